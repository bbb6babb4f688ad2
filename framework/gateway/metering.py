"""Who used what: per-client metering (Prometheus and an admin snapshot) and the access log.

    meter = Meter(metrics)                      # the gateway's MetricsRegistry, or None
    stack = [access_log_middleware(meter), ...] # outermost: it must see every final status

`Meter` counts each request's call, bytes in and bytes out per client, route and status class,
and exposes them two ways:

- Prometheus: `gateway_requests_total{route,client,status}` (status is the class: `2xx`...),
  `gateway_request_bytes_total{client,direction}` (`in`/`out`) and the histogram
  `gateway_request_seconds{route}`.
- `Meter.snapshot()`: exact numbers per client and route for the admin API and for charging;
  `snapshot(reset=True)` hands over the usage since the previous reset, so a billing job can
  drain it periodically.

Bounded cardinality, the choice made here: the first `label_clients` distinct clients get their
own `client` label and every later one is counted as `client="other"`. Not "top N by calls":
a series, once exposed, has to keep counting (dropping it reads as a counter reset and moves
usage between clients), and a gateway's real clients (API keys, partners) show up early. The
snapshot keeps exact numbers for up to `max_clients` clients; usage of clients beyond that is
added up under `other`, so totals stay right. Anonymous callers (no identity, or the `anonymous`
method) are one client, `anonymous`, in both: their addresses would otherwise fill both bounds.

`access_log_middleware` writes ONE JSON line per request on the logger
`framework.gateway.access` (through `framework.observability.logging`), also when an inner layer
raised: `GatewayError` with its status, any other exception as 500, a cancelled request (the
client went away) as 499; the exception is then re-raised for the outer layer to answer. When the
logger is not enabled for the line's level, the line is not even built.

`AccessLog` takes the writing of those lines off the event loop (`msa gateway` starts it):

    access_log = AccessLog.from_env()   # MSA_ACCESS_LOG_FILE, or the service log's stderr
    access_log.start()                  # before the gateway starts
    ...
    access_log.stop()                   # after it stopped: every queued line is written

While it runs, the access logger hands its records to a `logging.handlers.QueueHandler` that
appends them to a buffer (on the loop: no formatting, no I/O, no thread woken), and a writer
thread takes the buffer's records every `interval` (50 ms), formats and writes them: to the
file `MSA_ACCESS_LOG_FILE` names, instead of stderr, when set (JSON lines, appended, one write
per batch), else to the root logger's handlers (the service log, stderr), where they went
before. Appending (O_APPEND) makes the file safe to rotate by copytruncate: after a truncation the
next line lands at the new end, at offset 0, with no reopening.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from aiohttp import web

from framework.errors import ConfigurationError
from framework.gateway.types import Exchange, GatewayError, GatewayHandler, GatewayMiddleware
from framework.observability.logging import JsonFormatter
from framework.observability.metrics import CounterChild, HistogramChild, MetricsRegistry
from framework.observability.tracing import current_correlation_id, current_trace

__all__ = [
    "ACCESS_LOGGER",
    "FILE_VARIABLE",
    "AccessLog",
    "ClientUsage",
    "Meter",
    "RouteUsage",
    "access_log_middleware",
    "account",
    "failure_status",
]

ACCESS_LOGGER = "framework.gateway.access"
FILE_VARIABLE = "MSA_ACCESS_LOG_FILE"
ANONYMOUS = "anonymous"
OTHER = "other"


class RouteUsage(TypedDict):
    calls: int
    bytes_in: int
    bytes_out: int
    status: dict[str, int]
    """Calls by status class (`2xx`, `4xx`...)."""


class ClientUsage(TypedDict):
    calls: int
    bytes_in: int
    bytes_out: int
    routes: dict[str, RouteUsage]


@dataclass(slots=True)
class _Usage:
    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    status: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, bytes_in: int, bytes_out: int) -> None:
        self.calls += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.status[status] = self.status.get(status, 0) + 1


@dataclass(slots=True)
class _ClientTotals:
    total: _Usage = field(default_factory=_Usage)
    routes: dict[str, _Usage] = field(default_factory=dict)


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class Meter:
    """Per-client usage counters; see the module docstring for the metrics and the bounds."""

    def __init__(
        self,
        metrics: MetricsRegistry | None = None,
        *,
        label_clients: int = 100,
        max_clients: int = 10_000,
    ) -> None:
        if label_clients < 0 or max_clients < 1:
            raise ConfigurationError("label_clients must be >= 0 and max_clients >= 1")
        self.label_clients = label_clients
        self.max_clients = max_clients
        self._labelled: set[str] = set()
        self._usage: dict[str, _ClientTotals] = {}
        self._series: dict[
            tuple[str, str, str], tuple[CounterChild, CounterChild, CounterChild, HistogramChild]
        ] = {}
        if metrics is None:
            self._requests = self._bytes = self._seconds = None
        else:
            self._requests = metrics.counter(
                "gateway_requests_total",
                "Requests through the gateway, by route, client and status class.",
                ("route", "client", "status"),
            )
            self._bytes = metrics.counter(
                "gateway_request_bytes_total",
                "Body bytes received from (in) and sent to (out) clients, by client.",
                ("client", "direction"),
            )
            self._seconds = metrics.histogram(
                "gateway_request_seconds", "Time to answer a request, by route.", ("route",)
            )

    def _label(self, client: str) -> str:
        if client == ANONYMOUS or client in self._labelled:
            return client
        if len(self._labelled) < self.label_clients:
            self._labelled.add(client)
            return client
        return OTHER

    def record(
        self,
        *,
        route: str,
        client: str | None,
        status: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        seconds: float = 0.0,
    ) -> None:
        """Count one request of `client` (None: anonymous) on `route`."""
        client = client or ANONYMOUS
        klass = _status_class(status)
        if self._requests is not None and self._bytes is not None and self._seconds is not None:
            label = self._label(client)
            key = (route, label, klass)
            series = self._series.get(key)
            if series is None:  # resolved once per route, client label and status class
                series = self._series[key] = (
                    self._requests.labels(route=route, client=label, status=klass),
                    self._bytes.labels(client=label, direction="in"),
                    self._bytes.labels(client=label, direction="out"),
                    self._seconds.labels(route=route),
                )
            calls, received, sent, latency = series
            calls.inc()
            if bytes_in:
                received.inc(bytes_in)
            if bytes_out:
                sent.inc(bytes_out)
            latency.observe(seconds)
        totals = self._usage.get(client)
        if totals is None:
            if len(self._usage) >= self.max_clients and client != OTHER:
                client = OTHER
                totals = self._usage.get(OTHER)
            if totals is None:
                totals = self._usage[client] = _ClientTotals()
        totals.total.add(klass, bytes_in, bytes_out)
        per_route = totals.routes.get(route)
        if per_route is None:
            per_route = totals.routes[route] = _Usage()
        per_route.add(klass, bytes_in, bytes_out)

    def snapshot(self, *, reset: bool = False) -> dict[str, ClientUsage]:
        """Usage per client (since start, or the last reset), ready to serve as JSON.

        `{"alice": {"calls": 3, "bytes_in": 10, "bytes_out": 512, "routes": {"products":
        {"calls": 3, "bytes_in": 10, "bytes_out": 512, "status": {"2xx": 2, "4xx": 1}}}}}`.
        The Prometheus counters are never reset.
        """
        out: dict[str, ClientUsage] = {
            client: {
                "calls": totals.total.calls,
                "bytes_in": totals.total.bytes_in,
                "bytes_out": totals.total.bytes_out,
                "routes": {
                    route: {
                        "calls": usage.calls,
                        "bytes_in": usage.bytes_in,
                        "bytes_out": usage.bytes_out,
                        "status": dict(usage.status),
                    }
                    for route, usage in totals.routes.items()
                },
            }
            for client, totals in self._usage.items()
        }
        if reset:
            self._usage = {}
        return out


def _metered_client(exchange: Exchange) -> str | None:
    client = exchange.client
    if client is None or client.method == "anonymous":
        return None
    return client.id


def _bytes_out(exchange: Exchange, response: web.StreamResponse | None) -> int:
    if response is None:
        return exchange.bytes_out
    if response.prepared:
        # Streamed by the handler: what it counted itself, else aiohttp's count of the bytes
        # written, which includes the status line, headers and chunk framing.
        return exchange.bytes_out or response.body_length
    try:
        length = response.content_length  # a web.Response's body, or a declared length
    except ValueError:  # a Content-Length header that is not a number
        length = None
    return exchange.bytes_out if length is None else length


def _access_fields(
    exchange: Exchange, status: int, latency: float, error: str | None
) -> dict[str, Any]:
    """The access-log line's own fields (see `access_log_middleware`)."""
    request = exchange.request
    fields: dict[str, Any] = {
        "route": exchange.route.name,
        "method": request.method,
        "path": request.path,
        "client": exchange.client.id if exchange.client is not None else None,
        "remote": request.remote,
        "status": status,
        "latency_ms": round(latency, 3),
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "upstream": exchange.upstream,
        "gtxid": exchange.gtxid,
        "request_id": exchange.request_id,
        "notes": dict(exchange.notes),
    }
    if error is not None:
        fields["error"] = error
    return fields


