"""The access log off the event loop: `AccessLog`'s listener thread, `MSA_ACCESS_LOG_FILE`, and
no line built while the access logger is off."""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from framework.errors import ConfigurationError
from framework.gateway import metering
from framework.gateway.metering import (
    ACCESS_LOGGER,
    FILE_VARIABLE,
    AccessLog,
    Meter,
    access_log_middleware,
)
from framework.gateway.types import Exchange, GatewayError
from framework.observability.tracing import TraceContext, use_correlation_id, use_trace
from tests.framework.gateway.recording_upstream import GatewayProcess
from tests.framework.gateway.test_metering import chain, exchange_for

FIELDS = {
    "route",
    "method",
    "path",
    "client",
    "remote",
    "status",
    "latency_ms",
    "bytes_in",
    "bytes_out",
    "upstream",
    "gtxid",
    "request_id",
    "notes",
}


@pytest.fixture
def access_logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    """The access logger, enabled for INFO (caplog restores its level afterwards)."""
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return logging.getLogger(ACCESS_LOGGER)


@pytest.fixture
def started() -> Iterator[list[AccessLog]]:
    """AccessLogs a test starts; stopped afterwards, so no test leaves the logger rerouted."""
    logs: list[AccessLog] = []
    yield logs
    for access in logs:
        access.stop()


def start(started: list[AccessLog], file: Path | None) -> AccessLog:
    access = AccessLog(file)
    access.start()
    started.append(access)
    return access


class Writes:
    """Spies on `logging.FileHandler.emit`: which threads wrote, and a semaphore per line."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[threading.Thread] = []
        self.written = threading.Semaphore(0)
        self.entered = threading.Event()
        self.hold: threading.Event | None = None
        original = logging.FileHandler.emit

        def emit(handler: logging.FileHandler, record: logging.LogRecord) -> None:
            self.threads.append(threading.current_thread())
            self.entered.set()
            if self.hold is not None:
                assert self.hold.wait(10), "the test never released the writer"
            original(handler, record)
            self.written.release()

        monkeypatch.setattr(logging.FileHandler, "emit", emit)

    def wait(self, lines: int) -> None:
        for _ in range(lines):
            assert self.written.acquire(timeout=10), "the listener wrote no line"


def propagates(logger: logging.Logger) -> bool:
    return logger.propagate


def file_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def ok(exchange: Exchange) -> web.StreamResponse:
    exchange.notes["cache"] = "miss"
    exchange.upstream = "http://u:1"
    return web.Response(body=b"hello")


async def unavailable(exchange: Exchange) -> web.StreamResponse:
    raise GatewayError(503, "upstream unavailable")


# -- the file target, written by the listener thread ---------------------------------------------


async def test_the_file_gets_one_json_line_per_request_from_the_listener_thread(
    access_logger: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    started: list[AccessLog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = Writes(monkeypatch)
    path = tmp_path / "access.log"
    access = start(started, path)
    meter = Meter(None)
    call = chain(ok, access_log_middleware(meter))
    paths = [f"/x/{n}" for n in range(5)]
    for request_path in paths:
        await call(exchange_for("POST", request_path))
    writes.wait(len(paths))
    access.stop()

    lines = file_lines(path)
    assert [line["path"] for line in lines] == paths
    for line in lines:
        assert set(line) >= FIELDS
        assert line["logger"] == ACCESS_LOGGER
        assert line["level"] == "INFO"
        assert line["message"] == f"POST {line['path']} 200"
        assert line["service"] == "gateway"
        assert (line["route"], line["method"], line["status"]) == ("products", "POST", 200)
        assert (line["client"], line["remote"], line["bytes_out"]) == ("alice", "10.0.0.9", 5)
        assert (line["gtxid"], line["request_id"]) == ("g-1", "r-1")
        assert (line["upstream"], line["notes"]) == ("http://u:1", {"cache": "miss"})
    [writer] = set(writes.threads)
    assert writer is not threading.main_thread()
    # Instead of stderr: the root logger's handlers (here caplog's) saw none of them.
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert meter.snapshot()["alice"]["calls"] == len(paths)


async def test_stop_writes_every_line_still_queued(
    access_logger: logging.Logger,
    started: list[AccessLog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer is held on the first line while the rest wait in the buffer and stop() begins;
    once released, stop() returns only after all of them are written."""
    writes = Writes(monkeypatch)
    writes.hold = threading.Event()
    path = tmp_path / "access.log"
    access = start(started, path)
    call = chain(ok, access_log_middleware(Meter(None)))
    count = 200
    for n in range(count):
        await call(exchange_for(path=f"/x/{n}"))
    assert writes.entered.wait(10)
    assert path.read_text() == ""  # the first line is held, the others are buffered

    stopping = access.stopping
    assert stopping is not None
    stopper = threading.Thread(target=access.stop)
    stopper.start()
    assert stopping.wait(10)
    writes.hold.set()
    stopper.join(10)
    assert not stopper.is_alive()

    assert [line["path"] for line in file_lines(path)] == [f"/x/{n}" for n in range(count)]
    assert not access.running
    assert access_logger.propagate
    assert not access_logger.handlers


