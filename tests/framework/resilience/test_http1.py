"""`Http1Client`, the upstream pools' HTTP/1.1 client, against real servers on 127.0.0.1.

An aiohttp server where a well-behaved upstream suffices; a scripted `asyncio.start_server`
(`Upstream`) where a test needs the exact bytes of an answer, to count the connections it
accepted (reuse and non-reuse), to see a connection the client closed (the end of the stream where
the next request would start), or to answer only when the test says so. Nothing here bets on the
clock: a test awaits an event, bounded by `WAIT` only so that a broken client fails instead of
hanging; the small `timeout`s given to the client are deadlines it must meet against a server that
never answers, never thresholds.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from multidict import CIMultiDict

from framework.resilience.http1 import Http1Client, RawResponse, UpstreamConnectionError
from tests.framework.gateway.conftest import eventually

WAIT = 10.0
"""Seconds that bound a wait which would otherwise hang; no test relies on how long it takes."""


# -- the scripted upstream -------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the upstream received it: its head's exact bytes and its body."""

    head: bytes
    body: bytes = b""

    @property
    def line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]

    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if line]
        return [(name, value.strip()) for name, value in pairs]

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers() if key.lower() == name.lower()]


class Conn:
    """One connection the upstream accepted, seen from the server's side."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[Request] = []
        self.ended = asyncio.Event()
        """The client closed the connection: the stream ended (or was reset)."""

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed the connection."""
        try:
            request = Request(await self.reader.readuntil(b"\r\n\r\n"))
            length = request.header("content-length")
            if length:
                request.body = await self.reader.readexactly(int(length[0]))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended.set()
            return None
        self.requests.append(request)
        return request

    async def send(self, *pieces: bytes) -> None:
        """Write each piece on its own (draining between them)."""
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()

    async def until_ended(self) -> None:
        """Read (and ignore) whatever arrives until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.ended.set()


Handler = Callable[[Conn], Awaitable[None]]
Answer = Callable[[Conn, Request], Awaitable[bytes] | bytes]


class Upstream:
    """A raw server on 127.0.0.1: `handler` runs for each accepted connection, which is read
    until the client closes it once the handler returns (unless the handler closed it)."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_context
        self.conns: list[Conn] = []
        self.url = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def requests(self) -> list[Request]:
        return [request for conn in self.conns for request in conn.requests]

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.ssl)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        try:
            await self.handler(conn)
            if not writer.is_closing():
                await conn.until_ended()
        except ConnectionError:
            conn.ended.set()
        except asyncio.CancelledError:  # stopped by __aexit__ (the task must end as a success:
            pass  # asyncio's stream callback asks a finished handler for its exception)
        finally:
            writer.close()


