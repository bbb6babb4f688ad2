"""A service's missing PostgreSQL role: created by `msa migrate` with an admin's URL
(`PostgresResource.provision`), or refused with a typed error naming what an admin should run.
On the real PostgreSQL, as its superuser (POSTGRES_URL) for the admin.

Every name here needs quoting (capitals, a hyphen, a double quote) and the password holds a
quote, a backslash and URL delimiters, so a statement built by pasting them in raw would fail
or do something else. The dev server trusts loopback logins, so the password cannot be proved
by logging in with it; instead the SCRAM verifier PostgreSQL stored is checked against the
URL's password, which proves the literal reached the server intact.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from framework.cli import main
from framework.errors import ConfigurationError, MsaError, PersistenceError
from framework.persistence.postgres import (
    DatabaseMissing,
    LoginRefused,
    Migration,
    PostgresResource,
    RoleMissing,
    _login_refused,
)
from tests.conftest import SERVERS, unique_name

pytestmark = pytest.mark.postgres

LEDGER = "tests.framework.sample_services:Ledger"
ORDERS = [Migration(1, "orders", "create table orders (id text primary key)")]
PASSWORD = "it's a \\ secret: @/?#%"


@functools.cache
def _server() -> str:
    """The superuser's URL, read once: a test below sets POSTGRES_URL to the service's."""
    url = SERVERS["postgres"].url()
    assert url is not None
    return url


def _url(database: str, *, role: str, password: str | None = None) -> str:
    """A URL on the dev server's host and port, as `role`, for `database`."""
    parts = urlsplit(_server())
    user = quote(role, safe="")
    if password is not None:
        user += ":" + quote(password, safe="")
    netloc = f"{user}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(database, safe="")))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _as_superuser_in(database: str) -> str:
    return urlunsplit(urlsplit(_server())._replace(path="/" + quote(database, safe="")))


async def _as_superuser(query: str, *args: object) -> object:
    conn = await asyncpg.connect(_server())
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


@dataclass(frozen=True)
class Names:
    role: str
    database: str

    def url(self, password: str | None = PASSWORD) -> str:
        return _url(self.database, role=self.role, password=password)


async def _drop(database: str | None, *roles: str) -> None:
    admin = await asyncpg.connect(_server())
    try:
        if database is not None:
            await admin.execute(f"drop database if exists {_ident(database)} with (force)")
        for role in roles:
            await admin.execute(f"drop role if exists {_ident(role)}")
    finally:
        await admin.close()


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """A role and a database no one has created; dropped afterwards if a test created them."""
    created = Names(unique_name('test-Role"q'), unique_name('test-Db"q'))
    yield created
    await _drop(created.database, created.role)


@pytest.fixture
async def weak_admin() -> AsyncIterator[str]:
    """The URL of a login role that may create databases but not roles; dropped afterwards."""
    role = unique_name("test_nocreaterole")
    await _as_superuser(f"create role {_ident(role)} login createdb nocreaterole")
    yield _url("postgres", role=role)
    await _drop(None, role)


@pytest.fixture
async def roles_only_admin() -> AsyncIterator[str]:
    """The URL of a login role that may create roles but not databases; dropped afterwards."""
    role = unique_name("test_nocreatedb")
    await _as_superuser(f"create role {_ident(role)} login createrole nocreatedb")
    yield _url("postgres", role=role)
    await _drop(None, role)


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a stored `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` is
    `password`'s (RFC 5802; SASLprep leaves an ASCII password as it is)."""
    method, _, rest = verifier.partition("$")
    assert method == "SCRAM-SHA-256", verifier
    head, _, keys = rest.partition("$")
    iterations, salt = head.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return (
        hashlib.sha256(client_key).digest() == stored_key
        and hmac.digest(salted, b"Server Key", "sha256") == server_key
    )


# -- provisioning --------------------------------------------------------------------------------


async def test_provision_creates_the_role_and_its_database_and_the_service_logs_in(
    names: Names,
) -> None:
    db = PostgresResource(names.url(), migrations=ORDERS)
    ran = await db.provision(_server())
    assert ran == [
        f"CREATE ROLE {_ident(names.role)} LOGIN PASSWORD '***'",
        f"CREATE DATABASE {_ident(names.database)} OWNER {_ident(names.role)}",
    ]
    verifier = await _as_superuser(
        "select rolpassword from pg_authid where rolname = $1 and rolcanlogin", names.role
    )
    assert isinstance(verifier, str)
    assert _scram_matches(verifier, PASSWORD)
    assert not _scram_matches(verifier, PASSWORD.replace("\\", "\\\\"))
    owner = await _as_superuser(
        "select pg_get_userbyid(datdba) from pg_database where datname = $1", names.database
    )
    assert owner == names.role
    public_may_connect = await _as_superuser(
        "select has_database_privilege('public', $1, 'connect')", names.database
    )
    assert public_may_connect is False  # only its owner (and superusers)

    await db.start()  # as the new role, with its migrations
    try:
        async with db.connection() as conn:
            assert await conn.fetchval("select current_user") == names.role
            owner = await conn.fetchval(
                "select tableowner from pg_tables where tablename = 'orders'"
            )
            assert owner == names.role
    finally:
        await db.stop()

    assert await db.provision(_server()) == []  # idempotent: both exist now


async def test_concurrent_provisions_both_succeed_and_create_each_thing_once(
    names: Names,
) -> None:
    first, second = (PostgresResource(names.url()) for _ in "ab")
    ran = await asyncio.gather(first.provision(_server()), second.provision(_server()))
    statements = sorted(statement for each in ran for statement in each)
    assert [s.split()[1] for s in statements] == ["DATABASE", "ROLE"], ran
    assert await _as_superuser("select 1 from pg_roles where rolname = $1", names.role) == 1


