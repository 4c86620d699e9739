"""A synchronous LicenseClient for applications without an event loop.

The client runs its own event loop in a daemon thread; every call waits for its result
there. Leases heartbeat, resume and fail over in that thread, and ``on_event`` callbacks
run in it too (keep them short; hand work to your own thread or queue)::

    with SyncLicenseClient("@localhost") as client:
        with client.lease("client.station") as lease:
            ...

``close()`` (and leaving ``with``) checks in every license still held and stops the
thread; an ``atexit`` hook does the same at interpreter exit for a client never closed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime as dt
import functools
import threading
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar, Unpack

from clients.client import FeatureInformation, LicenseClient
from clients.errors import LicenseLost
from clients.license import EventCallback, License, LicenseState
from clients.settings import ClientKeywords, ClientOptions

T = TypeVar("T")


class SyncLicense:
    """A License (network lease or local license) seen from another thread."""

    def __init__(self, client: SyncLicenseClient, license: License) -> None:
        self._client = client
        self.license = license

    @property
    def feature(self) -> str:
        return self.license.feature

    @property
    def count(self) -> int:
        return self.license.count

    @property
    def kind(self) -> str:
        return self.license.kind

    @property
    def state(self) -> LicenseState:
        return self.license.state

    @property
    def held(self) -> bool:
        return self.license.held

    @property
    def lost(self) -> LicenseLost | None:
        return self.license.lost

    @property
    def expires_at(self) -> dt.datetime | None:
        return self.license.expires_at

    def check(self) -> None:
        """Raise the LicenseLost if the license was lost."""
        self.license.check()

    def wait_lost(self, timeout: float | None = None) -> LicenseLost | None:
        """Block until the license ends (the LicenseLost, or None when checked in) or
        ``timeout`` passes (TimeoutError)."""
        return self._client._run(self.license.wait_lost(), timeout)

    def release(self) -> bool:
        """Check the license in; see License.release."""
        return self._client._run(self.license.release())

    def __enter__(self) -> SyncLicense:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class SyncLicenseClient:
    """LicenseClient's API, blocking; the same arguments as LicenseClient (a ClientOptions
    or its fields as keyword arguments)."""

    def __init__(
        self,
        address: str,
        options: ClientOptions | None = None,
        **keywords: Unpack[ClientKeywords],
    ) -> None:
        # Built first: an invalid address raises before any thread or network call.
        self._client = LicenseClient(address, options, **keywords)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tessera-license-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    @property
    def client(self) -> LicenseClient:
        """The asynchronous client underneath (use it only from the client's thread)."""
        return self._client

    @property
    def address(self) -> str:
        return self._client.address

    def acquire(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> SyncLicense:
        """A network lease (see LicenseClient.acquire); release it when done."""
        lease = self._run(
            self._client.acquire(feature, count, ttl=ttl, wait=wait, on_event=on_event)
        )
        return SyncLicense(self, lease)

    def check_out(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> SyncLicense:
        """Local license first, else a network lease (see LicenseClient.check_out)."""
        license = self._run(
            self._client.check_out(feature, count, ttl=ttl, wait=wait, on_event=on_event)
        )
        return SyncLicense(self, license)

    @contextlib.contextmanager
    def lease(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> Iterator[SyncLicense]:
        """``with`` a network lease; checked in on exit."""
        with self.acquire(feature, count, ttl=ttl, wait=wait, on_event=on_event) as lease:
            yield lease

    @contextlib.contextmanager
    def license(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> Iterator[SyncLicense]:
        """``with`` a license by the start-up rule; checked in on exit."""
        with self.check_out(feature, count, ttl=ttl, wait=wait, on_event=on_event) as license:
            yield license

    def declare_requirement(self, feature: str, required: int) -> None:
        self._run(self._client.declare_requirement(feature, required))

    def license_information(self, feature: str = "") -> list[FeatureInformation]:
        return self._run(self._client.license_information(feature))

    def close(self) -> None:
        """Check in every license still held and stop the client's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._exit_hook)
        try:
            self._run(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _shutdown(self) -> None:
        await self._client.close()
        # Whatever still waits (a wait_lost given up on) ends before the loop does.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> SyncLicenseClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed and not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError("the SyncLicenseClient is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except BaseException:  # a timeout, or Ctrl-C in the waiting thread
            future.cancel()
            raise


def _close_at_exit(reference: weakref.ref[SyncLicenseClient]) -> None:
    client = reference()
    if client is not None:
        client.close()