async def test_the_file_is_appended_to_and_survives_copytruncate(
    access_logger: logging.Logger,
    started: list[AccessLog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sidecar truncates the file in place (`: > file`); the gateway keeps its descriptor,
    and O_APPEND puts the next line at the new end, offset 0 (no hole of NUL bytes)."""
    writes = Writes(monkeypatch)
    path = tmp_path / "access.log"
    path.write_text('{"earlier":"line"}\n')
    start(started, path)
    call = chain(ok, access_log_middleware(Meter(None)))

    await call(exchange_for(path="/before"))
    writes.wait(1)
    assert [line.get("path") for line in file_lines(path)] == [None, "/before"]

    os.truncate(path, 0)
    await call(exchange_for(path="/after"))
    writes.wait(1)
    raw = path.read_bytes()
    assert raw.startswith(b"{")
    assert raw.endswith(b"}\n")
    assert b"\0" not in raw
    assert [line["path"] for line in file_lines(path)] == ["/after"]


async def test_the_listener_keeps_the_ids_of_the_task_that_logged(
    access_logger: logging.Logger,
    started: list[AccessLog],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The formatter runs in the listener's thread, where the log context's contextvars are
    unset: the queue handler stamps them on the record first."""
    writes = Writes(monkeypatch)
    path = tmp_path / "access.log"
    start(started, path)
    call = chain(ok, access_log_middleware(Meter(None)))
    trace = TraceContext.new_root()
    with use_correlation_id("c-17"), use_trace(trace):
        await call(exchange_for())
    writes.wait(1)
    [line] = file_lines(path)
    assert line["correlation_id"] == "c-17"
    assert (line["trace_id"], line["span_id"]) == (trace.trace_id, trace.span_id)


# -- without a file: the service log, from the listener thread -----------------------------------


async def test_without_a_file_the_root_handlers_write_the_lines_from_the_listener_thread(
    access_logger: logging.Logger, started: list[AccessLog]
) -> None:
    seen: list[tuple[str, int, threading.Thread]] = []
    done = threading.Event()

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == ACCESS_LOGGER:
                seen.append((record.getMessage(), record.levelno, threading.current_thread()))
                done.set()

    recorder = Recorder(logging.INFO)
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        access = start(started, None)
        assert not propagates(access_logger)  # instead of the root handlers, on the loop
        with pytest.raises(GatewayError):
            await chain(unavailable, access_log_middleware(Meter(None)))(exchange_for())
        assert done.wait(10)
        access.stop()
        assert access_logger.propagate
    finally:
        root.removeHandler(recorder)
    [(message, level, thread)] = seen
    assert (message, level) == ("GET /x 503", logging.WARNING)
    assert thread is not threading.main_thread()


async def test_after_stop_the_records_propagate_synchronously_again(
    access_logger: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    started: list[AccessLog],
    tmp_path: Path,
) -> None:
    access = start(started, tmp_path / "access.log")
    access.stop()
    access.stop()  # idempotent
    await chain(ok, access_log_middleware(Meter(None)))(exchange_for())
    assert [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER] == ["GET /x 200"]
    assert (tmp_path / "access.log").read_text() == ""


# -- nothing built while the logger is off --------------------------------------------------------


async def test_no_line_is_built_while_the_access_logger_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    original = metering._access_fields

    def spy(exchange: Exchange, status: int, latency: float, error: str | None) -> dict[str, Any]:
        built.append(status)
        return original(exchange, status, latency, error)

    monkeypatch.setattr(metering, "_access_fields", spy)
    meter = Meter(None)
    caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)  # INFO off, WARNING (5xx) on

    await chain(ok, access_log_middleware(meter))(exchange_for())
    assert built == []  # neither the fields nor the copy of the notes
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]

    with pytest.raises(GatewayError):
        await chain(unavailable, access_log_middleware(meter))(exchange_for())
    assert built == [503]
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.levelno == logging.WARNING

    caplog.set_level(logging.CRITICAL, logger=ACCESS_LOGGER)
    with pytest.raises(GatewayError):
        await chain(unavailable, access_log_middleware(meter))(exchange_for())
    assert built == [503]
    # Metering is separate: every request was counted.
    assert meter.snapshot()["alice"]["routes"]["products"]["status"] == {"2xx": 1, "5xx": 2}