def failure_status(exc: BaseException) -> tuple[int, str]:
    """The status and `error` field an access-log line gives a request that ended in `exc`."""
    if isinstance(exc, GatewayError):
        return exc.status, exc.title
    if isinstance(exc, web.HTTPException):
        return exc.status, exc.reason
    if isinstance(exc, asyncio.CancelledError):
        return 499, "client closed the request"
    return 500, type(exc).__name__


def account(
    meter: Meter | None,
    log: logging.Logger,
    exchange: Exchange,
    response: web.StreamResponse | None,
    status: int,
    error: str | None,
) -> None:
    """Count a finished request on `meter` and write its access-log line to `log` (built only
    when `log` is enabled for the line's level): what `access_log_middleware` does once the
    layers inside it are done; the gateway's compiled routes call it directly."""
    latency = exchange.elapsed_ms()
    exchange.bytes_out = _bytes_out(exchange, response)
    if meter is not None:
        meter.record(
            route=exchange.route.name,
            client=_metered_client(exchange),
            status=status,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            seconds=latency / 1000,
        )
    level = logging.WARNING if status >= 500 else logging.INFO
    if log.isEnabledFor(level):
        request = exchange.request
        # Made and handled directly (what Logger.log does, less looking up the caller's frame:
        # an access-log line's source is always this function).
        record = log.makeRecord(
            log.name,
            level,
            __file__,
            0,
            "%s %s %d",
            (request.method, request.path, status),
            None,
            func="account",
            extra=_access_fields(exchange, status, latency, error),
        )
        log.handle(record)


