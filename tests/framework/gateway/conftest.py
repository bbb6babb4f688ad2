"""Gateway test fixtures: upstream services as real processes, a gateway built from YAML."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from framework.gateway.app import Gateway
from framework.gateway.config import parse_config

ADMIN_TOKEN = "admin-secret-token"
ADMIN_HASH = "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
REPO = str(Path(__file__).resolve().parents[3])


@dataclass
class Upstream:
    name: str
    port: int
    process: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_upstream(name: str) -> Upstream:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.framework.gateway.upstream_app",
        "--name",
        name,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        line = (await process.stdout.readline()).decode()
    assert line.startswith("port "), f"upstream {name} did not start: {line!r}"
    return Upstream(name, int(line.split()[1]), process)


async def stop_upstream(upstream: Upstream) -> None:
    if upstream.process.returncode is None:
        upstream.process.terminate()
        await upstream.process.wait()


@pytest.fixture(scope="module")
async def upstreams() -> AsyncIterator[dict[str, Upstream]]:
    """Three upstream processes, `a`, `b` and `c`."""
    started = await asyncio.gather(*(start_upstream(n) for n in ("a", "b", "c")))
    yield {u.name: u for u in started}
    await asyncio.gather(*(stop_upstream(u) for u in started))


GatewayFactory = Callable[[str], Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Build and start a gateway from YAML text (ports 0: picked freely)."""
    gateways: list[Gateway] = []

    async def make(yaml_text: str, **options: object) -> Gateway:
        config = parse_config(textwrap.dedent(yaml_text), source="test.yaml")
        gateway = Gateway(config, **options)  # type: ignore[arg-type]
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