def serve(answer: Answer) -> Handler:
    """A keep-alive server: each request gets `answer(conn, request)`, until the client closes."""

    async def handler(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            reply = answer(conn, request)
            await conn.send(reply if isinstance(reply, bytes) else await reply)

    return handler


def response(body: bytes = b"ok", *headers: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    """An answer framed by Content-Length, with `headers` ("Name: value") after it."""
    head = "\r\n".join([status, f"Content-Length: {len(body)}", *headers])
    return (head + "\r\n\r\n").encode() + body


def by_connection(conn: Conn, request: Request) -> bytes:
    """Answers with the index of the connection the request came on."""
    return response(str(conn.index).encode())


async def ended(conn: Conn) -> None:
    """Return once the client has closed `conn`."""
    async with asyncio.timeout(WAIT):
        await conn.ended.wait()


# -- the client, and an aiohttp upstream -----------------------------------------------------------


@asynccontextmanager
async def open_client(**options: Any) -> AsyncIterator[Http1Client]:
    client = Http1Client(**options)
    try:
        yield client
    finally:
        await client.close()


async def call(
    client: Http1Client,
    url: str,
    target: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = WAIT,
    connect_timeout: float | None = None,
    server_hostname: str | None = None,
) -> RawResponse:
    return await client.request(
        url,
        method,
        target,
        CIMultiDict(headers or {}),
        body,
        timeout=timeout,
        connect_timeout=connect_timeout,
        server_hostname=server_hostname,
    )


@asynccontextmanager
async def aiohttp_upstream(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def idle_connections(client: Http1Client) -> list[Any]:
    """The client's idle connections (its internals: the only way to see what it noticed)."""
    return [connection for idle in client._idle.values() for connection in idle]


# -- TLS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for "localhost" and 127.0.0.1."""

    certfile: Path
    keyfile: Path

    def server_context(self, names: list[str | None]) -> ssl.SSLContext:
        """A server context that appends the server name each client sends (SNI) to `names`."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certfile, self.keyfile)

        def record(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            names.append(name)

        context.sni_callback = record
        return context

    def trusting_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certfile))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(certfile, keyfile)


# -- requests and answers --------------------------------------------------------------------------


async def test_an_aiohttp_upstream_gets_the_request_and_its_answer_is_read() -> None:
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"q": request.query["q"]}, status=201, headers={"X-A": "1"})

    app = web.Application()
    app.router.add_get("/items", handle)
    async with aiohttp_upstream(app) as url, open_client() as client:
        answer = await call(client, url, "/items?q=a%20b", headers={"X-Trace": "t1"})

    assert answer.status == 201
    assert answer.body == b'{"q": "a b"}'
    assert answer.headers["X-A"] == "1"
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    assert not answer.decoded
    (request,) = seen
    assert request.headers["X-Trace"] == "t1"
    assert request.headers["Host"] == url.removeprefix("http://")
    # it adds Host and nothing else: no User-Agent, no Accept-Encoding
    assert set(request.headers) == {"X-Trace", "Host"}


async def test_the_request_head_carries_host_and_a_content_length_it_computes() -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client() as client:
        await call(
            client,
            upstream.url,
            "/orders",
            method="POST",
            headers={"Content-Length": "999", "X-Trace": "t"},
            body=b'{"a":1}',
        )
        await call(client, upstream.url, "/empty", method="POST")
        await call(client, upstream.url, "/read", headers={"Host": "api.example"})

    posted, empty, read = upstream.requests
    assert posted.line == "POST /orders HTTP/1.1"
    assert posted.header("Content-Length") == ["7"]
    assert posted.body == b'{"a":1}'
    assert posted.header("Host") == [f"127.0.0.1:{upstream.port}"]
    assert posted.header("X-Trace") == ["t"]
    assert empty.header("Content-Length") == ["0"]
    assert read.header("Content-Length") == []
    assert read.header("Host") == ["api.example"]


async def test_a_keep_alive_connection_is_reused() -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client() as client:
        answers = [await call(client, upstream.url, f"/{n}") for n in range(3)]

    assert [a.body for a in answers] == [b"0", b"0", b"0"]
    assert len(upstream.conns) == 1
    assert [r.target for r in upstream.conns[0].requests] == ["/0", "/1", "/2"]


async def held_requests(upstream: Upstream, client: Http1Client) -> dict[str, RawResponse]:
    """Sends `/a` and `/b` at once (two connections); the upstream answers `/b` first, then
    `/a`, so `/a`'s connection is the last released."""
    gates = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    upstream.handler = serve(lambda conn, request: held(conn, request, gates))
    tasks = {path: asyncio.create_task(call(client, upstream.url, path)) for path in gates}
    await eventually(lambda: len(upstream.requests) == 2)
    gates["/b"].set()
    answer_b = await tasks["/b"]
    gates["/a"].set()
    answer_a = await tasks["/a"]
    assert answer_a.body != answer_b.body  # two connections
    return {"/a": answer_a, "/b": answer_b}


async def held(conn: Conn, request: Request, gates: dict[str, asyncio.Event]) -> bytes:
    if request.target in gates:
        await gates[request.target].wait()
    return by_connection(conn, request)


async def test_idle_connections_are_reused_last_released_first() -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client() as client:
        answers = await held_requests(upstream, client)
        again = await call(client, upstream.url, "/c")
        then = await call(client, upstream.url, "/d")

    assert again.body == answers["/a"].body  # the warmest connection
    assert then.body == answers["/a"].body
    assert len(upstream.conns) == 2


async def test_more_idle_connections_than_max_idle_close_the_coldest() -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client(max_idle=1) as client:
        answers = await held_requests(upstream, client)
        coldest = upstream.conns[int(answers["/b"].body)]
        await ended(coldest)  # released first, closed when /a's connection came back
        again = await call(client, upstream.url, "/c")

    assert again.body == answers["/a"].body
    assert len(upstream.conns) == 2


async def test_close_idle_closes_the_idle_connections_of_one_origin() -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client() as client:
        await held_requests(upstream, client)  # two idle connections now
        assert client.close_idle(upstream.url) == 2
        await ended(upstream.conns[0])
        await ended(upstream.conns[1])
        again = await call(client, upstream.url, "/c")
        assert client.close_idle("http://127.0.0.1:1") == 0  # an origin it never reached

    assert again.body == b"2"  # a third connection
    assert len(upstream.conns) == 3


async def test_a_chunked_body_is_read_across_pieces_and_the_connection_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    )

    async def handler(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target == "/chunked":  # in pieces that cut the framing anywhere
                await conn.send(*(chunked[i : i + 7] for i in range(0, len(chunked), 7)))
            else:
                await conn.send(response(b"next"))

    async with Upstream(handler) as upstream, open_client() as client:
        answer = await call(client, upstream.url, "/chunked")
        following = await call(client, upstream.url, "/next")

    assert (answer.status, answer.body) == (200, b"hello world")
    assert list(answer.headers.items()) == [("X-A", "1")]  # no Transfer-Encoding
    assert following.body == b"next"
    assert len(upstream.conns) == 1


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_a_body_without_framing_runs_to_the_end_of_the_connection(version: str) -> None:
    async def handler(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(f"{version} 200 OK\r\nX-A: 1\r\n\r\n".encode(), b"part one, ", b"two")
        conn.writer.close()

    async with Upstream(handler) as upstream, open_client() as client:
        answer = await call(client, upstream.url)
        upstream.handler = serve(by_connection)
        following = await call(client, upstream.url)

    assert (answer.status, answer.body) == (200, b"part one, two")
    assert list(answer.headers.items()) == [("X-A", "1")]
    assert following.body == b"1"  # a new connection


async def test_interim_answers_are_skipped() -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )
    final = response(b"final", "X-Final: yes", status="HTTP/1.1 201 Created")

    async def handler(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.send(interim, final)  # interim answers and the final one apart
        if await conn.read_request() is not None:
            await conn.send(interim + final)  # and in one piece
        await serve(by_connection)(conn)

    async with Upstream(handler) as upstream, open_client() as client:
        first = await call(client, upstream.url)
        second = await call(client, upstream.url)
        third = await call(client, upstream.url)

    for answer in (first, second):
        assert (answer.status, answer.body) == (201, b"final")
        assert list(answer.headers.items()) == [("X-Final", "yes")]  # no Link from the 103
    assert third.body == b"0"  # the same connection all along
    assert len(upstream.conns) == 1


async def test_a_head_is_answered_without_its_body_and_its_connection_not_reused() -> None:
    async def answer(conn: Conn, request: Request) -> bytes:
        if request.line.startswith("HEAD "):  # declares a body it does not send
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n"
        return by_connection(conn, request)

    async with Upstream(serve(answer)) as upstream, open_client() as client:
        head = await call(client, upstream.url, method="HEAD")
        following = await call(client, upstream.url)
        await ended(upstream.conns[0])

    assert (head.status, head.body) == (200, b"")
    assert list(head.headers.items()) == [("X-A", "1")]
    assert following.body == b"1"
    assert len(upstream.conns) == 2


@pytest.mark.parametrize(
    ("status", "headers", "connections"),
    [
        ("HTTP/1.1 200 OK", (), 1),
        ("HTTP/1.1 200 OK", ("Connection: close",), 2),
        ("HTTP/1.0 200 OK", (), 2),
        ("HTTP/1.0 200 OK", ("Connection: keep-alive",), 1),
    ],
)
async def test_an_answer_that_does_not_allow_keep_alive_closes_its_connection(
    status: str, headers: tuple[str, ...], connections: int
) -> None:
    def answer(conn: Conn, request: Request) -> bytes:
        return response(str(conn.index).encode(), *headers, status=status)

    async with Upstream(serve(answer)) as upstream, open_client() as client:
        first = await call(client, upstream.url)
        second = await call(client, upstream.url)
        if connections == 2:
            await ended(upstream.conns[0])  # the client closed it: the upstream did not

    assert (first.body, second.body) == (b"0", str(connections - 1).encode())
    assert len(upstream.conns) == connections


async def test_hop_by_hop_headers_and_what_connection_names_are_dropped() -> None:
    headers = (
        "Connection: keep-alive, X-Private",
        "Keep-Alive: timeout=5",
        "X-Kept: 1",
        "X-Private: secret",
        "Set-Cookie: a=1",
        "Proxy-Authenticate: Basic",
        "Proxy-Anything: 1",
        "TE: trailers",
        "Trailer: X-Sum",
        "Upgrade: h2c",
        "Set-Cookie: b=2",
        "Content-Type: text/plain",
    )

    async with (
        Upstream(serve(lambda c, r: response(b"ok", *headers))) as upstream,
        open_client() as client,
    ):
        answer = await call(client, upstream.url)

    assert list(answer.headers.items()) == [
        ("X-Kept", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),  # repeated, in order
        ("Content-Type", "text/plain"),
    ]
    assert answer.body == b"ok"


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("gzip", gzip.compress(b"hello " * 50)),
        ("x-gzip", gzip.compress(b"hello " * 50)),
        ("deflate", zlib.compress(b"hello " * 50)),
        ("deflate", zlib.compress(b"hello " * 50)[2:-4]),  # raw deflate, as some servers send
    ],
)
async def test_a_gzip_or_deflate_body_is_decoded(coding: str, encoded: bytes) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=encoded, headers={"Content-Encoding": coding, "X-A": "1"})

    app = web.Application()
    app.router.add_get("/", handle)
    async with aiohttp_upstream(app) as url, open_client() as client:
        answer = await call(client, url)

    assert answer.body == b"hello " * 50
    assert answer.decoded
    assert "Content-Encoding" not in answer.headers
    assert answer.headers["X-A"] == "1"


@pytest.mark.parametrize("coding", ["br", "zstd", "identity"])
async def test_other_codings_pass_through(coding: str) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"\x8b\x00opaque", headers={"Content-Encoding": coding})

    app = web.Application()
    app.router.add_get("/", handle)
    async with aiohttp_upstream(app) as url, open_client() as client:
        answer = await call(client, url)

    assert answer.body == b"\x8b\x00opaque"
    assert not answer.decoded
    assert answer.headers["Content-Encoding"] == coding