# -- configuration ---------------------------------------------------------------------------------


def test_the_file_comes_from_the_environment(tmp_path: Path) -> None:
    assert AccessLog.from_env({}).file is None
    assert AccessLog.from_env({FILE_VARIABLE: "  "}).file is None
    path = tmp_path / "access.log"
    assert AccessLog.from_env({FILE_VARIABLE: str(path)}).file == path


def test_a_file_that_cannot_be_opened_is_a_configuration_error(tmp_path: Path) -> None:
    access = AccessLog(tmp_path / "missing" / "access.log")
    with pytest.raises(ConfigurationError, match=FILE_VARIABLE):
        access.start()
    assert not access.running
    logger = logging.getLogger(ACCESS_LOGGER)
    assert logger.propagate
    assert not logger.handlers


# -- msa gateway -----------------------------------------------------------------------------------


async def test_msa_gateway_writes_its_access_log_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `msa gateway` with MSA_ACCESS_LOG_FILE: one line per request in the file, none on
    stderr, and the lines of the last requests are there once SIGTERM has stopped it."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", hello)
    path = tmp_path / "access.log"
    monkeypatch.setenv(FILE_VARIABLE, str(path))
    monkeypatch.setenv("MSA_LOG_LEVEL", "INFO")
    async with TestServer(upstream_app, host="127.0.0.1") as upstream:
        config = f"""\
gateway:
  name: access
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0}}
upstreams:
  shop: {{targets: ["http://127.0.0.1:{upstream.port}"]}}
routes:
  - name: pages
    match: {{methods: [GET], path: /, prefix: true}}
    upstream: shop
"""
        gateway = GatewayProcess.start(config, tmp_path, name="access")
        try:
            count = 20
            async with aiohttp.ClientSession() as http:
                for n in range(count):
                    async with http.get(f"http://127.0.0.1:{gateway.port}/p/{n}?q=1") as answer:
                        assert answer.status == 200
                        assert await answer.text() == "hello"
        finally:
            code = gateway.stop()
    stderr = gateway.stderr()
    assert code == 0, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert ACCESS_LOGGER not in stderr  # instead of stderr, not in addition to it
    assert "gateway access listening" in stderr  # the rest of the log stays there
    lines = file_lines(path)
    assert [line["path"] for line in lines] == [f"/p/{n}" for n in range(count)]
    for line in lines:
        assert (line["logger"], line["route"], line["method"], line["status"]) == (
            ACCESS_LOGGER,
            "pages",
            "GET",
            200,
        )
        assert line["service"] == "gateway"
        assert set(line) >= FIELDS
