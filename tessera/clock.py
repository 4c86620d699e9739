"""Time, injectable so that rules about expiry can be tested without sleeping."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Clock(Protocol):
    """Tells the current time as an aware UTC datetime."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


def to_timestamp(value: dt.datetime | None) -> Timestamp | None:
    """An aware datetime as a protobuf Timestamp; None stays None (field left unset)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone(dt.UTC)  # as before: a naive time is the local time
    # Exact (no float) and cheap: it is on every heartbeat acknowledgement.
    since = value - EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def from_timestamp(stamp: Timestamp) -> dt.datetime:
    """A protobuf Timestamp as an aware UTC datetime."""
    return stamp.ToDatetime(tzinfo=dt.UTC)
