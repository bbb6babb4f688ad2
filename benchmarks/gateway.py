"""The API gateway as a reverse proxy, against nginx and a FastAPI + httpx proxy, same upstream.

    apt-get install -y wrk nginx-light                 # the load generator and the nginx baseline
    .venv/bin/python benchmarks/gateway.py              # full run, about 2.5 minutes on 2 cores
    .venv/bin/python benchmarks/gateway.py --quick      # a smoke run, about a minute

Every server is its own single process on 127.0.0.1, started fresh by this script and stopped at
the end; the 2-core machine is shared by the upstream, the proxy under test and the load
generator, so a proxy's requests/s are those of one process competing with two busy others for
two cores, not those of a dedicated core:

- the upstream: a tiny aiohttp app (uvloop, access log off) answering `GET /item/{id}` with a
  300-byte JSON body; every proxy forwards to it, and it is also measured directly.
- our gateway: `Gateway.from_file(config)` on uvloop (`uvloop.run`; note that `msa gateway`
  itself runs on the default asyncio loop), one route `GET /item/{id}` -> an upstream pool of the
  one target, every setting at its default. Logging through `configure_logging`: the plain proxy
  at level WARNING (the access-log middleware runs, but its INFO line is not written), the
  logging variants at INFO, one JSON line per request appended to a file in the temp dir.
- nginx (`nginx-light`, Debian package): `proxy_pass` to an `upstream` block with `keepalive 32`,
  `proxy_http_version 1.1`, `proxy_set_header Connection ""`, X-Forwarded-For/Proto set,
  `access_log off`, `worker_processes 1` (one process serving, as ours), `keepalive_requests`
  raised so neither side closes kept-alive connections during a run.
- FastAPI + httpx: a catch-all route forwarding with one shared `httpx.AsyncClient` (limits 100
  connections, all kept alive), hop-by-hop headers dropped both ways, run by uvicorn with
  uvloop + httptools, 1 worker, access log off.
- the bare proxies, the floor of our stack: an aiohttp server on uvloop whose one catch-all
  handler forwards through a shared upstream client and copies the answer back, hop-by-hop
  headers dropped both ways (repeated ones, Set-Cookie, kept), the whole body read before
  answering; no routing, limits, auth, metering or logging. They differ only in the client, each
  with at most 100 upstream connections kept alive, a 10 s total timeout, no redirects followed
  and no decompression: (f) aiohttp's `ClientSession`; (f2) pyreqwest's `Client` (reqwest and
  hyper in Rust, on a Tokio thread of the same process, so its CPU is counted); (f3) `LeanPool`,
  written here: an `asyncio.Protocol` per connection parsing answers with httptools (llhttp;
  Content-Length, chunked, or delimited by the close), idle connections reused last in, first
  out, a kept-alive connection found closed retried once for idempotent methods. Each client
  sends the forwarded headers plus what it adds itself: Host (all), Accept and User-Agent
  (aiohttp, pyreqwest), Accept-Encoding (aiohttp).

Scenarios:

1. throughput (closed loop): wrk, 1 thread, 32 connections, 10 s (after a 2 s warm-up run),
   all requests to `/item/12345`. Rows: (a) direct to the upstream, (d) nginx (the baseline of
   the ratio column), (b) our gateway as a plain proxy, (b') the same with its JSON access log
   written, (c) our gateway with JWT (RS256, the issuer's JWKS served by this script, fetched
   once at start) + rate limit (a `premium` tier of 1,000,000 req/s with that burst, so it is
   checked on every request but never throttles) + the access log, (e) FastAPI + httpx, the
   bare proxies (f) aiohttp client, (f2) pyreqwest, (f3) the lean client. p50/p99
   are wrk's latency distribution; "added" in the notes is the row's p50/p99 minus direct's, at
   saturation, so it includes queueing. CPU us/op is the proxy process's CPU time (user + sys,
   from /proc, children included: nginx's worker) per request; for (a) the upstream's.
   Targets: (b) >= 0.5x nginx and >= 1.5x FastAPI + httpx in requests/s.
2. steady 1,000 req/s (open loop): a small Python load client (its own process, uvloop, raw
   asyncio HTTP/1.1 on up to 64 kept-alive connections: about a seventh of a core at 1,000
   req/s, where aiohttp's client took two thirds) starts request i at i/1000 s whatever happened
   to the earlier ones, for 1 s of warm-up then 8 s measured. A latency runs from the start of
   the request's task (within uvloop's 1 ms timer tick of its scheduled time), waiting for a
   free connection included, so a stalled server is not hidden; the achieved rate is the
   answers over the measured stretch, draining included. The client's own overhead is in every
   row alike; the gateway's added latency is its p50/p99 minus direct's. Target: added p50
   <= 1 ms (stated in the notes, PASS or FAIL). nginx is measured for reference, and the same
   rows again at 200 req/s (`--rates`), where no server here is near its capacity: what a
   request costs in latency when nothing queues.

Before any timing each proxy must return the upstream's exact body for one request; the JWT
variant must also refuse a request without a token (401), send the verified subject upstream
(the upstream echoes it in a header) and answer with `RateLimit-*` headers. The bare proxies
must also pass on, byte for byte, a chunked answer with its two Set-Cookie headers, an answer
that closes its connection (and answer the next request), and 40 concurrent answers.
`--rows a,d,b,f,f2,f3` runs only the rows named (by the letter in parentheses). A failed check, a
server that does not start, a load run with errors or non-2xx answers, or one over its time
limit gives an ERROR row (and exit status 1); a missed target is a result, not an error.

Without wrk the throughput scenario falls back to a closed-loop aiohttp client (its own process,
32 connections), far slower than wrk: its ratios then mostly measure the client. Without nginx
its rows are ERROR rows saying how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import aiohttp
import httptools
import orjson
import uvloop
from _common import Check, Result, environment, percentile, render
from aiohttp import web

HOST = "127.0.0.1"
ITEM = "/item/12345"
ISSUER, AUDIENCE, SUBJECT, KID = "bench-issuer", "bench-api", "bench-client", "bench-key-1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

DIRECT, NGINX, PLAIN, PLAIN_AIOHTTP, WORKERS, LOGGED, FULL, FASTAPI = (
    "(a) direct",
    "(d) nginx",
    "(b) our gateway",
    "(b2) our gateway, aiohttp client",
    "(g) our gateway, 2 workers",
    "(b') our gateway + log",
    "(c) our gateway + JWT/RL/log",
    "(e) FastAPI + httpx",
)
BARE, BARE_PYREQWEST, BARE_LEAN = (
    "(f) bare aiohttp proxy",
    "(f2) bare aiohttp + pyreqwest",
    "(f3) bare aiohttp + lean client",
)
BARES = (BARE, BARE_PYREQWEST, BARE_LEAN)
UPSTREAM_TIMEOUT = 10.0
"""The bare proxies' total timeout per upstream request (connect, send, answer read fully)."""
UPSTREAM_CONNECTIONS = 100
"""The bare proxies' upstream connection limit (aiohttp's `TCPConnector(limit=100)`)."""


