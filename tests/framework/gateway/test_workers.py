"""`msa gateway --workers N` as real processes: one port served by every worker, the admin API
answering for all, reloads reaching each, restarts, and stopping (by SIGTERM, or on its own when
the supervisor is killed)."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework.gateway.workers import MAX_WORKERS
from tests.framework.gateway.conftest import ADMIN_HASH, ADMIN_TOKEN, REPO, Upstream, eventually

LISTENING = re.compile(r"gateway listening on port (\d+) \(admin (\d+)\)")
WORKER_MODULE = b"framework.gateway.workers"


def config(upstream: Upstream, *, extra_route: str | None = None, port: int = 0) -> str:
    """Listening on `port`, routes `echo` (`/echo`) and `hold` (`/hold/<key>`: answered once the
    key is released at the upstream); with `extra_route`, a third route of that name at
    `/<name>`."""
    routes = """\
  - name: echo
    match: {path: /echo}
    upstream: a
  - name: hold
    match: {path: /hold, prefix: true}
    upstream: a
"""
    if extra_route is not None:
        routes += f"""\
  - name: {extra_route}
    match: {{path: /{extra_route}}}
    upstream: a
    rewrite: /echo
"""
    return f"""\
gateway:
  name: workers
  listen: {{host: 127.0.0.1, port: {port}}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
upstreams:
  a: {{targets: ["{upstream.url}"]}}
routes:
{routes}"""


@dataclass
class Supervisor:
    """A real `python -m framework.cli gateway --config FILE --workers N`."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def workers(self) -> dict[int, int]:
        """Its worker processes now: index -> pid."""
        return workers_of(self.process.pid)

    def stop(self) -> int:
        """SIGTERM, then wait; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start(text: str, directory: Path, workers: int) -> Supervisor:
    config_path = directory / "gateway.yaml"
    config_path.write_text(text, encoding="utf-8")
    stderr_path = directory / "gateway.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "framework.cli",
                "gateway",
                "--config",
                str(config_path),
                "--workers",
                str(workers),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, "MSA_LOG_LEVEL": "INFO"},
        )
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline().decode(errors="replace") if readable else ""
    process.stdout.close()
    found = LISTENING.fullmatch(line.strip())
    if found is None:
        process.kill()
        process.wait()
        errors = stderr_path.read_text(encoding="utf-8", errors="replace")
        raise AssertionError(f"no listening line (got {line!r}); stderr:\n{errors[-4000:]}")
    return Supervisor(process, int(found[1]), int(found[2]), config_path, stderr_path)


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Callable[..., Supervisor]]:
    """Start supervisors (`supervised(text, workers=2)`); each still running afterwards is
    stopped with SIGTERM and must exit 0, and none may have logged a traceback."""
    started: list[Supervisor] = []

    def make(text: str, *, workers: int = 2) -> Supervisor:
        directory = tmp_path / f"gateway{len(started)}"
        directory.mkdir()
        supervisor = start(text, directory, workers)
        started.append(supervisor)
        return supervisor

    yield make
    for supervisor in started:
        pids = supervisor.workers()
        running = supervisor.process.poll() is None
        code = supervisor.stop()
        for pid in pids.values():
            await gone(pid)
        stderr = supervisor.stderr()
        assert "Traceback" not in stderr, stderr[-4000:]
        assert code == 0 or not running, stderr[-4000:]


# -- processes, from /proc -----------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def alive(pid: int) -> bool:
    """Running (a zombie that no one reaped has ended)."""
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def workers_of(supervisor: int) -> dict[int, int]:
    """The live gateway workers whose parent is `supervisor`: index -> pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        stat = _stat(pid)
        if WORKER_MODULE not in arguments or stat is None or stat[1] != supervisor:
            continue
        if alive(pid):
            found[int(arguments[arguments.index(b"--index") + 1])] = pid
    return found


def sockets_of(worker: int) -> Path:
    """The directory of a worker's unix sockets (`--sockets` on its command line)."""
    arguments = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    return Path(arguments[arguments.index(b"--sockets") + 1].decode())


async def gone(pid: int, within: float = 60.0) -> None:
    await eventually(lambda: not alive(pid), within=within)


# -- asking the gateway --------------------------------------------------------------------------


async def fresh_gets(url: str, count: int) -> list[int]:
    """`count` GETs of `url`, each on a new connection (so SO_REUSEPORT can pick any worker)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def get() -> int:
            async with http.get(url) as answer:
                await answer.read()
                return answer.status

        return await asyncio.gather(*(get() for _ in range(count)))


async def all_answered(url: str, count: int) -> bool:
    """Whether `count` GETs of `url` on new connections were all answered 200."""
    try:
        return await fresh_gets(url, count) == [200] * count
    except aiohttp.ClientConnectionError:
        return False


async def served(supervisor: Supervisor, route: str) -> Counter[str]:
    """Answered requests (any status) on `route`, by worker, from the merged `/metrics`."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{supervisor.admin_url}/metrics") as answer,
    ):
        assert answer.status == 200
        text = await answer.text()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels["route"] == route:
                counts[sample.labels["worker"]] += int(sample.value)
    return counts


