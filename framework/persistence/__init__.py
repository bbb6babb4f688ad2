"""Persistence: database resources, the transactional outbox, the idempotent inbox, sagas.

- `framework.persistence.postgres`: `PostgresResource` (asyncpg pool, migrations, transactions).
- `framework.persistence.outbox`: `PostgresOutbox` (+ relay) and `PostgresInbox`.
- `framework.persistence.mongo`: `MongoResource`, `MongoOutbox`, `MongoInbox` (single-document
  atomicity only, so it runs on FerretDB as on MongoDB).
- `framework.persistence.saga`: orchestrated sagas with persisted state.

Each needs its extra (`postgres`, `mongo`); importing a module without it raises an ImportError
that names the extra to install.
"""
