"""Persistence: database resources, the transactional outbox, the idempotent inbox, sagas.

- `framework.persistence.postgres`: `PostgresResource` (asyncpg pool, migrations, transactions).
- `framework.persistence.outbox`: `PostgresOutbox` (+ relay) and `PostgresInbox`.
- `framework.persistence.mongo`: `MongoResource`, `MongoOutbox`, `MongoInbox` (single-document
  atomicity only, so it runs on FerretDB as on MongoDB).
- `framework.persistence.saga`: orchestrated sagas with persisted state (stores in `saga_postgres`
  and `saga_mongo`); `framework.persistence.contracts`: the `Outbox` and `Inbox` they use.

Each database module needs its extra (`postgres`, `mongo`); importing one without it raises an
ImportError that names the extra to install. The names below resolve from here on first use, so
importing this package needs no extra. Left in their modules: each backend's `translate` (the
same name once per database) and the saga step results `ok` and `fail`.

    from framework.persistence import PostgresOutbox, PostgresResource, SagaDefinition
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.errors import DatabaseUnavailable
    from framework.persistence.contracts import Inbox, Outbox
    from framework.persistence.mongo import (
        DocumentChange,
        DocumentNotFound,
        DuplicateKey,
        IndexSpec,
        MongoInbox,
        MongoOutbox,
        MongoResource,
    )
    from framework.persistence.outbox import PostgresInbox, PostgresOutbox
    from framework.persistence.postgres import (
        DatabaseMissing,
        Migration,
        MigrationError,
        PostgresResource,
        SerializationFailure,
        UniqueViolation,
    )
    from framework.persistence.saga import (
        DuplicateSaga,
        Outcome,
        SagaChange,
        SagaDefinition,
        SagaError,
        SagaEvent,
        SagaNote,
        SagaNotFound,
        SagaOrchestrator,
        SagaState,
        SagaStatus,
        SagaStore,
        Step,
        StoredSaga,
    )
    from framework.persistence.saga_mongo import SAGAS_COLLECTION, MongoSagaStore
    from framework.persistence.saga_postgres import SAGA_MIGRATIONS, PostgresSagaStore

_MODULES = {
    "framework.errors": ("DatabaseUnavailable",),
    "framework.persistence.contracts": ("Inbox", "Outbox"),
    "framework.persistence.postgres": (
        "DatabaseMissing",
        "Migration",
        "MigrationError",
        "PostgresResource",
        "SerializationFailure",
        "UniqueViolation",
    ),
    "framework.persistence.outbox": ("PostgresInbox", "PostgresOutbox"),
    "framework.persistence.mongo": (
        "DocumentChange",
        "DocumentNotFound",
        "DuplicateKey",
        "IndexSpec",
        "MongoInbox",
        "MongoOutbox",
        "MongoResource",
    ),
    "framework.persistence.saga": (
        "DuplicateSaga",
        "Outcome",
        "SagaChange",
        "SagaDefinition",
        "SagaError",
        "SagaEvent",
        "SagaNotFound",
        "SagaNote",
        "SagaOrchestrator",
        "SagaState",
        "SagaStatus",
        "SagaStore",
        "Step",
        "StoredSaga",
    ),
    "framework.persistence.saga_postgres": ("SAGA_MIGRATIONS", "PostgresSagaStore"),
    "framework.persistence.saga_mongo": ("SAGAS_COLLECTION", "MongoSagaStore"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "SAGAS_COLLECTION",
    "SAGA_MIGRATIONS",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "DocumentChange",
    "DocumentNotFound",
    "DuplicateKey",
    "DuplicateSaga",
    "Inbox",
    "IndexSpec",
    "Migration",
    "MigrationError",
    "MongoInbox",
    "MongoOutbox",
    "MongoResource",
    "MongoSagaStore",
    "Outbox",
    "Outcome",
    "PostgresInbox",
    "PostgresOutbox",
    "PostgresResource",
    "PostgresSagaStore",
    "SagaChange",
    "SagaDefinition",
    "SagaError",
    "SagaEvent",
    "SagaNotFound",
    "SagaNote",
    "SagaOrchestrator",
    "SagaState",
    "SagaStatus",
    "SagaStore",
    "SerializationFailure",
    "Step",
    "StoredSaga",
    "UniqueViolation",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'framework.persistence' has no attribute {name!r}")
    return getattr(import_module(module), name)
