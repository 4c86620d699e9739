"""Log lines as text or JSON, stamped with the request id of the call that wrote them.

The call observer (``tessera.observed_calls``) puts each RPC's request id in a context
variable; every log record made while the call runs (and in the tasks it starts) carries
it as ``record.request_id``. ``--log-format json`` writes one JSON object a line: ``ts``,
``level``, ``logger``, ``message``, ``service``, ``request_id`` (null outside a call) and
``exception`` when there is one.

Secrets stay out of the code's own log calls; as a second line of defence both formats
mask what looks like a bearer credential or a secret/token/key value in a formatted line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from contextvars import ContextVar
from typing import IO, Any

LOG_FORMATS = ("text", "json")

request_id_var: ContextVar[str] = ContextVar("tessera_request_id", default="")

_REDACTED = "[redacted]"
# "Bearer abc", "authorization: abc", lease_secret="abc", 'vendor_token': 'abc', …
_SECRET_PATTERNS = (
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{16,}"),
    re.compile(
        r"(?i)(\b(?:authorization|[a-z_]*secret|[a-z_]*token|private_key|signing_key)"
        r"['\"]?\s*[:=]\s*['\"]?)(?!\[redacted\]|bearer\b)[^\s'\",;)}\]]+"
    ),
)


def current_request_id() -> str:
    """The request id of the call running in this context, or ''."""
    return request_id_var.get()


def redact(text: str) -> str:
    """``text`` with what looks like a credential or secret value masked."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + _REDACTED, text)
    return text


_factory_installed = False


def stamp_request_ids() -> None:
    """Make every log record carry ``request_id`` from the running call (idempotent)."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with ``[request id]`` inside a call; masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "")
        record.request = f" [{request_id}]" if request_id else ""
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "service": self.service,
            "request_id": getattr(record, "request_id", "") or None,
        }
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter_for(log_format: str, service: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(service)
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")


# Libraries whose DEBUG lines carry what must stay out of logs: aiosqlite writes every
# statement with its parameters (lease secret hashes, registration details).
QUIET_LIBRARIES = ("aiosqlite",)


def configure_logging(
    level: str, log_format: str = "text", service: str = "", stream: IO[str] | None = None
) -> None:
    """Log lines on ``stream`` (stderr), as text or JSON, at ``level``; replaces earlier
    handlers. Even at DEBUG, the libraries in QUIET_LIBRARIES say no more than INFO."""
    stamp_request_ids()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(log_format, service))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