async def test_a_gzip_body_that_does_not_decode_is_a_connection_error() -> None:
    def answer(conn: Conn, request: Request) -> bytes:
        return response(b"not gzip at all", "Content-Encoding: gzip")

    async with Upstream(serve(answer)) as upstream, open_client() as client:
        with pytest.raises(UpstreamConnectionError, match="does not decode"):
            await call(client, upstream.url)
        await ended(upstream.conns[0])


# -- requests refused before anything is sent ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ({"X-A": "1\r\nX-Injected: 1"}, "/bad"),
        ({"X-A": "1\nX-Injected: 1"}, "/bad"),
        ({"X-A": "1\rX-Injected: 1"}, "/bad"),
        ({"X-A": "1\0"}, "/bad"),
        ({"X-A\r\nX-Injected": "1"}, "/bad"),
        ({"Host": "h\r\n\r\nGET /smuggled HTTP/1.1"}, "/bad"),
        ({}, "/bad\r\nX-Injected: 1"),
        ({}, "/bad HTTP/1.1\r\n\r\nGET /smuggled"),
        ({}, "/bad\0"),
        ({}, "/bad\n"),
        ({}, "/a b"),
    ],
)
async def test_cr_lf_or_nul_in_a_header_or_the_target_is_refused_before_sending(
    headers: dict[str, str], target: str
) -> None:
    async with Upstream(serve(by_connection)) as upstream, open_client() as client:
        await call(client, upstream.url, "/one")
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            await call(client, upstream.url, target, headers=headers)
        after = await call(client, upstream.url, "/two")

    assert after.body == b"0"  # the idle connection was still fit to use: nothing was written
    assert [r.line for r in upstream.requests] == ["GET /one HTTP/1.1", "GET /two HTTP/1.1"]


