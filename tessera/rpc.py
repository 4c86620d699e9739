"""Rich gRPC statuses, both ways: ``rich_status`` builds a status carrying a
google.rpc.ErrorInfo (and RetryInfo), and ``error_info``, ``reason_of`` and
``retry_delay`` read them back from a failed call.

Client-safe: it ships in the client wheel. How servers turn domain errors into such
statuses is ``tessera.server.error_table``; the handler wrappers are
``tessera.server.handlers``.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str],
    retry_after: float | None = None,
) -> grpc.Status:
    """A status carrying a google.rpc.ErrorInfo in ``grpc-status-details-bin``, and a
    google.rpc.RetryInfo when ``retry_after`` (seconds) is given."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata))
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(retry_after * 1e9)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a server attached to a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The seconds a server's google.rpc.RetryInfo asks the caller to wait, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The machine-readable reason of a failed call, or '' when the server gave none."""
    info = error_info(error)
    return info.reason if info is not None else ""
