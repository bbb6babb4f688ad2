"""Identity: accounts, sign-in, and the RS256 JWTs the gateways verify against its JWKS.

    POST /auth/signup            {email, password, name} -> 201 profile; 409 taken; 422 weak
    POST /auth/login             {email, password} -> 200 {access_token, token_type, expires_in}
                                 and the same token in the `session` cookie (plus the
                                 `signed_in` hint cookie); 401 otherwise
    POST /auth/logout            clears both cookies (204)
    GET  /auth/me                the profile of `x-user-id` (set by the gateway)
    GET  /.well-known/jwks.json  the public signing keys

Tokens: `iss` (JWT_ISSUER), `aud` "shop", `sub` (the user id), `roles` ("customer", plus
"admin"), `tier` "browser", `iat`, `exp` (one hour), and the signing key's `kid` in the header
(keys: `example_shop.identity.keys`). Tokens are not revocable: logout only drops the cookie,
and a token stays valid until it expires.

The `session` cookie is HttpOnly, so a page cannot tell whether it holds one. Login therefore
also sets `signed_in=1`, readable by scripts, with the same lifetime and path: the storefront
asks `/auth/me` only when it is there, and an anonymous visitor's page makes no request that is
bound to fail (401). It is a hint, never a credential: the gateway reads only `session`.

Environment (besides POSTGRES_URL / IDENTITY_DATABASE_URL):

    JWT_ISSUER                 the `iss` claim (default msa-shop-identity; the gateways agree)
    IDENTITY_SIGNING_KEY_PEM   an RSA private key that signs (default: keys in the database)
    IDENTITY_COOKIE_SECURE     1 to mark the cookie Secure (do so behind TLS; default 0)
    SHOP_ADMIN_EMAIL           the admin account created at start if missing, and its
    SHOP_ADMIN_PASSWORD        password (DEV-ONLY defaults: admin@shop.test / admin-password-123)
    SHOP_DEMO_CUSTOMER         0 to not create demo@shop.test / demo-password-123 (default 1)
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from pydantic import BaseModel, Field, field_validator, model_validator

from example_shop.common import caller, default_settings, postgres_url
from example_shop.identity.keys import ALGORITHM, SigningKeys
from example_shop.identity.passwords import hash_password, password_weakness, verify_password
from framework.http import json_response, read_json
from framework.persistence.postgres import Migration, PostgresResource, UniqueViolation
from framework.service import Service, ServiceSettings, route
from framework.types import Transport

__all__ = ["Credentials", "Identity", "Profile", "SignUp", "TokenResponse"]

log = logging.getLogger("example_shop.identity")

AUDIENCE = "shop"
DEFAULT_ISSUER = "msa-shop-identity"
TOKEN_TTL = 3600
COOKIE = "session"
HINT_COOKIE = "signed_in"
"""Set beside `COOKIE`, not HttpOnly: tells the page that a session cookie is there."""
TIER = "browser"
# DEV-ONLY defaults, for a shop on a laptop; production sets SHOP_ADMIN_* from a Secret.
DEV_ADMIN_EMAIL = "admin@shop.test"
DEV_ADMIN_PASSWORD = "admin-password-123"
DEMO_EMAIL = "demo@shop.test"
DEMO_PASSWORD = "demo-password-123"

# No control characters: nobody's address or name needs one, and PostgreSQL text cannot hold
# NUL (an error there would be a 500, not the 422 a bad form deserves).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+")

MIGRATIONS = [
    Migration(
        1,
        "users",
        """
        create table users (
            id text primary key,
            email text not null unique,
            name text not null,
            password_hash text not null,
            roles text[] not null default '{customer}',
            created_at timestamptz not null default now()
        )
        """,
    )
]


# -- the API's documents --------------------------------------------------------------------------


class SignUp(BaseModel):
    email: str = Field(max_length=254)
    password: str
    name: str = Field(min_length=1, max_length=100)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip().lower()
        if not _EMAIL.fullmatch(value):
            raise ValueError("not an email address")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the name is empty")
        if _CONTROL.search(value):
            raise ValueError("the name holds control characters")
        return value

    @model_validator(mode="after")
    def _strong_password(self) -> SignUp:
        weakness = password_weakness(self.password, self.email)
        if weakness is not None:
            raise ValueError(f"password too weak: {weakness}")
        return self


class Credentials(BaseModel):
    email: str = Field(max_length=254)
    password: str = Field(max_length=1024)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip().lower()
        if _CONTROL.search(value):
            raise ValueError("not an email address")
        return value


class Profile(BaseModel):
    id: str
    email: str
    name: str
    roles: list[str]


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int = TOKEN_TTL


# -- the service ----------------------------------------------------------------------------------


class Identity(Service):
    """Accounts and tokens. No injectable resources: extra keyword arguments are ignored."""

    name = "identity"

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        **resources: Any,
    ) -> None:
        super().__init__(default_settings("identity", settings), transport=transport)
        env = self.settings.env
        self.issuer = env.get("JWT_ISSUER") or DEFAULT_ISSUER
        self.cookie_secure = env.get("IDENTITY_COOKIE_SECURE", "0") == "1"
        self.db = self.use(
            PostgresResource(
                postgres_url(env, "identity"), migrations=MIGRATIONS, create_database=True
            )
        )
        self.keys = self.use(SigningKeys(self.db, pem=env.get("IDENTITY_SIGNING_KEY_PEM")))
        self._dummy_hash = ""

    async def on_start(self) -> None:
        # Login checks this hash when the email is unknown, so that "no such user" takes as
        # long as "wrong password" and response times do not reveal who has an account.
        self._dummy_hash = await asyncio.to_thread(hash_password, secrets.token_urlsafe(16))
        env = self.settings.env
        if not env.get("SHOP_ADMIN_PASSWORD"):
            log.warning("identity: seeding the admin with the DEV-ONLY default password")
        await self._seed(
            env.get("SHOP_ADMIN_EMAIL") or DEV_ADMIN_EMAIL,
            env.get("SHOP_ADMIN_PASSWORD") or DEV_ADMIN_PASSWORD,
            "Shop Admin",
            ["customer", "admin"],
        )
        if env.get("SHOP_DEMO_CUSTOMER", "1") != "0":
            await self._seed(DEMO_EMAIL, DEMO_PASSWORD, "Demo Customer", ["customer"])

    async def _seed(self, email: str, password: str, name: str, roles: list[str]) -> None:
        email = email.strip().lower()
        async with self.db.connection() as conn:
            if await conn.fetchval("select 1 from users where email = $1", email):
                return
        hashed = await asyncio.to_thread(hash_password, password)
        async with self.db.connection() as conn:
            await conn.execute(
                "insert into users (id, email, name, password_hash, roles) "
                "values ($1, $2, $3, $4, $5) on conflict (email) do nothing",
                str(uuid.uuid4()),
                email,
                name,
                hashed,
                roles,
            )

    # -- routes ---------------------------------------------------------------------------------

    @route("POST", "/auth/signup", body=SignUp, response=Profile)
    async def signup(self, request: web.Request) -> web.Response:
        """Create a customer account."""
        form = await read_json(request, SignUp)
        hashed = await asyncio.to_thread(hash_password, form.password)
        user_id = str(uuid.uuid4())
        profile = Profile(id=user_id, email=form.email, name=form.name, roles=["customer"])
        try:
            async with self.db.connection() as conn:
                await conn.execute(
                    "insert into users (id, email, name, password_hash, roles) "
                    "values ($1, $2, $3, $4, $5)",
                    profile.id,
                    profile.email,
                    profile.name,
                    hashed,
                    profile.roles,
                )
        except UniqueViolation as exc:
            raise web.HTTPConflict(text="an account with this email exists") from exc
        return json_response(profile, status=201)

    @route("POST", "/auth/login", body=Credentials, response=TokenResponse)
    async def login(self, request: web.Request) -> web.Response:
        """Sign in: a bearer token, also set as the HttpOnly `session` cookie."""
        form = await read_json(request, Credentials)
        async with self.db.connection() as conn:
            user = await conn.fetchrow(
                "select id, roles, password_hash from users where email = $1", form.email
            )
        stored = user["password_hash"] if user is not None else self._dummy_hash
        matches = await asyncio.to_thread(verify_password, form.password, stored)
        if user is None or not matches:
            raise web.HTTPUnauthorized(text="wrong email or password")
        token = await self.issue_token(user["id"], list(user["roles"]))
        response = json_response(TokenResponse(access_token=token), headers=_NO_STORE)
        response.set_cookie(
            COOKIE,
            token,
            max_age=TOKEN_TTL,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=self.cookie_secure,
        )
        response.set_cookie(
            HINT_COOKIE,
            "1",
            max_age=TOKEN_TTL,
            path="/",
            samesite="Lax",
            secure=self.cookie_secure,
        )
        return response

    @route("POST", "/auth/logout")
    async def logout(self, request: web.Request) -> web.Response:
        """Sign out of the browser: clears the `session` cookie and its hint."""
        response = web.Response(status=204, headers=_NO_STORE)
        response.del_cookie(
            COOKIE, path="/", httponly=True, samesite="Lax", secure=self.cookie_secure
        )
        response.del_cookie(HINT_COOKIE, path="/", samesite="Lax", secure=self.cookie_secure)
        return response

    @route("GET", "/auth/me", response=Profile)
    async def me(self, request: web.Request) -> web.Response:
        """The signed-in user's profile."""
        who = caller(request)
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                "select id, email, name, roles from users where id = $1", who.user_id
            )
        if row is None:
            raise web.HTTPNotFound(text="no such user")
        return json_response(Profile(**dict(row)))

    @route("GET", "/.well-known/jwks.json")
    async def jwks(self, request: web.Request) -> web.Response:
        """The public keys that verify this service's tokens (JWKS)."""
        return json_response(await self.keys.jwks(), headers={"Cache-Control": "max-age=60"})

    # -- tokens ---------------------------------------------------------------------------------

    async def issue_token(self, user_id: str, roles: list[str]) -> str:
        """A signed access token for `user_id`, valid for `TOKEN_TTL` seconds."""
        key = await self.keys.current()
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": user_id,
            "roles": roles,
            "tier": TIER,
            "iat": now,
            "exp": now + TOKEN_TTL,
        }
        return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


_NO_STORE = {"Cache-Control": "no-store"}