# -- child processes: `gateway.py --role NAME ...` -------------------------------------------------


def item_body(ident: str) -> bytes:
    """The upstream's answer for `/item/{ident}`: about 300 bytes of JSON."""
    return orjson.dumps(
        {
            "id": ident,
            "sku": f"SKU-{ident}",
            "name": "Stainless steel water bottle, 750 ml",
            "price": {"amount": 2490, "currency": "EUR"},
            "stock": 137,
            "tags": ["outdoor", "kitchen", "bpa-free"],
            "description": "Double-walled, keeps drinks cold for 24 hours and hot for 12. "
            "Dishwasher safe lid; powder-coated finish.",
        }
    )


async def _serve_until_signal(app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await _announce_and_wait(port)
    await runner.cleanup()


async def _announce_and_wait(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()


async def role_upstream() -> None:
    async def item(request: web.Request) -> web.Response:
        headers = {}
        user = request.headers.get("x-user-id")
        if user is not None:
            headers["x-saw-user"] = user
        return web.Response(
            body=item_body(request.match_info["id"]),
            content_type="application/json",
            headers=headers,
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        """The item body in two chunks (`Transfer-Encoding: chunked`), with two Set-Cookie
        headers: the bare proxies' checks (body framing, repeated headers)."""
        body = item_body(request.match_info["id"])
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        answer.headers.add("Set-Cookie", "a=1; Path=/")
        answer.headers.add("Set-Cookie", "b=2; Path=/")
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        await answer.write(body[:100])
        await answer.write(body[100:])
        await answer.write_eof()
        return answer

    async def close(request: web.Request) -> web.Response:
        """The item body, then the connection closed (`Connection: close`)."""
        answer = web.Response(
            body=item_body(request.match_info["id"]), content_type="application/json"
        )
        answer.force_close()
        return answer

    app = web.Application()
    app.router.add_get("/item/{id}", item)
    app.router.add_get("/chunked/{id}", chunked)
    app.router.add_get("/close/{id}", close)
    await _serve_until_signal(app)


async def role_gateway(config_path: str, log_path: str) -> None:
    """Our gateway as `msa gateway` runs it with `MSA_ACCESS_LOG_FILE` set (as the k8s gateway
    is): its access-log lines written in batches by `AccessLog`'s thread, off the event loop,
    to the log file this role was given, and the garbage collector settled once it has
    started."""
    from framework.gateway.app import Gateway, settle_garbage_collector
    from framework.gateway.metering import AccessLog

    access_log = AccessLog(log_path)
    access_log.start()
    try:
        gateway = Gateway.from_file(config_path, watch_interval=0)
        await gateway.start()
        settle_garbage_collector()
        assert gateway.port is not None
        await _announce_and_wait(gateway.port)
        await gateway.stop()
    finally:
        access_log.stop()


async def role_bare(upstream: str, port: int) -> None:
    """The floor of our stack: an aiohttp server on uvloop whose one catch-all handler sends the
    request through one shared `ClientSession` (keep-alive pool) and copies the answer back,
    dropping hop-by-hop headers both ways - what any aiohttp proxy must do, and nothing else."""
    session = aiohttp.ClientSession(
        base_url=upstream,
        connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT),
    )

    async def proxy(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(
            request.method,
            request.rel_url,
            headers=headers,
            data=await request.read() if request.can_read_body else None,
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            out = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP]
            return web.Response(body=body, status=answer.status, headers=out)

    await _serve_bare(proxy, port, session.close)


async def role_bare_pyreqwest(upstream: str, port: int) -> None:
    """(f) with pyreqwest (reqwest/hyper in Rust, on its own Tokio thread) as the upstream
    client: one shared `Client`, keep-alive pool, at most 100 requests in flight, the same total
    timeout, no redirects followed, no decompression (nor Accept-Encoding added), the whole body
    read before answering."""
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    client = (
        ClientBuilder()
        .base_url(upstream)
        .max_connections(UPSTREAM_CONNECTIONS)
        .timeout(timedelta(seconds=UPSTREAM_TIMEOUT))
        .follow_redirects(False)
        .gzip(False)
        .brotli(False)
        .zstd(False)
        .deflate(False)
        .no_proxy()  # no *_PROXY variables read, as aiohttp's trust_env=False
        .build()
    )

    async def proxy(request: web.Request) -> web.Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        builder = client.request(request.method, str(request.rel_url)).headers(headers)
        if request.can_read_body:
            builder = builder.body_bytes(await request.read())
        answer = await builder.build().send()  # the body is read fully by send()
        body = await answer.bytes()
        out = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP]
        return web.Response(body=memoryview(body), status=answer.status, headers=out)

    await _serve_bare(proxy, port, client.close)


class _Upstream(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection of the lean client: one request at a time, the answer
    parsed by httptools (llhttp): Content-Length, chunked, or delimited by the connection's
    close; `reusable` once an answer is complete and neither side asked to close."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.head = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.framed = False  # Content-Length or Transfer-Encoding: not delimited by the close
        self.received = False
        self.complete = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, raw: bytes, head: bool) -> asyncio.Future[None]:
        assert self.transport is not None
        self.head, self.status, self.headers, self.body = head, 0, [], []
        self.framed = self.received = self.complete = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.waiter is None or self.complete:  # nothing asked: the connection is unusable
            self._fail(ConnectionError("data from the upstream with no request pending"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed answer from the upstream: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head:  # llhttp cannot be told the request was HEAD: its body length is not sent
            self._done(reusable=False)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._done(reusable=self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.status and not self.framed:  # an answer delimited by the close: complete
                self._done(reusable=False)
            else:
                self.waiter.set_exception(ConnectionError("the upstream closed the connection"))

    @property
    def reusable(self) -> bool:
        return self.complete and not self.closed

    def _done(self, *, reusable: bool) -> None:
        self.complete = True
        if not reusable:
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LeanPool:
    """The lean client's pool: up to `limit` connections to one upstream, idle ones reused last
    in, first out; a request waits for a connection when all are busy. A kept-alive connection
    the upstream closed while idle is retried once on a new one when nothing was received (as
    aiohttp does for idempotent methods)."""

    def __init__(self, upstream: str, limit: int, timeout: float) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.host, self.port = parts.hostname or HOST, parts.port or 80
        self.authority = parts.netloc.encode()
        self.limit, self.timeout = limit, timeout
        self.idle: list[_Upstream] = []
        self.opened = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers (raw, in order, repeats kept) and the whole body of the answer."""
        lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + self.authority]
        lines += [f"{k}: {v}".encode("utf-8", "surrogateescape") for k, v in headers]
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        raw = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
        idempotent = method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
        async with asyncio.timeout(self.timeout):
            for attempt in (1, 2):
                connection, reused = await self._acquire()
                try:
                    await connection.send(raw, method == "HEAD")
                except ConnectionError:
                    if attempt == 1 and reused and idempotent and not connection.received:
                        continue
                    raise
                finally:
                    self._release(connection)
                return connection.status, connection.headers, b"".join(connection.body)
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[_Upstream, bool]:
        """An idle connection (True), else a new one (False) once fewer than `limit` are open."""
        while True:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection, True
                self.opened -= 1  # the upstream closed it while idle
            if self.opened < self.limit:
                break
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            try:
                await waiter
            except BaseException:  # cancelled (timeout): pass on a wake-up it was given
                if waiter in self.waiting:
                    self.waiting.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()
                raise
        self.opened += 1
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                _Upstream, self.host, self.port
            )
        except BaseException:
            self.opened -= 1
            self._wake()
            raise
        return connection, False

    def _release(self, connection: _Upstream) -> None:
        if connection.reusable:
            self.idle.append(connection)
        else:  # closed, failed, or cancelled mid-answer (its state unknown): not reused
            connection.close()
            self.opened -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


async def role_bare_lean(upstream: str, port: int) -> None:
    """(f) with `LeanPool` as the upstream client: asyncio protocols parsing with httptools, up
    to 100 kept-alive connections, the same total timeout, the same forwarded headers (plus Host
    and Content-Length, as aiohttp sets them), no redirects, no decompression."""
    pool = LeanPool(upstream, UPSTREAM_CONNECTIONS, UPSTREAM_TIMEOUT)

    async def proxy(request: web.Request) -> web.Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        body = await request.read() if request.can_read_body else None
        status, raw, content = await pool.request(request.method, request.raw_path, headers, body)
        out = []
        for k, v in raw:
            name = k.decode("utf-8", "surrogateescape")
            if name.lower() not in HOP:
                out.append((name, v.decode("utf-8", "surrogateescape")))
        return web.Response(body=content, status=status, headers=out)

    async def close() -> None:
        pool.close()

    await _serve_bare(proxy, port, close)


async def _serve_bare(
    handler: Callable[[web.Request], Awaitable[web.Response]],
    port: int,
    close: Callable[[], Awaitable[None]],
) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    print(f"READY {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await close()
        await runner.cleanup()


def role_fastapi(upstream: str, port: int) -> None:
    from contextlib import asynccontextmanager

    import httpx
    import uvicorn
    from fastapi import FastAPI, Request, Response

    clients: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        clients.append(httpx.AsyncClient(base_url=upstream, limits=limits))
        yield
        await clients[0].aclose()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    async def proxy(path: str, request: Request) -> Response:
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        answer = await clients[0].request(
            request.method, url, headers=headers, content=await request.body()
        )
        out = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in HOP and k.lower() != "content-encoding"
        }
        return Response(content=answer.content, status_code=answer.status_code, headers=out)

    # This module's annotations are strings (PEP 563) naming imports local to this function,
    # which FastAPI could not resolve: give it the real types.
    proxy.__annotations__ = {"path": str, "request": Request, "return": Response}
    app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])(proxy)

    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection of the paced client: one request at a time, answers
    with a Content-Length (every server measured here sends one). Far lighter than aiohttp's
    client, so the client takes less of the CPUs the servers need."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.need = -1
        self.status = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None:
            return
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if length is None:
                self.waiter.set_exception(ConnectionError("an answer without Content-Length"))
                self.waiter = None
                return
            self.status = int(head[9:12])
            self.need = end + 4 + int(length.group(1))
        if len(self.buffer) >= self.need:
            del self.buffer[: self.need]
            self.need = -1
            waiter, self.waiter = self.waiter, None
            waiter.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed by the server"))

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


async def role_paced(url: str, rate: float, warm: float, seconds: float, token: str) -> None:
    """Open loop: request i starts at i/rate s, on one of up to 64 kept-alive connections (it
    waits for one when all are busy: that wait counts in its latency); prints the latencies
    (ms) of the requests after the warm-up, as JSON.

    A latency runs from the moment the request's task starts, not from its scheduled time:
    uvloop's timers have a 1 ms resolution, so a request may start up to about a millisecond
    late, the client's lateness and not the server's. The requests are still started on the
    schedule whatever the answers do, so a stalled server is not hidden."""
    loop = asyncio.get_running_loop()
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or HOST, parts.port or 80
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    raw = f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode()
    warm_n, total = int(rate * warm), int(rate * (warm + seconds))
    latencies: list[float] = []
    errors: list[str] = []
    idle: list[_Connection] = []
    waiting: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
    opened = 0

    async def acquire() -> _Connection:
        nonlocal opened
        if idle:
            return idle.pop()
        if opened >= 64:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            waiting.append(waiter)
            handed = await waiter
            if handed is not None:
                return handed
        opened += 1
        _, connection = await loop.create_connection(_Connection, host, port)
        return connection

    def release(connection: _Connection) -> None:
        nonlocal opened
        if connection.lost:
            opened -= 1
            if waiting:
                waiting.popleft().set_result(None)  # the waiter opens a new connection
        elif waiting:
            waiting.popleft().set_result(connection)
        else:
            idle.append(connection)

    async def one(index: int) -> None:
        started = time.perf_counter()
        connection = await acquire()
        try:
            status = await connection.request(raw)
        except (ConnectionError, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.lost = True
            return
        finally:
            release(connection)
        done = time.perf_counter()
        if status != 200:
            errors.append(f"status {status}")
        elif index >= warm_n:
            latencies.append((done - started) * 1000)

    running: set[asyncio.Task[None]] = set()
    began = time.perf_counter() + 0.05
    index = 0
    while index < total:
        now = time.perf_counter()
        while index < total and began + index / rate <= now:
            task = asyncio.create_task(one(index))
            running.add(task)
            task.add_done_callback(running.discard)
            index += 1
        await asyncio.sleep(max(0.0, began + index / rate - time.perf_counter()))
    measured_from = began + warm_n / rate
    await asyncio.gather(*running)
    elapsed = time.perf_counter() - measured_from
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    print(json.dumps({"latencies": latencies, "errors": errors, "seconds": elapsed}))


async def role_closed(url: str, connections: int, seconds: float, token: str) -> None:
    """Closed loop (the fallback without wrk): `connections` loops, each awaiting its answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                sent = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, OSError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - sent) * 1000)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    print(
        json.dumps(
            {
                "requests": len(latencies) + errors,
                "seconds": elapsed,
                "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99),
                "errors": errors,
            }
        )
    )


def run_role(role: str, args: Sequence[str]) -> None:
    if role == "upstream":
        uvloop.run(role_upstream())
    elif role == "gateway":
        from framework.observability.logging import configure_logging

        config_path, log_path, level = args
        with open(log_path, "a", encoding="utf-8") as log_file:
            configure_logging("gateway", level=level, stream=log_file, json=True)
            uvloop.run(role_gateway(config_path, log_path))
    elif role == "fastapi":
        role_fastapi(args[0], int(args[1]))
    elif role == "bare":
        uvloop.run(role_bare(args[0], int(args[1])))
    elif role == "bare-pyreqwest":
        uvloop.run(role_bare_pyreqwest(args[0], int(args[1])))
    elif role == "bare-lean":
        uvloop.run(role_bare_lean(args[0], int(args[1])))
    elif role == "paced":
        uvloop.run(role_paced(args[0], float(args[1]), float(args[2]), float(args[3]), args[4]))
    elif role == "closed":
        uvloop.run(role_closed(args[0], int(args[1]), float(args[2]), args[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")


# -- the parent: servers, load, results ---------------------------------------------------------


class Failure(Exception):
    """A measurement that cannot be trusted or did not happen; becomes an ERROR row."""


@dataclass(kw_only=True)
class Measured(Result):
    """A result whose percentiles come from the load generator (wrk reports no samples)."""

    given_p50: float | None = None
    given_p99: float | None = None

    @property
    def p50(self) -> float | None:
        return self.given_p50 if self.given_p50 is not None else super().p50

    @property
    def p99(self) -> float | None:
        return self.given_p99 if self.given_p99 is not None else super().p99


@dataclass
class Load:
    requests: int
    seconds: float
    p50: float
    p99: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of `pid` and its direct children (nginx: master + worker)."""

    def own(stat: str) -> tuple[int, int]:
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime

    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid, ticks = own(Path(f"/proc/{entry}/stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if int(entry) == pid or ppid == pid:
            total += ticks
    return total


class Server:
    """A child process serving HTTP on 127.0.0.1; `port` once it is ready."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int | None = None,
        logs: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.env = None if env is None else {**os.environ, **env}
        self.stderr = logs / f"{name}.stderr"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        with self.stderr.open("ab") as stderr:  # a file: a chatty child never blocks on it
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=self.env,
            )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                if self.port is None:  # our children say "READY <port>"
                    assert self.proc.stdout is not None
                    line = (await self.proc.stdout.readline()).decode().strip()
                    if not line.startswith("READY "):
                        raise Failure(f"{self.name} did not start: {await self._stderr()}")
                    self.port = int(line.split()[1])
                else:  # nginx, uvicorn: wait until the port answers
                    while not await _answers(self.base + ITEM):
                        if self.proc.returncode is not None:
                            raise Failure(f"{self.name} exited: {await self._stderr()}")
                        await asyncio.sleep(0.1)
        except TimeoutError:
            await self.stop()
            raise Failure(f"{self.name} not ready within {START_TIMEOUT:.0f} s") from None
        except Failure:
            await self.stop()
            raise

    async def _stderr(self) -> str:
        await asyncio.sleep(0.2)  # let an exiting child finish writing
        try:
            data = self.stderr.read_bytes()[-4000:]
        except OSError:
            return "(no stderr)"
        return " ".join(data.decode(errors="replace").split())[-300:] or "(no stderr)"

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _answers(url: str) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            await response.read()
            return response.status < 500
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def child(role: str, *args: object) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--role", role, *map(str, args)]


# -- load generators --


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise Failure(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Load:
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.M)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    p50 = re.search(r"^\s*50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", output, re.M)
    if not (requests and rate and p50 and p99):
        raise Failure("unreadable wrk output: " + " ".join(output.split())[-200:])
    count = int(requests.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx and int(non2xx.group(1)):
        raise Failure(f"{non2xx.group(1)} of {count} answers were not 2xx/3xx")
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        failed = sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
        if failed > count * 0.001:
            raise Failure(f"wrk socket errors: {socket_errors.group(1)}")
    return Load(count, count / float(rate.group(1)), _wrk_ms(p50.group(1)), _wrk_ms(p99.group(1)))


async def run_process(argv: Sequence[str], limit: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(limit):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Failure(f"{Path(argv[0]).name} over its {limit:.0f} s time limit") from None
    if proc.returncode != 0:
        raise Failure(f"{Path(argv[0]).name} failed: {' '.join(err.decode().split())[-200:]}")
    return out.decode()


@dataclass
class Settings:
    wrk: str | None
    nginx: str | None
    connections: int
    seconds: float
    warm: float
    rates: tuple[float, ...]
    """Steady rates; the first one is the target's."""
    steady_seconds: float
    steady_warm: float
    rows: frozenset[str] = frozenset()
    """The rows to run, by key (`a`, `d`, `b`, `b'`, `c`, `e`, `f`, `f2`, `f3`); empty: all."""


def row_key(name: str) -> str:
    """`(f2) bare aiohttp + pyreqwest` -> `f2`."""
    return name[1 : name.index(")")]


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (and were waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def closed_load(settings: Settings, url: str, token: str, seconds: float) -> Load:
    limit = seconds + 60
    if settings.wrk is not None:
        argv = [settings.wrk, "-t1", f"-c{settings.connections}", f"-d{seconds:g}s", "--latency"]
        if token:
            argv += ["-H", f"Authorization: Bearer {token}"]
        return parse_wrk(await run_process([*argv, url], limit))
    out = json.loads(
        await run_process(child("closed", url, settings.connections, seconds, token), limit)
    )
    if out["errors"]:
        raise Failure(f"{out['errors']} of {out['requests']} requests failed")
    return Load(out["requests"], out["seconds"], out["p50"], out["p99"])


async def steady_load(
    settings: Settings, url: str, token: str, rate: float
) -> tuple[list[float], float]:
    argv = child("paced", url, rate, settings.steady_warm, settings.steady_seconds, token)
    out = json.loads(await run_process(argv, settings.steady_warm + settings.steady_seconds + 60))
    if out["errors"]:
        raise Failure(f"{len(out['errors'])} requests failed ({out['errors'][0]})")
    return out["latencies"], len(out["latencies"]) / out["seconds"]


# -- JWT issuer --


@dataclass
class Issuer:
    jwks_url: str
    token: str


@contextlib.asynccontextmanager
async def issuer() -> AsyncIterator[Issuer]:
    """An RSA key, a JWKS served from this process, and a token signed with the key."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {
        "kid": KID,
        "alg": "RS256",
        "use": "sig",
    }

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": now,
        "exp": now + 3600,
        "tier": "premium",
        "roles": ["reader"],
        "scope": "items:read",
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    try:
        yield Issuer(f"http://{HOST}:{port}/jwks.json", token)
    finally:
        await runner.cleanup()


# -- the servers under test --


def gateway_config(
    upstream: Server, jwks_url: str | None, *, client: str = "http1", port: int = 0
) -> str:
    lines = [
        "gateway:",
        "  name: bench",
        f"  listen: {{host: {HOST}, port: {port}}}",
        f"  admin: {{host: {HOST}, port: 0}}",
        "upstreams:",
        f'  item: {{targets: ["{upstream.base}"], client: {client}}}',
    ]
    if jwks_url is not None:
        lines += [
            "auth:",
            "  jwt:",
            f"    jwks_url: {jwks_url}",
            "    jwks_refresh: 3600",
            f"    issuer: {ISSUER}",
            f"    audience: {AUDIENCE}",
            "    algorithms: [RS256]",
            "tiers:",
            "  premium: {rate: 1000000, burst: 1000000}",
            "default_tier: premium",
        ]
    lines += [
        "routes:",
        "  - name: item",
        '    match: {path: "/item/{id}", methods: [GET]}',
        "    upstream: item",
    ]
    if jwks_url is not None:
        lines.append("    auth: [jwt]")
    return "\n".join(lines) + "\n"


def nginx_config(directory: Path, port: int, upstream: Server) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
    upstream backend {{
        server {HOST}:{upstream.port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    semantics: str
    make: Callable[[], Server]
    token: str = ""
    log: Path | None = None
    steady: bool = False
    unavailable: str | None = None
    owned: bool = True
    """False: the server is already running (the upstream itself, for the direct rows)."""


async def verify(target: Target, server: Server, token: str) -> None:
    expected = item_body("12345")
    url = server.base + ITEM
    async with aiohttp.ClientSession() as session:
        if token:
            async with session.get(url) as response:
                if response.status != 401:
                    raise Failure(f"without a token: {response.status}, expected 401")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.get(url, headers=headers) as response:
            body = await response.read()
            if response.status != 200 or body != expected:
                raise Failure(f"{response.status} {body[:60]!r}, not the upstream's body")
            if token:
                if response.headers.get("x-saw-user") != SUBJECT:
                    raise Failure("the verified subject did not reach the upstream")
                if "RateLimit-Limit" not in response.headers:
                    raise Failure("no RateLimit-Limit header: the rate limit is not applied")
        if target.name in BARES:
            await _verify_client(session, server.base, expected)


async def _verify_client(session: aiohttp.ClientSession, base: str, expected: bytes) -> None:
    """The bare proxies' upstream clients: a chunked answer with two Set-Cookie headers, an
    answer that closes its connection, then concurrent requests on the pool, all answered with
    the upstream's exact body."""
    async with session.get(base + "/chunked/12345") as response:
        body = await response.read()
        if response.status != 200 or body != expected:
            raise Failure(f"chunked: {response.status} {body[:60]!r}, not the upstream's body")
        cookies = response.headers.getall("Set-Cookie", [])
        if cookies != ["a=1; Path=/", "b=2; Path=/"]:
            raise Failure(f"chunked: Set-Cookie {cookies}, not the upstream's two")
    for path in ("/close/12345", ITEM):
        async with session.get(base + path) as response:
            body = await response.read()
            if response.status != 200 or body != expected:
                raise Failure(f"{path}: {response.status} {body[:60]!r}, not the upstream's body")

    async def one() -> bytes:
        async with session.get(base + ITEM) as response:
            return await response.read() if response.status == 200 else b""

    bodies = await asyncio.gather(*(one() for _ in range(40)))
    if any(body != expected for body in bodies):
        raise Failure("concurrent requests: an answer that is not the upstream's body")


# -- measuring --


def error_rows(target: Target, settings: Settings, message: str) -> list[list[Result]]:
    rows: list[list[Result]] = [
        [
            Result(
                scenario=THROUGHPUT,
                implementation=target.name,
                semantics=target.semantics,
                rate=0,
                unit="req/s",
                baseline=target.name == NGINX,
                error=message,
            )
        ],
        [],
    ]
    for rate in settings.rates if target.steady else ():
        rows[1].append(
            Result(
                scenario=steady_name(rate),
                implementation=target.name,
                semantics=target.semantics,
                rate=0,
                unit="req/s",
                error=message,
            )
        )
    return rows


THROUGHPUT = "throughput (closed loop)"


def steady_name(rate: float) -> str:
    return f"steady {rate:,.0f} req/s"


async def measure(
    target: Target, settings: Settings, upstream: Server
) -> tuple[Measured, list[tuple[float, list[float], float]]]:
    """Start `target`, check it, warm it, time it with wrk; then its steady runs, if any:
    (rate, latencies, achieved rate) for each of `settings.rates`."""
    server = target.make()
    async with running(server) if target.owned else contextlib.nullcontext(server):
        await verify(target, server, target.token)
        url = server.base + ITEM
        await closed_load(settings, url, target.token, settings.warm)
        before = cpu_ticks(server.pid)
        upstream_before = cpu_ticks(upstream.pid)
        children_before = _children_cpu()  # wrk, reaped when its run ends
        log_before = target.log.stat().st_size if target.log and target.log.exists() else 0
        load = await closed_load(settings, url, target.token, settings.seconds)
        tick = os.sysconf("SC_CLK_TCK")
        cpu_us = (cpu_ticks(server.pid) - before) / tick / load.requests * 1e6
        upstream_us = (cpu_ticks(upstream.pid) - upstream_before) / tick / load.requests * 1e6
        load_us = (_children_cpu() - children_before) / load.requests * 1e6
        busy = (cpu_us + upstream_us + load_us) * load.rate / 1e6
        notes = [
            f"CPU per request: the load generator {load_us:.0f} us, the upstream "
            f"{upstream_us:.0f} us; with the proxy's, {busy:.2f} of {os.cpu_count()} cores busy"
        ]
        if target.log is not None:
            lines = target.log.read_bytes()[log_before:].count(b"\n")
            notes.append(
                f"{lines:,} access-log lines written ({lines / load.requests:.2f} per request)"
            )
        note = "; ".join(notes)
        result = Measured(
            scenario=THROUGHPUT,
            implementation=target.name,
            semantics=target.semantics,
            rate=load.rate,
            unit="req/s",
            given_p50=load.p50,
            given_p99=load.p99,
            cpu_us_per_op=cpu_us,
            note=note,
        )
        steady = []
        for rate in settings.rates if target.steady else ():
            latencies, achieved = await steady_load(settings, url, target.token, rate)
            steady.append((rate, latencies, achieved))
        return result, steady


async def run(settings: Settings, directory: Path) -> list[Result]:
    throughput: list[Result] = []
    steady: dict[float, list[Result]] = {rate: [] for rate in settings.rates}
    async with (
        issuer() as jwt_issuer,
        running(Server("upstream", child("upstream"), logs=directory)) as upstream,
    ):

        def gateway(
            name: str, jwks: str | None, level: str, client: str = "http1"
        ) -> Callable[[], Server]:
            config = directory / f"{name}.yaml"
            config.write_text(gateway_config(upstream, jwks, client=client))
            log = directory / f"{name}.log"
            return lambda: Server(name, child("gateway", config, log, level), logs=directory)

        def workers(count: int) -> Callable[[], Server]:
            def start() -> Server:
                port = free_port()
                config = directory / f"workers{count}.yaml"
                config.write_text(gateway_config(upstream, None, port=port))
                argv = [sys.executable, "-m", "framework.cli", "gateway", "--config", str(config)]
                return Server(
                    f"workers{count}",
                    [*argv, "--workers", str(count)],
                    port=port,
                    logs=directory,
                    env={"MSA_LOG_LEVEL": "WARNING"},  # the access log off, as in (b)
                )

            return start

        def nginx() -> Server:
            assert settings.nginx is not None
            where = directory / "nginx"
            where.mkdir(exist_ok=True)
            where.chmod(0o755)  # the worker (user nobody, when run as root) needs to enter it
            port = free_port()
            conf = where / "nginx.conf"
            conf.write_text(nginx_config(where, port, upstream))
            argv = [settings.nginx, "-p", str(where), "-e", str(where / "error.log")]
            argv += ["-c", str(conf), "-g", "daemon off;"]
            return Server("nginx", argv, port=port, logs=directory)

        def fastapi() -> Server:
            port = free_port()
            return Server(
                "fastapi", child("fastapi", upstream.base, port), port=port, logs=directory
            )

        def bare(role: str) -> Callable[[], Server]:
            return lambda: Server(role, child(role, upstream.base, free_port()), logs=directory)

        token = jwt_issuer.token
        no_nginx = None if settings.nginx else "no nginx: apt-get install -y nginx-light"
        targets = [
            Target(
                DIRECT, "aiohttp upstream, no proxy", lambda: upstream, steady=True, owned=False
            ),
            Target(
                NGINX,
                "proxy_pass, keepalive 32, 1 worker",
                nginx,
                steady=True,
                unavailable=no_nginx,
            ),
            Target(
                PLAIN,
                "route -> pool, access log off",
                gateway("plain", None, "WARNING"),
                steady=True,
            ),
            Target(
                PLAIN_AIOHTTP,
                "as (b), upstream client: aiohttp ClientSession",
                gateway("plain-aiohttp", None, "WARNING", client="aiohttp"),
            ),
            Target(
                WORKERS,
                "as (b), msa gateway --workers 2 (SO_REUSEPORT)",
                workers(2),
            ),
            Target(
                LOGGED,
                "+ JSON access log to a file",
                gateway("logged", None, "INFO"),
                log=directory / "logged.log",
            ),
            Target(
                FULL,
                "+ JWT RS256 + rate limit + log",
                gateway("full", jwt_issuer.jwks_url, "INFO"),
                token=token,
                log=directory / "full.log",
            ),
            Target(FASTAPI, "catch-all route, shared httpx", fastapi),
            Target(BARE, "catch-all aiohttp handler -> shared ClientSession, uvloop", bare("bare")),
            Target(
                BARE_PYREQWEST, "as (f), client: shared pyreqwest Client", bare("bare-pyreqwest")
            ),
            Target(BARE_LEAN, "as (f), client: asyncio + httptools, LIFO pool", bare("bare-lean")),
        ]
        if settings.rows:
            targets = [t for t in targets if row_key(t.name) in settings.rows]
        direct_steady: dict[float, list[float]] = {}
        for target in targets:
            print(f"  {target.name} ...", file=sys.stderr, flush=True)
            if target.unavailable:
                _add_errors(target, settings, target.unavailable, throughput, steady)
                continue
            try:
                result, runs = await measure(target, settings, upstream)
            except (Failure, OSError, ValueError, KeyError, aiohttp.ClientError) as exc:
                message = str(exc) if isinstance(exc, Failure) else f"{type(exc).__name__}: {exc}"
                _add_errors(target, settings, message, throughput, steady)
                continue
            if target.name == NGINX:
                result.baseline = True
            if target.name == PLAIN:
                result.checks = [
                    Check(baseline=NGINX, minimum=0.5, label="nginx"),
                    Check(baseline=FASTAPI, minimum=1.5, label="FastAPI"),
                    Check(baseline=BARE, minimum=1.0, label="bare aiohttp proxy"),
                ]
            if target.name == FULL:
                result.checks = [Check(baseline=PLAIN, minimum=0.8, label="our plain proxy")]
            if target.name == WORKERS:
                result.checks = [Check(baseline=PLAIN, minimum=1.6, label="1 worker")]
            throughput.append(result)
            for rate, latencies, achieved in runs:
                if target.name == DIRECT:
                    direct_steady[rate] = latencies
                judged = target.name == PLAIN and rate == settings.rates[0]
                steady[rate].append(
                    Result(
                        scenario=steady_name(rate),
                        implementation=target.name,
                        semantics=target.semantics,
                        rate=achieved,
                        unit="req/s",
                        latencies_ms=latencies,
                        baseline=target.name == DIRECT,
                        note=_added(latencies, direct_steady.get(rate), judged),
                    )
                )
    _added_closed(throughput)
    return throughput + [r for rate in settings.rates for r in steady[rate]]


def _add_errors(
    target: Target,
    settings: Settings,
    message: str,
    throughput: list[Result],
    steady: dict[float, list[Result]],
) -> None:
    closed, paced = error_rows(target, settings, message)
    throughput += closed
    for result in paced:
        steady[next(r for r in settings.rates if steady_name(r) == result.scenario)].append(result)


def _added(latencies: list[float], direct: list[float] | None, judged: bool) -> str:
    if direct is None or latencies is direct:
        return ""
    p50 = percentile(latencies, 50) - percentile(direct, 50)
    p99 = percentile(latencies, 99) - percentile(direct, 99)
    text = f"added vs direct: p50 {p50:+.2f} ms, p99 {p99:+.2f} ms"
    if judged:
        text += f"; target added p50 <= 1 ms: {'PASS' if p50 <= 1.0 else 'FAIL'}"
        text += f", added p99 <= 5 ms: {'PASS' if p99 <= 5.0 else 'FAIL'}"
    return text


def _added_closed(results: list[Result]) -> None:
    direct = next((r for r in results if r.implementation == DIRECT and not r.error), None)
    if direct is None or direct.p50 is None or direct.p99 is None:
        return
    for result in results:
        if result is direct or result.error or result.p50 is None or result.p99 is None:
            continue
        added = (
            f"added vs direct: p50 {result.p50 - direct.p50:+.2f} ms, "
            f"p99 {result.p99 - direct.p99:+.2f} ms"
        )
        result.note = f"{added}; {result.note}" if result.note else added


def _version(argv: Sequence[str]) -> str:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke run")
    parser.add_argument("--seconds", type=float, help="closed-loop run length (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--rates",
        default="1000,200",
        help="steady rates in req/s, comma-separated; the first is the target's (1000,200)",
    )
    parser.add_argument(
        "--rows",
        default="",
        help="only these rows, comma-separated keys: a,d,b,b',c,e,f,f2,f3 (default: all)",
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.role:
        run_role(args.role, rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = Settings(
        wrk=shutil.which("wrk"),
        nginx=shutil.which("nginx")
        or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None),
        connections=args.connections,
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        warm=1.0 if args.quick else 2.0,
        rates=tuple(float(r) for r in args.rates.split(",") if r.strip()),
        steady_seconds=3.0 if args.quick else 8.0,
        steady_warm=1.0,
        rows=frozenset(r.strip() for r in args.rows.split(",") if r.strip()),
    )
    known = {
        row_key(name)
        for name in (DIRECT, NGINX, PLAIN, PLAIN_AIOHTTP, WORKERS, LOGGED, FULL, FASTAPI, *BARES)
    }
    if settings.rows - known:
        parser.error(f"unknown rows {sorted(settings.rows - known)}; known: {sorted(known)}")
    load = (
        f"wrk -t1 -c{settings.connections} -d{settings.seconds:g}s --latency "
        f"({_version([settings.wrk, '-v'])})"
        if settings.wrk
        else f"aiohttp closed-loop client, {settings.connections} connections, "
        f"{settings.seconds:g} s (no wrk: apt-get install -y wrk)"
    )
    print(f"benchmarks/gateway.py - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        environment(
            [
                "msa-framework",
                "aiohttp",
                "uvloop",
                "PyJWT",
                "cryptography",
                "fastapi",
                "httpx",
                "uvicorn",
                "httptools",
                "pyreqwest",
            ],
            extra=[
                (
                    "nginx",
                    _version([settings.nginx, "-v"])
                    if settings.nginx
                    else "not installed (apt-get install -y nginx-light)",
                ),
                ("Load", load),
                (
                    "Steady",
                    f"{' and '.join(f'{r:,.0f}' for r in settings.rates)} req/s open loop, "
                    f"{settings.steady_warm:g} s warm-up + {settings.steady_seconds:g} s each, "
                    "Python client (uvloop, raw asyncio HTTP/1.1, up to 64 connections)",
                ),
                (
                    "Shape",
                    f"GET {ITEM}, {len(item_body('12345'))} B JSON answer; every server one "
                    "process, sharing the CPUs with the upstream and the load generator",
                ),
                (
                    "Machine",
                    "1/5/15-min load average at start: {:.2f} {:.2f} {:.2f}".format(
                        *os.getloadavg()
                    ),
                ),
            ],
        )
    )
    began, machine0, own0 = time.perf_counter(), machine_cpu_seconds(), own_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as directory:
        results = uvloop.run(run(settings, Path(directory)))
    wall = time.perf_counter() - began
    others = (machine_cpu_seconds() - machine0) - (own_cpu_seconds() - own0)
    share = others / (wall * (os.cpu_count() or 1))
    print()
    print(render(results))
    print(
        f"\n(total {wall:.0f} s; CPU used by processes other than this benchmark's during the "
        f"run: {others:.0f} core-seconds, {share:.0%} of the machine; load average at end: "
        "{:.2f} {:.2f} {:.2f})".format(*os.getloadavg())
    )
    if share > 0.05:
        print(
            "warning: other processes were busy during the run; these numbers are not those "
            "of a quiet machine."
        )
    return 1 if any(r.error for r in results) else 0


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (from /proc/stat): user, nice and system
    time, and interrupts - loopback traffic is mostly softirq time there, while a process's own
    system time includes what it ran of it - and steal (guest time is already in user)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have exited (servers, wrk)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


if __name__ == "__main__":
    raise SystemExit(main())
