"""The identity service over HTTP on a real PostgreSQL: accounts, sign-in, tokens and the JWKS."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from example_shop.identity import Identity
from example_shop.identity.passwords import hash_password, password_weakness, verify_password
from framework.bus import MemoryTransport
from framework.service import ServiceSettings

pytestmark = pytest.mark.postgres

SCRYPT_FORMAT = re.compile(r"scrypt\$16384\$8\$1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


def identity(database_url: str, **env: str) -> Identity:
    settings = ServiceSettings(
        http_host="127.0.0.1", http_port=0, env={"IDENTITY_DATABASE_URL": database_url, **env}
    )
    return Identity(settings, transport=MemoryTransport())


@pytest.fixture
async def service(postgres_database: str) -> AsyncIterator[Identity]:
    running = identity(postgres_database)
    await running.start()
    yield running
    await running.stop(grace=1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base(service: Identity) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def login(
    http: aiohttp.ClientSession, service: Identity, email: str, password: str
) -> dict[str, Any]:
    credentials = {"email": email, "password": password}
    async with http.post(f"{base(service)}/auth/login", json=credentials) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
    return body


async def verify(http: aiohttp.ClientSession, service: Identity, token: str) -> dict[str, Any]:
    """Verify `token` the way a gateway does: with the key its `kid` names in the served JWKS."""
    async with http.get(f"{base(service)}/.well-known/jwks.json") as response:
        assert response.status == 200
        jwks = jwt.PyJWKSet.from_dict(await response.json())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience="shop",
        issuer="msa-shop-identity",
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    return claims


async def test_sign_up_log_in_and_read_the_profile(
    service: Identity, http: aiohttp.ClientSession
) -> None:
    signup = {"email": " Ada@Example.com ", "password": "analytical-engine-1843", "name": "Ada"}
    async with http.post(f"{base(service)}/auth/signup", json=signup) as response:
        assert response.status == 201, await response.text()
        profile = await response.json()
    assert profile["email"] == "ada@example.com"
    assert profile["roles"] == ["customer"]
    assert "password" not in str(profile)

    credentials = {"email": "ada@example.com", "password": "analytical-engine-1843"}
    async with http.post(f"{base(service)}/auth/login", json=credentials) as response:
        assert response.status == 200
        body = await response.json()
        cookie = response.headers["Set-Cookie"]
        assert response.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert f"session={body['access_token']}" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/" in cookie

    claims = await verify(http, service, body["access_token"])
    assert claims["sub"] == profile["id"]
    assert claims["roles"] == ["customer"]
    assert claims["tier"] == "browser"
    assert claims["exp"] - claims["iat"] == 3600

    async with http.get(f"{base(service)}/auth/me", headers={"x-user-id": claims["sub"]}) as r:
        assert r.status == 200
        assert await r.json() == profile
    async with http.get(f"{base(service)}/auth/me") as response:
        assert response.status == 401  # not forwarded by the gateway: nobody signed in

    async with http.post(f"{base(service)}/auth/logout") as response:
        assert response.status == 204
        cleared = response.headers["Set-Cookie"]
    assert cleared.startswith(('session="";', "session=;"))
    assert "Max-Age=0" in cleared
    assert "HttpOnly" in cleared


async def test_login_sets_a_readable_hint_beside_the_session_cookie_and_logout_clears_both(
    service: Identity, http: aiohttp.ClientSession
) -> None:
    """The page cannot read the HttpOnly session cookie; `signed_in` tells it one is there, so
    an anonymous visitor's page never asks /auth/me (a 401 in its console)."""
    credentials = {"email": "demo@shop.test", "password": "demo-password-123"}
    async with http.post(f"{base(service)}/auth/login", json=credentials) as response:
        assert response.status == 200
        cookies = {morsel.key: morsel for morsel in response.cookies.values()}
    session, hint = cookies["session"], cookies["signed_in"]
    assert hint.value == "1"
    assert not hint["httponly"]  # readable by the page's script
    assert session["httponly"]
    for name in ("max-age", "path", "samesite", "secure"):
        assert hint[name] == session[name], name
    assert hint["max-age"] == "3600"

    async with http.post(f"{base(service)}/auth/logout") as response:
        assert response.status == 204
        cleared = {morsel.key: morsel for morsel in response.cookies.values()}
    assert set(cleared) == {"session", "signed_in"}
    assert cleared["signed_in"].value == ""
    assert cleared["signed_in"]["max-age"] == "0"
    assert cleared["signed_in"]["path"] == "/"