def access_log_middleware(
    meter: Meter | None, logger: logging.Logger | None = None
) -> GatewayMiddleware:
    """Log one JSON line per request (and count it on `meter`); place it outermost.

    The line's fields: `route`, `method`, `path` (without the query, which may carry secrets),
    `client` (the identity's id, None without one), `remote`, `status`, `latency_ms`,
    `bytes_in`, `bytes_out` (the final response's body length; for a streamed response
    `exchange.bytes_out` if the handler counted, else all bytes written, headers included),
    `upstream`, `gtxid`, `request_id`, `notes` (`exchange.notes` as one object, so a note can
    never replace a field) and, when an inner layer raised, `error`. Level INFO, WARNING for
    5xx; when `logger` is not enabled for that level, nothing of the line is built (the request
    is still counted on `meter`).
    """
    log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)

    async def access_log(exchange: Exchange, call_next: GatewayHandler) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            response = await call_next(exchange)
        except BaseException as exc:
            status, error = failure_status(exc)
            account(meter, log, exchange, None, status, error)
            raise
        account(meter, log, exchange, response, response.status, None)
        return response

    return access_log


# -- the access log's writer -------------------------------------------------------------------


class _Buffer(logging.handlers.QueueHandler):
    """Puts a record in the writer's buffer as it is, with the log context stamped on it.

    The formatter runs in the writer's thread, where the contextvars `JsonFormatter` reads are
    unset: the correlation and trace ids are copied onto the record here (the formatter prefers
    a record's own), in the task that logged (`service` is the formatter's: `msa gateway` sets
    no other). Nothing else is done on the loop: the message's arguments are immutable (method,
    path, status) and the fields a fresh dict, so the record is neither formatted nor copied
    (stdlib's `prepare` does both, for queues to other processes), and appending to a deque
    wakes no thread (a queue's `put` would wake the writer, and hand it the GIL, once a line).
    """

    queue: deque[logging.LogRecord]  # type: ignore[assignment]

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        attributes = record.__dict__
        if "correlation_id" not in attributes:
            correlation_id = current_correlation_id.get()
            if correlation_id is not None:
                attributes["correlation_id"] = correlation_id
        trace = current_trace.get()
        if trace is not None:
            attributes.setdefault("trace_id", trace.trace_id)
            attributes.setdefault("span_id", trace.span_id)
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.append(record)