async def admin(supervisor: Supervisor, method: str, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{supervisor.admin_url}{path}", headers=headers) as answer,
    ):
        return answer.status, orjson.loads(await answer.read())


async def every_worker_serves(
    supervisor: Supervisor, route: str, workers: int = 2, *, within: float = 60.0
) -> None:
    """Send requests on new connections until every worker has answered some on `route`."""

    async def all_served() -> bool:
        try:
            await fresh_gets(f"{supervisor.url}/{route}", 10)
            counts = await served(supervisor, route)
        except aiohttp.ClientConnectionError:  # a worker restarting (worker 0: the admin API)
            return False
        return all(counts[str(index)] > 0 for index in range(workers))

    await eventually(all_served, within=within)


# -- serving -------------------------------------------------------------------------------------


async def test_requests_are_spread_over_the_workers_and_metered_as_one(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=2)
    assert sorted(supervisor.workers()) == [0, 1]

    count = 60
    assert await fresh_gets(f"{supervisor.url}/echo", count) == [200] * count

    by_worker = await served(supervisor, "echo")
    assert set(by_worker) == {"0", "1"}  # both workers served some
    assert sum(by_worker.values()) == count
    status, metering = await admin(supervisor, "GET", "/admin/metering")
    assert status == 200
    assert set(metering) == {"anonymous"}
    assert metering["anonymous"]["calls"] == count
    assert metering["anonymous"]["routes"]["echo"]["status"] == {"2xx": count}


async def test_one_worker_is_the_single_process_gateway(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=1)

    assert supervisor.workers() == {}  # no supervisor, no workers: today's `msa gateway`
    assert await fresh_gets(f"{supervisor.url}/echo", 5) == [200] * 5
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{supervisor.admin_url}/metrics") as answer,
    ):
        metrics = await answer.text()
    assert 'gateway_requests_total{client="anonymous",route="echo",status="2xx"} 5.0' in metrics
    assert "worker=" not in metrics


async def test_admin_reload_reaches_every_worker(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=2)
    supervisor.config_path.write_text(config(upstreams["a"], extra_route="added"))

    status, answer = await admin(supervisor, "POST", "/admin/reload")

    assert status == 200, answer
    assert answer["reloaded"] is True
    assert answer["workers"] == 2  # worker 1 answered its reload with 200
    assert answer["routes"] == 3
    await every_worker_serves(supervisor, "added")


async def test_a_refused_reload_keeps_every_worker_on_the_old_config(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=2)
    supervisor.config_path.write_text("routes: [{name: broken}]\n")

    status, answer = await admin(supervisor, "POST", "/admin/reload")

    assert status == 400
    assert answer["problems"]
    await every_worker_serves(supervisor, "echo")


async def test_an_edited_config_file_reloads_every_worker(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=2)

    supervisor.config_path.write_text(config(upstreams["a"], extra_route="edited"))

    await every_worker_serves(supervisor, "edited")


# -- failures and stopping -----------------------------------------------------------------------


