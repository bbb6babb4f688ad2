"""The transactional outbox + inbox against the unsafe dual write, on real PostgreSQL and Kafka.

    eval "$(scripts/devservices env)"              # KAFKA_BOOTSTRAP, POSTGRES_URL
    .venv/bin/python benchmarks/outbox.py           # full run, about 100 s on 2 cores
    .venv/bin/python benchmarks/outbox.py --quick   # a smoke run, well under a minute

Every run uses a fresh database (`bench_<random>`, dropped at the end) and fresh topics (deleted
at the end). One process, one uvloop event loop: writers, relay and consumer share one core, the
broker and PostgreSQL the rest of the machine. Payloads are 1 KiB JSON, keyed by one of 1,000
account ids; topics have 3 partitions.

Scenarios (each run repeated, interleaved with its baseline, and the median run kept, since the
machine may be shared):

1. end-to-end - N state changes committed by 8 concurrent writers (a pool of 10 connections).
   *outbox + inbox*: the state change and `PostgresOutbox.add` commit in one transaction, the
   relay (LISTEN/NOTIFY, leader lock) publishes to Kafka, a consumer `Bus` subscription applies
   each effect with `PostgresInbox.run_once` (inbox row + effect in one transaction).
   *dual write* (baseline): commit the state change, then `bus.publish()` (confirm=True: the
   broker's ack is awaited); the consumer applies the same effect, without an inbox. The rate runs
   from the first commit to the last applied effect; p50/p99 are commit -> handler entry, and
   the 1b rows give commit -> broker ack for the same runs.
2. latency at a low steady rate (open loop, 200 events/s by default, so it measures latency,
   not queueing): commit -> broker ack and commit -> handler entry, for both designs.
3. relay drain - 2N rows pre-inserted into the outbox, then the relay is started; the time until
   every row is published and deleted, at several batch sizes. Baseline: our KafkaTransport
   sending the same records pipelined, acks gathered (the ceiling for any relay on this broker).
4. writer commits - what the outbox adds to the writer's transaction, no relay, no Kafka: the
   state update alone; plus an outbox row without NOTIFY; plus `outbox.add` (row + NOTIFY).

Commit times are taken right after the writer's transaction committed; ack times in a done
callback of the transport's acknowledgement future (a thin `KafkaTransport` subclass keyed by
the CloudEvents id, matched to its state change by the consumer); handler times on entry to the
handler. All from `time.perf_counter()`. A measurement during which the broker connection failed
(aiokafka logged an error: e.g. someone restarted Kafka) or that raised is discarded and redone
once; the notes say so. Producer settings are `KafkaSettings` defaults (acks=all, idempotence,
linger_ms=5) for both designs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar, cast

import asyncpg
import orjson
import uvloop
from _common import Clock, Result, environment, render, require_env
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from pydantic import BaseModel

from framework.bus import Bus, ConsumerOptions, HandlerSpec, MemoryTransport, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import message_type, to_binary, type_name
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import Migration, PostgresResource
from framework.types import RecordMetadata

log = logging.getLogger("benchmarks.outbox")
T = TypeVar("T")

PAYLOAD_BYTES = 1024
ACCOUNTS = 1000
WRITERS = 8
POOL = 10
WARM = 200
DUAL, OUTBOX = "dual write", "outbox + inbox"

APP = [
    Migration(
        1,
        "accounts",
        "create table accounts (id text primary key, version bigint not null default 0, "
        "balance bigint not null default 0)",
    ),
    Migration(
        2,
        "projection",
        "create table projection (id text primary key, applied bigint not null default 0, "
        "total bigint not null default 0)",
    ),
]
UPDATE_ACCOUNT = "update accounts set version = version + 1, balance = balance + $2 where id = $1"
APPLY_EFFECT = "update projection set applied = applied + 1, total = total + $2 where id = $1"
INSERT_OUTBOX = "insert into msa_outbox (topic, key, headers, value) values ($1, $2, $3, $4)"
KEYS = [f"acct-{i:04d}" for i in range(ACCOUNTS)]


@message_type("bench.account.changed")
class AccountChanged(BaseModel):
    account: str
    seq: int
    amount: int
    note: str


_PAD = PAYLOAD_BYTES - len(
    AccountChanged(account=KEYS[0], seq=0, amount=0, note="").model_dump_json()
)


def event(seq: int) -> AccountChanged:
    """A 1 KiB event (about: seq's digits vary) for state change `seq` (negative: warm-up)."""
    return AccountChanged(account=KEYS[seq % ACCOUNTS], seq=seq, amount=seq % 100, note="n" * _PAD)


# -- plumbing -------------------------------------------------------------------------------------


class Topics:
    """Fresh topics for this run; deletes every topic of the run (DLQs included) at the end."""

    def __init__(self, bootstrap: str, run: str) -> None:
        self.run = run
        self.made = 0
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")

    async def __aenter__(self) -> Topics:
        await self.admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            names = [t for t in await self.admin.list_topics() if t.startswith(f"bench-{self.run}")]
            if names:
                await self.admin.delete_topics(names)
        await self.admin.close()

    async def fresh(self, name: str, partitions: int = 3) -> str:
        self.made += 1
        topic = f"bench-{self.run}-{name}-{self.made}"
        await self.admin.create_topics([NewTopic(topic, partitions, 1)])
        await asyncio.sleep(0.2)  # let the new partitions get their leader before first use
        return topic


class Database:
    """A fresh database for the run, created on POSTGRES_URL's server and dropped at the end."""

    def __init__(self, server_url: str, run: str) -> None:
        self.server_url = server_url
        self.name = f"bench_{run}"
        parts = urllib.parse.urlsplit(server_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path="/" + self.name))
        self.describe = ""

    async def __aenter__(self) -> Database:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'create database "{self.name}"')
            version = await conn.fetchval("show server_version")
            settings = [
                f"{name}={await conn.fetchval(f'show {name}')}"
                for name in ("fsync", "synchronous_commit", "shared_buffers")
            ]
            self.describe = f"{version.split()[0]} ({', '.join(settings)}), db {self.name}"
        finally:
            await conn.close()
        setup = PostgresResource(self.url, migrations=APP, min_size=1, max_size=1)
        PostgresOutbox(setup, Bus(MemoryTransport(), source="bench.setup"), relay=False)
        PostgresInbox(setup)
        await setup.start()  # apply the app, outbox and inbox migrations once
        await setup.stop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'drop database if exists "{self.name}" with (force)')
        finally:
            await conn.close()

    async def reset(self) -> None:
        """Empty outbox and inbox, fresh accounts and projection rows, vacuumed."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("truncate msa_outbox, msa_inbox, accounts, projection")
            for table in ("accounts", "projection"):
                await conn.execute(
                    f"insert into {table} (id) select 'acct-' || lpad(i::text, 4, '0') "
                    f"from generate_series(0, {ACCOUNTS - 1}) as i"
                )
            await conn.execute("vacuum analyze accounts, projection, msa_outbox, msa_inbox")
        finally:
            await conn.close()

    async def scalar(self, sql: str) -> Any:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()


class AckClockTransport(KafkaTransport):
    """Our KafkaTransport, noting when the broker acknowledged each CloudEvent (by `ce_id`)."""

    def __init__(self, settings: KafkaSettings, acked: dict[str, float]) -> None:
        super().__init__(settings)
        self.acked = acked

    async def send(
        self, topic: str, value: bytes, **options: Any
    ) -> asyncio.Future[RecordMetadata]:
        ack = await super().send(topic, value, **options)
        event_id = next((v for k, v in options.get("headers", ()) if k == "ce_id"), None)
        if event_id is not None:
            acked, ident = self.acked, event_id.decode()
            ack.add_done_callback(lambda _: acked.__setitem__(ident, time.perf_counter()))
        return ack


@dataclass
class Timeline:
    """When each state change `seq` committed, was acknowledged, reached and left the handler."""

    total: int
    committed: dict[int, float] = field(default_factory=dict)
    event_ids: dict[int, str] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    consumed: dict[int, float] = field(default_factory=dict)
    applied: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    warm_applied: int = 0
    warm_done: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def apply(self, seq: int) -> None:
        if seq < 0:
            self.warm_applied += 1
            if self.warm_applied == WARM:
                self.warm_done.set()
            return
        self.applied[seq] = time.perf_counter()
        if len(self.applied) == self.total:
            self.done.set()

    def commit_to_ack_ms(self) -> list[float]:
        return [
            (self.acked[self.event_ids[s]] - t) * 1000
            for s, t in self.committed.items()
            if s >= 0 and self.event_ids.get(s) in self.acked
        ]

    def commit_to_consumed_ms(self) -> list[float]:
        return [(self.consumed[s] - t) * 1000 for s, t in self.committed.items() if s >= 0]

    def first_commit(self) -> float:
        return min(t for s, t in self.committed.items() if s >= 0)

    def last_commit(self) -> float:
        return max(t for s, t in self.committed.items() if s >= 0)

    def last_applied(self) -> float:
        return max(self.applied.values())


async def closed_loop(write: Callable[[int], Awaitable[None]], seqs: Iterable[int]) -> None:
    """`WRITERS` coroutines taking the next state change as soon as their last one is done."""
    todo = iter(seqs)

    async def writer() -> None:
        for seq in todo:
            await write(seq)

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


async def paced(write: Callable[[int], Awaitable[None]], seqs: Sequence[int], rate: float) -> None:
    """Open loop: start state change i at i/rate seconds, whether or not earlier ones are done."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    running: set[asyncio.Task[None]] = set()
    for i, seq in enumerate(seqs):
        delay = began + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(write(seq))
        running.add(task)
        task.add_done_callback(running.discard)
    outcomes = await asyncio.gather(*running, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def until(predicate: Callable[[], bool], interval: float = 0.002) -> None:
    """Poll `predicate` (framework state that has no event to wait on) every `interval` s."""
    while True:
        if predicate():
            return
        await asyncio.sleep(interval)


def maximum(values: Sequence[float]) -> str:
    return f"max {max(values):,.0f} ms" if values else "max -"


# -- 1 and 2. the pipeline: writers -> (outbox -> relay | publish) -> Kafka -> handler -------------


@dataclass
class Run:
    timeline: Timeline
    clock: Clock
    rate: float = 0.0


async def pipeline(
    ctx: Context,
    design: str,
    *,
    n: int,
    drive: Callable[[Callable[[int], Awaitable[None]], Sequence[int]], Awaitable[None]],
    label: str,
) -> Run:
    """One run of `design` (OUTBOX or DUAL): warm up with WARM events, then time `n`."""
    await ctx.db.reset()
    topic = await ctx.topics.fresh(f"{label}-{'outbox' if design == OUTBOX else 'dual'}")
    timeline = Timeline(total=n)
    writer_db = PostgresResource(ctx.db.url, migrations=APP, min_size=POOL, max_size=POOL)
    reader_db = PostgresResource(ctx.db.url, min_size=POOL, max_size=POOL)
    writer_bus = Bus(AckClockTransport(ctx.settings, timeline.acked), source="bench.writer")
    reader_bus = Bus(KafkaTransport(ctx.settings), source="bench.reader")
    outbox = PostgresOutbox(writer_db, writer_bus) if design == OUTBOX else None
    inbox = PostgresInbox(reader_db) if design == OUTBOX else None

    async def on_change(message: Message[AccountChanged]) -> None:
        seen = time.perf_counter()
        data = message.data
        timeline.consumed.setdefault(data.seq, seen)
        timeline.event_ids.setdefault(data.seq, message.envelope.id)  # to match its broker ack
        if inbox is None:  # the dual write's consumer: the same effect, no inbox
            async with reader_db.connection() as conn:
                await conn.execute(APPLY_EFFECT, data.account, data.amount)
            timeline.apply(data.seq)
            return

        async def effect(tx: Any) -> bool:
            await tx.execute(APPLY_EFFECT, data.account, data.amount)
            return True

        if await inbox.run_once(message, effect):
            timeline.apply(data.seq)
        else:
            timeline.duplicates += 1

    async def write_outbox(seq: int) -> None:
        assert outbox is not None
        key = KEYS[seq % ACCOUNTS]
        async with writer_db.transaction() as tx:
            await tx.execute(UPDATE_ACCOUNT, key, seq % 100)
            await outbox.add(tx, topic, event(seq), key=key)
        timeline.committed[seq] = time.perf_counter()

    async def write_dual(seq: int) -> None:
        key = KEYS[seq % ACCOUNTS]
        async with writer_db.transaction() as tx:
            await tx.execute(UPDATE_ACCOUNT, key, seq % 100)
        timeline.committed[seq] = time.perf_counter()
        await writer_bus.publish(topic, event(seq), key=key)  # confirm=True: awaits the ack

    write = write_outbox if design == OUTBOX else write_dual
    reader_bus.subscribe(
        [topic],
        {type_name(AccountChanged): HandlerSpec(AccountChanged, on_change)},
        ConsumerOptions(group=f"bench-{ctx.run}-{label}-{len(ctx.groups)}"),
    )
    ctx.groups.append(topic)
    started: list[Any] = []
    try:
        for part in (writer_db, reader_db, reader_bus, writer_bus):
            await part.start()
            started.append(part)
        if outbox is not None:
            await outbox.start()
            started.append(outbox)
            await until(lambda: outbox.is_leader)
            await asyncio.sleep(0.05)  # LISTEN is issued right after the lock is taken
        await closed_loop(write, range(-WARM, 0))
        async with asyncio.timeout(30):
            await timeline.warm_done.wait()
        await asyncio.sleep(0.3)  # let the warm-up's commits and relay wake-ups settle
        trouble = BrokerTrouble.count
        clock = Clock()
        clock.start()
        await drive(write, range(n))
        async with asyncio.timeout(max(30.0, n / 200)):
            await timeline.done.wait()
        clock.stop(at=timeline.last_applied())
        BrokerTrouble.check(trouble)
        await asyncio.sleep(0.3)  # late duplicates, if any, would show up here
        if outbox is not None:
            pending = await outbox.pending()
            if pending:
                raise RuntimeError(f"{pending} outbox rows left after the run")
        applied = await ctx.db.scalar("select sum(applied) from projection")
        if applied != n + WARM:
            raise RuntimeError(f"projection applied {applied} effects, expected {n + WARM}")
        return Run(timeline=timeline, clock=clock)
    finally:
        for part in reversed(started):
            with contextlib.suppress(Exception):
                if isinstance(part, Bus):
                    await part.stop(grace=2)
                else:
                    await part.stop()


@dataclass
class Context:
    settings: KafkaSettings
    db: Database
    topics: Topics
    run: str
    groups: list[str] = field(default_factory=list)


def median_run(runs: Sequence[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def failed(errors: dict[str, list[str]], name: str) -> str:
    """A note on the runs of `name` that failed and were redone (not in the median)."""
    problems = errors.get(name)
    return f"{len(problems)} run(s) discarded ({problems[0][:90]}); " if problems else ""


def spread(runs: Sequence[Run], unit: str) -> str:
    if len(runs) < 2:
        return ""
    return f"{len(runs)} runs: " + ", ".join(f"{r.rate:,.0f}" for r in runs) + f" {unit}; "


async def end_to_end(ctx: Context, *, n: int, repeat: int) -> list[Result]:
    scenario = f"1. end-to-end, {WRITERS} writers"
    runs: dict[str, list[Run]] = {DUAL: [], OUTBOX: []}
    errors: dict[str, list[str]] = {}
    for _ in range(repeat):  # interleaved, so a change in the machine's load hits both designs
        for design in (DUAL, OUTBOX):
            run = await attempts(
                f"{scenario} {design}",
                60 + n / 100,
                partial(pipeline, ctx, design, n=n, drive=closed_loop, label="e2e"),
                errors.setdefault(design, []),
            )
            if run is None:
                continue
            tl = run.timeline
            run.rate = n / (tl.last_applied() - tl.first_commit())
            runs[design].append(run)
            print(f"  {scenario:<34} {design:<40} {run.rate:>10,.0f} ev/s", flush=True)
    results: list[Result] = []
    acks: list[Result] = []
    for design in (DUAL, OUTBOX):
        if not runs[design]:
            results.append(
                Result(
                    scenario=scenario,
                    implementation=design,
                    semantics="",
                    rate=0,
                    error="; ".join(errors.get(design) or ["no run"]),
                )
            )
            continue
        run = median_run(runs[design])
        tl, clock = run.timeline, run.clock
        ack, consumed = tl.commit_to_ack_ms(), tl.commit_to_consumed_ms()
        results.append(
            Result(
                scenario=scenario,
                implementation=f"{design}, commit->handler",
                semantics=(
                    "at-most-once: a crash after commit loses it"
                    if design == DUAL
                    else "effectively once (at-least-once + inbox)"
                ),
                rate=run.rate,
                unit="ev/s",
                latencies_ms=consumed,
                cpu_us_per_op=clock.us_per(n),
                baseline=design == DUAL,
                note=(
                    f"{failed(errors, design)}{spread(runs[design], 'ev/s')}median run: "
                    "last commit -> last effect "
                    f"{(tl.last_applied() - tl.last_commit()) * 1000:,.0f} ms, commit->handler "
                    f"{maximum(consumed)}, commit->ack {maximum(ack)}, machine CPU "
                    f"{clock.machine_busy} busy, {tl.duplicates} duplicates"
                ),
            )
        )
        acks.append(
            Result(
                scenario="1b. same runs, commit->broker ack",
                implementation=f"{design}, commit->ack",
                semantics="relay publishes" if design == OUTBOX else "writer awaits publish",
                rate=run.rate,
                unit="ev/s",
                latencies_ms=ack,
            )
        )
    return results + acks


async def latency(ctx: Context, *, n: int, rate: float) -> list[Result]:
    scenario = f"2. latency, {rate:.0f} ev/s steady"
    results: list[Result] = []

    async def drive(write: Callable[[int], Awaitable[None]], seqs: Sequence[int]) -> None:
        await paced(write, seqs, rate)

    for design in (DUAL, OUTBOX):
        problems: list[str] = []
        run = await attempts(
            f"{scenario} {design}",
            60 + n / rate,
            partial(pipeline, ctx, design, n=n, drive=drive, label="lat"),
            problems,
        )
        if run is None:
            results.append(
                Result(
                    scenario=scenario,
                    implementation=design,
                    semantics="",
                    rate=0,
                    error="; ".join(problems),
                )
            )
            continue
        tl = run.timeline
        committed = n / (tl.last_commit() - tl.first_commit())
        ack, consumed = tl.commit_to_ack_ms(), tl.commit_to_consumed_ms()
        results += [
            Result(
                scenario=scenario,
                implementation=f"{design}, commit->ack",
                semantics="open loop, 1 event per commit",
                rate=committed,
                unit="ev/s",
                latencies_ms=ack,
                note=(
                    f"{failed({design: problems}, design)}"
                    f"commit->ack {maximum(ack)}, commit->handler {maximum(consumed)}; "
                    f"last commit -> last effect "
                    f"{(tl.last_applied() - tl.last_commit()) * 1000:,.0f} ms"
                ),
            ),
            Result(
                scenario=scenario,
                implementation=f"{design}, commit->handler",
                semantics="open loop, 1 event per commit",
                rate=committed,
                unit="ev/s",
                latencies_ms=consumed,
            ),
        ]
        report(results[-2:])
    return results


# -- 3. relay drain -------------------------------------------------------------------------------


async def relay_drain(
    ctx: Context, *, n: int, batch_sizes: Sequence[int], repeat: int
) -> list[Result]:
    scenario = f"3. relay drain, {n} rows"
    shaper = Bus(MemoryTransport(), source="bench.writer")
    encoded: list[tuple[bytes | None, str, bytes]] = []
    for seq in range(n):
        key, value, headers = to_binary(shaper.envelope(event(seq), key=KEYS[seq % ACCOUNTS]))
        encoded.append((key, orjson.dumps([[k, v.decode()] for k, v in headers]).decode(), value))

    async def producer_alone() -> Run:
        topic = await ctx.topics.fresh("drain-producer")
        transport = KafkaTransport(ctx.settings)
        await transport.start()
        try:
            await (await transport.send(topic, b"warm-up"))
            trouble = BrokerTrouble.count
            clock = Clock()
            clock.start()
            acks = []
            for key, headers_json, value in encoded:  # the relay's own decoding of the rows
                headers = tuple((k, v.encode()) for k, v in orjson.loads(headers_json))
                acks.append(await transport.send(topic, value, key=key, headers=headers))
            await asyncio.gather(*acks)
            clock.stop()
            BrokerTrouble.check(trouble)
        finally:
            await transport.stop()
        return Run(timeline=Timeline(total=n), clock=clock, rate=n / clock.wall)

    async def relay(batch_size: int) -> Run:
        await ctx.db.reset()
        topic = await ctx.topics.fresh(f"drain-relay-{batch_size}")
        db = PostgresResource(ctx.db.url, min_size=2, max_size=2)
        bus = Bus(KafkaTransport(ctx.settings), source="bench.writer")
        outbox = PostgresOutbox(db, bus, batch_size=batch_size)
        try:
            await db.start()
            await bus.start()
            async with db.transaction() as tx:
                await tx.executemany(INSERT_OUTBOX, [(topic, *row) for row in encoded])
            async with db.connection() as conn:
                await conn.execute("vacuum analyze msa_outbox")
            await (await bus.transport.send(topic, b"warm-up"))
            trouble = BrokerTrouble.count
            clock = Clock()
            clock.start()
            await outbox.start()
            await until(lambda: outbox.published >= n)
            clock.stop()
            BrokerTrouble.check(trouble)
            pending = await outbox.pending()
            if pending:
                raise RuntimeError(f"{pending} rows left in the outbox")
        finally:
            await outbox.stop()
            await bus.stop()
            await db.stop()
        return Run(timeline=Timeline(total=n), clock=clock, rate=n / clock.wall)

    work: list[tuple[str, str, Callable[[], Awaitable[Run]]]] = [
        ("KafkaTransport alone", "pipelined sends, acks gathered", producer_alone),
        *(
            (
                f"PostgresOutbox relay, batch_size={b}" + (" (default)" if b == 500 else ""),
                "at-least-once, in id order",
                lambda b=b: relay(b),
            )
            for b in batch_sizes
        ),
    ]
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in work}
    errors: dict[str, list[str]] = {}
    for _ in range(repeat):
        for name, _, measure in work:
            run = await attempts(
                f"{scenario} {name}", 60 + n / 500, measure, errors.setdefault(name, [])
            )
            if run is None:
                continue
            runs[name].append(run)
            print(f"  {scenario:<34} {name:<40} {run.rate:>10,.0f} ev/s", flush=True)
    results = []
    for name, semantics, _ in work:
        if not runs[name]:
            results.append(
                Result(
                    scenario=scenario,
                    implementation=name,
                    semantics=semantics,
                    rate=0,
                    error="; ".join(errors.get(name) or ["no run"]),
                )
            )
            continue
        run = median_run(runs[name])
        batch = next((b for b in batch_sizes if f"={b}" in name), None)
        per_batch = (
            f", {run.clock.wall / -(-n // batch) * 1000:.1f} ms per batch of {batch}"
            if batch
            else ""
        )
        results.append(
            Result(
                scenario=scenario,
                implementation=name,
                semantics=semantics,
                rate=run.rate,
                unit="ev/s",
                cpu_us_per_op=run.clock.us_per(n),
                baseline=batch is None,
                note=f"{failed(errors, name)}{spread(runs[name], 'ev/s')}"
                f"machine CPU {run.clock.machine_busy} busy" + per_batch,
            )
        )
    return results


# -- 4. writer commit cost ------------------------------------------------------------------------


async def writer_cost(ctx: Context, *, n: int, repeat: int) -> list[Result]:
    scenario = f"4. writer commits, {WRITERS} writers"
    bus = Bus(MemoryTransport(), source="bench.writer")

    async def state_only(tx: Any, outbox: PostgresOutbox, seq: int) -> None:
        await tx.execute(UPDATE_ACCOUNT, KEYS[seq % ACCOUNTS], seq % 100)

    async def row_no_notify(tx: Any, outbox: PostgresOutbox, seq: int) -> None:
        # what outbox.add() does, minus the NOTIFY
        await tx.execute(UPDATE_ACCOUNT, KEYS[seq % ACCOUNTS], seq % 100)
        key, value, headers = to_binary(bus.envelope(event(seq), key=KEYS[seq % ACCOUNTS]))
        encoded = orjson.dumps([[k, v.decode()] for k, v in headers]).decode()
        await tx.execute(INSERT_OUTBOX, "bench-topic", key, encoded, value)

    async def outbox_add(tx: Any, outbox: PostgresOutbox, seq: int) -> None:
        await tx.execute(UPDATE_ACCOUNT, KEYS[seq % ACCOUNTS], seq % 100)
        await outbox.add(tx, "bench-topic", event(seq), key=KEYS[seq % ACCOUNTS])

    variants: list[tuple[str, str, Callable[[Any, PostgresOutbox, int], Awaitable[None]]]] = [
        ("state update only", "no event: BEGIN, UPDATE, COMMIT", state_only),
        ("+ outbox row, no NOTIFY", "+ INSERT (relay would only poll)", row_no_notify),
        ("+ outbox.add() (row + NOTIFY)", "+ INSERT + NOTIFY, as shipped", outbox_add),
    ]

    async def measure(
        body: Callable[[Any, PostgresOutbox, int], Awaitable[None]],
    ) -> tuple[Run, list[float]]:
        await ctx.db.reset()
        db = PostgresResource(ctx.db.url, min_size=POOL, max_size=POOL)
        outbox = PostgresOutbox(db, bus, relay=False)
        latencies: list[float] = []

        async def write(seq: int) -> None:
            began = time.perf_counter()
            async with db.transaction() as tx:
                await body(tx, outbox, seq)
            latencies.append((time.perf_counter() - began) * 1000)

        try:
            await db.start()
            await closed_loop(write, range(-WARM, 0))
            latencies.clear()
            clock = Clock()
            clock.start()
            await closed_loop(write, range(n))
            clock.stop()
        finally:
            await db.stop()
        return Run(timeline=Timeline(total=n), clock=clock, rate=n / clock.wall), latencies

    runs: dict[str, list[tuple[Run, list[float]]]] = {name: [] for name, _, _ in variants}
    errors: dict[str, list[str]] = {}
    for _ in range(repeat):
        for name, _, body in variants:
            measured = await attempts(
                f"{scenario} {name}",
                60 + n / 100,
                partial(measure, body),
                errors.setdefault(name, []),
            )
            if measured is None:
                continue
            runs[name].append(measured)
            print(f"  {scenario:<34} {name:<40} {measured[0].rate:>10,.0f} tx/s", flush=True)
    results = []
    for name, semantics, body in variants:
        if not runs[name]:
            results.append(
                Result(
                    scenario=scenario,
                    implementation=name,
                    semantics=semantics,
                    rate=0,
                    error="; ".join(errors.get(name) or ["no run"]),
                )
            )
            continue
        run, latencies = sorted(runs[name], key=lambda m: m[0].rate)[len(runs[name]) // 2]
        results.append(
            Result(
                scenario=scenario,
                implementation=name,
                semantics=semantics,
                rate=run.rate,
                unit="tx/s",
                latencies_ms=latencies,
                cpu_us_per_op=run.clock.us_per(n),
                baseline=body is state_only,
                note=(failed(errors, name) + spread([r for r, _ in runs[name]], "tx/s")).rstrip(
                    "; "
                ),
            )
        )
    return results


# -- main -----------------------------------------------------------------------------------------


class BrokerTrouble(logging.Handler):
    """Counts aiokafka's errors (lost connections, failed requests): a measurement during which
    the broker went away (e.g. restarted by someone else's fault-injection test) is redone."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        BrokerTrouble.count += 1

    @staticmethod
    def check(since: int) -> None:
        if BrokerTrouble.count > since:
            raise RuntimeError(
                f"the broker connection failed {BrokerTrouble.count - since} time(s) during the "
                "measurement (was Kafka restarted?)"
            )


async def attempts(
    what: str, seconds: float, make: Callable[[], Awaitable[T]], errors: list[str], tries: int = 2
) -> T | None:
    """`make()`'s result; a failed or disturbed measurement is redone (up to `tries` in all)."""
    for _ in range(tries):
        result = await bounded(what, seconds, make())
        if not isinstance(result, str):
            return cast(T, result)
        errors.append(result)
        print(f"  {what}: {result}", flush=True)
    return None


async def bounded(what: str, seconds: float, work: Awaitable[Any]) -> Any:
    """`work`'s result, or an error string if it raises or overruns `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        return f"timed out after {seconds:.0f}s"
    except Exception as exc:  # report and carry on with the next measurement
        log.exception("%s failed", what)
        return f"{type(exc).__name__}: {exc}"


def report(results: Sequence[Result]) -> None:
    for result in results:
        rate = f"{result.rate:>10,.0f} {result.unit}" if not result.error else result.error
        p = f"  p50 {result.p50:.1f} ms  p99 {result.p99:.1f} ms" if result.latencies_ms else ""
        print(f"  {result.scenario:<34} {result.implementation:<40} {rate}{p}", flush=True)


async def run(args: argparse.Namespace, bootstrap: str, postgres: str) -> list[Result]:
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="bench-outbox")
    run_id = f"{int(time.time())}_{os.getpid()}_{os.urandom(2).hex()}"
    results: list[Result] = []
    began = time.perf_counter()
    async with (
        Database(postgres, run_id) as db,
        Topics(bootstrap, run_id.replace("_", "-")) as topics,
    ):
        print(f"PostgreSQL  {db.describe}", flush=True)
        ctx = Context(settings=settings, db=db, topics=topics, run=run_id.replace("_", "-"))
        print(f"end-to-end ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await end_to_end(ctx, n=args.events, repeat=args.repeat)
        print(f"latency ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await latency(ctx, n=args.latency_events, rate=args.rate)
        print(f"relay drain ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await relay_drain(
            ctx, n=args.drain_events, batch_sizes=args.batch_sizes, repeat=args.repeat
        )
        print(f"writer commits ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await writer_cost(ctx, n=args.events // 2, repeat=args.repeat)
    return results


def framework_version() -> str:
    """The git commit the framework was measured at (and whether framework/ had local edits)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", repo, "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "framework"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit[:72]}" + (" + local edits in framework/" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--events", type=int, help="events per end-to-end run (default 4000)")
    parser.add_argument("--rate", type=float, default=200.0, help="latency run rate (ev/s)")
    parser.add_argument("--repeat", type=int, help="interleaved repeats, median kept (default 3)")
    args = parser.parse_args(argv)
    args.events = args.events or (1000 if args.quick else 4000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.drain_events = args.events * 2
    args.latency_events = int(args.rate * (2 if args.quick else 10))
    args.batch_sizes = (500,) if args.quick else (100, 500, 2000)

    bootstrap = require_env(
        "KAFKA_BOOTSTRAP",
        'Start the dev servers and export their addresses: eval "$(scripts/devservices env)"',
    )
    postgres = require_env(
        "POSTGRES_URL",
        'Start the dev servers and export their addresses: eval "$(scripts/devservices env)"',
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # leader-election retries on new topics
    logging.getLogger("aiokafka").addHandler(BrokerTrouble(logging.ERROR))

    print(f"benchmarks/outbox.py - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        environment(
            ["msa-framework", "aiokafka", "asyncpg", "pydantic", "orjson", "uvloop"],
            extra=[
                ("Kafka", f"{os.environ.get('KAFKA_VERSION', 'unknown version')} at {bootstrap}"),
                ("Loop", "uvloop; writers, relay and consumer in one process"),
                (
                    "Counts",
                    f"{args.events} events per end-to-end run ({WARM} warm-up first), "
                    f"{args.latency_events} at {args.rate:.0f} ev/s for latency, "
                    f"{args.drain_events} rows per drain, {args.events // 2} writer commits; "
                    f"{args.repeat} interleaved repeat(s), the median kept",
                ),
                (
                    "Shape",
                    f"{WRITERS} writers, pools of {POOL} connections, payload {PAYLOAD_BYTES} B, "
                    f"{ACCOUNTS} keys, 3 partitions",
                ),
                ("Framework", framework_version()),
                (
                    "Load",
                    "1/5/15-min load average at start: {:.2f} {:.2f} {:.2f}".format(
                        *os.getloadavg()
                    ),
                ),
            ],
        )
    )
    began = time.perf_counter()
    results = uvloop.run(run(args, bootstrap, postgres))
    print()
    print(render(results))
    print(
        f"\n(total {time.perf_counter() - began:.0f} s; load average at end: "
        "{:.2f} {:.2f} {:.2f})".format(*os.getloadavg())
    )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
