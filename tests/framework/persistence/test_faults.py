"""Fault injection on real Apache Kafka and PostgreSQL: crashes and restarts lose nothing and
apply no effect twice.

Each test sends uniquely keyed events, applies each one's effect through `PostgresInbox` in the
transaction that records it (`fault_services.apply_once`), breaks something meanwhile, then
counts and prints one line:

    sent=N effected=E duplicates=D lost=L ...

`effected` counts the distinct events whose effect is in the database, `duplicates` the extra
applications of an effect (its `applied` counter above 1), `lost` the events sent but never
effected, `unpaired` the inbox rows without their effect and effects without their inbox row.
Duplicates *on the bus* (the relay republishing after a crash, a consumer redelivering past its
last commit) are allowed and reported; lost events, duplicated effects and unpaired rows are not.

- (a) consumer processes SIGKILLed mid-batch, 20 times in all;
- (b) Kafka restarted while a writer commits state with outbox events (and, in miniature and
  deterministic, the lost idempotence sequence such a restart can leave the relay's producer);
- (c) PostgreSQL restarted while handlers apply effects (and, in miniature and deterministic,
  a connection the server terminates under a transaction);
- (d) the outbox relay process SIGKILLed while it publishes a backlog.

Restarts use `scripts/devservices.py restart <server>`, which stops the dev server and starts it
again on its data. Teardown waits for a restart a test began, makes sure the server answers
(restarting or starting it if not), kills the processes the test spawned and deletes its topics.

Every wait is bounded, and each test's `pytest.mark.timeout` lies above the sum of its bounds:
pytest-timeout's signal, landing inside the event loop, is swallowed by it and would leave the
session hanging, so the test's own deadlines must always come first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka import TopicPartition as AiokafkaTopicPartition

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message, RetryPolicy
from framework.bus.kafka import KafkaTransport
from framework.errors import MsaError
from framework.messages import from_binary, type_name
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import DatabaseUnavailable, PostgresResource
from framework.types import TopicPartition
from tests.conftest import SERVERS, unique_name
from tests.framework.persistence.fault_services import (
    EFFECTS,
    EffectRequested,
    apply_once,
    kafka_transport,
)

REPO = Path(__file__).resolve().parents[3]
DEVSERVICES = REPO / "scripts" / "devservices.py"
FAULT_SERVICES = "tests.framework.persistence.fault_services"
RESTART_TIMEOUT = 150.0  # devservices itself waits up to 120 s for Kafka to answer


# -- counting -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the database says happened to the events a test sent."""

    sent: int
    effected: int
    duplicates: int
    lost: int
    unexpected: int
    unpaired: int
    redelivered: int
    """Deliveries the inbox recognised as processed already."""

    def line(self, **extra: object) -> str:
        counts = (
            f"sent={self.sent} effected={self.effected} duplicates={self.duplicates} "
            f"lost={self.lost} unexpected={self.unexpected} unpaired={self.unpaired} "
            f"redelivered={self.redelivered}"
        )
        return " ".join([counts, *(f"{k}={v}" for k, v in extra.items())])

    def assert_exactly_once(self) -> None:
        assert self.lost == 0, f"{self.lost} event(s) never effected"
        assert self.duplicates == 0, f"{self.duplicates} extra application(s) of effects"
        assert self.unexpected == 0, f"{self.unexpected} effect(s) of events never sent"
        assert self.unpaired == 0, f"{self.unpaired} inbox/effect row(s) written alone"


async def outcome(url: str, groups: list[str], sent: set[str]) -> Outcome:
    conn = await asyncpg.connect(url)
    try:
        effects = await conn.fetch("select event_id, message_id, applied from effects")
        inbox = await conn.fetch(
            "select message_id from msa_inbox where consumer_group = any($1::text[])", groups
        )
        redelivered = await conn.fetchval("select count(*) from redeliveries")
    finally:
        await conn.close()
    effected = {r["event_id"] for r in effects}
    return Outcome(
        sent=len(sent),
        effected=len(effected),
        duplicates=sum(r["applied"] - 1 for r in effects),
        lost=len(sent - effected),
        unexpected=len(effected - sent),
        unpaired=len({r["message_id"] for r in inbox} ^ {r["message_id"] for r in effects}),
        redelivered=int(redelivered),
    )


