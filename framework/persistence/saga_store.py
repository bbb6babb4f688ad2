"""Where sagas are kept: the records a saga store reads and writes, and the store's protocol.

Kept apart from `framework.persistence.saga` (the orchestrator) so that the stores
(`saga_postgres`, `saga_mongo`) and the orchestrator that picks one both import it, and neither
imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from framework.errors import MsaError

__all__ = [
    "DuplicateSaga",
    "SagaChange",
    "SagaError",
    "SagaEvent",
    "SagaNotFound",
    "SagaNote",
    "SagaStatus",
    "SagaStore",
    "StoredSaga",
]


class SagaError(MsaError):
    """A saga operation was refused."""


class SagaNotFound(SagaError, LookupError):
    """No saga has this id."""


class DuplicateSaga(SagaError):
    """`start_saga` was given a saga id that is already in use."""


class SagaStatus(StrEnum):
    RUNNING = "running"
    """Waiting for the reply of `step`."""
    COMPENSATING = "compensating"
    """Undoing: waiting for the confirmation of `step`'s compensation."""
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    """A compensation could not be sent, was refused, or was never confirmed."""

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


@dataclass(frozen=True, kw_only=True)
class SagaEvent:
    """One line of a saga's history: what happened, and the status it left the saga in.

    `event` is one of: started, command-sent, reply-ok, reply-failed, timed-out, error,
    compensation-sent, compensation-ok, compensation-refused, compensation-timed-out,
    ignored, completed, compensated, failed.
    """

    at: datetime
    event: str
    status: SagaStatus
    version: int
    """The saga's version after the transition that wrote this line."""
    step: str | None = None
    message_type: str | None = None
    message_id: str | None = None
    detail: str | None = None


# -- where sagas are kept -------------------------------------------------------------------------


class SagaNote(NamedTuple):
    """One history line a transition writes (the store adds the time and the version)."""

    event: str
    status: str
    step: str | None = None
    message_type: str | None = None
    message_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class StoredSaga:
    """A saga as its store keeps it, the data as JSON. Read for a transition, the times and the
    history stay empty; `SagaStore.load` fills them."""

    id: str
    type: str
    status: SagaStatus
    step: int
    data: bytes
    version: int
    attempts: int = 0
    failed_step: str | None = None
    error: str | None = None
    created: datetime | None = None
    updated: datetime | None = None
    deadline: datetime | None = None
    history: tuple[SagaEvent, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SagaChange:
    """What one transition writes: the new state when `moved` (as version `version + 1`, only
    over version `version`), and its history lines in any case."""

    id: str
    version: int
    moved: bool
    status: SagaStatus
    step: int
    data: bytes
    attempts: int
    failed_step: str | None
    error: str | None
    timeout: float | None
    """Seconds from now to the new deadline; None: no deadline."""
    notes: tuple[SagaNote, ...]


class SagaStore(Protocol):
    """Where an orchestrator keeps its sagas, and what a transition's `tx` is.

    Implementations: `PostgresSagaStore` (rows; `tx` is the transaction's connection) and
    `MongoSagaStore` (documents; `tx` is the saga document's `DocumentChange`). The orchestrator
    picks the one for its database resource.
    """

    def creating(self, tx: Any | None, saga: StoredSaga) -> AbstractAsyncContextManager[Any]:
        """Create `saga` (`DuplicateSaga` if its id is taken) inside `tx`, or in a unit of work
        of its own when None, which commits when the block ends; yields the `tx` to write the
        first transition in."""
        ...

    def locked(self, saga_id: str) -> AbstractAsyncContextManager[tuple[Any, StoredSaga] | None]:
        """The saga, held against concurrent transitions, with the `tx` to move it in (None: no
        such saga). What the block wrote commits when it ends, nothing if it raises."""
        ...

    def expired(
        self, types: Sequence[str]
    ) -> AbstractAsyncContextManager[tuple[Any, StoredSaga] | None]:
        """One saga of these types whose deadline passed and that nobody holds, held as by
        `locked`; None when there is none."""
        ...

    async def save(self, tx: Any, change: SagaChange) -> None:
        """Write one transition inside `tx`."""
        ...

    async def seconds_to_next_deadline(self, types: Sequence[str]) -> float | None:
        """Seconds until the earliest deadline of a saga of these types (negative: passed)."""
        ...

    async def load(self, saga_id: str) -> StoredSaga | None:
        """The saga with its times and history, for `SagaOrchestrator.get`."""
        ...
