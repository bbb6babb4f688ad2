"""The gateway's door: what one client connection may cost before a request reaches a route.

aiohttp parses HTTP; a `ConnectionGuard` sits between the socket and aiohttp's protocol for each
connection and enforces what aiohttp does not (nginx's `client_header_timeout` and
`large_client_header_buffers`, Envoy's `request_headers_timeout` and `max_request_headers_kb`):

- **Header timeout**: from a connection's start, or from the first byte of the next request on a
  kept-alive one, the headers must be complete within `header_timeout` seconds. A client that
  sent part of a request then gets a 408 and the connection is closed; one that sent nothing is
  closed quietly.
- **Header volume**: the request line and headers may hold at most `max_header_bytes` bytes and
  `max_headers` lines; over either, a 431 and the connection is closed, before aiohttp parses or
  buffers more of it.
- **Connections**: at most `max_connections` open at once (`ConnectionLimit`, shared by one
  gateway's listeners); the next gets a 503 and is closed at once.

The guard only looks for the blank line that ends a request's headers, so it needs no parser of
its own; aiohttp's parser still refuses malformed requests. Once headers are complete the
connection belongs to aiohttp and the route's handler, which tells the guard when a request
begins and ends (`request_started`, `request_finished`, found with `guard_of(request)`); the body
and its timeouts are the handler's (`framework.gateway.qos.body_limit_middleware`).

    limit = ConnectionLimit(config.gateway.limits.max_connections)
    server = await loop.create_server(
        lambda: ConnectionGuard(web_server(), limits, limit), host, port
    )
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Literal, cast

import orjson
from aiohttp import web

from framework.gateway.config import LimitsConfig
from framework.gateway.types import status_title
from framework.http import problem
from framework.observability.metrics import MetricsRegistry

__all__ = ["ConnectionGuard", "ConnectionLimit", "GatewayProtocol", "guard_of"]

log = logging.getLogger("framework.gateway.guard")

_END_OF_HEAD: Final = b"\r\n\r\n"
_LINGER_SECONDS: Final = 2.0
_LINGER_BYTES: Final = 1 << 20
"""After a refusal, what is read and dropped before the connection is closed anyway."""


def _answer(status: int, detail: str) -> bytes:
    """A complete HTTP/1.1 problem response that closes the connection."""
    title = status_title(status)
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    extra = "Retry-After: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nServer: {SERVER_NAME}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionLimit:
    """Open connections of one gateway, against `maximum`, and why the guards closed any.

    With `metrics`, the same numbers are `gateway_open_connections` and
    `gateway_connections_closed_total{reason}` (`capacity`, `header_timeout`, `header_size`).
    """

    def __init__(self, maximum: int, metrics: MetricsRegistry | None = None) -> None:
        self.maximum = maximum
        self.open = 0
        self.closed: dict[str, int] = {"capacity": 0, "header_timeout": 0, "header_size": 0}
        self._closed_total = (
            metrics.counter(
                "gateway_connections_closed_total",
                "Client connections the gateway closed at its door, by reason.",
                ("reason",),
            )
            if metrics is not None
            else None
        )
        if metrics is not None:
            metrics.gauge("gateway_open_connections", "Client connections open now.").set_function(
                lambda: self.open
            )

    def count_closed(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        if self._closed_total is not None:
            self._closed_total.labels(reason=reason).inc()


class ConnectionGuard(asyncio.Protocol):
    """One client connection: enforces the header timeout and volume, then hands every byte to
    `inner` (aiohttp's request handler) unchanged."""

    def __init__(self, inner: asyncio.Protocol, limits: LimitsConfig, limit: ConnectionLimit):
        self._inner = inner
        self._limits = limits
        self._limit = limit
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._closed = False
        self._state: Literal["head", "request", "idle"] = "head"
        self._head_bytes = 0
        self._head_lines = 0
        self._tail = b""
        self._active = 0
        self._discarded = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if self._limit.open >= self._limit.maximum:
            self._refused = True
            self._limit.count_closed("capacity")
            transport.write(_answer(503, "the gateway has too many open connections"))
            transport.close()
            return
        self._limit.open += 1
        self._inner.connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        if self._refused:
            return
        self._limit.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            self._discarded += len(data)  # lingering: read what the client still sends
            if self._discarded > _LINGER_BYTES and self._transport is not None:
                self._transport.close()
            return
        if self._state == "idle":  # the first byte of the next request on a kept-alive connection
            self._start_head()
            if not self._scan_head(data):
                return
            if self._reading_head():  # not all of it yet: its clock runs from now
                self._arm()
        elif self._state == "head" and not self._scan_head(data):
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()

    # -- what the handler tells it ---------------------------------------------------------------

    def request_started(self) -> None:
        """A request's headers were parsed: its time is the handler's from here."""
        self._active += 1
        self._state = "request"
        self._disarm()

    def request_finished(self) -> None:
        """The handler answered; the next byte starts the next request's header clock."""
        self._active = max(0, self._active - 1)
        if self._active == 0:
            self._state = "idle"

    # -- the head of a request -------------------------------------------------------------------

    def _start_head(self) -> None:
        """A new head begins; the caller arms its clock unless the head came whole (the common
        case: no timer is made and cancelled for it)."""
        self._state = "head"
        self._head_bytes = 0
        self._head_lines = 0
        self._tail = b""

    def _reading_head(self) -> bool:
        return self._state == "head"

    def _scan_head(self, data: bytes) -> bool:
        """Count the head's bytes and lines; False when it broke a limit (and was answered)."""
        window = self._tail + data
        end = window.find(_END_OF_HEAD)
        head = window if end < 0 else window[: end + 2]
        size = self._head_bytes + len(head) - len(self._tail)
        lines = self._head_lines + head.count(b"\n", len(self._tail))
        if size > self._limits.max_header_bytes or lines > self._limits.max_headers + 1:
            what = (
                f"more than {self._limits.max_header_bytes} bytes"
                if size > self._limits.max_header_bytes
                else f"more than {self._limits.max_headers} fields"
            )
            self._refuse(431, f"the request line and headers hold {what}", "header_size")
            return False
        if end >= 0:
            self._state = "request"
            self._disarm()
        else:
            self._head_bytes, self._head_lines = size, lines
            self._tail = window[-(len(_END_OF_HEAD) - 1) :]
        return True

    # -- timers and refusals ---------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._state != "head" or self._closed:
            return
        if self._head_bytes or self._tail:
            self._refuse(
                408,
                f"the request headers did not arrive within {self._limits.header_timeout:g} s",
                "header_timeout",
            )
        elif self._transport is not None:
            self._limit.count_closed("header_timeout")
            self._transport.close()  # nothing was asked: close without an answer

    def _refuse(self, status: int, detail: str, reason: str) -> None:
        """Answer, then close the way nginx's lingering close does: half-close after the
        answer and read (and drop) what the client is still sending for a moment, so the
        answer is not lost to a reset while the client is mid-send."""
        log.info("gateway: closing a connection with %d (%s)", status, detail)
        self._limit.count_closed(reason)
        self._closed = True
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(_answer(status, detail))
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)
        else:
            transport.close()


