"""The hostile-client suite's kit: a recording upstream, a gateway process, a raw HTTP/1.1 client.

`RecordingUpstream` is two aiohttp servers on an event loop of their own, in a thread of the test
process, so they outlive each test's loop and the gateway process reaches them at any moment:

- the upstream (`url`) answers every request with a JSON echo and records it first: method, raw
  path, headers (in order, repeats kept, bytes as latin-1) and body. It parses requests far
  larger than aiohttp's defaults allow, so nothing forwarded goes unrecorded. A test asks
  afterwards what reached it: `upstream.saw(probe)`, `upstream.with_probe(probe)`;
- the issuer (`issuer_url`) serves the JWKS for the gateway's `auth.jwt.jwks_url` at
  `/.well-known/jwks.json`, and bait a hostile token or document may point at (`/attacker/...`,
  `/xxe`): every fetch is counted by path, so a test can assert the gateway never followed one.

    upstream = RecordingUpstream(jwks={"keys": [...]}, bait={"/attacker/jwks.json": b"..."})
    upstream.start()
    gateway = GatewayProcess.start(yaml_text, tmp_dir, name="main")   # a real `msa gateway`
    answer = await exchange(gateway.port, b"GET /x?probe=p1 HTTP/1.1\\r\\nHost: gw\\r\\n\\r\\n")
    assert answer.status == 404 and not upstream.saw("p1")
    gateway.stop(); upstream.stop()

Every request a test sends carries a probe id (`?probe=p17`, also `x-probe: p17`), which is
how the upstream's records are matched to the request that caused them.

`exchange(port, data)` writes raw bytes on a fresh connection, so nothing normalises the path or
the headers on the way, and parses what comes back into an `Answer`; a connection closed (or
reset) before a status line is an `Answer` with `status=None`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.framework.gateway.conftest import REPO

__all__ = [
    "Answer",
    "GatewayDidNotStart",
    "GatewayProcess",
    "Recorded",
    "RecordingUpstream",
    "connect",
    "exchange",
    "read_answer",
]

_PROBE = re.compile(r"[?&]probe=([A-Za-z0-9_-]+)")
_LISTENING = re.compile(r"gateway listening on port (\d+) \(admin (\d+)\)")
_PERMISSIVE = {"max_line_size": 1 << 20, "max_field_size": 1 << 20, "max_headers": 1 << 16}


# -- the recording upstream and the issuer ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    """Path and query exactly as they came (not decoded)."""
    headers: tuple[tuple[str, str], ...]
    """In order, repeats kept; names and values decoded as latin-1, so no byte is lost."""
    body: bytes

    def values(self, name: str) -> list[str]:
        """Every value of header `name` (any case), in order."""
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]

    @property
    def probe(self) -> str | None:
        found = _PROBE.search(self.raw_path)
        if found is not None:
            return found.group(1)
        probes = self.values("x-probe")
        return probes[0] if probes else None


class RecordingUpstream:
    """An upstream that records what reaches it, and an issuer serving a JWKS (see the module).

    `start()` returns once both listen; `stop()` closes them. Records and counts are read from
    any thread.
    """

    def __init__(self, *, jwks: Mapping[str, Any], bait: Mapping[str, bytes] | None = None):
        self._jwks = json.dumps(jwks).encode()
        self._bait = dict(bait or {})
        self._lock = threading.Lock()
        self._records: list[Recorded] = []
        self._fetches: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.port = 0
        self.issuer_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer_url(self) -> str:
        return f"http://127.0.0.1:{self.issuer_port}"

    # -- what it saw --

    def records(self) -> list[Recorded]:
        with self._lock:
            return list(self._records)

    def with_probe(self, probe: str) -> list[Recorded]:
        return [r for r in self.records() if r.probe == probe]

    def saw(self, probe: str) -> bool:
        return bool(self.with_probe(probe))

    def fetches(self, path: str) -> int:
        """How often the issuer was asked for `path`."""
        with self._lock:
            return self._fetches[path]

    # -- lifecycle --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recording-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(20) or self._failure is not None:
            raise RuntimeError("the recording upstream did not start") from self._failure

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(20)
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(), never lost in the thread
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        # Parses whatever the gateway sends it (aiohttp's own limits are 8 KiB a line, 128
        # headers): a request too large for those must still be recorded as one that got here.
        upstream = web.Application(handler_args=_PERMISSIVE)
        upstream.router.add_route("*", "/{tail:.*}", self._echo)
        issuer = web.Application()
        issuer.router.add_route("*", "/{tail:.*}", self._issue)
        runners = [web.AppRunner(app, access_log=None) for app in (upstream, issuer)]
        try:
            ports = []
            for runner in runners:
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                ports.append(int(runner.addresses[0][1]))
            self.port, self.issuer_port = ports
            self._ready.set()
            await self._stopping.wait()
        finally:
            for runner in runners:
                await runner.cleanup()

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
        )
        record = Recorded(
            method=request.method, raw_path=request.raw_path, headers=headers, body=body
        )
        with self._lock:
            self._records.append(record)
        echo = {
            "recorded": True,
            "method": record.method,
            "path": record.raw_path,
            "headers": [list(pair) for pair in headers],
        }
        # Served as a real aiohttp service answers: its default `Server` banner included.
        return web.Response(body=json.dumps(echo).encode(), content_type="application/json")

    async def _issue(self, request: web.Request) -> web.Response:
        path = request.path
        with self._lock:
            self._fetches[path] += 1
        if path == "/.well-known/jwks.json":
            return web.Response(body=self._jwks, content_type="application/json")
        if path in self._bait:
            return web.Response(body=self._bait[path], content_type="application/octet-stream")
        return web.Response(status=404)


# -- the gateway as a process ----------------------------------------------------------------------


class GatewayDidNotStart(AssertionError):
    """`msa gateway` exited or printed no port; the message holds its stderr."""


@dataclass
class GatewayProcess:
    """A real `python -m framework.cli gateway --config FILE`, its stderr kept in a file."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    stderr_path: Path

    @classmethod
    def start(cls, config: str, directory: Path, *, name: str) -> GatewayProcess:
        """Write `config` to `directory/<name>.yaml`, start the gateway, wait for its ports.

        Raises `GatewayDidNotStart` (with the gateway's stderr) when it exits instead, e.g.
        because the config is refused."""
        config_path = directory / f"{name}.yaml"
        config_path.write_text(config, encoding="utf-8")
        stderr_path = directory / f"{name}.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "framework.cli", "gateway", "--config", str(config_path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
            )
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline().decode(errors="replace") if readable else ""
        found = _LISTENING.search(line)
        if found is None:
            process.terminate()
            process.wait(30)
            process.stdout.close()
            errors = stderr_path.read_text(encoding="utf-8", errors="replace")
            raise GatewayDidNotStart(
                f"gateway {name!r} did not start (printed {line!r}); its stderr:\n{errors[-4000:]}"
            )
        return cls(process, int(found.group(1)), int(found.group(2)), stderr_path)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int | None:
        """SIGTERM (the gateway finishes its requests), then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


# -- a raw HTTP/1.1 client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back on one connection for one request."""

    status: int | None
    """The final status; None when the connection closed (or was reset) before a status line."""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    interim: tuple[int, ...] = ()
    """1xx statuses (`100 Continue`) received before the final one."""
    raw: bytes = b""
    """Every byte read for this request, status lines and headers included."""
    followups: tuple[int | None, ...] = field(default=())
    """Statuses of further responses on the same connection (see `exchange(sentinel=...)`)."""

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    @property
    def content_type(self) -> str:
        return (self.header("Content-Type") or "").split(";", 1)[0].strip().lower()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class _Response:
    status: int | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    raw: bytes
    closed: bool


