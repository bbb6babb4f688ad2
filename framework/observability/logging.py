"""Structured logs: one JSON object per line, with service, correlation id and trace id.

    configure_logging("orders")  # once, at process start
    log = logging.getLogger("orders.checkout")
    with use_correlation_id("c-17"), use_trace(TraceContext.new_root()):
        log.info("order placed", extra={"order_id": "o-17", "total": 12.5})

writes (on one line)

    {"time":"2026-11-25T08:00:00.123Z","level":"INFO","logger":"orders.checkout",
     "message":"order placed","service":"orders","correlation_id":"c-17",
     "trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7",
     "order_id":"o-17","total":12.5}

`correlation_id`, `trace_id` and `span_id` come from the contextvars of
`framework.observability.tracing` at the moment the line is formatted, and are left out when
unset; a caller can also pass them in `extra`, which wins. Other `extra` fields are copied as they
are (values orjson cannot encode are written as `str(value)`); they cannot replace the fixed fields
above. An exception adds `exception` (the formatted traceback), `stack_info` adds `stack`.

`service` is the service whose work is running (`current_service`, which the bus sets for every
task of its consumers, so a process running several services, like `msa shop`, names the right
one), else the name given to `configure_logging`. The framework's own lines about a message carry
the same context as its handler's lines: the consumer logs a retry, a dead letter or an unhandled
type inside the message's correlation id and trace (the trace id of the message's `traceparent`,
which all its attempts share).

Formatting reads the contextvars, so it must happen in the thread and task that logged: keep the
JSON handler synchronous (a `StreamHandler`, as `configure_logging` installs), or stamp records
with the ids before handing them to a queue.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson

from framework.errors import ConfigurationError
from framework.observability.tracing import (
    current_correlation_id,
    current_service,
    current_trace,
)

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

LEVEL_VARIABLE = "MSA_LOG_LEVEL"
FORMAT_VARIABLE = "MSA_LOG_FORMAT"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}
# Fields the formatter writes itself (an `extra` of the same name does not replace them).
_FIXED_FIELDS = frozenset({"time", "level", "logger", "message", "service", "exception", "stack"})
_CONTEXT_FIELDS = frozenset({"correlation_id", "trace_id", "span_id"})


def _fallback(value: object) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring for the fields)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second: tuple[int, str] = (-1, "")  # (unix second, its RFC 3339 prefix)

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached_second, prefix = self._second
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)  # one assignment: safe to race between threads
        return f"{prefix}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        attributes = record.__dict__
        line: dict[str, Any] = {
            "time": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": current_service.get() or self.service,
        }
        correlation_id = attributes.get("correlation_id") or current_correlation_id.get()
        if correlation_id is not None:
            line["correlation_id"] = correlation_id
        trace = current_trace.get()
        trace_id = attributes.get("trace_id") or (trace.trace_id if trace is not None else None)
        if trace_id is not None:
            line["trace_id"] = trace_id
        span_id = attributes.get("span_id") or (trace.span_id if trace is not None else None)
        if span_id is not None:
            line["span_id"] = span_id
        if record.exc_info and not record.exc_text:  # cached on the record, like logging's
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for key, value in attributes.items():
            if (
                key not in _RECORD_ATTRIBUTES
                and key not in _FIXED_FIELDS
                and key not in _CONTEXT_FIELDS
            ):
                line[key] = value
        try:
            return orjson.dumps(line, default=_fallback).decode()
        except orjson.JSONEncodeError:  # e.g. an int beyond 64 bits inside an extra
            for key, value in line.items():
                try:
                    orjson.dumps(value, default=_fallback)
                except orjson.JSONEncodeError:
                    line[key] = str(value)
            return orjson.dumps(line, default=_fallback).decode()


class TextFormatter(logging.Formatter):
    """A human-readable line with the same context, for a terminal (`MSA_LOG_FORMAT=text`).

    `2026-11-25 08:00:00,123 INFO orders.checkout [orders c-17 4bf92f35...] order placed`
    """

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.service = service

    def formatMessage(self, record: logging.LogRecord) -> str:
        context = current_service.get() or self.service
        correlation_id = record.__dict__.get("correlation_id") or current_correlation_id.get()
        if correlation_id is not None:
            context += f" correlation_id={correlation_id}"
        trace = current_trace.get()
        if trace is not None:
            context += f" trace_id={trace.trace_id}"
        return f"{record.asctime} {record.levelname} {record.name} [{context}] {record.message}"


class _ServiceLogHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs; recognised (and replaced) on the next call."""


def _level_from(value: str | int) -> int:
    if isinstance(value, int):
        return value
    levels = logging.getLevelNamesMapping()
    name = value.strip().upper()
    if name in levels:
        return levels[name]
    raise ConfigurationError(
        f"unknown log level {value!r} (expected one of {', '.join(sorted(levels))})"
    )


def configure_logging(
    service: str,
    *,
    level: str | int | None = None,
    stream: TextIO | None = None,
    json: bool | None = None,
) -> logging.Handler:
    """Send the root logger's records to `stream` (default stderr) as JSON lines for `service`.

    `level` defaults to `MSA_LOG_LEVEL` (else `INFO`); `json` defaults to `MSA_LOG_FORMAT`
    (`json` or `text`, else `json`). Calling it again replaces the handler it installed before
    (to change service, level, format or stream) instead of adding a second one; handlers
    installed by others (pytest's capture, a test's own) are left alone. Returns the handler.
    """
    if level is None:
        level = os.environ.get(LEVEL_VARIABLE) or "INFO"
    resolved_level = _level_from(level)
    if json is None:
        chosen = (os.environ.get(FORMAT_VARIABLE) or "json").strip().lower()
        if chosen not in {"json", "text"}:
            raise ConfigurationError(
                f"{FORMAT_VARIABLE}={chosen!r} is not a log format (expected json or text)"
            )
        json = chosen == "json"

    handler = _ServiceLogHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json else TextFormatter(service))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _ServiceLogHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(resolved_level)
    return handler