SERVER_NAME: Final = "msa-gateway"
"""The `Server` header of every answer: a name, no software versions."""


class GatewayProtocol(web.RequestHandler):
    """aiohttp's request handler with the gateway's answer to requests its parser refuses
    (a malformed request line or header, a repeated `Host`, a bad chunk size, ...): an RFC 9457
    problem with a fixed detail and no `Server` version, and one log line naming the error's
    kind, never the offending bytes (they can hold a client's credentials).

    `handle_error` is aiohttp's hook for these answers; pyproject pins aiohttp below the next
    minor version, and the hostile-client suite's parser rows fail if the hook stops being used.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # not the client's doing: keep aiohttp's logging (a traceback)
            response = super().handle_error(request, status, exc, message)
        else:
            log.info(
                "gateway: refused a malformed request from %s with %d (%s)",
                request.remote,
                status,
                type(exc).__name__ if exc is not None else "no detail",
            )
            response = problem(
                status, status_title(status), "the request is not well-formed HTTP/1.1"
            )
            response.force_close()  # the connection ends after this answer
        response.headers["Server"] = SERVER_NAME
        return response


def guard_of(request: web.BaseRequest) -> ConnectionGuard | None:
    """The guard of the connection `request` came on (None: not served through one)."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, ConnectionGuard) else None
