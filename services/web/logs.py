"""Process logging of the services: one line per record on stderr, JSON by default.

`configure_logging(service, fmt, level)` is for a command line (`dapdee serve ...`): it
replaces the root logger's handlers with one stream handler, so every logger of the process
(ours, uvicorn's, libraries') writes through it; `logging_config(...)` is the same as a
dictConfig schema, for uvicorn's `log_config` (applied again in each worker process).
Libraries and app factories never call either.

JSON lines carry `ts` (ISO-8601 UTC, milliseconds), `level`, `service`, `logger`, `msg`, the
`trace_id`/`span_id` of the current trace context (so application lines of a request carry the
request's ids), `exc` for an exception, and every `extra={...}` field of the call (the access
log's `method`, `path`, `status`, `duration_ms`, ...). Text lines are for people reading a
terminal: `ts LEVEL [service] logger trace=…: message`.
"""

from __future__ import annotations

import json
import logging
import logging.config
import math
from datetime import datetime, timezone
from typing import Any, TextIO

from dapdee.tracecontext import current

FORMATS = ("json", "text")
LEVELS = ("critical", "error", "warning", "info", "debug")
# attributes every LogRecord has: what is left in a record's __dict__ came through `extra`
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_OURS = {"trace_id", "span_id"}  # set by TraceFields, written by the formatters themselves
_DROPPED = {"color_message"}  # uvicorn's coloured copy of the message


class TraceFields(logging.Filter):
    """Adds `trace_id` and `span_id` of the current trace context to each record that does not
    carry them already (None outside a request). Runs in the logging thread: O(1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            ctx = current()
            record.trace_id = ctx.trace_id if ctx is not None else None
            record.span_id = ctx.span_id if ctx is not None else None
        return True


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring). O(record size)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "service": getattr(record, "service", self.service),  # a record may name its own
            "logger": record.name,
            "msg": record.getMessage(),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in _OURS and key not in _DROPPED and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        try:
            return json.dumps(out, default=str, ensure_ascii=False, allow_nan=False)
        except ValueError:  # a non-finite float: JSON has none, so it is written as a string
            return json.dumps(_finite(out), default=str, ensure_ascii=False)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float, in dicts, lists and tuples too, as its string
    ("nan", "inf", "-inf"). O(size of value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class TextFormatter(logging.Formatter):
    """`ts LEVEL [service] logger trace=<trace>/<span>: message` (trace part only in a request)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        trace_id = getattr(record, "trace_id", None)
        where = f" trace={trace_id}/{getattr(record, 'span_id', None)}" if trace_id else ""
        service = getattr(record, "service", self.service)
        line = (
            f"{_timestamp(record.created)} {record.levelname} [{service}] {record.name}{where}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def logging_config(service: str, fmt: str = "json", level: str = "info", stream: Any = None) -> dict[str, Any]:
    """The `logging.config.dictConfig` schema of the process logging: one stream handler (stderr
    unless `stream`) on the root logger writing `fmt` lines at `level` and above, with the trace
    fields; uvicorn's loggers lose their own handlers and propagate to it, so there is one format.
    Also uvicorn's `log_config`, which it applies in each worker process too. ValueError naming a
    bad format or level. O(1)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"trace": {"()": TraceFields}},
        "formatters": {"line": {"()": JsonFormatter if fmt == "json" else TextFormatter, "service": service}},
        "handlers": {
            "stream": {
                "class": "logging.StreamHandler",
                "stream": stream if stream is not None else "ext://sys.stderr",
                "formatter": "line",
                "filters": ["trace"],
            }
        },
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
        "root": {"handlers": ["stream"], "level": level.upper()},
    }


def configure_logging(service: str, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Apply `logging_config(...)`: every logger of the process writes through one handler.
    For command lines only: it replaces process-wide logging state."""
    logging.config.dictConfig(logging_config(service, fmt, level, stream))


def add_log_arguments(parser: Any) -> None:
    """`--log-format json|text` (default json) on an argparse parser."""
    parser.add_argument(
        "--log-format",
        default="json",
        choices=FORMATS,
        help="stderr log lines: one JSON object each (default) or plain text",
    )
