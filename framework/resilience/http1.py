"""The upstream pools' HTTP client: HTTP/1.1 keep-alive connections on asyncio protocols.

    client = Http1Client()
    answer = await client.request(
        "http://10.0.0.5:8080", "GET", "/products/42", CIMultiDict(), None,
        timeout=5.0, connect_timeout=1.0,
    )
    answer.status, answer.headers, answer.body
    await client.close()

What an upstream pool needs of a client, and nothing else: one request at a time per
connection, connections kept alive and reused last-in first-out per origin (the warmest socket
first, so idle ones age out), the response read in full, a total deadline and a connect
deadline. Responses are parsed by `httptools` (llhttp, the parser Node.js uses): status line,
headers (repeated ones kept, in order), bodies framed by `Content-Length`, chunked, or by the
connection's end; 1xx interim answers are skipped, trailers after the last chunk ignored, and
bytes beyond the answer asked for close the connection (never read as its answer). Measured
against aiohttp's `ClientSession` in `benchmarks/gateway.py` (rows (f), (f3) and (b)).

What it does not do, by design: redirects (an upstream's 3xx is the client's answer), cookies,
proxies, `Expect`, request bodies other than bytes. It adds only `Host` (unless given),
`Content-Length` (when there is a body, or the method implies one) and nothing else: no
`User-Agent`, no `Accept-Encoding`; a body the upstream chose to send `gzip` or `deflate`
encoded is decoded (`decoded` in the answer), any other coding is passed on as it is.

Errors: `TimeoutError` when the deadline passes (connecting, writing or reading), and
`UpstreamConnectionError` (an `OSError`) when the connection cannot be made, is refused, breaks,
or the answer is not HTTP. A connection is reused only after a complete response that allows
it (`Connection: close`, HTTP/1.0 without keep-alive and an error all close it), and a request
that was cancelled or timed out closes its connection: a late answer never reaches the next
request. An idle connection the upstream closed is noticed when it closes (the protocol's
`connection_lost`) and dropped; one idle for longer than `keepalive_timeout` is closed before it
would be reused.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

__all__ = ["HOP_BY_HOP", "Http1Client", "RawResponse", "UpstreamConnectionError"]

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers that describe one connection, not the message (RFC 9110 7.6.1); never forwarded.
Every other `Proxy-*` header, and every header the `Connection` header names, is dropped too."""
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP) | {b"content-length"}


