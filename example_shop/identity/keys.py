"""The identity's RS256 signing keys: which one signs, and the JWKS that lets others verify.

Two sources, chosen at construction:

- a private key given as PEM (`IDENTITY_SIGNING_KEY_PEM`, from a Secret): it signs every token;
- otherwise the `signing_keys` table: `start()` generates an RSA-2048 key when the table holds
  no active one (under a transaction-scoped advisory lock, so replicas starting together create
  exactly one), the newest active key signs, and every replica and restart shares them.

The JWKS lists every active key (and the PEM key, when there is one), each with `kid` (its
RFC 7638 thumbprint), `use: sig` and `alg: RS256`. Rotation without logging anyone out:
`rotate()` adds a key, which signs from then on, while the older keys stay in the JWKS until
they are deactivated (`update signing_keys set active = false where kid = ...`) once the tokens
they signed have expired. The gateway refetches the JWKS when it meets an unknown `kid`.

The table holds private keys in clear: restrict access to the identity database, or give the
key as a Secret instead.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from framework.errors import ConfigurationError
from framework.persistence.postgres import Migration, PostgresResource

__all__ = ["KEY_MIGRATIONS", "SigningKey", "SigningKeys"]

ALGORITHM = "RS256"
_LOCK = 0x69645F6B657973  # "id_keys": serialises key creation across replicas

KEY_MIGRATIONS = [
    Migration(
        1,
        "signing keys",
        """
        create table signing_keys (
            kid text primary key,
            private_pem text not null,
            public_jwk jsonb not null,
            active boolean not null default true,
            created_at timestamptz not null default clock_timestamp()
        )
        """,
        component="identity_keys",
    )
]


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey


def public_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The public half of `key` as a JWK, with its thumbprint as `kid`."""
    jwk: dict[str, str] = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
    canonical = json.dumps({m: jwk[m] for m in ("e", "kty", "n")}, separators=(",", ":"))
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    return {**jwk, "kid": thumbprint.rstrip(b"=").decode(), "use": "sig", "alg": ALGORITHM}


def _load_pem(pem: str, source: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{source} is not a usable PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise ConfigurationError(f"{source} must be an RSA key of at least 2048 bits")
    return key


def _new_key() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key, pem


class SigningKeys:
    """A resource of the identity service; `use` it after the database it keeps keys in."""

    def __init__(self, db: PostgresResource, *, pem: str | None = None) -> None:
        self.db = db
        db.add_migrations(KEY_MIGRATIONS)
        self._pinned: SigningKey | None = None
        self._pinned_jwk: dict[str, str] | None = None
        if pem:
            key = _load_pem(pem, "IDENTITY_SIGNING_KEY_PEM")
            self._pinned_jwk = public_jwk(key)
            self._pinned = SigningKey(self._pinned_jwk["kid"], key)
        self._parsed: dict[str, rsa.RSAPrivateKey] = {}  # PEM parsing is slow: once per kid

    async def start(self) -> None:
        if self._pinned is None:
            await self._add_key(only_if_none=True)

    async def stop(self) -> None:
        """Nothing to release: the keys live in the database."""

    async def current(self) -> SigningKey:
        """The key that signs now: the pinned one, else the newest active one in the table."""
        if self._pinned is not None:
            return self._pinned
        async with self.db.connection() as conn:
            newest = await self._newest(conn)
        if newest is None:  # every key was deactivated while running: make one rather than fail
            return await self._add_key(only_if_none=True)
        return newest

    async def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document: every key a valid token may have been signed with."""
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                "select public_jwk from signing_keys where active order by created_at desc, kid"
            )
        keys = [json.loads(row["public_jwk"]) for row in rows]
        if self._pinned_jwk is not None:
            keys = [self._pinned_jwk, *(k for k in keys if k["kid"] != self._pinned_jwk["kid"])]
        return {"keys": keys}

    async def rotate(self) -> str:
        """Add a new key to the table; it signs from now on. Returns its `kid`."""
        return (await self._add_key(only_if_none=False)).kid

    async def _add_key(self, *, only_if_none: bool) -> SigningKey:
        if only_if_none:
            async with self.db.connection() as conn:
                if (existing := await self._newest(conn)) is not None:
                    return existing
        key, pem = await asyncio.to_thread(_new_key)  # RSA generation takes ~100 ms
        jwk = public_jwk(key)
        async with self.db.transaction() as tx:
            await tx.execute("select pg_advisory_xact_lock($1)", _LOCK)
            if only_if_none and (existing := await self._newest(tx)) is not None:
                return existing  # another replica was first: use its key
            await tx.execute(
                "insert into signing_keys (kid, private_pem, public_jwk) values ($1, $2, $3)",
                jwk["kid"],
                pem,
                json.dumps(jwk),
            )
        self._parsed[jwk["kid"]] = key
        return SigningKey(jwk["kid"], key)

    async def _newest(self, conn: Any) -> SigningKey | None:
        row = await conn.fetchrow(
            "select kid, private_pem from signing_keys where active "
            "order by created_at desc, kid limit 1"
        )
        if row is None:
            return None
        return SigningKey(row["kid"], self._private_key(row["kid"], row["private_pem"]))

    def _private_key(self, kid: str, pem: str) -> rsa.RSAPrivateKey:
        key = self._parsed.get(kid)
        if key is None:
            key = self._parsed[kid] = _load_pem(pem, f"signing key {kid}")
        return key