async def effect_count(conn: asyncpg.Connection, prefix: str = "") -> int:
    """Effects applied so far (of events whose id starts with `prefix`); 0 before migrating."""
    with contextlib.suppress(asyncpg.UndefinedTableError):
        return int(
            await conn.fetchval("select count(*) from effects where event_id like $1", prefix + "%")
        )
    return 0


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting until {what}")
        await asyncio.sleep(every)


async def all_effected(url: str, count: int, *, within: float) -> None:
    """Wait until `count` effects are in."""
    conn = await asyncpg.connect(url)
    try:

        async def done() -> bool:
            return await effect_count(conn) >= count

        await eventually(done, within=within, what=f"all {count} events are effected")
    finally:
        await conn.close()


async def sessions_ended(url: str, *, within: float = 15.0) -> None:
    """Wait until no other client is connected to the database. Then nothing can commit any
    more (not even a transaction whose COMMIT a killed process sent before it died): what the
    database holds is the final outcome, and a late duplicate effect would be in it."""
    conn = await asyncpg.connect(url)
    try:

        async def alone() -> bool:
            others = await conn.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and pid <> pg_backend_pid() and backend_type = 'client backend'"
            )
            return int(others) == 0

        await eventually(alone, within=within, what="every other session has ended")
    finally:
        await conn.close()


def report(name: str, result: Outcome, began: float, **extra: object) -> None:
    print(f"\n[{name}] {result.line(**extra)} seconds={time.monotonic() - began:.1f}")


# -- Kafka ----------------------------------------------------------------------------------------


def transport_for(bootstrap: str) -> KafkaTransport:
    return kafka_transport({"KAFKA_BOOTSTRAP": bootstrap})


class Publisher:
    """Publishes uniquely keyed `EffectRequested` events; `sent` holds those the broker acked."""

    def __init__(self, bus: Bus, topic: str, prefix: str = "e") -> None:
        self.bus = bus
        self.topic = topic
        self.prefix = prefix
        self.sent: set[str] = set()
        self._next = 0

    @property
    def next_id(self) -> str:
        """The id of the next event `publish` sends."""
        return f"{self.prefix}-{self._next}"

    async def publish(self, count: int) -> None:
        ids = [f"{self.prefix}-{self._next + i}" for i in range(count)]
        self._next += count
        acks = [
            await self.bus.publish(self.topic, EffectRequested(event_id=i), key=i, confirm=False)
            for i in ids
        ]
        await asyncio.gather(*acks)  # type: ignore[arg-type]
        self.sent.update(ids)

    async def keep_publishing(self, per_second: int, stop: asyncio.Event) -> None:
        """About `per_second` events a second, in bursts every 0.1 s, until `stop` is set."""
        while not stop.is_set():
            await self.publish(max(1, per_second // 10))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.1)


@contextlib.asynccontextmanager
async def publishing_bus(bootstrap: str) -> AsyncIterator[Bus]:
    bus = Bus(transport_for(bootstrap), source="fault-tests")
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop(grace=1)


class _Listener:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


async def copies_on_bus(bootstrap: str, topic: str) -> Counter[str]:
    """How many records of each CloudEvents id `topic` holds, read from its beginning to the end
    of every partition (its high watermark: nothing writes to the topic any more)."""
    transport = transport_for(bootstrap)
    await transport.start()
    copies: Counter[str] = Counter()
    try:
        partitions = await transport.partitions_for(topic)
        consumer = transport.consumer([topic], group=None, listener=_Listener())
        await consumer.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                records = await consumer.fetch(timeout=0.3, max_records=5000)
                copies.update(from_binary(record).id for record in records)
                lag = consumer.lag()  # partitions not fetched yet are missing from it
                if len(lag) == partitions and not any(lag.values()):
                    break
                assert time.monotonic() < deadline, f"{topic} not read to its end in 60 s: {lag}"
        finally:
            await consumer.stop()
    finally:
        await transport.stop()
    return copies


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_name: str) -> AsyncIterator[list[str]]:
    """Topics the test uses (its `topic_name` first; it appends others); deleted afterwards,
    so the broker has fewer partitions to load when a later test restarts it."""
    names = [topic_name]
    yield names
    with contextlib.suppress(MsaError, TimeoutError):
        transport = transport_for(kafka_bootstrap)
        async with asyncio.timeout(30):
            await transport.start()
            try:
                await transport.delete_topics(
                    [f"{name}{suffix}" for name in names for suffix in ("", ".dlq")]
                )
            finally:
                await transport.stop()


@dataclass
class Tally:
    """What an in-process effect consumer's handler saw."""

    deliveries: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)


