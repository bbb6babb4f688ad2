"""Gateway test fixtures: upstream services as real processes, a gateway built from YAML."""

from __future__ import annotations

import asyncio
import hashlib
import select
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest

from framework.bus import Bus
from framework.gateway.app import Gateway
from framework.gateway.config import parse_config

ADMIN_TOKEN = "admin-secret-token"
ADMIN_HASH = "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
REPO = str(Path(__file__).resolve().parents[3])


@dataclass
class Upstream:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_upstreams(*names: str) -> list[Upstream]:
    """Launch one upstream process per name, then wait for each to print its port."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.framework.gateway.upstream_app", "--name", name],
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        for name in names
    ]
    started = []
    for name, process in zip(names, processes, strict=True):
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], 20)
        line = process.stdout.readline().decode() if readable else ""  # "" if it exited
        assert line.startswith("port "), f"upstream {name} did not start: {line!r}"
        started.append(Upstream(name, int(line.split()[1]), process))
    return started


def stop_upstream(upstream: Upstream) -> None:
    upstream.process.terminate()
    upstream.process.wait()
    if upstream.process.stdout is not None:
        upstream.process.stdout.close()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """Three upstream processes, `a`, `b` and `c`, shared by a module's tests.

    Plain processes, not asyncio subprocesses: they belong to no event loop, so every test still
    runs on its own loop while the processes outlive it.
    """
    started = start_upstreams("a", "b", "c")
    try:
        yield {u.name: u for u in started}
    finally:
        for upstream in started:
            stop_upstream(upstream)


class GatewayFactory(Protocol):
    """Builds and starts a gateway from YAML text (ports 0: picked freely)."""

    async def __call__(self, yaml_text: str, *, bus: Bus | None = None) -> Gateway: ...


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Build and start a gateway from YAML text (ports 0: picked freely)."""
    gateways: list[Gateway] = []

    async def make(yaml_text: str, *, bus: Bus | None = None) -> Gateway:
        config = parse_config(textwrap.dedent(yaml_text), source="test.yaml")
        gateway = Gateway(config, bus=bus)
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield make
    for gateway in gateways:
        await gateway.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}"


def admin(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.admin_port}"


async def eventually(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]], *, within: float = 10.0
) -> None:
    """Return once `condition()` holds, checking it every 20 ms.

    `within` seconds only bound a wait that would otherwise hang; no test relies on how long the
    wait takes.
    """
    try:
        async with asyncio.timeout(within):
            while True:
                result = condition()
                if result if isinstance(result, bool) else await result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"condition not met within {within:g} s") from None


@dataclass
class Clock:
    """A monotonic clock that moves only when the test moves it; a `time_fn` or `clock`."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