async def test_refuses_duplicates_weak_passwords_and_wrong_credentials(
    service: Identity, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{base(service)}/auth/signup"
    account = {"email": "bob@example.com", "password": "correct-horse-42", "name": "Bob"}
    async with http.post(url, json=account) as response:
        assert response.status == 201
    async with http.post(url, json={**account, "email": "BOB@example.com"}) as response:
        assert response.status == 409
        assert response.content_type == "application/problem+json"
    for weak in ("short-1", "onlyletterslong", "12345678901234", "bobby-tables-bobby-1"):
        candidate = {**account, "email": "bobby@example.com", "password": weak}
        async with http.post(url, json=candidate) as response:
            assert response.status == 422, weak
            assert "password too weak" in await response.text()
    async with http.post(url, json={**account, "email": "not-an-email"}) as response:
        assert response.status == 422

    # Wrong password and unknown email: the same answer, and both run the KDF.
    checked: list[str] = []
    real_verify = verify_password

    def spying_verify(password: str, stored: str) -> bool:
        checked.append(stored)
        return real_verify(password, stored)

    monkeypatch.setattr("example_shop.identity.service.verify_password", spying_verify)
    answers = []
    for email, password in [
        ("bob@example.com", "wrong-password-1"),
        ("nobody@example.com", "correct-horse-42"),
    ]:
        credentials = {"email": email, "password": password}
        async with http.post(f"{base(service)}/auth/login", json=credentials) as response:
            assert response.status == 401
            assert "Set-Cookie" not in response.headers
            answers.append(await response.json())
    assert answers[0] == answers[1]
    assert len(checked) == 2
    assert all(SCRYPT_FORMAT.fullmatch(stored) for stored in checked)


async def test_passwords_are_stored_as_scrypt_hashes(service: Identity) -> None:
    async with service.db.connection() as conn:
        stored = await conn.fetchval(
            "select password_hash from users where email = 'demo@shop.test'"
        )
    match = SCRYPT_FORMAT.fullmatch(stored)
    assert match is not None, stored
    assert "demo-password-123" not in stored
    assert verify_password("demo-password-123", stored)
    assert not verify_password("demo-password-124", stored)
    assert not verify_password("demo-password-123", "scrypt$broken")

    again = hash_password("demo-password-123")
    assert again != stored  # a fresh 16-byte salt each time
    salt = SCRYPT_FORMAT.fullmatch(again)
    assert salt is not None
    assert len(base64.b64decode(salt.group(1))) == 16
    assert password_weakness("demo-password-123") is None


async def test_seeds_the_admin_and_the_demo_customer_once(
    service: Identity, http: aiohttp.ClientSession, postgres_database: str
) -> None:
    admin = await login(http, service, "admin@shop.test", "admin-password-123")
    assert (await verify(http, service, admin["access_token"]))["roles"] == ["customer", "admin"]
    demo = await login(http, service, "demo@shop.test", "demo-password-123")
    assert (await verify(http, service, demo["access_token"]))["roles"] == ["customer"]

    replica = identity(postgres_database)  # a restart or a second replica seeds nothing twice
    await replica.start()
    try:
        async with service.db.connection() as conn:
            assert await conn.fetchval("select count(*) from users") == 2
            assert await conn.fetchval("select count(*) from signing_keys") == 1
    finally:
        await replica.stop(grace=1)


async def test_configured_admin_and_no_demo_customer(
    postgres_database: str, http: aiohttp.ClientSession
) -> None:
    service = identity(
        postgres_database,
        SHOP_ADMIN_EMAIL="root@shop.example",
        SHOP_ADMIN_PASSWORD="a-better-secret-77",
        SHOP_DEMO_CUSTOMER="0",
    )
    await service.start()
    try:
        token = await login(http, service, "root@shop.example", "a-better-secret-77")
        assert "admin" in (await verify(http, service, token["access_token"]))["roles"]
        async with service.db.connection() as conn:
            assert await conn.fetchval("select array_agg(email) from users") == [
                "root@shop.example"
            ]
    finally:
        await service.stop(grace=1)


async def test_a_rotated_key_signs_while_the_old_one_still_verifies(
    postgres_database: str, http: aiohttp.ClientSession
) -> None:
    first, second = identity(postgres_database), identity(postgres_database)
    await asyncio.gather(first.start(), second.start())  # replicas starting together
    try:
        async with http.get(f"{base(first)}/.well-known/jwks.json") as response:
            [only] = (await response.json())["keys"]
        assert (only["kty"], only["use"], only["alg"]) == ("RSA", "sig", "RS256")
        old = await login(http, first, "demo@shop.test", "demo-password-123")
        assert jwt.get_unverified_header(old["access_token"])["kid"] == only["kid"]

        new_kid = await first.keys.rotate()
        async with http.get(f"{base(second)}/.well-known/jwks.json") as response:
            kids = [key["kid"] for key in (await response.json())["keys"]]
        assert kids == [new_kid, only["kid"]]  # both replicas serve both keys, newest first

        new = await login(http, second, "demo@shop.test", "demo-password-123")
        assert jwt.get_unverified_header(new["access_token"])["kid"] == new_kid
        for token in (old, new):
            assert (await verify(http, second, token["access_token"]))["tier"] == "browser"
    finally:
        await asyncio.gather(first.stop(grace=1), second.stop(grace=1))


async def test_a_configured_pem_key_signs(
    postgres_database: str, http: aiohttp.ClientSession
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    service = identity(postgres_database, IDENTITY_SIGNING_KEY_PEM=pem, JWT_ISSUER="other")
    await service.start()
    try:
        async with http.get(f"{base(service)}/.well-known/jwks.json") as response:
            [served] = (await response.json())["keys"]
        token = (await login(http, service, "demo@shop.test", "demo-password-123"))["access_token"]
        assert jwt.get_unverified_header(token)["kid"] == served["kid"]
        claims = jwt.decode(token, key.public_key(), algorithms=["RS256"], audience="shop")
        assert claims["iss"] == "other"
        async with service.db.connection() as conn:
            assert await conn.fetchval("select count(*) from signing_keys") == 0
    finally:
        await service.stop(grace=1)
