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

A role cannot be created that way: a service cannot log in as a role that does not exist, and it
should not hold an admin's password. So a missing role stops `start()` with `RoleMissing` (or,
under password authentication, which answers "password authentication failed" for a missing
role and a wrong password alike, its parent `LoginRefused`), whose message names the
`CREATE ROLE ... LOGIN PASSWORD '***'` and `CREATE DATABASE ... OWNER ...` an admin should run,
the password left out. Or the admin hands `msa migrate` their own URL (`POSTGRES_ADMIN_URL`, or
`--admin-url`): it then runs `provision(admin_url)`, which creates the role (LOGIN, with the
password of the service's URL) and the database owned by it when they are missing, and only
then migrates, connected as the service's role, as the service itself will be. An admin role
that may not create roles (no CREATEROLE) or databases (no CREATEDB) gets `RoleMissing` or
`DatabaseMissing` naming the statements, as the service does.

asyncpg errors are translated to `PersistenceError` subclasses at this one edge (`translate`):
`DatabaseUnavailable` (from `framework.errors`, shared with MongoDB), `DatabaseMissing`,
`UniqueViolation`, `SerializationFailure`.
"""

from __future__ import annotations

import asyncio
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
    "LoginRefused",
    "Migration",
    "MigrationError",
    "PostgresResource",
    "RoleMissing",
    "SerializationFailure",
    "UniqueViolation",
    "translate",
]

log = logging.getLogger("framework.persistence")
_LOCK_KEY = 0x6D73615F6D6967  # "msa_mig": the advisory lock serialising migrations
_MAINTENANCE_DATABASE = "postgres"
_NAME_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL cuts longer names short, silently


class UniqueViolation(PersistenceError):
    """A unique constraint refused a row."""


class SerializationFailure(PersistenceError):
    """A concurrent transaction conflicted (serialization failure or deadlock); retry it."""


class MigrationError(PersistenceError):
    """A migration failed, or a recorded one no longer matches its SQL."""


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg has no types
    """A pool's connection that is rolled back, not reset, when it returns to the pool.

    asyncpg's pool runs `Connection.get_reset_query()` (`SELECT pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL`) on every release: a round trip, and about a tenth of the shop's
    database work, after every transaction. The release still ends an open transaction and drops
    the connection's listeners (asyncpg does that before the query); what is no longer undone is
    session state set on a pooled connection - a plain `SET`, `LISTEN`, an advisory lock or a
    cursor held past its block - as with SQLAlchemy's default `reset_on_return="rollback"` and
    PgBouncer's transaction pooling. Use `SET LOCAL` inside a transaction, and a connection of
    your own (`asyncpg.connect`) for a session-long LISTEN or lock, as the outbox relay does.
    """

    def get_reset_query(self) -> str:
        return ""


class DatabaseMissing(PersistenceError):
    """The database does not exist, and was not created (not asked to, or the role may not)."""


class LoginRefused(PersistenceError):
    """PostgreSQL refused to log the URL's role in: a wrong password, or a role that does not
    exist (password authentication reports the two alike, so as not to tell a stranger which
    roles exist). The message names what an admin would run if the role is missing."""


class RoleMissing(LoginRefused):
    """The role the URL names does not exist, and was not created (no admin URL was given, or
    the admin role may not create roles). The message names the statements an admin should run.
    """


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
        close_timeout: float = 10.0,
    ) -> None:
        """`close_timeout`: seconds `stop()` waits for borrowed connections to come back before
        it terminates the pool (asyncpg's `Pool.close()` alone waits for ever)."""
        if not url:
            raise ConfigurationError("PostgresResource needs a URL (POSTGRES_URL)")
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.apply_migrations = apply_migrations
        self.create_database = create_database
        self.close_timeout = close_timeout
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
        except PersistenceError as exc:
            refused = _login_refused(self.url, exc.__cause__)
            if refused is None:
                raise
            raise refused from exc.__cause__
        if self.apply_migrations:
            try:
                await self.migrate()
            except BaseException:
                await self.stop()
                raise

    async def provision(self, admin_url: str) -> list[str]:
        """Create this resource's role and database when missing, connected as `admin_url`.

        For `msa migrate` (and deploy tooling) run by someone who holds an admin's URL: the
        service itself never gets one. The role is the URL's user, created with LOGIN and the
        URL's password; the database is the URL's, created owned by that role, with CONNECT
        taken from PUBLIC so that only its owner (and superusers) may connect, as
        k8s/databases/postgres/init-databases.sh does. What exists already is left as it is:
        a role's password and attributes, a database's owner (a warning says when it is not
        the URL's role) are the admin's to change. Concurrent provisioners are fine: the loser
        of a race takes the winner's object. Returns the statements it ran, the password left
        out (empty when there was nothing to do).

        Names are quoted as identifiers and the password as a literal, never pasted in raw
        (utility statements take no $1 parameters); a name PostgreSQL would cut short (over 63
        bytes), reserve (`pg_*` roles) or cannot hold (NUL) is a `ConfigurationError` first. An
        admin role without CREATEROLE gets `RoleMissing`, one without CREATEDB (or, from
        PostgreSQL 16 on, without the right to SET ROLE to the owner) `DatabaseMissing`, both
        naming the statements a more privileged admin should run.
        """
        login = _Login.of(self.url)
        ran: list[str] = []
        with translate():
            try:
                conn = await asyncpg.connect(admin_url, timeout=self.command_timeout)
            except asyncpg.InvalidAuthorizationSpecificationError as exc:
                raise LoginRefused(f"PostgreSQL refused the admin URL's login: {exc}") from exc
            try:
                admin = await conn.fetchrow(
                    "select rolname, rolsuper, rolcreaterole, rolcreatedb"
                    " from pg_roles where rolname = current_user"
                )
                assert admin is not None  # the role we are connected as
                if await login.create_role(conn, admin):
                    ran.append(login.create_role_statement(elide_password=True))
                if await login.create_database(conn, admin):
                    ran.append(login.create_database_statement())
            finally:
                await conn.close()
            for statement in ran:
                log.warning("provisioned as %s: %s", admin["rolname"], statement)
        return ran

    async def _connect(self) -> asyncpg.Pool:
        with translate():
            return await asyncpg.create_pool(
                self.url,
                connection_class=PooledConnection,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
            )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.close_timeout)
        except TimeoutError:
            log.warning(
                "a PostgreSQL connection was not given back within %.1fs; closing the pool at once",
                self.close_timeout,
            )
            pool.terminate()
        except Exception:
            log.exception("closing the PostgreSQL pool failed")
            pool.terminate()

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


def _quote_literal(value: str) -> str:
    """A string literal that means `value` whatever standard_conforming_strings says: the
    escape-string form, with backslashes and quotes doubled."""
    if "\x00" in value:
        raise ConfigurationError("a PostgreSQL string cannot hold a NUL character")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _checked_name(kind: str, name: str) -> str:
    """`name` when PostgreSQL would create exactly that object, else a ConfigurationError."""
    if not name:
        raise ConfigurationError(f"the PostgreSQL URL names no {kind}")
    if "\x00" in name:
        raise ConfigurationError(f"{kind} name {name!r}: a NUL character")
    if len(name.encode()) > _NAME_BYTES:
        raise ConfigurationError(
            f"{kind} name {name!r}: longer than {_NAME_BYTES} bytes (PostgreSQL would cut it "
            "short and create another name than the URL's)"
        )
    if kind == "role" and name.startswith("pg_"):
        raise ConfigurationError(f"role name {name!r}: names starting pg_ are reserved")
    return name


@dataclass(frozen=True)
class _Login:
    """The role, password and database a service's URL names, and how an admin creates them."""

    role: str
    password: str | None
    database: str

    @classmethod
    def of(cls, url: str) -> _Login:
        parts = urlsplit(url)
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            _checked_name("role", unquote(parts.username or "")),
            password,
            _checked_name("database", unquote(parts.path.lstrip("/"))),
        )

    def create_role_statement(self, *, elide_password: bool = False) -> str:
        statement = f"CREATE ROLE {_quote_identifier(self.role)} LOGIN"
        if self.password is None:
            return statement
        return f"{statement} PASSWORD " + (
            "'***'" if elide_password else _quote_literal(self.password)
        )

    def create_database_statement(self) -> str:
        return (
            f"CREATE DATABASE {_quote_identifier(self.database)} "
            f"OWNER {_quote_identifier(self.role)}"
        )

    def hint(self) -> str:
        return (
            f"have an admin run: {self.create_role_statement(elide_password=True)}; "
            f"{self.create_database_statement()} (or give `msa migrate` an admin's URL in "
            "POSTGRES_ADMIN_URL, and it creates both)"
        )

    async def create_role(self, conn: asyncpg.Connection, admin: asyncpg.Record) -> bool:
        """Create the role unless it exists; True when this call created it."""
        if await conn.fetchval("select 1 from pg_roles where rolname = $1", self.role):
            return False
        refusal = (
            f'role "{self.role}" does not exist and the admin role "{admin["rolname"]}" may '
            "not create it"
        )
        if not (admin["rolsuper"] or admin["rolcreaterole"]):
            raise RoleMissing(f"{refusal} (it has no CREATEROLE): {self.hint()}")
        try:
            await conn.execute(self.create_role_statement())
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            return False  # a concurrent provisioner created it first
        except asyncpg.InsufficientPrivilegeError as exc:
            raise RoleMissing(f"{refusal} ({exc}): {self.hint()}") from exc
        return True

    async def create_database(self, conn: asyncpg.Connection, admin: asyncpg.Record) -> bool:
        """Create the database owned by the role unless it exists; True when this call did."""
        owner = await conn.fetchval(
            "select pg_get_userbyid(datdba) from pg_database where datname = $1", self.database
        )
        if owner is not None:
            if owner != self.role:
                log.warning(
                    'database "%s" exists, owned by "%s" rather than "%s": left as it is',
                    self.database,
                    owner,
                    self.role,
                )
            return False
        refusal = (
            f'database "{self.database}" does not exist and the admin role '
            f'"{admin["rolname"]}" may not create it owned by "{self.role}"'
        )
        if not (admin["rolsuper"] or admin["rolcreatedb"]):
            raise DatabaseMissing(
                f"{refusal} (it has no CREATEDB): have an admin run: "
                f"{self.create_database_statement()}"
            )
        try:
            await conn.execute(self.create_database_statement())
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            return False  # a concurrent provisioner created it first
        except asyncpg.InsufficientPrivilegeError as exc:
            raise DatabaseMissing(
                f"{refusal} ({exc}): have an admin run: {self.create_database_statement()}"
            ) from exc
        database = _quote_identifier(self.database)
        await conn.execute(f"revoke all on database {database} from public")
        return True


def _login_refused(url: str, cause: BaseException | None) -> LoginRefused | None:
    """The typed error for a refused login (`cause`, from asyncpg), or None for other errors.

    SQLSTATE 28000 also means "no pg_hba.conf entry" and "not permitted to log in"; only its
    "role ... does not exist" is `RoleMissing`. Password authentication (28P01) answers the
    same for a missing role as for a wrong password, so that one is `LoginRefused`, naming
    both causes.
    """
    if not isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError):
        return None
    try:
        hint = _Login.of(url).hint()
    except ConfigurationError:  # a URL that names no role or database: nothing to create
        hint = "have an admin create the role and its database"
    role = unquote(urlsplit(url).username or "")
    if isinstance(cause, asyncpg.InvalidPasswordError):
        return LoginRefused(
            f'PostgreSQL refused the login of role "{role}" ({cause}): its password is wrong, '
            "or the role does not exist (password authentication does not tell the two "
            f"apart); if it does not exist, {hint}"
        )
    if "does not exist" in str(cause):
        return RoleMissing(f'role "{role}" does not exist: {hint}')
    return LoginRefused(f'PostgreSQL refused the login of role "{role}" ({cause})')