@pytest.mark.parametrize("killed", [0, 1])
async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(
    killed: int, supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    """Worker 0 comes back with the admin API on the same port (the supervisor keeps it)."""
    supervisor = supervised(config(upstreams["a"]), workers=2)
    before = supervisor.workers()
    survivor = 1 - killed

    os.kill(before[killed], signal.SIGKILL)
    await eventually(lambda: _stat(before[killed]) is None, within=60)  # reaped

    # Connections the kernel was handing the dying worker are reset (the module's docstring);
    # then the other worker alone answers all.
    await eventually(lambda: all_answered(f"{supervisor.url}/echo", 20), within=60)
    await eventually(lambda: supervisor.workers().get(killed, before[killed]) != before[killed])
    after = supervisor.workers()
    assert after[survivor] == before[survivor]
    await every_worker_serves(supervisor, "echo")  # the new worker serves too
    status, _ = await admin(supervisor, "GET", "/admin/metering")
    assert status == 200
    stderr = supervisor.stderr()
    assert (
        f"gateway worker {killed} (pid {before[killed]}) ended (signal SIGKILL); restarting it"
        in stderr
    )
    assert f"gateway worker {killed} (pid {after[killed]}) listening" in stderr


async def test_the_workers_stop_when_the_supervisor_is_killed(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    supervisor = supervised(config(upstreams["a"]), workers=2)
    pids = supervisor.workers()
    assert len(pids) == 2
    sockets = sockets_of(pids[0])
    assert sockets.is_dir()

    supervisor.process.kill()
    supervisor.process.wait()

    for pid in pids.values():
        await gone(pid)
    await eventually(lambda: not sockets.exists())  # removed by the last worker out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", supervisor.port), timeout=10).close()


async def test_sigterm_finishes_the_requests_in_flight_then_exits_0(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    upstream = upstreams["a"]
    supervisor = supervised(config(upstream), workers=2)
    sockets = sockets_of(supervisor.workers()[1])
    keys = [f"drain{n}" for n in range(6)]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def get(url: str) -> tuple[int, bytes]:
            async with http.get(url) as answer:
                return answer.status, await answer.read()

        holding: list[str] = []

        async def upstream_holds() -> bool:
            status, body = await get(f"{upstream.url}/holding")
            holding[:] = orjson.loads(body) if status == 200 else []
            return set(holding) == set(keys)

        in_flight = [asyncio.create_task(get(f"{supervisor.url}/hold/{key}")) for key in keys]
        try:
            await eventually(upstream_holds, within=60)
        except AssertionError:
            ended = [task.exception() or task.result() for task in in_flight if task.done()]
            for task in in_flight:
                task.cancel()
            raise AssertionError(f"the upstream holds {holding}; ended: {ended}") from None

        supervisor.process.send_signal(signal.SIGTERM)

        def refused() -> bool:  # every worker has closed its listening socket: draining
            try:
                socket.create_connection(("127.0.0.1", supervisor.port), timeout=10).close()
            except ConnectionRefusedError:
                return True
            return False

        await eventually(refused, within=60)
        assert supervisor.process.poll() is None  # still waiting for its workers
        for key in keys:
            async with http.post(f"{upstream.url}/release/{key}") as released:
                assert released.status == 200
        answers = await asyncio.gather(*in_flight)

    assert [status for status, _ in answers] == [200] * len(keys)
    assert sorted(orjson.loads(body)["held"] for _, body in answers) == sorted(keys)
    await eventually(lambda: supervisor.process.poll() is not None, within=60)
    assert supervisor.process.returncode == 0, supervisor.stderr()[-4000:]
    assert not sockets.exists()


@pytest.mark.parametrize("workers", ["0", str(MAX_WORKERS + 1), "many"])
def test_a_worker_count_out_of_range_is_a_usage_error(workers: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "framework.cli",
            "gateway",
            "--config",
            str(tmp_path / "never-read.yaml"),
            "--workers",
            workers,
        ],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"usage: msa gateway" in result.stderr
    assert b"argument --workers:" in result.stderr
    assert result.stdout == b""


def test_a_port_already_served_is_refused(tmp_path: Path, upstreams: dict[str, Upstream]) -> None:
    """The supervisor reserves its port without SO_REUSEPORT: it cannot join another server's
    group, as a single gateway cannot."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = tmp_path / "gateway.yaml"
        path.write_text(config(upstreams["a"], port=port))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "framework.cli",
                "gateway",
                "--config",
                str(path),
                "--workers",
                "2",
            ],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr.decode()[-4000:]
    assert f"msa: error: cannot listen on 127.0.0.1:{port}".encode() in result.stderr
    assert result.stdout == b""


async def test_each_worker_enforces_its_share_of_a_limit(
    supervised: Callable[..., Supervisor], upstreams: dict[str, Upstream]
) -> None:
    """A burst of 4 with 2 workers: 2 per worker, so a client on one keep-alive connection (one
    worker) meets half of it (the caveat the module's docstring names)."""
    limited = config(upstreams["a"]) + "tiers: {anon: {rate: 0.001, burst: 4}}\n"
    supervisor = supervised(limited + "anonymous_tier: anon\n", workers=2)

    async with aiohttp.ClientSession() as http:  # keeps one connection open
        statuses = []
        for _ in range(3):
            async with http.get(f"{supervisor.url}/echo") as answer:
                await answer.read()
                statuses.append(answer.status)

    assert statuses == [200, 200, 429]


def test_a_worker_that_cannot_start_fails_the_start(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config(upstreams["a"]))
    unwritable = tmp_path / "missing" / "access.log"
    result = subprocess.run(
        [sys.executable, "-m", "framework.cli", "gateway", "--config", str(path), "--workers", "2"],
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "MSA_ACCESS_LOG_FILE": str(unwritable)},
        timeout=120,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-4000:]
    assert "cannot open the access log" in stderr  # the worker's own error
    assert re.search(
        r"msa: error: gateway worker \d ended \(exit code 2\) before it listened", stderr
    )
    assert result.stdout == b""
