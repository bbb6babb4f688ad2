"""Real servers for the suite.

A test that needs a server says so with a marker (`kafka`, `postgres`, `mongo`); the autouse
fixture below checks that the server answers before the test runs. When it does not:

- with `CI=true` or `MSA_REQUIRE_SERVERS=1` (as `scripts/test` sets) the test FAILS, naming the
  server and the variable, because a suite that skips its real-server tests proves nothing;
- otherwise (a developer running a subset by hand) it is skipped with that same message, which
  `-ra` prints in the summary. Start the servers with `eval "$(scripts/devservices up)"`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from framework.bus import MemoryTransport
from framework.types import Transport


@dataclass(frozen=True, kw_only=True)
class RealServer:
    marker: str
    variable: str
    title: str

    def url(self) -> str | None:
        return os.environ.get(self.variable) or None

    def address(self) -> tuple[str, int] | None:
        url = self.url()
        if url is None:
            return None
        if "://" not in url:  # KAFKA_BOOTSTRAP is host:port[,host:port]
            url = "kafka://" + url.split(",")[0]
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            return None
        return parts.hostname, parts.port


SERVERS = {
    s.marker: s
    for s in (
        RealServer(marker="kafka", variable="KAFKA_BOOTSTRAP", title="Apache Kafka"),
        RealServer(marker="postgres", variable="POSTGRES_URL", title="PostgreSQL"),
        RealServer(
            marker="mongo", variable="MONGO_URL", title="the MongoDB-wire server (FerretDB)"
        ),
    )
}
_unreachable: dict[str, str | None] = {}


def servers_required() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or (
        os.environ.get("MSA_REQUIRE_SERVERS") == "1"
    )


def why_unreachable(server: RealServer) -> str | None:
    """None when the server accepts connections, else a message naming it."""
    if server.marker not in _unreachable:
        address = server.address()
        problem: str | None
        if address is None:
            problem = f"{server.variable} is not set (or has no host:port)"
        else:
            try:
                socket.create_connection(address, timeout=3).close()
                problem = None
            except OSError as exc:
                problem = f"nothing answers at {server.variable}={server.url()} ({exc})"
        _unreachable[server.marker] = (
            None
            if problem is None
            else f"{server.title} is unreachable: {problem}. "
            'Start it with `eval "$(scripts/devservices up)"`, or run scripts/test.'
        )
    return _unreachable[server.marker]


@pytest.fixture(autouse=True)
def _require_real_servers(request: pytest.FixtureRequest) -> None:
    for marker, server in SERVERS.items():
        if request.node.get_closest_marker(marker) is None:
            continue
        problem = why_unreachable(server)
        if problem is not None:
            if servers_required():
                pytest.fail(problem, pytrace=False)
            pytest.skip(problem)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for server in SERVERS.values():
        problem = why_unreachable(server)
        state = "reachable" if problem is None else "UNREACHABLE"
        lines.append(f"{server.title}: {server.variable}={server.url()} ({state})")
    if os.environ.get("KAFKA_VERSION"):
        lines.append(f"Apache Kafka version (devservices): {os.environ['KAFKA_VERSION']}")
    return lines


# -- every test cleans up its own tasks -----------------------------------------------------------

SETTLE_ROUNDS = 100
"""Event-loop turns a finished test's cancelled tasks get to wind down before they count as leaked
(turns, not seconds: a task that is still pending after them is waiting on something)."""


@pytest.fixture(autouse=True)
async def _no_leaked_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail the test that leaves tasks running on its event loop.

    Autouse and async, so it is set up before (and torn down after) the test's other fixtures on
    the test's own loop: what is still pending once they are all torn down was started by the
    test and never awaited or cancelled. Tests that share a module's or package's loop with a
    fixture (`loop_scope=...`) are checked for the tasks they added themselves.
    """
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    leaked: set[asyncio.Task[object]] = set()
    for _ in range(SETTLE_ROUNDS):
        leaked = {t for t in asyncio.all_tasks() - before if t is not me and not t.done()}
        if not leaked:
            return
        await asyncio.sleep(0)
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    names = sorted(f"{t.get_name()}: {t.get_coro()!r}" for t in leaked)
    pytest.fail(
        f"{request.node.nodeid} left {len(leaked)} task(s) running:\n  " + "\n  ".join(names),
        pytrace=False,
    )


# -- per-test resources on the real servers ------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kafka_bootstrap() -> str:
    url = SERVERS["kafka"].url()
    assert url is not None
    return url


@pytest.fixture
async def postgres_database() -> AsyncIterator[str]:
    """A fresh, empty database on the real PostgreSQL; its URL. Dropped afterwards."""
    import asyncpg

    server_url = SERVERS["postgres"].url()
    assert server_url is not None
    name = unique_name("test")
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(server_url)
        yield urlunsplit(parts._replace(path="/" + name))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def mongo_url() -> str:
    url = SERVERS["mongo"].url()
    assert url is not None
    return url


@pytest.fixture
async def mongo_database_name(mongo_url: str) -> AsyncIterator[str]:
    """A database name no other test uses on the real MongoDB-wire server; dropped afterwards."""
    from pymongo import AsyncMongoClient

    name = unique_name("test")
    yield name
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        await client.drop_database(name)
    finally:
        await client.close()


@pytest.fixture
def topic_name() -> str:
    return unique_name("test").replace("_", "-")


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def make_transport(request: pytest.FixtureRequest) -> Callable[[], Transport]:
    """Transports for suites that run on both: one in-memory "cluster" per test (every call
    returns the same `MemoryTransport`, like one broker), or a new client of the real Kafka."""
    if request.param == "memory":
        shared = MemoryTransport()
        return lambda: shared
    from framework.bus.kafka import KafkaSettings, KafkaTransport

    bootstrap = request.getfixturevalue("kafka_bootstrap")
    return lambda: KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap, linger_ms=1))