class _Lines(logging.FileHandler):
    """The file target: lines appended, flushed (written) once per batch, not once per line."""

    batching = False

    def flush(self) -> None:
        if not self.batching:
            super().flush()


class _Writer(threading.Thread):
    """Every `interval` seconds, and once more when stopped, hands what the buffer holds to
    `target` (one write per batch for the file)."""

    def __init__(
        self, records: deque[logging.LogRecord], target: logging.Handler, interval: float
    ) -> None:
        super().__init__(name="access-log", daemon=True)
        self.records = records
        self.target = target
        self.interval = interval
        self.stopping = threading.Event()
        """Set by `AccessLog.stop()`: the writer drains what is buffered and ends."""

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.drain()
        self.drain()

    def drain(self) -> None:
        records, target = self.records, self.target
        lines = target if isinstance(target, _Lines) else None
        while records:
            if lines is not None:
                lines.batching = True
            try:
                for _ in range(len(records)):
                    record = records.popleft()
                    if record.levelno >= target.level:
                        target.handle(record)
            finally:
                if lines is not None:
                    lines.batching = False
                    lines.flush()


class _RootHandlers(logging.Handler):
    """Hands a record to the root logger's handlers, as propagation would have (each handler
    takes its own lock, so lines from the loop's thread and the listener's never interleave)."""

    def handle(self, record: logging.LogRecord) -> bool:
        logging.getLogger().callHandlers(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        self.handle(record)


class AccessLog:
    """Writes the access log from a thread while started (module docstring).

    `file`: append the lines (JSON, formatted for `service`) to this file instead of stderr;
    None: the root logger's handlers (the service log) write them, as without an `AccessLog`.
    The loop only appends each record to a buffer; the writer thread takes what is there every
    `interval` seconds, so a line is written within about that long, and the loop's thread and
    the writer's contend for the GIL a few times a second, not once a line (with a queue that
    wakes its reader on every line, writing the log cost the plain-proxy benchmark ~250 us of
    CPU per request; batched, ~20).
    `start()` raises `ConfigurationError` when the file cannot be opened. `stop()` writes every
    line still queued, then returns the access logger to logging synchronously; both are
    idempotent.
    """

    def __init__(
        self,
        file: str | Path | None = None,
        *,
        service: str = "gateway",
        logger: logging.Logger | None = None,
        interval: float = 0.05,
    ) -> None:
        self.file = Path(file) if file is not None else None
        self.service = service
        self.logger = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self.interval = interval
        self._writer: _Writer | None = None
        self._queue_handler: logging.Handler | None = None
        self._target: logging.Handler | None = None
        self._propagate = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> AccessLog:
        """An `AccessLog` to the file `MSA_ACCESS_LOG_FILE` names (unset or empty: stderr)."""
        env = os.environ if environ is None else environ
        file = env.get(FILE_VARIABLE, "").strip()
        return cls(file or None, **options)

    @property
    def running(self) -> bool:
        return self._writer is not None

    @property
    def stopping(self) -> threading.Event | None:
        """Set once `stop()` has begun (None when not running): for tests that hold the
        writer while lines are still buffered."""
        return None if self._writer is None else self._writer.stopping

    def start(self) -> None:
        if self._writer is not None:
            return
        target: logging.Handler
        if self.file is not None:
            try:
                target = _Lines(self.file, mode="a", encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"{FILE_VARIABLE}={str(self.file)!r}: cannot open the access log: {exc}"
                ) from exc
            target.setFormatter(JsonFormatter(self.service))
        else:
            target = _RootHandlers()
        records: deque[logging.LogRecord] = deque()
        writer = _Writer(records, target, self.interval)
        writer.start()
        self._writer, self._target = writer, target
        self._queue_handler = _Buffer(records)  # type: ignore[arg-type]
        self._propagate = self.logger.propagate
        self.logger.addHandler(self._queue_handler)
        self.logger.propagate = False

    def stop(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._queue_handler is not None:
            self.logger.removeHandler(self._queue_handler)
            self._queue_handler = None
        self.logger.propagate = self._propagate
        writer.stopping.set()
        writer.join()  # it drains the buffer before it ends: every line logged is written
        self._writer = None
        if self._target is not None:
            self._target.close()
            self._target = None