# -- failures --------------------------------------------------------------------------------------


async def test_a_refused_connection_is_an_upstream_connection_error() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        async with open_client() as client:
            with pytest.raises(UpstreamConnectionError, match="cannot connect") as caught:
                await call(client, url)

    assert isinstance(caught.value, OSError)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "closed the connection before answering"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed the connection before answering"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed the connection before"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not HTTP"),
        (b"garbage\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "not HTTP"),
    ],
)
async def test_a_broken_or_foreign_answer_is_an_upstream_connection_error(
    reply: bytes, message: str
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index > 0:
            await serve(by_connection)(conn)
        elif await conn.read_request() is not None:
            await conn.send(reply)
            if message.startswith("closed"):
                conn.writer.close()

    async with Upstream(handler) as upstream, open_client() as client:
        with pytest.raises(UpstreamConnectionError, match=message):
            await call(client, upstream.url)
        following = await call(client, upstream.url)

    assert following.body == b"1"  # a new connection
    assert len(upstream.conns) == 2


async def test_a_read_timeout_closes_the_connection_and_a_late_answer_reaches_nobody() -> None:
    late, late_sent = asyncio.Event(), asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            if await conn.read_request() is None:
                return
            await late.wait()
            conn.writer.write(response(b"late"))  # to a client that gave up
            late_sent.set()
            return
        await serve(lambda c, r: response(b"fresh"))(conn)

    async with Upstream(handler) as upstream, open_client() as client:
        with pytest.raises(TimeoutError):
            await call(client, upstream.url, "/slow", timeout=0.05)
        late.set()
        async with asyncio.timeout(WAIT):
            await late_sent.wait()
        following = await call(client, upstream.url, "/next")
        await ended(upstream.conns[0])

    assert following.body == b"fresh"
    assert len(upstream.conns) == 2


async def test_a_shorter_deadline_set_later_still_times_out_first() -> None:
    """One timer serves every request's deadline: a request with a shorter one, sent while a
    longer one waits, times out at its own; the longer one still gets its answer."""
    release = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        if conn.index == 0:
            await release.wait()
            conn.writer.write(response(b"patient"))
            await conn.writer.drain()
            return
        await asyncio.Event().wait()  # the impatient request is never answered

    async with Upstream(handler) as upstream, open_client() as client:
        patient = asyncio.create_task(call(client, upstream.url, "/patient", timeout=30))
        await eventually(lambda: len(upstream.requests) == 1)
        with pytest.raises(TimeoutError):
            await call(client, upstream.url, "/impatient", timeout=0.05)
        assert not patient.done()
        release.set()
        answer = await patient

    assert answer.body == b"patient"


async def test_a_cancelled_request_closes_its_connection() -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.read_request()
            return  # never answers; read until the client closes
        await serve(by_connection)(conn)

    async with Upstream(handler) as upstream, open_client() as client:
        task = asyncio.create_task(call(client, upstream.url, "/slow"))
        await eventually(lambda: len(upstream.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ended(upstream.conns[0])
        following = await call(client, upstream.url, "/next")

    assert following.body == b"1"


@pytest.mark.parametrize(
    ("timeout", "connect_timeout"),
    [(0.05, None), (WAIT, 0.05)],
    ids=["the-deadline", "the-connect-deadline"],
)
async def test_a_connection_that_cannot_be_made_in_time_is_a_timeout(
    certificate: Certificate, timeout: float, connect_timeout: float | None
) -> None:
    """A TCP server that never answers the TLS handshake: the connection never completes."""

    async def silent(conn: Conn) -> None:
        pass

    async with Upstream(silent) as upstream:
        url = upstream.url.replace("http://", "https://")
        async with open_client(ssl_context=certificate.trusting_context()) as client:
            with pytest.raises(TimeoutError) as caught:
                await call(client, url, timeout=timeout, connect_timeout=connect_timeout)
        await eventually(lambda: len(upstream.conns) == 1)
        await ended(upstream.conns[0])  # the client gave up on it

    assert not isinstance(caught.value, UpstreamConnectionError)


# -- idle connections ------------------------------------------------------------------------------


async def test_an_idle_connection_the_upstream_closed_is_dropped() -> None:
    async def handler(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.send(response(str(conn.index).encode()))  # keep-alive, yet
        conn.writer.close()  # closed once answered

    async with Upstream(handler) as upstream, open_client() as client:
        first = await call(client, upstream.url)
        await eventually(lambda: all(c.closed for c in idle_connections(client)))
        second = await call(client, upstream.url)

    assert (first.body, second.body) == (b"0", b"1")


async def test_bytes_on_an_idle_connection_close_it() -> None:
    stray = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            if await conn.read_request() is not None:
                await conn.send(response(b"first"))
                await stray.wait()
                await conn.send(response(b"stray"))  # nobody asked
            return
        await serve(lambda c, r: response(b"fresh"))(conn)

    async with Upstream(handler) as upstream, open_client() as client:
        first = await call(client, upstream.url)
        stray.set()
        await ended(upstream.conns[0])
        second = await call(client, upstream.url)

    assert (first.body, second.body) == (b"first", b"fresh")
    assert len(upstream.conns) == 2


async def test_an_answer_sent_beyond_the_one_asked_for_is_not_taken_for_it() -> None:
    """Two answers in one piece to one request: the first is the answer, the rest is stray
    bytes (the connection is not reused)."""

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            if await conn.read_request() is not None:
                await conn.send(response(b"first") + response(b"extra", "X-Extra: 1"))
            return
        await serve(lambda c, r: response(b"fresh"))(conn)

    async with Upstream(handler) as upstream, open_client() as client:
        first = await call(client, upstream.url)
        assert (first.body, list(first.headers.items())) == (b"first", [])
        await ended(upstream.conns[0])  # closed by the client, never reused
        second = await call(client, upstream.url)

    assert second.body == b"fresh"


async def test_an_idle_connection_past_keepalive_timeout_is_closed_not_reused() -> None:
    async with (
        Upstream(serve(by_connection)) as upstream,
        open_client(keepalive_timeout=0) as client,
    ):
        first = await call(client, upstream.url)
        second = await call(client, upstream.url)
        await ended(upstream.conns[0])  # closed by the client when it would have been reused

    assert (first.body, second.body) == (b"0", b"1")


@pytest.mark.parametrize(("idle_for", "connections"), [(29.0, 1), (31.0, 2)])
async def test_keepalive_timeout_is_measured_from_when_the_connection_went_idle(
    idle_for: float, connections: int
) -> None:
    async with (
        Upstream(serve(by_connection)) as upstream,
        open_client(keepalive_timeout=30.0) as client,
    ):
        await call(client, upstream.url)
        for connection in idle_connections(client):  # as if it went idle that long ago
            connection.idle_since -= idle_for
        second = await call(client, upstream.url)

    assert second.body == str(connections - 1).encode()
    assert len(upstream.conns) == connections


async def test_close_closes_idle_connections_fails_requests_under_way_and_later_ones() -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.read_request()
            return  # never answers
        await serve(by_connection)(conn)

    async with Upstream(handler) as upstream:
        client = Http1Client()
        under_way = asyncio.create_task(call(client, upstream.url, "/slow"))
        await eventually(lambda: len(upstream.requests) == 1)
        idle = await call(client, upstream.url, "/quick")  # a second connection, now idle
        await client.close()
        with pytest.raises(UpstreamConnectionError, match="before answering"):
            await under_way
        await ended(upstream.conns[0])
        await ended(upstream.conns[1])
        with pytest.raises(UpstreamConnectionError, match="closed"):
            await call(client, upstream.url, "/after")
        await client.close()  # twice is fine

    assert idle.body == b"1"
    assert [r.target for r in upstream.requests] == ["/slow", "/quick"]
    assert len(upstream.conns) == 2


# -- TLS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "server_hostname", "sent"),
    [("127.0.0.1", "localhost", "localhost"), ("127.0.0.1", None, None)],
)
async def test_an_https_origin_is_verified_and_its_connection_kept(
    certificate: Certificate, host: str, server_hostname: str | None, sent: str | None
) -> None:
    names: list[str | None] = []
    context = certificate.server_context(names)
    async with Upstream(serve(by_connection), ssl_context=context) as upstream:
        url = f"https://{host}:{upstream.port}"
        async with open_client(ssl_context=certificate.trusting_context()) as client:
            answers = [await call(client, url, server_hostname=server_hostname) for _ in "ab"]

    assert [a.body for a in answers] == [b"0", b"0"]
    assert len(upstream.conns) == 1
    assert names == [sent]  # the name the client sent, once (an IP address is never sent)


async def test_an_https_origin_is_reached_by_its_name(certificate: Certificate) -> None:
    names: list[str | None] = []
    context = certificate.server_context(names)
    async with (
        Upstream(serve(by_connection), ssl_context=context) as upstream,
        open_client(ssl_context=certificate.trusting_context()) as client,
    ):
        answer = await call(client, f"https://localhost:{upstream.port}")

    assert answer.body == b"0"
    assert names == ["localhost"]


async def test_a_certificate_for_another_name_is_refused(certificate: Certificate) -> None:
    names: list[str | None] = []
    context = certificate.server_context(names)
    async with (
        Upstream(serve(by_connection), ssl_context=context) as upstream,
        open_client(ssl_context=certificate.trusting_context()) as client,
    ):
        with pytest.raises(UpstreamConnectionError) as caught:
            await call(client, upstream.url, server_hostname="other.example")

    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    assert names == ["other.example"]
    assert upstream.requests == []


async def test_a_certificate_nobody_trusts_is_refused(certificate: Certificate) -> None:
    context = certificate.server_context([])
    async with (
        Upstream(serve(by_connection), ssl_context=context) as upstream,
        open_client() as client,  # the system's trust store
    ):
        with pytest.raises(UpstreamConnectionError) as caught:
            await call(client, upstream.url)

    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    assert upstream.requests == []
