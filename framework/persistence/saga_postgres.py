"""Sagas kept in PostgreSQL: a row of `msa_saga` per saga, its history in `msa_saga_history`.

A transition is one transaction on the caller's pool: `SELECT ... FOR UPDATE` of the saga's row
(concurrent replies to one saga queue behind it), the inbox's row, the outbox's rows of the new
commands, the row's update guarded by its `version`, the history lines. The timer claims expired
sagas with `FOR UPDATE SKIP LOCKED`, so replicas share them; deadlines come from the database's
clock. `SagaOrchestrator` builds this store for a `PostgresResource` (`framework.persistence.saga`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from framework.persistence.postgres import (
    Migration,
    PostgresResource,
    SerializationFailure,
    translate,
)
from framework.persistence.saga_store import (
    DuplicateSaga,
    SagaChange,
    SagaEvent,
    SagaStatus,
    StoredSaga,
)

__all__ = ["SAGA_MIGRATIONS", "PostgresSagaStore"]

SAGA_MIGRATIONS = [
    Migration(
        1,
        "sagas",
        """
        create table msa_saga (
            id text primary key,
            type text not null,
            status text not null,
            step integer not null,
            data jsonb not null,
            version integer not null,
            attempts integer not null default 0,
            failed_step text,
            error text,
            created timestamptz not null default clock_timestamp(),
            updated timestamptz not null default clock_timestamp(),
            deadline timestamptz
        );
        create index msa_saga_deadline on msa_saga (deadline) where deadline is not null;
        create index msa_saga_type_status on msa_saga (type, status);
        create table msa_saga_history (
            id bigserial primary key,
            saga_id text not null references msa_saga (id) on delete cascade,
            at timestamptz not null default clock_timestamp(),
            version integer not null,
            event text not null,
            status text not null,
            step text,
            message_type text,
            message_id text,
            detail text
        );
        create index msa_saga_history_saga on msa_saga_history (saga_id, id)
        """,
        component="msa_saga",
    )
]

_COLUMNS = "id, type, status, step, data, version, attempts, failed_step, error"
_INSERT = """
insert into msa_saga (id, type, status, step, data, version)
values ($1, $2, $3, $4, $5::jsonb, $6) on conflict (id) do nothing
"""
_LOCK = f"select {_COLUMNS} from msa_saga where id = $1 for update"
_SAVE = """
update msa_saga set status = $2, step = $3, data = $4::jsonb, attempts = $5, failed_step = $6,
    error = $7, version = version + 1, updated = clock_timestamp(),
    deadline = clock_timestamp() + $8::float8 * interval '1 second'
where id = $1 and version = $9
"""
_HISTORY = """
insert into msa_saga_history
    (saga_id, version, event, status, step, message_type, message_id, detail)
values ($1, $2, $3, $4, $5, $6, $7, $8)
"""
_EXPIRED = f"""
select {_COLUMNS} from msa_saga
where deadline <= clock_timestamp() and type = any($1::text[])
order by deadline limit 1 for update skip locked
"""
_NEXT_DEADLINE = """
select extract(epoch from min(deadline) - clock_timestamp())::float8
from msa_saga where deadline is not null and type = any($1::text[])
"""


class PostgresSagaStore:
    """The `SagaStore` of a `PostgresResource`; `tx` is the transaction's connection."""

    def __init__(self, db: PostgresResource) -> None:
        self.db = db
        db.add_migrations(SAGA_MIGRATIONS)

    @contextlib.asynccontextmanager
    async def creating(self, tx: Any | None, saga: StoredSaga) -> AsyncIterator[Any]:
        if tx is not None:
            await self._insert(tx, saga)
            yield tx
            return
        async with self.db.transaction() as own:
            await self._insert(own, saga)
            yield own

    async def _insert(self, tx: Any, saga: StoredSaga) -> None:
        with translate():
            status = await tx.execute(
                _INSERT,
                saga.id,
                saga.type,
                saga.status.value,
                saga.step,
                saga.data.decode(),
                saga.version,
            )
        if status != "INSERT 0 1":
            raise DuplicateSaga(f"a saga with id {saga.id!r} exists already")

    @contextlib.asynccontextmanager
    async def locked(self, saga_id: str) -> AsyncIterator[tuple[Any, StoredSaga] | None]:
        async with self.db.transaction() as tx:
            with translate():
                row = await tx.fetchrow(_LOCK, saga_id)
            yield None if row is None else (tx, _stored(row))

    @contextlib.asynccontextmanager
    async def expired(self, types: Sequence[str]) -> AsyncIterator[tuple[Any, StoredSaga] | None]:
        async with self.db.transaction() as tx:
            with translate():
                row = await tx.fetchrow(_EXPIRED, list(types))
            yield None if row is None else (tx, _stored(row))

    async def save(self, tx: Any, change: SagaChange) -> None:
        version = change.version
        with translate():
            if change.moved:
                status = await tx.execute(
                    _SAVE,
                    change.id,
                    change.status.value,
                    change.step,
                    change.data.decode(),
                    change.attempts,
                    change.failed_step,
                    change.error,
                    change.timeout,
                    version,
                )
                if status != "UPDATE 1":  # the row lock makes this unreachable; stay safe
                    raise SerializationFailure(f"saga {change.id} changed concurrently")
                version += 1
            if change.notes:
                await tx.executemany(_HISTORY, [(change.id, version, *n) for n in change.notes])

    async def seconds_to_next_deadline(self, types: Sequence[str]) -> float | None:
        async with self.db.connection() as conn:
            until = await conn.fetchval(_NEXT_DEADLINE, list(types))
        return None if until is None else float(until)

    async def load(self, saga_id: str) -> StoredSaga | None:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                f"select {_COLUMNS}, created, updated, deadline from msa_saga where id = $1",
                saga_id,
            )
            if row is None:
                return None
            events = await conn.fetch(
                "select at, event, status, version, step, message_type, message_id, detail "
                "from msa_saga_history where saga_id = $1 order by id",
                saga_id,
            )
        history = tuple(
            SagaEvent(
                at=e["at"],
                event=e["event"],
                status=SagaStatus(e["status"]),
                version=e["version"],
                step=e["step"],
                message_type=e["message_type"],
                message_id=e["message_id"],
                detail=e["detail"],
            )
            for e in events
        )
        return _stored(
            row,
            created=row["created"],
            updated=row["updated"],
            deadline=row["deadline"],
            history=history,
        )


def _stored(row: Any, **read: Any) -> StoredSaga:
    """A saga of a row; `read`: what `load` read besides (times, history)."""
    return StoredSaga(
        id=row["id"],
        type=row["type"],
        status=SagaStatus(row["status"]),
        step=row["step"],
        data=row["data"].encode(),
        version=row["version"],
        attempts=row["attempts"],
        failed_step=row["failed_step"],
        error=row["error"],
        **read,
    )