async def test_msa_migrate_with_an_admin_url_provisions_then_migrates_as_the_role(
    names: Names, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POSTGRES_URL", names.url())
    monkeypatch.setenv("POSTGRES_ADMIN_URL", _server())
    # `msa migrate` runs its own event loop, as it does from a shell
    assert await asyncio.to_thread(main, ["migrate", LEDGER]) == 0
    out = capsys.readouterr().out
    assert f"ran CREATE ROLE {_ident(names.role)} LOGIN PASSWORD '***'" in out
    assert f"ran CREATE DATABASE {_ident(names.database)}" in out
    assert "applied 2 (app:1 entries, app:2 amounts)" in out
    assert PASSWORD not in out

    conn = await asyncpg.connect(_as_superuser_in(names.database))
    try:
        owner = await conn.fetchval("select tableowner from pg_tables where tablename = 'entries'")
    finally:
        await conn.close()
    assert owner == names.role  # the migrations ran as the service's role, not as the admin

    monkeypatch.delenv("POSTGRES_ADMIN_URL")  # --admin-url says the same
    assert await asyncio.to_thread(main, ["migrate", LEDGER, "--admin-url", _server()]) == 0
    again = capsys.readouterr().out
    assert " ran " not in again
    assert "applied 0 (none)" in again


# -- refusals ------------------------------------------------------------------------------------


async def test_a_missing_role_stops_the_start_naming_what_an_admin_should_run(
    names: Names,
) -> None:
    db = PostgresResource(names.url(), migrations=ORDERS, create_database=True)
    with pytest.raises(RoleMissing) as caught:
        await db.start()
    assert isinstance(caught.value, LoginRefused)
    assert isinstance(caught.value, PersistenceError)
    assert isinstance(caught.value, MsaError)
    message = str(caught.value)
    assert f'role "{names.role}" does not exist' in message
    assert f"CREATE ROLE {_ident(names.role)} LOGIN PASSWORD '***'" in message
    assert f"CREATE DATABASE {_ident(names.database)} OWNER {_ident(names.role)}" in message
    assert "POSTGRES_ADMIN_URL" in message
    assert PASSWORD not in message
    assert await _as_superuser("select 1 from pg_roles where rolname = $1", names.role) is None


async def test_msa_migrate_without_an_admin_url_says_what_to_run(
    names: Names, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POSTGRES_URL", names.url(password=None))
    monkeypatch.delenv("POSTGRES_ADMIN_URL", raising=False)
    assert await asyncio.to_thread(main, ["migrate", LEDGER]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'msa: error: role "{names.role}" does not exist'), err
    assert f"CREATE ROLE {_ident(names.role)} LOGIN;" in err  # no password in the URL, none here
    assert "Traceback" not in err


async def test_an_admin_without_createrole_is_told_so(names: Names, weak_admin: str) -> None:
    db = PostgresResource(names.url())
    with pytest.raises(RoleMissing) as caught:
        await db.provision(weak_admin)
    message = str(caught.value)
    assert f'role "{names.role}" does not exist and the admin role' in message
    assert "may not create it (it has no CREATEROLE)" in message
    assert f"CREATE ROLE {_ident(names.role)} LOGIN PASSWORD '***'" in message
    assert PASSWORD not in message
    assert await _as_superuser("select 1 from pg_roles where rolname = $1", names.role) is None


async def test_an_admin_without_createdb_creates_the_role_and_names_the_database_statement(
    names: Names, roles_only_admin: str
) -> None:
    db = PostgresResource(names.url())
    with pytest.raises(DatabaseMissing, match="it has no CREATEDB") as caught:
        await db.provision(roles_only_admin)
    assert f"CREATE DATABASE {_ident(names.database)} OWNER {_ident(names.role)}" in str(
        caught.value
    )
    assert await _as_superuser("select 1 from pg_roles where rolname = $1", names.role) == 1


@pytest.mark.parametrize(
    ("role", "database", "problem"),
    [
        ("", "shop", "names no role"),
        ("pg_shop", "shop", "reserved"),
        ("r" * 64, "shop", "longer than 63 bytes"),
        ("shop", "é" * 32, "longer than 63 bytes"),  # 64 bytes in UTF-8
        ("shop", "", "names no database"),
    ],
)
async def test_names_postgresql_would_not_create_as_given_are_refused_first(
    role: str, database: str, problem: str
) -> None:
    db = PostgresResource(_url(database, role=role) if role else f"postgresql://h/{database}")
    with pytest.raises(ConfigurationError, match=problem):
        await db.provision("postgresql://nowhere.invalid/postgres")  # never connected to


def test_a_refused_password_names_both_possible_causes() -> None:
    """Password authentication answers a missing role like a wrong password (28P01). The dev
    server trusts loopback, so this maps the error asyncpg raises then, as the start does."""
    url = "postgresql://orders:secret@db:5432/shop_orders"
    refused = _login_refused(
        url, asyncpg.InvalidPasswordError('password authentication failed for user "orders"')
    )
    assert type(refused) is LoginRefused
    message = str(refused)
    assert "its password is wrong, or the role does not exist" in message
    assert 'CREATE ROLE "orders" LOGIN PASSWORD \'***\'; CREATE DATABASE "shop_orders"' in message
    assert "secret" not in message
    assert _login_refused(url, OSError("connection refused")) is None


async def test_an_admin_url_whose_login_is_refused_says_it_is_the_admins(names: Names) -> None:
    db = PostgresResource(names.url())
    nobody = _url("postgres", role=unique_name("test_no_such_admin"))
    with pytest.raises(LoginRefused, match="refused the admin URL's login"):
        await db.provision(nobody)
    assert await _as_superuser("select 1 from pg_roles where rolname = $1", names.role) is None