async def _read_response(reader: asyncio.StreamReader) -> _Response:
    """One response; `closed` says the connection ended during or right after it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:  # closed before a complete head: what came, raw
        return _Response(None, (), b"", exc.partial, True)
    except (ConnectionError, asyncio.LimitOverrunError):
        return _Response(None, (), b"", b"", True)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not lines[0].startswith("HTTP/") or len(parts) < 2 or not parts[1].isdigit():
        rest = await _read_to_end(reader)
        return _Response(None, (), b"", head + rest, True)
    status = int(parts[1])
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v.lower() for k, v in headers}
    body = b""
    closed = "close" in lower.get("connection", "")
    try:
        if 100 <= status < 200 or status in (204, 304):
            pass
        elif "chunked" in lower.get("transfer-encoding", ""):
            body = await _read_chunked(reader)
        elif "content-length" in lower:
            body = await reader.readexactly(int(lower["content-length"]))
        else:
            body, closed = await _read_to_end(reader), True
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        body = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
        closed = True
    return _Response(status, tuple(headers), body, head + body, closed)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionError:
        return b""


async def read_answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter | None = None,
    *,
    after_interim: bytes = b"",
) -> Answer:
    """The final answer on `reader`; 1xx answers are noted in `interim` and, when
    `after_interim` is given, answered by writing it (the body a `100 Continue` asked for)."""
    interim: list[int] = []
    raw = b""
    while True:
        response = await _read_response(reader)
        raw += response.raw
        if response.status is not None and 100 <= response.status < 200:
            interim.append(response.status)
            if writer is not None and after_interim:
                with contextlib.suppress(ConnectionError):
                    writer.write(after_interim)
                    await writer.drain()
            continue
        return Answer(
            status=response.status,
            headers=response.headers,
            body=response.body,
            interim=tuple(interim),
            raw=raw,
        )


class _KeepsWhatCame(asyncio.StreamReaderProtocol):
    """A reset connection ends the stream like a close would: the bytes already received stay
    readable. (A server that closes with our request still unread resets the connection, and a
    plain `StreamReader` would then drop the answer it had sent, a 431, before the reset.)"""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(None)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:`port`, as `asyncio.open_connection`, that keeps what came."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = _KeepsWhatCame(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def exchange(
    port: int,
    data: bytes,
    *,
    after_interim: bytes = b"",
    sentinel: bytes | None = None,
    timeout: float = 15.0,
) -> Answer:
    """Write `data` on a new connection to 127.0.0.1:`port` and read the answer.

    Large requests are written in pieces while the answer is read, and writing stops once the
    server has answered (a 431 comes before the last header byte). With `sentinel`, once the
    first answer is in and the connection is still open, `sentinel` (a request with
    `Connection: close`) is written too and every further response read until the server closes:
    the server handles requests on a connection in order, so by then anything smuggled inside
    `data` has been handled (and would have reached the upstream). `timeout` only bounds a
    server that never answers: it fails the test.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await connect(port)
            try:
                return await _exchange(reader, writer, data, after_interim, sentinel)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except TimeoutError:
        raise AssertionError(f"no answer within {timeout:g} s") from None


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes,
    after_interim: bytes,
    sentinel: bytes | None,
) -> Answer:
    answered = asyncio.Event()

    async def write() -> None:
        for start in range(0, len(data), 16384):
            if answered.is_set():
                return
            writer.write(data[start : start + 16384])
            await writer.drain()

    writing = asyncio.create_task(write())
    try:
        reading = asyncio.create_task(read_answer(reader, writer, after_interim=after_interim))
        reading.add_done_callback(lambda _: answered.set())
        answer = await reading
    finally:
        if not writing.done():
            writing.cancel()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await writing
    if sentinel is None or answer.status is None or reader.at_eof():
        return answer
    if "close" in (answer.header("Connection") or "").lower():
        return answer
    followups: list[int | None] = []
    try:
        writer.write(sentinel)
        await writer.drain()
    except ConnectionError:
        return answer
    while True:
        response = await _read_response(reader)
        if response.status is None and not response.raw:
            break
        followups.append(response.status)
        if response.closed:
            break
    return Answer(
        status=answer.status,
        headers=answer.headers,
        body=answer.body,
        interim=answer.interim,
        raw=answer.raw,
        followups=tuple(followups),
    )
