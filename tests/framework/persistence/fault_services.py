"""Services the fault-injection tests (`test_faults.py`) run as `msa run` processes, and the
effect they apply.

    python -m framework.cli run tests.framework.persistence.fault_services:effect_consumer
    python -m framework.cli run tests.framework.persistence.fault_services:outbox_relay
    python -m framework.cli run tests.framework.persistence.fault_services:order_writer

All are factories (the topic and the tuning come from the environment, read when the service is
built, so a test chooses them per run):

    POSTGRES_URL        the database (a fresh one per test)
    FAULT_TOPIC         the topic `effect_consumer` consumes and `order_writer` publishes to
    FAULT_GROUP         the consumer group of `effect_consumer` (default `fault-effects`)
    FAULT_CONCURRENCY   its handlers running at once (default 32)
    FAULT_POOL_SIZE     its PostgreSQL connections (default 16)
    FAULT_BATCH_SIZE    rows per relay batch (default 200)
    FAULT_STOP_FILE     `order_writer` places orders until this file exists

Plus MSA_TRANSPORT=kafka, KAFKA_BOOTSTRAP and MSA_HTTP_PORT=-1, as for any service.

The effect is an upsert that counts its own applications, so an effect applied twice shows up as
`applied = 2` instead of hiding in an idempotent write; `message_id` ties each effect to its inbox
row, so a test can check that neither was ever written without the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from framework.bus import Message, RetryPolicy
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.errors import PersistenceError
from framework.messages import message_type
from framework.persistence.outbox import PostgresInbox, PostgresOutbox
from framework.persistence.postgres import Migration, PostgresResource
from framework.service import Service, ServiceSettings, handles

__all__ = [
    "EFFECTS",
    "ORDERS",
    "EffectRequested",
    "apply_once",
    "effect_consumer",
    "kafka_transport",
    "order_writer",
    "outbox_relay",
]

log = logging.getLogger("tests.faults")


@message_type("fault.effect.requested")
class EffectRequested(BaseModel):
    event_id: str


EFFECTS = [
    Migration(
        1,
        "effects",
        """
        create table effects (
            event_id text primary key,
            message_id text not null,
            applied integer not null
        );
        create table redeliveries (message_id text not null)
        """,
    )
]

ORDERS = Migration(
    2,
    "orders",
    """
    create table orders (
        id text primary key,
        committed_at timestamptz not null default clock_timestamp()
    )
    """,
)
"""The state `order_writer` commits, one row per order, with its outbox event."""

APPLY = """
insert into effects (event_id, message_id, applied) values ($1, $2, 1)
on conflict (event_id) do update set applied = effects.applied + 1
"""


async def apply_once(inbox: PostgresInbox, message: Message[EffectRequested]) -> bool:
    """Apply the message's effect with its inbox row in one transaction; False for a duplicate.

    A duplicate is noted in `redeliveries` (best effort, outside the transaction: it only
    tells the test that a redelivery happened and the inbox absorbed it).
    """

    async def effect(tx: object) -> bool:
        await tx.execute(APPLY, message.data.event_id, message.envelope.id)  # type: ignore[attr-defined]
        return True

    if await inbox.run_once(message, effect):
        return True
    with contextlib.suppress(PersistenceError):
        async with inbox.db.connection() as conn:
            await conn.execute("insert into redeliveries values ($1)", message.envelope.id)
    return False


def kafka_transport(env: Mapping[str, str]) -> KafkaTransport:
    """Kafka from the usual KAFKA_* variables, with the shortest session the broker accepts
    (6 s, its group.min.session.timeout.ms) so a SIGKILLed member leaves the group quickly, and
    a 10 s request timeout so an unanswered send fails (and is retried) within a test's time."""
    settings = dataclasses.replace(
        KafkaSettings.from_env(environ=env),
        session_timeout_ms=6_000,
        heartbeat_interval_ms=500,
        request_timeout_ms=10_000,
    )
    return KafkaTransport(settings)


def effect_consumer() -> Service:
    """Consumes `FAULT_TOPIC` and applies each `EffectRequested` once, through the inbox."""
    settings = ServiceSettings.from_env()
    env = settings.env
    group = env.get("FAULT_GROUP", "fault-effects")
    concurrency = int(env.get("FAULT_CONCURRENCY", "32"))
    retry = RetryPolicy(max_attempts=60, initial_backoff=0.1, max_backoff=1.0)

    class EffectConsumer(Service):
        name = group

        def __init__(self) -> None:
            super().__init__(settings, transport=kafka_transport(env))
            self.db = self.use(
                PostgresResource(
                    env["POSTGRES_URL"],
                    migrations=EFFECTS,
                    max_size=int(env.get("FAULT_POOL_SIZE", "16")),
                )
            )
            self.inbox = self.use(PostgresInbox(self.db))

        @handles(env["FAULT_TOPIC"], concurrency=concurrency, retry=retry)
        async def on_effect(
            self, event: EffectRequested, message: Message[EffectRequested]
        ) -> None:
            await apply_once(self.inbox, message)

    return EffectConsumer()


def outbox_relay() -> Service:
    """Runs nothing but the outbox relay: publishes what `msa_outbox` holds to Kafka."""
    settings = ServiceSettings.from_env()
    env = settings.env

    class OutboxRelay(Service):
        name = "fault-relay"

        def __init__(self) -> None:
            super().__init__(settings, transport=kafka_transport(env))
            self.db = self.use(PostgresResource(env["POSTGRES_URL"], migrations=EFFECTS))
            self.outbox = self.use(
                PostgresOutbox(
                    self.db,
                    self.bus,
                    batch_size=int(env.get("FAULT_BATCH_SIZE", "200")),
                    poll_interval=0.5,
                )
            )

    return OutboxRelay()


def order_writer() -> Service:
    """Commits an order and its outbox event every 10 ms, until `FAULT_STOP_FILE` exists; its
    relay publishes the events to `FAULT_TOPIC`. A commit involves PostgreSQL only."""
    settings = ServiceSettings.from_env()
    env = settings.env
    topic = env["FAULT_TOPIC"]
    stop_file = Path(env["FAULT_STOP_FILE"])

    class OrderWriter(Service):
        name = "fault-orders"

        def __init__(self) -> None:
            super().__init__(settings, transport=kafka_transport(env))
            self.db = self.use(
                PostgresResource(env["POSTGRES_URL"], migrations=[*EFFECTS, ORDERS], max_size=4)
            )
            self.outbox = self.use(
                PostgresOutbox(
                    self.db,
                    self.bus,
                    batch_size=int(env.get("FAULT_BATCH_SIZE", "200")),
                    poll_interval=0.5,
                )
            )
            self._writing: asyncio.Task[None] | None = None

        async def on_start(self) -> None:
            self._writing = asyncio.create_task(self._place_orders())

        async def on_stop(self) -> None:
            if self._writing is not None:
                self._writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writing

        async def _place_orders(self) -> None:
            placed = 0
            try:
                while not await asyncio.to_thread(stop_file.exists):
                    order_id = f"o-{placed}"
                    async with self.db.transaction() as tx:
                        await tx.execute("insert into orders (id) values ($1)", order_id)
                        await self.outbox.add(
                            tx, topic, EffectRequested(event_id=order_id), key=order_id
                        )
                    placed += 1
                    await asyncio.sleep(0.01)
            except Exception:
                log.exception("placing order %d failed; no more orders", placed)
                raise

    return OrderWriter()