class UpstreamConnectionError(OSError):
    """The upstream could not be reached, broke the connection, or answered with no HTTP."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    """As received (repeated ones kept, in order), less this hop's framing: the hop-by-hop
    headers (`HOP_BY_HOP`, `Proxy-*` and what `Connection` names) and `Content-Length`; less
    `Content-Encoding` too when the body was decoded."""
    body: bytes
    decoded: bool = False
    """The body arrived gzip- or deflate-encoded and was decoded here."""


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str


class _Connection(asyncio.Protocol):
    """One keep-alive connection: feeds what arrives to the parser, settles `waiter`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self.head = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.in_head = True
        self.framed = True
        """The body's end is known (a length, chunks, or no body): else it ends with the
        connection."""

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for, on an idle connection: not reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"the upstream's answer is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.status >= 200 and not self.framed:  # the body ran to the connection's end
            waiter.set_result(None)
        else:
            waiter.set_exception(
                UpstreamConnectionError("the upstream closed the connection before answering")
            )

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self.waiter is not None and self.waiter.done():
            # A second answer behind the one asked for (in the same read): never taken for it.
            # Raising stops the parser; data_received closes the connection.
            raise UpstreamConnectionError("the upstream sent an answer nobody asked for")
        self.headers = []
        self.body = []
        self.in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # fields after the last chunk (trailers) are not headers
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        status = self.parser.get_status_code()
        self.status = status
        if status < 200 or self.head or status in (204, 304):
            self.framed = True
        else:
            names = {name.lower() for name, _ in self.headers}
            self.framed = b"content-length" in names or b"transfer-encoding" in names
        if self.head and status >= 200:  # no body follows, whatever the headers declare
            self.reusable = False
            self._settle()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # an interim answer (100, 103): the real one follows
            self.status = 0
            return
        self.reusable = self.parser.should_keep_alive() and self.framed
        self._settle()

    # -- helpers --

    def _settle(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class Http1Client:
    """Keep-alive HTTP/1.1 connections per origin (module docstring).

    `keepalive_timeout`: seconds an idle connection may wait to be reused; `max_idle`: idle
    connections kept per origin (more are closed when released); `ssl_context`: for `https`
    origins (the system's default trust store when None).
    """

    def __init__(
        self,
        *,
        keepalive_timeout: float = 30.0,
        max_idle: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle
        self._ssl = ssl_context
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closed = False
        self._deadlines: dict[asyncio.Future[None], float] = {}
        """Each answer awaited, and when it times out: one timer for all of them (`_sweep`),
        not one per request (a timer set and cancelled costs ~2 us on uvloop)."""
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        timeout: float,
        connect_timeout: float | None = None,
        server_hostname: str | None = None,
    ) -> RawResponse:
        """Send `method target` to the origin of `base_url` (`http://host:port`, any path in
        it ignored: `target` is the whole path and query, already encoded) and read the whole
        answer within `timeout` seconds, connecting within `connect_timeout` of them."""
        if self._closed:
            raise UpstreamConnectionError("the HTTP client is closed")
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = self._origin(base_url)
        head = _request_head(method, target, headers, origin.host_header, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = self._reuse(origin)
        if connection is None:
            limit = timeout if connect_timeout is None else min(connect_timeout, timeout)
            connection = await self._connect(origin, limit, server_hostname)
        self._busy.add(connection)
        try:
            answer = await self._exchange(connection, method, head, body, deadline)
        except BaseException:
            connection.close()  # a late or partial answer must never reach another request
            raise
        finally:
            self._busy.discard(connection)
        if connection.reusable and not self._closed:
            self._release(origin, connection)
        else:
            connection.close()
        return answer

    def close_idle(self, base_url: str) -> int:
        """Close the idle connections to the origin of `base_url`; returns how many. For an
        origin that said it is going away (a draining instance behind a Kubernetes Service,
        whose kept-alive connections all reach the same terminating pod)."""
        origin = self._origins.get(base_url)
        idle = self._idle.pop(origin, None) if origin is not None else None
        for connection in idle or ():
            connection.close()
        return len(idle or ())

    async def close(self) -> None:
        """Close every connection; a request under way fails."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()

    # -- connections --

    def _origin(self, base_url: str) -> _Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) base URL: {base_url!r}")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = 443 if secure else 80
        return _Origin(
            host=host,
            port=port,
            ssl=(self._ssl or ssl.create_default_context()) if secure else None,
            host_header=shown if port == default else f"{shown}:{port}",
        )

    def _reuse(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = time.monotonic() - self.keepalive_timeout
        while idle:
            connection = idle.pop()  # the warmest first
            if (
                connection.closed
                or connection.idle_since < oldest_allowed
                or connection.transport is None
                or connection.transport.is_closing()
            ):
                connection.close()
                continue
            return connection
        return None

    async def _connect(
        self, origin: _Origin, connect_timeout: float, server_hostname: str | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=(server_hostname or origin.host) if origin.ssl else None,
                )
        except TimeoutError:
            raise  # an OSError too, but the deadline's: not "unreachable"
        except (OSError, ssl.SSLError) as exc:
            if isinstance(exc, UpstreamConnectionError):
                raise
            raise UpstreamConnectionError(
                f"cannot connect to {origin.host}:{origin.port}: {exc}"
            ) from exc
        return connection

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        if len(idle) >= self.max_idle:
            idle.popleft().close()  # the coldest goes
        connection.idle_since = time.monotonic()
        connection.waiter = None
        idle.append(connection)

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        head: bytes,
        body: bytes | None,
        deadline: float,
    ) -> RawResponse:
        transport = connection.transport
        if connection.closed or transport is None or transport.is_closing():
            raise UpstreamConnectionError("the connection closed before the request was sent")
        waiter = connection.loop.create_future()
        connection.waiter = waiter
        connection.status = 0
        connection.head = method == "HEAD"
        if body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        self._deadlines[waiter] = deadline
        sweeper = self._sweeper
        if sweeper is None or deadline < sweeper.when():
            if sweeper is not None:
                sweeper.cancel()
            self._sweeper = connection.loop.call_at(deadline, self._sweep)
        try:
            await waiter
        finally:
            del self._deadlines[waiter]
        return _answer(connection)

    def _sweep(self) -> None:
        """Time out every answer whose deadline has passed; then sleep until the next one."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        upcoming = None
        for waiter, deadline in list(self._deadlines.items()):
            if deadline <= now:
                if not waiter.done():
                    waiter.set_exception(TimeoutError())
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        if upcoming is not None:
            self._sweeper = loop.call_at(upcoming, self._sweep)


def _request_head(
    method: str, target: str, headers: CIMultiDict[str], host: str, body: bytes | None
) -> bytes:
    """The request line and headers, CRLF-terminated; refuses CR, LF or NUL in any of them
    (`ValueError`): a header value must never start another header or request."""
    lines = [f"{method} {target} HTTP/1.1"]
    has_host = False
    for name, value in headers.items():
        lower = name.lower()
        if lower == "content-length":
            continue
        if lower == "host":
            has_host = True
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.append(f"Host: {host}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    elif method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1  # the only CRs and LFs are the ones joining the lines
    if text.count("\r") != breaks or text.count("\n") != breaks or "\0" in text or " " in target:
        raise ValueError("a CR, LF or NUL in the request line or a header")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


def _answer(connection: _Connection) -> RawResponse:
    named: set[bytes] = set()
    for name, value in connection.headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in connection.headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in named or lower.startswith(b"proxy-"):
            continue
        headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
    body = b"".join(connection.body) if len(connection.body) != 1 else connection.body[0]
    coding = headers.get("Content-Encoding", "").strip().lower()
    wbits = _DECODERS.get(coding) if coding else None
    if wbits is None:
        return RawResponse(connection.status, headers, body)
    try:
        body = _decode(body, wbits)
    except zlib.error as exc:
        connection.close()
        raise UpstreamConnectionError(f"the {coding} body does not decode: {exc}") from exc
    headers.popall("Content-Encoding")
    return RawResponse(connection.status, headers, body, decoded=True)


def _decode(body: bytes, wbits: int) -> bytes:
    try:
        return zlib.decompress(body, wbits)
    except zlib.error:
        if wbits != zlib.MAX_WBITS:
            raise
        return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send it
