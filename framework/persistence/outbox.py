"""Transactional outbox and idempotent inbox on PostgreSQL.

**Outbox.** `await outbox.add(tx, topic, event, key=...)` writes the event, already encoded as a
CloudEvents record, into `msa_outbox` inside the caller's transaction: the state change and the
event commit together or not at all. The relay publishes what committed:

- it claims the oldest rows with `SELECT ... ORDER BY id FOR UPDATE SKIP LOCKED`, publishes them
  through the bus (`Bus.publish_stored`: the publish middleware sees each event and the bus's
  metrics count it; pipelined, idempotent producer, acks=all), and deletes them in the same
  transaction once the broker acknowledged every one. A crash between the broker's ack and the
  delete republishes the rows later: duplicates on the bus are possible, lost events are not;
  the inbox (and the stable CloudEvents `id`) makes the duplicates harmless.
- order per aggregate: rows are published in id order by one *active* relay at a time. Every
  replica runs a relay, but only the holder of a PostgreSQL advisory lock publishes; the others
  stand by and take over within `poll_interval` when it dies (the lock goes with its session).
  Two relays publishing concurrently could reorder one aggregate's events, so they never do.
- latency: `add` issues `pg_notify('msa_outbox')`, delivered at commit; the relay LISTENs, so
  commit-to-publish takes milliseconds instead of a poll interval (polling stays as a fallback).

**Inbox.** `await inbox.record(tx, message)` inserts `(consumer_group, message_id)` in the
caller's transaction and returns False when the row already existed: the message was processed
before, and the caller skips its effect. A concurrent duplicate blocks on the first one's row
until that commits, then sees the conflict. Old ids are deleted after `retention`.

    async with self.db.transaction() as tx:
        if not await self.inbox.record(tx, message):
            return                                   # a redelivery: the effect happened already
        await tx.execute("update stock set reserved = reserved + $1 where sku = $2", n, sku)
        await self.outbox.add(tx, "inventory", StockReserved(sku=sku, quantity=n), key=sku)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from framework.errors import MsaError, NotStartedError, PersistenceError
from framework.messages import Envelope, to_binary
from framework.persistence.postgres import Migration, PostgresResource, translate
from framework.resilience import Backoff
from framework.tasks import finish_task

if TYPE_CHECKING:
    from framework.bus import Bus, Message

__all__ = ["PostgresInbox", "PostgresOutbox"]

T = TypeVar("T")
log = logging.getLogger("framework.persistence.outbox")
_RELAY_LOCK = 0x6D73615F72656C  # "msa_rel"
CHANNEL = "msa_outbox"
_ADD = f"""
with added as (
    insert into msa_outbox (topic, key, headers, value) values ($1, $2, $3, $4) returning 1
)
select pg_notify('{CHANNEL}', '') from added
"""
"""One round trip: the row, and the notification the leader's relay LISTENs for (sent at
commit, and once per transaction however many rows: PostgreSQL folds equal payloads)."""
RECONNECT = Backoff(initial=0.4, maximum=5.0)
"""Between attempts of the relay to reconnect (the database is down, or the relay failed)."""
REPUBLISH = Backoff(initial=0.2, maximum=5.0)
"""Between attempts of the leading relay to publish a batch the broker refused."""

OUTBOX_MIGRATIONS = [
    Migration(
        1,
        "outbox",
        """
        create table msa_outbox (
            id bigserial primary key,
            topic text not null,
            key bytea,
            headers jsonb not null,
            value bytea not null,
            created_at timestamptz not null default clock_timestamp()
        )
        """,
        component="msa_outbox",
    )
]

INBOX_MIGRATIONS = [
    Migration(
        1,
        "inbox",
        """
        create table msa_inbox (
            consumer_group text not null,
            message_id text not null,
            processed_at timestamptz not null default now(),
            primary key (consumer_group, message_id)
        );
        create index msa_inbox_processed_at on msa_inbox (processed_at)
        """,
        component="msa_inbox",
    )
]


class PostgresOutbox:
    """The outbox table and its relay; `use` it in a service after its `PostgresResource`."""

    def __init__(
        self,
        db: PostgresResource,
        bus: Bus,
        *,
        relay: bool = True,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.relay_enabled = relay
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        db.add_migrations(OUTBOX_MIGRATIONS)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.is_leader = False
        """True while this relay holds the leader lock and LISTENs: from then on an event that
        commits is published without waiting for the poll interval."""
        self.published = 0
        metrics = bus.metrics.registry
        self._m_published = metrics.counter(
            "msa_outbox_published_total", "Outbox events published by the relay.", ("topic",)
        )
        self._m_latency = metrics.histogram(
            "msa_outbox_commit_to_publish_seconds",
            "Time from the outbox row's creation to the broker's acknowledgement.",
        )

    async def add(
        self,
        tx: Any,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
    ) -> Envelope[Any]:
        """Add an event to the outbox inside transaction `tx`; returns its envelope."""
        envelope = self.bus.envelope(data, key=key, type=type, subject=subject)
        await self.add_envelope(tx, topic, envelope)
        return envelope

    async def add_envelope(self, tx: Any, topic: str, envelope: Envelope[Any]) -> None:
        record_key, value, headers = to_binary(envelope)
        encoded = orjson.dumps([[k, v.decode()] for k, v in headers]).decode()
        with translate():
            await tx.execute(_ADD, topic, record_key, encoded, value)

    # -- relay ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.relay_enabled and self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._relay(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        await finish_task(task)

    def wake(self) -> None:
        self._wake.set()

    async def _relay(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._lead()
                failures = 0
            except (PersistenceError, OSError) as exc:
                failures += 1
                log.warning("outbox relay: database problem (%s); reconnecting", exc)
            except Exception:
                failures += 1
                log.exception("outbox relay failed; restarting")
            self.is_leader = False
            await self._pause(RECONNECT.delay(failures))

    async def _lead(self) -> None:
        """Hold the leader lock on a dedicated connection, LISTEN on it, publish until stopped."""
        import asyncpg

        with translate():
            conn = await asyncpg.connect(self.db.url)
        try:
            while not await conn.fetchval("select pg_try_advisory_lock($1)", _RELAY_LOCK):
                if not await self._pause(self.poll_interval):
                    return
            await conn.add_listener(CHANNEL, self._on_notify)
            self.is_leader = True  # only now: a commit before the LISTEN would not wake it
            failures = 0
            while not self._stopping.is_set():
                if not self.bus.started:  # a Service starts its resources before its bus
                    await self._pause(0.05)  # and stops them after it: nothing to publish with
                    continue
                self._wake.clear()  # before the batch: a NOTIFY during it triggers the next one
                try:
                    count = await self.publish_batch()
                    failures = 0
                except MsaError as exc:
                    if isinstance(exc, PersistenceError):
                        raise
                    failures += 1  # the broker is down: keep the rows, back off, try again
                    log.warning("outbox relay: publishing failed (%s); will retry", exc)
                    await self._pause(REPUBLISH.delay(failures))
                    continue
                if count < self.batch_size:
                    await self._pause(self.poll_interval, wake=True)
                if conn.is_closed():
                    raise PersistenceError("outbox relay lost its leader connection")
        finally:
            self.is_leader = False
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_notify(self, *args: object) -> None:
        self._wake.set()

    async def _pause(self, seconds: float, *, wake: bool = False) -> bool:
        """Wait (for a notification when `wake`); False when stopping."""
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        if wake:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return not self._stopping.is_set()

    async def publish_batch(self) -> int:
        """Publish up to `batch_size` committed events in order; returns how many."""
        async with self.db.transaction() as tx:
            with translate():
                rows = await tx.fetch(
                    "select id, topic, key, headers, value, "
                    "extract(epoch from created_at) as created from msa_outbox "
                    "order by id limit $1 for update skip locked",
                    self.batch_size,
                )
            if not rows:
                return 0
            futures = []
            for row in rows:
                headers = tuple((k, v.encode()) for k, v in orjson.loads(row["headers"]))
                futures.append(
                    await self.bus.publish_stored(
                        row["topic"], row["value"], key=row["key"], headers=headers
                    )
                )
            await asyncio.gather(*futures)
            now = time.time()
            for row in rows:
                self._m_published.labels(topic=row["topic"]).inc()
                self._m_latency.observe(max(0.0, now - float(row["created"])))
            with translate():
                await tx.execute(
                    "delete from msa_outbox where id = any($1::bigint[])", [r["id"] for r in rows]
                )
        self.published += len(rows)
        return len(rows)

    async def pending(self) -> int:
        """Events committed but not published yet."""
        async with self.db.connection() as conn:
            return int(await conn.fetchval("select count(*) from msa_outbox"))


class PostgresInbox:
    """Processed message ids per consumer group, recorded with the effect they guard."""

    def __init__(
        self,
        db: PostgresResource,
        *,
        retention: timedelta = timedelta(days=7),
        cleanup_interval: float = 3600.0,
    ) -> None:
        self.db = db
        self.retention = retention
        self.cleanup_interval = cleanup_interval
        db.add_migrations(INBOX_MIGRATIONS)
        self._task: asyncio.Task[None] | None = None

    async def record(self, tx: Any, message: Message[Any]) -> bool:
        """Record `message` as processed in `tx`; False if it was processed before."""
        return await self.record_id(tx, message.group, message.envelope.id)

    async def record_id(self, tx: Any, group: str, message_id: str) -> bool:
        with translate():
            status = await tx.execute(
                "insert into msa_inbox (consumer_group, message_id) values ($1, $2) "
                "on conflict do nothing",
                group,
                message_id,
            )
        return bool(status == "INSERT 0 1")

    async def run_once(
        self, message: Message[Any], effect: Callable[[Any], Awaitable[T]]
    ) -> T | None:
        """Run `effect(tx)` in a transaction that records `message`; None for a duplicate."""
        async with self.db.transaction() as tx:
            if not await self.record(tx, message):
                return None
            return await effect(tx)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._cleanup_loop(), name="inbox-cleanup")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cleanup(self) -> int:
        """Delete ids older than the retention; returns how many."""
        try:
            async with self.db.connection() as conn:
                status = await conn.execute(
                    "delete from msa_inbox where processed_at < now() - $1::interval",
                    self.retention,
                )
        except NotStartedError:
            return 0
        return int(status.split()[-1])

    async def _cleanup_loop(self) -> None:
        while True:
            try:
                removed = await self.cleanup()
                if removed:
                    log.info(
                        "inbox: removed %d processed ids older than %s", removed, self.retention
                    )
            except PersistenceError as exc:
                log.warning("inbox cleanup failed: %s", exc)
            await asyncio.sleep(self.cleanup_interval)