RETRY_THROUGH_OUTAGES = RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=1.0)
"""Generous: 200 attempts, at most a second apart, outlast any restart these tests cause."""


@contextlib.asynccontextmanager
async def effect_subscription(
    bootstrap: str, url: str, topic: str, group: str, *, concurrency: int = 32
) -> AsyncIterator[Tally]:
    """An in-process consumer applying each event's effect once, through the inbox."""
    db = PostgresResource(url, migrations=EFFECTS, max_size=16)
    inbox = PostgresInbox(db)
    bus = Bus(transport_for(bootstrap), source=group)
    tally = Tally()

    async def handle(message: Message[EffectRequested]) -> None:
        tally.deliveries += 1
        try:
            await apply_once(inbox, message)
        except Exception as exc:
            tally.failures += 1
            tally.errors[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
            raise

    bus.subscribe(
        [topic],
        {type_name(EffectRequested): HandlerSpec(EffectRequested, handle)},
        ConsumerOptions(group=group, concurrency=concurrency, retry=RETRY_THROUGH_OUTAGES),
    )
    await db.start()
    try:
        await bus.start()
        try:
            yield tally
        finally:
            await bus.stop(grace=5)
    finally:
        await db.stop()


# -- processes and servers ------------------------------------------------------------------------


class ServiceProcess:
    """One `msa run` process of a `fault_services` service, its output in a log file."""

    def __init__(self, target: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "framework.cli", "run", f"{FAULT_SERVICES}:{target}"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (unless it exited already), and reap it."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM, a graceful stop; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, within)
        except subprocess.TimeoutExpired:
            self.kill()
            problem = f"no exit within {within:.0f}s of SIGTERM\n{self.tail()}"
            raise AssertionError(problem) from None
        self._log.close()
        return int(self.proc.returncode)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)


class Processes:
    """Spawns service processes; kills, by pid, whatever still runs at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.spawned: list[ServiceProcess] = []

    def spawn(self, target: str, **env: str) -> ServiceProcess:
        environment = {
            **os.environ,
            "MSA_TRANSPORT": "kafka",
            "MSA_HTTP_PORT": "-1",
            "MSA_LOG_FORMAT": "text",
            "MSA_LOG_LEVEL": "WARNING",
            "MSA_SHUTDOWN_GRACE": "10",
            **env,
        }
        log_path = self.tmp_path / f"{target}-{len(self.spawned)}.log"
        process = ServiceProcess(target, environment, log_path)
        self.spawned.append(process)
        return process

    def logged_problems(self, containing: str = "") -> list[str]:
        """The framework's WARNING and ERROR lines in all the processes' logs (aiokafka's own
        are left out: it logs every failed reconnection while a broker is down)."""
        return [
            line
            for process in self.spawned
            for line in process.log_path.read_text(errors="replace").splitlines()
            if (" WARNING framework." in line or " ERROR framework." in line) and containing in line
        ]

    def kill_all(self) -> None:
        for process in self.spawned:
            process.kill()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    spawned = Processes(tmp_path)
    try:
        yield spawned
    finally:
        spawned.kill_all()


def devservices(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEVSERVICES), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def server_state(name: str) -> str:
    """`ready`, `stopped` or `not ready`, as `devservices status` reports `name`."""
    for line in devservices("status").stdout.splitlines():
        words = line.split()
        if words[:1] == [name]:
            return words[1] if words[1] in ("ready", "stopped") else "not ready"
    return "not ready"


RUN_DIR = Path(
    os.environ.get("MSA_RUN_DIR") or Path(tempfile.gettempdir()) / f"msa-devservices-{os.getuid()}"
)
EPHEMERAL_PORTS = "-".join(
    Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    if Path("/proc/sys/net/ipv4/ip_local_port_range").exists()
    else ["?", "?"]
)
SERVER_PORTS = {
    name: SERVERS[name].address()[1]  # type: ignore[index]
    for name in ("kafka", "postgres")
    if SERVERS[name].address() is not None
}


def sockets_on_port(port: int) -> int:
    """Sockets (in any state, TIME_WAIT included) whose local port is `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            count += sum(1 for line in lines if int(line.split()[1].rsplit(":", 1)[1], 16) == port)
    return count


def wait_until_port_is_free(port: int, *, within: float) -> None:
    deadline = time.monotonic() + within
    while sockets_on_port(port) and time.monotonic() < deadline:
        time.sleep(1)


class Restarts:
    """Restarts dev servers and, at teardown, makes sure they are back."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[str]] = []
        self.touched: set[str] = set()

    async def restart(self, name: str) -> float:
        """`devservices restart name` while the event loop runs on; the seconds it took."""
        self.touched.add(name)
        began = time.monotonic()
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, str(DEVSERVICES), "restart", name],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.running.append(proc)
        try:  # in a thread, so that the event loop (and what the test runs on it) goes on
            output = (await asyncio.to_thread(proc.communicate, timeout=RESTART_TIMEOUT))[0]
        except subprocess.TimeoutExpired:
            problem = f"devservices restart {name} took over {RESTART_TIMEOUT}s"
            raise AssertionError(problem) from None
        self.running.remove(proc)
        if proc.returncode != 0:
            lines = [line for line in output.splitlines() if "Unable connect" not in line]
            raise AssertionError(
                f"devservices restart {name} failed. {self.diagnosis(name)}\n" + "\n".join(lines)
            )
        return time.monotonic() - began

    @staticmethod
    def diagnosis(name: str) -> str:
        """Why a server did not come back, when its log says it could not bind its port."""
        log = RUN_DIR / "logs" / f"{name}.log"
        with contextlib.suppress(OSError), log.open("rb") as file:
            file.seek(max(0, log.stat().st_size - 4_000_000))
            if b"Address already in use" in file.read():
                return (
                    f"Its port {SERVER_PORTS.get(name)} was taken when it started again: while "
                    "it was down, a client reconnecting in a tight loop connected to itself on "
                    "that port (a TCP self-connect; the port lies in the ephemeral range "
                    f"{EPHEMERAL_PORTS})."
                )
        return ""

    def bring_back(self) -> None:
        for proc in self.running:  # never interrupt a restart: that could leave it stopped
            try:
                proc.communicate(timeout=RESTART_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        missing = []
        for name in sorted(self.touched):
            state = server_state(name)
            deadline = time.monotonic() + 30
            while state == "not ready" and time.monotonic() < deadline:
                time.sleep(1)  # a server still starting
                state = server_state(name)
            if state == "ready":
                continue
            if state == "stopped":
                # It failed to start: most likely a client reconnecting in a tight loop while
                # it was down connected to itself on the server's port (which lies inside the
                # ephemeral range). Wait until that socket is gone, then start it (afresh).
                wait_until_port_is_free(SERVER_PORTS[name], within=90)
                devservices("up", timeout=RESTART_TIMEOUT)
            else:
                devservices("restart", name, timeout=RESTART_TIMEOUT)
            if server_state(name) != "ready":
                missing.append(name)
        assert not missing, f"dev server(s) {missing} did not come back: scripts/devservices up"


@pytest.fixture
def restarts() -> Iterator[Restarts]:
    servers = Restarts()
    try:
        yield servers
    finally:
        servers.bring_back()


@pytest.fixture
async def restartable_database() -> AsyncIterator[str]:
    """A fresh database, like conftest's `postgres_database`, whose teardown survives a server
    restart: that fixture drops the database through the connection it opened before the test,
    which a restart closes."""
    server_url = SERVERS["postgres"].url()
    assert server_url is not None
    name = unique_name("test")
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    for _ in range(30):
        try:
            admin = await asyncpg.connect(server_url)
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(1)
            continue
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        return


# -- (a) consumers SIGKILLed mid-batch ------------------------------------------------------------


LANES = 4
KILLS_PER_LANE = 5


@pytest.mark.timeout(420)
@pytest.mark.kafka
@pytest.mark.postgres
async def test_consumer_killed_mid_batch_applies_every_effect_once(
    kafka_bootstrap: str, postgres_database: str, topics: list[str], processes: Processes
) -> None:
    """`effect_consumer` processes are SIGKILLed 20 times while they work through streams of
    events, each time after applying some (a random number) of what they fetched; last
    instances finish. Effects applied whose offsets were not committed yet are redelivered,
    and the inbox must absorb every one of them.

    A SIGKILLed member leaves its group only when its session expires (6 s at the least,
    the broker's group.min.session.timeout.ms), and the group stands still until then. So the
    20 kills are spread over 4 consumer groups on 4 topics, killed in parallel, 5 times each:
    the same faults in a quarter of the time.
    """
    began = time.monotonic()
    group = unique_name("effects")
    groups = [f"{group}-{lane}" for lane in range(LANES)]
    topics.extend(f"{topics[0]}-{lane}" for lane in range(LANES))
    stop_feeding = asyncio.Event()
    all_sent = asyncio.Event()  # the streams stopped, every event acknowledged
    killed: list[int] = []  # the lanes done killing
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def lane(number: int, events: Publisher) -> None:
        env = {
            "POSTGRES_URL": postgres_database,
            "FAULT_TOPIC": events.topic,
            "FAULT_GROUP": groups[number],
            "FAULT_CONCURRENCY": "32",
            "FAULT_POOL_SIZE": "8",
        }
        conn = await asyncpg.connect(postgres_database)
        try:
            for _ in range(KILLS_PER_LANE):
                consumer = processes.spawn("effect_consumer", **env)
                target = await effect_count(conn, events.prefix) + rng.randint(1, 120)

                async def progressed(
                    consumer: ServiceProcess = consumer, target: int = target
                ) -> bool:
                    assert consumer.alive, f"a consumer exited:\n{consumer.tail()}"
                    return await effect_count(conn, events.prefix) >= target

                await eventually(progressed, within=30, what="a consumer makes progress")
                await asyncio.sleep(rng.uniform(0, 0.05))
                consumer.kill()
            killed.append(number)
            await all_sent.wait()
            last = processes.spawn("effect_consumer", **env)

            async def finished() -> bool:
                assert last.alive, f"a last consumer exited:\n{last.tail()}"
                return await effect_count(conn, events.prefix) >= len(events.sent)

            await eventually(finished, within=90, what=f"lane {number} effected every event")
            assert await last.terminate() == 0, last.tail()
        finally:
            await conn.close()

    async with publishing_bus(kafka_bootstrap) as bus:
        streams = [Publisher(bus, topics[1 + n], prefix=f"lane{n}") for n in range(LANES)]
        await asyncio.gather(*(events.publish(300) for events in streams))
        feeding = [asyncio.create_task(e.keep_publishing(30, stop_feeding)) for e in streams]
        lanes = [asyncio.create_task(lane(n, events)) for n, events in enumerate(streams)]
        try:
            while len(killed) < LANES:
                for task in lanes:
                    if task.done():
                        task.result()  # a lane that failed raises its failure here
                await asyncio.sleep(0.1)
            stop_feeding.set()
            await asyncio.gather(*feeding)
            all_sent.set()
            await asyncio.gather(*lanes)
        finally:
            stop_feeding.set()
            for task in [*feeding, *lanes]:
                task.cancel()
            await asyncio.gather(*feeding, *lanes, return_exceptions=True)
    await sessions_ended(postgres_database)

    sent = set().union(*(events.sent for events in streams))
    result = await outcome(postgres_database, groups, sent)
    report(
        "consumer kill -9",
        result,
        began,
        kills=LANES * KILLS_PER_LANE,
        groups=LANES,
        seed=seed,
        logged_problems=len(processes.logged_problems()),
    )
    result.assert_exactly_once()
    assert result.redelivered > 0, "no kill landed mid-batch: nothing was redelivered"


# -- (b) Kafka restarted while a service commits state with the outbox ----------------------------


@pytest.mark.timeout(600)
@pytest.mark.kafka
@pytest.mark.postgres
async def test_kafka_restart_while_committing_with_the_outbox_loses_nothing(
    kafka_bootstrap: str,
    postgres_database: str,
    topics: list[str],
    restarts: Restarts,
    processes: Processes,
    tmp_path: Path,
) -> None:
    """`order_writer` commits orders continuously, each with its outbox event, before, during
    and after a Kafka restart, while `effect_consumer` applies the events. The commits never
    wait for Kafka; the relay keeps the rows until the broker acknowledged them, so every
    committed order's event is effected, once.

    Both run as processes, so that whatever state a failure leaves their Kafka clients in, the
    teardown can end them before it brings Kafka back.
    """
    began = time.monotonic()
    topic = topics[0]
    group = unique_name("billing")
    stop_file = tmp_path / "stop-writing"
    common = {"POSTGRES_URL": postgres_database, "FAULT_TOPIC": topic}
    consumer = processes.spawn("effect_consumer", FAULT_GROUP=group, **common)
    writer = processes.spawn("order_writer", FAULT_STOP_FILE=str(stop_file), **common)
    conn = await asyncpg.connect(postgres_database)
    try:

        async def flowing() -> bool:
            for process in (consumer, writer):
                assert process.alive, f"a process exited:\n{process.tail()}"
            return await effect_count(conn) >= 100

        await eventually(flowing, within=60, what="orders flow to the consumer")
        restart_began = await conn.fetchval("select clock_timestamp()")
        restart_seconds = await restarts.restart("kafka")
        restart_ended = await conn.fetchval("select clock_timestamp()")

        async def reconnected() -> bool:  # the writer's relay and the consumer both
            for process in (consumer, writer):
                assert process.alive, f"a process exited:\n{process.tail()}"
            return bool(
                await conn.fetchval(
                    "select exists (select 1 from effects join orders on event_id = orders.id "
                    "where committed_at > $1)",
                    restart_ended,
                )
            )

        await eventually(
            reconnected, within=60, what="an order committed after the restart is effected"
        )
        stop_file.touch()

        async def drained() -> bool:
            assert writer.alive, f"the writer exited:\n{writer.tail()}"
            return int(await conn.fetchval("select count(*) from msa_outbox")) == 0

        try:
            await eventually(drained, within=60, what="the relay publishes every outbox row")
        except AssertionError as exc:
            pending = await conn.fetchval("select count(*) from msa_outbox")
            problems = "\n".join(sorted(set(processes.logged_problems()))[-10:])
            raise AssertionError(
                f"{exc}: {pending} row(s) left; the processes logged:\n{problems}"
            ) from None
        orders = {r["id"] for r in await conn.fetch("select id from orders")}
        during_restart = await conn.fetchval(
            "select count(*) from orders where committed_at between $1 and $2",
            restart_began,
            restart_ended,
        )
        longest_pause = await conn.fetchval(
            "select coalesce(extract(epoch from max(gap)), 0) from (select committed_at - "
            "lag(committed_at) over (order by committed_at) as gap from orders) gaps"
        )

        async def all_in() -> bool:
            assert consumer.alive, f"the consumer exited:\n{consumer.tail()}"
            return await effect_count(conn) >= len(orders)

        await eventually(all_in, within=60, what=f"all {len(orders)} orders are effected")
    finally:
        await conn.close()
    assert await writer.terminate() == 0, writer.tail()
    assert await consumer.terminate() == 0, consumer.tail()
    await sessions_ended(postgres_database)

    copies = await copies_on_bus(kafka_bootstrap, topic)
    result = await outcome(postgres_database, [group], orders)
    report(
        "kafka restart + outbox",
        result,
        began,
        committed_during_restart=during_restart,
        longest_commit_pause=f"{float(longest_pause):.2f}s",
        restart_seconds=f"{restart_seconds:.1f}",
        bus_records=sum(copies.values()),
        bus_duplicates=sum(copies.values()) - len(copies),
        relay_failures=len(processes.logged_problems("outbox relay: publishing failed")),
        out_of_order=len(processes.logged_problems("OutOfOrderSequenceNumber")),
    )
    assert during_restart > 0, "no order was committed while Kafka was down"
    assert float(longest_pause) < restart_seconds / 2, "commits waited for Kafka"
    assert len(copies) == len(orders), "one distinct event on the bus per committed order"
    result.assert_exactly_once()


@pytest.mark.timeout(120)
@pytest.mark.kafka
@pytest.mark.postgres
async def test_relay_recovers_when_the_producer_loses_its_sequence(
    kafka_bootstrap: str, postgres_database: str, topics: list[str]
) -> None:
    """What a Kafka restart can do to the relay, in miniature and without restarting anything.

    While a restarting broker has no leader for a partition, aiokafka expires a batch that
    waited longer than `request_timeout_ms`: it fails it *after* assigning it the partition's
    next idempotence sequence numbers, which the broker never sees. Every later batch to that
    partition is refused with OutOfOrderSequenceNumber, for as long as that producer lives.
    Here the same gap is made directly (the five sequence numbers an expired five-record batch
    would have used); the relay must still publish everything, through a new producer.
    """
    topic = topics[0]
    db = PostgresResource(postgres_database, migrations=EFFECTS, max_size=4)
    transport = transport_for(kafka_bootstrap)
    bus = Bus(transport, source="fault-orders")
    outbox = PostgresOutbox(db, bus, batch_size=200, poll_interval=0.5)

    async def add(first: int, count: int) -> None:
        async with db.transaction() as tx:
            for n in range(first, first + count):
                await outbox.add(tx, topic, EffectRequested(event_id=f"e-{n}"), key=f"e-{n}")

    async def drained() -> bool:
        return await outbox.pending() == 0

    await db.start()
    try:
        await bus.start()
        await outbox.start()
        await add(0, 100)
        await eventually(drained, within=15, what="the first 100 rows are published")
        partitions = await transport.partitions_for(topic)
        producer = transport._producer  # aiokafka's, to leave it as an expired batch would
        for partition in range(partitions):
            producer._txn_manager.increment_sequence_number(
                AiokafkaTopicPartition(topic, partition), 5
            )
        await add(100, 100)
        try:
            await eventually(drained, within=20, what="the next 100 rows are published")
        finally:
            print(
                f"\n[producer sequence gap] published={outbox.published} "
                f"pending={await outbox.pending()}"
            )
    finally:
        await outbox.stop()
        await bus.stop(grace=1)
        await db.stop()
    copies = await copies_on_bus(kafka_bootstrap, topic)
    assert len(copies) == 200


# -- (c) PostgreSQL restarted while handlers apply effects ----------------------------------------


@pytest.mark.timeout(450)
@pytest.mark.kafka
@pytest.mark.postgres
async def test_postgres_restart_during_handling_retries_without_half_written_state(
    kafka_bootstrap: str, restartable_database: str, topics: list[str], restarts: Restarts
) -> None:
    """Events stream in while PostgreSQL restarts under the handlers. Each effect commits with
    its inbox row or not at all; handlers that fail meanwhile are retried in place, by the
    bus's `RetryPolicy`, until the database is back; nothing is dead-lettered."""
    began = time.monotonic()
    url = restartable_database
    topic = topics[0]
    group = unique_name("ledger")
    stop = asyncio.Event()
    async with (
        effect_subscription(kafka_bootstrap, url, topic, group) as seen,
        publishing_bus(kafka_bootstrap) as bus,
    ):
        events = Publisher(bus, topic)
        feeding = asyncio.create_task(events.keep_publishing(200, stop))
        try:
            conn = await asyncpg.connect(url)
            try:

                async def handling() -> bool:
                    return await effect_count(conn) >= 100

                await eventually(handling, within=30, what="the consumer is handling events")
            finally:
                await conn.close()
            restart_seconds = await restarts.restart("postgres")
            first_after = events.next_id
            conn = await asyncpg.connect(url)
            try:

                async def recovered() -> bool:
                    if feeding.done():
                        feeding.result()  # publishing failed: raise that
                    return bool(
                        await conn.fetchval(
                            "select exists (select 1 from effects where event_id = $1)",
                            first_after,
                        )
                    )

                await eventually(
                    recovered, within=60, what="an event sent after the restart is effected"
                )
            finally:
                await conn.close()
        finally:
            stop.set()
            await feeding
        await all_effected(url, len(events.sent), within=90)
    await sessions_ended(url)

    dead_letters = await copies_on_bus(kafka_bootstrap, f"{topic}.dlq")
    result = await outcome(url, [group], events.sent)
    report(
        "postgres restart",
        result,
        began,
        restart_seconds=f"{restart_seconds:.1f}",
        failed_attempts=seen.failures,
        dead_letters=sum(dead_letters.values()),
        errors=dict(seen.errors),
    )
    assert seen.failures > 0, "the restart never reached a handler"
    assert not dead_letters, "a handler ran out of retries during the restart"
    result.assert_exactly_once()


ROUNDS = 20


@pytest.mark.timeout(60)
@pytest.mark.postgres
async def test_connection_terminated_under_a_transaction_is_database_unavailable(
    postgres_database: str,
) -> None:
    """What a restart does to each connection, in miniature and without restarting anything:
    the server terminates the backend (`pg_terminate_backend`, the same FATAL 57P01 a shutdown
    sends) while its transaction is open, and the next statement fails. Every such failure must
    come out of the framework's edge as `DatabaseUnavailable` (retrying helps), never as a raw
    asyncpg exception, and the pool must recover."""
    db = PostgresResource(postgres_database, migrations=EFFECTS, max_size=2)
    await db.start()
    seen: Counter[str] = Counter()
    admin = await asyncpg.connect(postgres_database)
    try:
        for attempt in range(ROUNDS):
            try:
                async with db.transaction() as tx:
                    backend = await tx.fetchval("select pg_backend_pid()")
                    await admin.execute("select pg_terminate_backend($1)", backend)
                    await asyncio.sleep(0.001 * (attempt % 3))
                    await tx.execute(
                        "insert into effects values ($1, $1, 1)", f"terminated-{attempt}"
                    )
            except Exception as exc:
                seen[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
            else:
                seen["committed"] += 1
        assert await db.check(), "the pool did not recover"
        async with db.transaction() as tx:
            assert await tx.fetchval("select count(*) from effects") == 0
    finally:
        await admin.close()
        await db.stop()
    print(f"\n[terminated connections] rounds={ROUNDS} outcomes={dict(seen)}")
    unavailable = f"{DatabaseUnavailable.__module__}.{DatabaseUnavailable.__name__}"
    assert seen == {unavailable: ROUNDS}, f"untranslated driver errors: {dict(seen)}"


# -- (d) the outbox relay SIGKILLed while publishing ----------------------------------------------


RELAY_KILLS = 3


@pytest.mark.timeout(400)
@pytest.mark.kafka
@pytest.mark.postgres
async def test_relay_killed_mid_publish_republishes_and_loses_nothing(
    kafka_bootstrap: str, postgres_database: str, topics: list[str], processes: Processes
) -> None:
    """A backlog of committed outbox rows; the relay process is SIGKILLed as soon as it is
    seen publishing (the row count drops), three times, then a last one drains the outbox.
    Rows published but not deleted yet are published again: duplicates on the bus, which the
    inbox absorbs."""
    began = time.monotonic()
    topic = topics[0]
    backlog = 6000
    group = unique_name("shipping")
    db = PostgresResource(postgres_database, migrations=EFFECTS)
    outbox = PostgresOutbox(db, Bus(MemoryTransport(), source="fault-orders"), relay=False)
    env = {"POSTGRES_URL": postgres_database, "FAULT_BATCH_SIZE": "200"}
    pending_at_kills = []
    await db.start()
    try:
        for first in range(0, backlog, 500):
            async with db.transaction() as tx:
                for i in range(first, min(first + 500, backlog)):
                    await outbox.add(tx, topic, EffectRequested(event_id=f"e-{i}"), key=f"e-{i}")
        sent = {f"e-{i}" for i in range(backlog)}
        async with effect_subscription(kafka_bootstrap, postgres_database, topic, group) as seen:
            for _ in range(RELAY_KILLS):
                relay = processes.spawn("outbox_relay", **env)
                level = await outbox.pending()

                async def publishing(relay: ServiceProcess = relay, level: int = level) -> bool:
                    assert relay.alive, f"the relay exited:\n{relay.tail()}"
                    return await outbox.pending() < level

                await eventually(publishing, within=30, what="the relay publishes", every=0.01)
                await asyncio.sleep(random.uniform(0, 0.05))
                relay.kill()
                pending_at_kills.append(await outbox.pending())
            last = processes.spawn("outbox_relay", **env)

            async def drained() -> bool:
                assert last.alive, f"the last relay exited:\n{last.tail()}"
                return await outbox.pending() == 0

            await eventually(drained, within=60, what="the last relay drains the outbox")
            assert await last.terminate() == 0, last.tail()
            await all_effected(postgres_database, backlog, within=60)
    finally:
        await db.stop()
    await sessions_ended(postgres_database)

    copies = await copies_on_bus(kafka_bootstrap, topic)
    result = await outcome(postgres_database, [group], sent)
    report(
        "relay kill -9",
        result,
        began,
        kills=RELAY_KILLS,
        pending_at_kills=pending_at_kills,
        bus_records=sum(copies.values()),
        bus_duplicates=sum(copies.values()) - len(copies),
        deliveries=seen.deliveries,
        logged_problems=len(processes.logged_problems()),
    )
    assert len(copies) == backlog, "every outbox row reached the bus"
    result.assert_exactly_once()
