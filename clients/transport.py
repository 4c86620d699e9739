"""gRPC plumbing for the client: fail-fast connections and one lease stream's messages.

Every attempt gets a fresh channel with its own subchannel pool. grpc otherwise shares
connections between channels to the same target, with its own reconnect backoff (up to
two minutes), and a new channel would keep failing fast long after its License Server
came back; the client's resume loop applies its own jittered backoff instead. Channels
are TLS when the client was given a ``ClientTls`` (``tessera.tls``), else plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from clients.errors import LicenseError, LicenseServerUnreachable, error_from_rpc
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.tls import ClientTls, open_channel

# No keepalive pings (a server may refuse them as too frequent): heartbeats and their
# acknowledgements already prove the stream is alive.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]


async def connect(target: str, within: float, tls: ClientTls | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` that is READY, or LicenseServerUnreachable. A refused
    connection (or a failed TLS handshake) fails at once (no waiting through grpc's
    reconnect backoff), so trying the ten ports of ``@host`` is quick."""
    channel = open_channel(target, tls, CHANNEL_OPTIONS)
    try:
        async with asyncio.timeout(within):
            state = channel.get_state(try_to_connect=True)
            while state is not grpc.ChannelConnectivity.READY:
                if state in (
                    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                    grpc.ChannelConnectivity.SHUTDOWN,
                ):
                    raise LicenseServerUnreachable("nothing answers on this port", server=target)
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        await channel.close()
        raise LicenseServerUnreachable(
            f"no answer within {within:g} s",
            code=grpc.StatusCode.DEADLINE_EXCEEDED,
            server=target,
        ) from None
    except BaseException:
        await channel.close()
        raise
    return channel


@contextlib.asynccontextmanager
async def connected(
    target: str, within: float, tls: ClientTls | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    channel = await connect(target, within, tls)
    try:
        yield channel
    finally:
        await channel.close()


@dataclass(frozen=True)
class StreamEnded:
    """The lease stream ended: ``error`` is the status it ended with (None for OK)."""

    error: LicenseError | None


class ReleaseRequested:
    """Put on a stream's inbox by Lease.release: check in on this stream."""


RELEASE = ReleaseRequested()

Item = pb.LeaseResponse | StreamEnded | ReleaseRequested


class LeaseStream:
    """One ``LeaseService.Lease`` call on its own channel. A reader task moves every
    response (and finally the end of the stream) into ``inbox``, so waiting for the next
    item can time out without cancelling the call."""

    def __init__(
        self,
        target: str,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.target = target
        self.channel = channel
        self.call = pb_grpc.LeaseServiceStub(channel).Lease(metadata=metadata)
        self.inbox: asyncio.Queue[Item] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(), name=f"tessera lease stream {target}")

    @classmethod
    async def open(
        cls,
        target: str,
        within: float,
        tls: ClientTls | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> LeaseStream:
        return cls(target, await connect(target, within, tls), metadata)

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self.inbox.put_nowait(StreamEnded(None))
                    return
                assert isinstance(response, pb.LeaseResponse)
                self.inbox.put_nowait(response)
        except grpc.aio.AioRpcError as error:
            self.inbox.put_nowait(StreamEnded(error_from_rpc(error, self.target)))
        except asyncio.CancelledError:
            self.inbox.put_nowait(
                StreamEnded(
                    LicenseServerUnreachable("the stream was cancelled", server=self.target)
                )
            )
            raise

    async def send(self, request: pb.LeaseRequest) -> LicenseError | None:
        """Write ``request``; the error when the stream is no longer writable."""
        try:
            await self.call.write(request)
        except grpc.aio.AioRpcError as error:
            return error_from_rpc(error, self.target)
        except asyncio.InvalidStateError:
            return LicenseServerUnreachable("the lease stream has ended", server=self.target)
        return None

    async def next(self, within: float) -> Item:
        """The next response, end of stream or release request; TimeoutError when none
        comes ``within`` seconds."""
        async with asyncio.timeout(max(within, 0.0)):
            return await self.inbox.get()

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.wait([self._reader])
        await self.channel.close()
