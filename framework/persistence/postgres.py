"""PostgreSQL as a service resource: an asyncpg pool, versioned migrations, transactions.

    db = service.use(PostgresResource(settings.env["POSTGRES_URL"], migrations=[
        Migration(1, "orders", "create table orders (id text primary key, status text not null)"),
        Migration(2, "totals", "alter table orders add column total numeric not null default 0"),
    ]))
    async with db.transaction() as tx:          # an asyncpg connection inside a transaction
        await tx.execute("update orders set status = 'paid' where id = $1", order_id)

Migrations are plain SQL, numbered per *component* (`app` by default; the framework's outbox,
inbox and saga tables are the `msa` component), applied in order at `start()` (or by
`msa migrate`) under a PostgreSQL advisory lock, so replicas starting together apply each one
exactly once. Each is recorded in `msa_migrations` with a checksum; a recorded migration whose
SQL changed since is refused with `MigrationError` rather than silently skipped.

A database that does not exist stops `start()` with `DatabaseMissing`, unless the resource is
made with `create_database=True`: it then connects to the same server's `postgres` maintenance
database with the same credentials and runs `CREATE DATABASE` (so `msa migrate` creates it too);
a concurrent creator winning the race is fine, and a role that may not create databases gets
`DatabaseMissing` naming the statement an admin should run. Off by default, so a mistyped name
fails instead of starting a service on a new, empty database; the example shop turns it on.

asyncpg errors are translated to `PersistenceError` subclasses at this one edge (`translate`):
`DatabaseUnavailable` (from `framework.errors`, shared with MongoDB), `DatabaseMissing`,
`UniqueViolation`, `SerializationFailure`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from framework.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    NotStartedError,
    PersistenceError,
)

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        'framework.persistence.postgres needs asyncpg: pip install "msa-framework[postgres]"'
    ) from exc

__all__ = [
    "DatabaseMissing",
    "DatabaseUnavailable",
    "Migration",
    "MigrationError",
    "PostgresResource",
    "SerializationFailure",
    "UniqueViolation",
    "translate",
]

log = logging.getLogger("framework.persistence")
_LOCK_KEY = 0x6D73615F6D6967  # "msa_mig": the advisory lock serialising migrations
_MAINTENANCE_DATABASE = "postgres"


class UniqueViolation(PersistenceError):
    """A unique constraint refused a row."""


class SerializationFailure(PersistenceError):
    """A concurrent transaction conflicted (serialization failure or deadlock); retry it."""


class MigrationError(PersistenceError):
    """A migration failed, or a recorded one no longer matches its SQL."""


class DatabaseMissing(PersistenceError):
    """The database does not exist, and was not created (not asked to, or the role may not)."""


@contextlib.contextmanager
def translate(*, driver_only: bool = False) -> Iterator[None]:
    """Map asyncpg and connection errors to the framework's persistence errors.

    With `driver_only`, only asyncpg's own exceptions are mapped: used around caller code inside
    `transaction()`, so that a caller's `OSError` or `asyncio` timeout keeps its type.
    """
    unavailable: tuple[type[BaseException], ...] = (
        asyncpg.ConnectionDoesNotExistError,
        asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError,
        asyncpg.CrashShutdownError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,  # e.g. a statement sent between the server's FATAL and EOF
    )
    if not driver_only:
        unavailable += (OSError, TimeoutError)
    try:
        yield
    except PersistenceError:
        raise
    except asyncpg.UniqueViolationError as exc:
        raise UniqueViolation(str(exc)) from exc
    except asyncpg.InvalidCatalogNameError as exc:
        raise DatabaseMissing(str(exc)) from exc
    except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError) as exc:
        raise SerializationFailure(str(exc)) from exc
    except unavailable as exc:
        raise DatabaseUnavailable(f"PostgreSQL unavailable: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise PersistenceError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Migration:
    """One versioned, plain-SQL migration of a component."""

    version: int
    name: str
    sql: str
    component: str = "app"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.strip().encode()).hexdigest()[:16]


_LEDGER = """
create table if not exists msa_migrations (
    component text not null,
    version integer not null,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now(),
    primary key (component, version)
)
"""


class PostgresResource:
    """An asyncpg pool owned by a service: started before its bus, stopped after it."""

    def __init__(
        self,
        url: str,
        *,
        migrations: Sequence[Migration] = (),
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        apply_migrations: bool = True,
        create_database: bool = False,
    ) -> None:
        if not url:
            raise ConfigurationError("PostgresResource needs a URL (POSTGRES_URL)")
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.apply_migrations = apply_migrations
        self.create_database = create_database
        self._migrations: list[Migration] = []
        self._pool: asyncpg.Pool | None = None
        self.add_migrations(migrations)

    def add_migrations(self, migrations: Sequence[Migration]) -> None:
        """Register more migrations (the outbox, inbox and sagas add theirs)."""
        known = {(m.component, m.version): m for m in self._migrations}
        for migration in migrations:
            twin = known.get((migration.component, migration.version))
            if twin == migration:
                continue  # the same component registered twice (e.g. two relays on one db)
            if twin is not None:
                raise ConfigurationError(
                    f"two migrations numbered {migration.version} for {migration.component!r}"
                )
            if self._pool is not None:
                raise ConfigurationError("add migrations before the resource starts")
            known[(migration.component, migration.version)] = migration
            self._migrations.append(migration)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise NotStartedError("PostgresResource used before start()")
        return self._pool

    async def start(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await self._connect()
        except DatabaseMissing as exc:
            target = _Target.of(self.url)
            if not self.create_database or target is None:
                raise DatabaseMissing(
                    f"{exc}: {target.hint() if target else 'name it in the URL'}"
                    " (or let the resource create it: create_database=True)"
                ) from exc
            await target.create()
            self._pool = await self._connect()
        if self.apply_migrations:
            try:
                await self.migrate()
            except BaseException:
                await self.stop()
                raise

    async def _connect(self) -> asyncpg.Pool:
        with translate():
            return await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
            )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()

    async def check(self) -> bool:
        """Readiness: one `select 1` round trip."""
        try:
            with translate():
                return bool(await self.pool.fetchval("select 1", timeout=2))
        except PersistenceError:
            return False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (autocommit); asyncpg errors in the block are translated."""
        with translate():
            conn = await self.pool.acquire()
        try:
            with translate(driver_only=True):
                yield conn
        finally:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self, *, isolation: str = "read_committed") -> AsyncIterator[Any]:
        """A pooled connection inside a transaction: committed on exit, rolled back on error."""
        with translate():
            conn = await self.pool.acquire()
        try:
            tx = conn.transaction(isolation=isolation)
            with translate():
                await tx.start()
            try:
                with translate(driver_only=True):
                    yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            with translate():
                await tx.commit()
        finally:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    async def migrate(self) -> list[Migration]:
        """Apply the migrations not applied yet; returns them. Safe to run concurrently."""
        applied: list[Migration] = []
        with translate():
            async with self.pool.acquire() as conn:
                await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
                try:
                    await conn.execute(_LEDGER)
                    rows = await conn.fetch(
                        "select component, version, checksum from msa_migrations"
                    )
                    done = {(r["component"], r["version"]): r["checksum"] for r in rows}
                    ordered = sorted(
                        self._migrations,
                        key=lambda m: (not m.component.startswith("msa"), m.component, m.version),
                    )
                    for migration in ordered:
                        recorded = done.get((migration.component, migration.version))
                        if recorded is not None:
                            if recorded != migration.checksum:
                                raise MigrationError(
                                    f"migration {migration.component}:{migration.version} "
                                    f"({migration.name}) changed after it was applied"
                                )
                            continue
                        try:
                            async with conn.transaction():
                                await conn.execute(migration.sql)
                                await conn.execute(
                                    "insert into msa_migrations "
                                    "(component, version, name, checksum) values ($1, $2, $3, $4)",
                                    migration.component,
                                    migration.version,
                                    migration.name,
                                    migration.checksum,
                                )
                        except asyncpg.PostgresError as exc:
                            raise MigrationError(
                                f"migration {migration.component}:{migration.version} "
                                f"({migration.name}) failed: {exc}"
                            ) from exc
                        log.info(
                            "applied migration %s:%s %s",
                            migration.component,
                            migration.version,
                            migration.name,
                        )
                        applied.append(migration)
                finally:
                    await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)
        return applied


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Target:
    """The database a URL names, and how to create it on the same server."""

    url: str
    database: str
    role: str

    @classmethod
    def of(cls, url: str) -> _Target | None:
        """None when the URL names no database (asyncpg then picks one from the environment)."""
        parts = urlsplit(url)
        database = unquote(parts.path.lstrip("/"))
        if not database:
            return None
        return cls(url, database, unquote(parts.username or ""))

    @property
    def maintenance_url(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(
            (parts.scheme, parts.netloc, "/" + _MAINTENANCE_DATABASE, parts.query, parts.fragment)
        )

    def hint(self, role: str | None = None) -> str:
        owner = _quote_identifier(role or self.role) if (role or self.role) else "<role>"
        return (
            f"have an admin run: CREATE DATABASE {_quote_identifier(self.database)} OWNER {owner}"
        )

    async def create(self) -> None:
        """`CREATE DATABASE` on the maintenance database; another creator's win is fine."""
        with translate():
            try:
                conn = await asyncpg.connect(self.maintenance_url)
            except asyncpg.PostgresError as exc:  # may not connect there, or it does not exist
                raise DatabaseMissing(
                    f'database "{self.database}" does not exist and could not be created '
                    f"(connecting to {_MAINTENANCE_DATABASE!r}: {exc}): {self.hint()}"
                ) from exc
            role = self.role
            try:
                role = await conn.fetchval("select current_user")
                await conn.execute(f"create database {_quote_identifier(self.database)}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                return  # a concurrent start created it first
            except asyncpg.InsufficientPrivilegeError as exc:
                raise DatabaseMissing(
                    f'database "{self.database}" does not exist and role "{role}" may not '
                    f"create it ({exc}): {self.hint(role)}"
                ) from exc
            finally:
                await conn.close()
        log.warning("created database %s (it did not exist)", self.database)
