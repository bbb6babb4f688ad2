"""Who is calling: JWTs checked against the issuer's keys, API keys, or nobody (open routes).

A route lists the credentials it accepts (`RouteConfig.auth`, tried in order). The gateway asks
the `Authenticator` for the caller's `ClientIdentity`, checks the route's roles and scopes with
`authorize`, removes the identity headers a client may have forged with `strip_forwarded`, and
sends the verified ones upstream with `forwarded_headers`:

    authenticator = Authenticator(config.auth)
    await authenticator.start()                       # fetches the JWKS once, if there is one
    identity = await authenticator.authenticate(request, route.auth, anonymous_tier="free")
    authorize(identity, route.roles, route.scopes)    # 403 when a role or scope is missing
    headers = strip_forwarded(request.headers, config.auth.forward_claims)
    headers |= forwarded_headers(identity, config.auth.forward_claims)
    ...
    await authenticator.stop()

Every refusal is a `GatewayError`: 401 with a `WWW-Authenticate` challenge naming the accepted
schemes (`Bearer realm="gateway"`, `ApiKey realm="gateway", header="x-api-key"`), or 403. Its
detail says what was wrong ("token expired", "unknown signing key", "wrong audience") and never
echoes a token, a key or a claim value. PyJWT and cryptography errors are translated here, at
this one edge, with `raise ... from exc`.

Rules that make the JWT check safe:

- A credential that is present is verified, and if it is bad the answer is 401 at once: it never
  falls through to the next method or to an anonymous identity.
- The algorithm is pinned: the token's `alg` must be in `JwtConfig.algorithms` (so `none` and
  HS256-signed-with-the-public-key tokens are refused before any key is touched), RS256/ES256 keys
  come only from the JWKS by `kid`, and the key's type must fit the algorithm (RSA for RS256, EC
  P-256 for ES256).
- `exp`, `iss`, `aud` and `sub` are required; `nbf` and `iat` are checked when present; all with
  `JwtConfig.leeway`.
- The JWKS is trusted for `jwks_refresh` seconds. A `kid` it does not hold triggers one early
  refetch, but fetches (of any cause) start at most once per 10 seconds, and concurrent ones are
  joined into one, so tokens with made-up `kid`s cannot make the gateway hammer the issuer. A
  failed fetch, or one with no usable key, is logged and the last good set stays in use.

**Verified tokens are remembered** (`JwtConfig.cache_size`, 10,000; 0 turns it off): a browser
sends the same token with every request, and its signature check and decoding were a tenth of
the shop's CPU under load. The cache is keyed by the token's SHA-256 and keeps the identity, the
key that verified it and the token's validity window (`exp` and `nbf` with the leeway). A hit
is used only while the window holds by the wall clock and the key is still the one the current,
fresh key set holds under that `kid` (a refetch, a rotation or a stale set send the token
through the full check again). Only tokens that passed are kept, least recently used first out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
from aiohttp import hdrs, web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from framework.errors import ConfigurationError, NotStartedError
from framework.gateway.config import ApiKeyConfig, AuthConfig, JwtConfig
from framework.gateway.types import ClientIdentity, GatewayError

__all__ = ["Authenticator", "authorize", "forwarded_headers", "hash_api_key", "strip_forwarded"]

log = logging.getLogger("framework.gateway.auth")

REALM: Final = "gateway"
_MIN_REFETCH_INTERVAL: Final = 10.0
"""Seconds between two JWKS fetch attempts, whatever asks for them."""
_JWKS_MAX_BYTES: Final = 1 << 20
_JWKS_TIMEOUT: Final = 5.0
_MIN_HS256_SECRET: Final = 32
"""Bytes; RFC 7518 §3.2 wants a key at least as long as the hash."""
_MIN_RSA_BITS: Final = 2048
_MAX_HEADER_VALUE: Final = 4096
_METHODS: Final = frozenset({"jwt", "api_key", "none"})
_REQUIRED_CLAIMS: Final = ["exp", "iss", "aud", "sub"]
_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
"""A JWS in compact serialization: three base64url parts (the last empty for alg none)."""


def hash_api_key(key: str) -> str:
    """The form an API key is configured in (`ApiKeyConfig.hash`): `sha256:<hex digest>`.

    >>> hash_api_key("k")[:15]
    'sha256:8254c329'
    """
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


# -- the issuer's signing keys -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SigningKey:
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    alg: str | None
    """The JWK's own `alg`, when it names one."""

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if alg == "RS256":
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg == "ES256":
            return isinstance(self.key, ec.EllipticCurvePublicKey) and isinstance(
                self.key.curve, ec.SECP256R1
            )
        return False


class _UnusableKeySet(Exception):
    """A JWKS response that cannot replace the keys in use (never leaves this module)."""


class _IssuerKeys:
    """The JWKS of one issuer: fetched, cached, refetched rarely and one fetch at a time."""

    def __init__(self, url: str, refresh_after: float, clock: Callable[[], float]) -> None:
        self._url = url
        self._refresh_after = refresh_after
        self._clock = clock
        self._keys: dict[str, _SigningKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetching: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None

    def _stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at >= self._refresh_after

    def current(self, kid: str) -> _SigningKey | None:
        """The key named `kid` if the set holding it is fresh (no fetch: for cached tokens)."""
        return None if self._stale(self._clock()) else self._keys.get(kid)

    async def find(self, kid: str) -> _SigningKey | None:
        """The key named `kid`, refetching the set first if it is stale or lacks that key."""
        now = self._clock()
        if (self._stale(now) or kid not in self._keys) and self._may_fetch(now):
            await self.refresh()
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return (
            self._fetching is not None  # joining a fetch under way costs the issuer nothing
            or self._attempted_at is None
            or now - self._attempted_at >= _MIN_REFETCH_INTERVAL
        )

    async def refresh(self) -> None:
        """Fetch the set, or wait for the fetch already under way; never raises a fetch error."""
        if self._fetching is None:
            self._attempted_at = self._clock()
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetched)
            self._fetching = task
        # Shielded: one caller giving up (a client hanging up) must not cancel it for the others.
        await asyncio.shield(self._fetching)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if self._fetching is task:
            self._fetching = None

    async def _fetch(self) -> None:
        try:
            keys = _parse_jwks(await self._download())
        except _UnusableKeySet as exc:
            log.warning(
                "JWKS from %s not used (%s); keeping the %d keys fetched before",
                self._url,
                exc,
                len(self._keys),
            )
            return
        self._keys = keys
        self._fetched_at = self._clock()
        log.debug("JWKS from %s: %d signing keys", self._url, len(keys))

    async def _download(self) -> Any:
        if self.session is None:
            raise NotStartedError("the JWKS is fetched only between start() and stop()")
        body = bytearray()
        try:
            async with self.session.get(
                self._url,
                headers={hdrs.ACCEPT: "application/json"},
                timeout=aiohttp.ClientTimeout(total=_JWKS_TIMEOUT),
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise _UnusableKeySet(f"HTTP {response.status}")
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > _JWKS_MAX_BYTES:
                        raise _UnusableKeySet(f"larger than {_JWKS_MAX_BYTES} bytes")
        except aiohttp.ClientError as exc:
            raise _UnusableKeySet(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise _UnusableKeySet(f"no answer within {_JWKS_TIMEOUT:g}s") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _UnusableKeySet("not JSON") from exc

    async def stop(self) -> None:
        task, self._fetching = self._fetching, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.session = None


def _parse_jwks(document: Any) -> dict[str, _SigningKey]:
    """The usable signing keys of a JWKS document, by `kid`; others are skipped and logged."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _UnusableKeySet("no 'keys' list")
    keys: dict[str, _SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid, use, alg = entry.get("kid"), entry.get("use"), entry.get("alg")
        if not isinstance(kid, str) or not kid or kid in keys:
            log.info("JWKS: skipping a key without a unique kid")
            continue
        if use not in (None, "sig") or not isinstance(alg, str | None):
            continue
        key = _public_key(entry)
        if key is None:
            log.info("JWKS: skipping key %r (unsupported type, curve or size)", kid)
            continue
        keys[kid] = _SigningKey(key, alg)
    if not keys:
        raise _UnusableKeySet("no usable signing key in it")
    return keys


def _public_key(entry: dict[str, Any]) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None:
    try:
        if entry.get("kty") == "RSA":
            key = RSAAlgorithm.from_jwk(entry)
            public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
            return public if public.key_size >= _MIN_RSA_BITS else None
        if entry.get("kty") == "EC":
            curve_key = ECAlgorithm.from_jwk(entry)
            if isinstance(curve_key, ec.EllipticCurvePrivateKey):
                curve_key = curve_key.public_key()
            return curve_key if isinstance(curve_key.curve, ec.SECP256R1) else None
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    return None


# -- authentication ------------------------------------------------------------------------------

_JWT_REASONS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    # Subclasses before their bases: InvalidSignatureError is a DecodeError.
    (jwt.InvalidSignatureError, "signature invalid"),
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "malformed claim iat"),
    (jwt.exceptions.InvalidSubjectError, "malformed claim sub"),
    (jwt.InvalidKeyError, "unusable signing key"),
    (jwt.DecodeError, "malformed token"),
)


def _jwt_reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"  # one of _REQUIRED_CLAIMS: safe to name
    for kind, reason in _JWT_REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: ClientIdentity
    kid: str | None
    """None for HS256 (the configured secret)."""
    key: _SigningKey | None
    not_before: float
    not_after: float


class _VerifiedTokens:
    """Tokens that passed the full check, by SHA-256, least recently used out first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()

    def get(self, digest: bytes, now: float) -> _Verified | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if not entry.not_before <= now < entry.not_after:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, entry: _Verified) -> None:
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Authenticator:
    """Turns a request's credentials into a `ClientIdentity`, or refuses it with a 401.

    Built once per config; `session` is the `aiohttp.ClientSession` for JWKS fetches (one is
    made, and closed by `stop()`, when none is given). `clock` (monotonic seconds) paces the JWKS
    refetches; tests pass a fake one.

    Lifecycle: `start()` opens the session and fetches the JWKS once (a failure is logged, not
    raised: tokens are then refused with "unknown signing key" until a fetch succeeds);
    `authenticate()` may be called between `start()` and `stop()`; `stop()` cancels a fetch under
    way and closes the session if it made it.

    Raises `ConfigurationError` at once for an HS256 secret shorter than 32 bytes.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._session = session
        self._owns_session = session is None
        self._started = False
        jwt_config = config.jwt
        secret = jwt_config.hs256_secret if jwt_config else None
        if secret is not None and len(secret.encode("utf-8")) < _MIN_HS256_SECRET:
            raise ConfigurationError(
                f"auth.jwt.hs256_secret must be at least {_MIN_HS256_SECRET} bytes long"
            )
        self._issuer_keys = (
            _IssuerKeys(jwt_config.jwks_url, jwt_config.jwks_refresh, clock)
            if jwt_config and jwt_config.jwks_url
            else None
        )
        self._wall_clock = wall_clock
        cache_size = jwt_config.cache_size if jwt_config else 0
        self._verified: _VerifiedTokens | None = _VerifiedTokens(cache_size) if cache_size else None
        # The digest of a presented key is looked up here, then confirmed with compare_digest.
        # The lookup's timing cannot help an attacker: they choose the key, not its SHA-256.
        # Each key's identity is built once, with the config: a request with a key costs one
        # SHA-256 and one lookup.
        self._api_keys: dict[str, tuple[ApiKeyConfig, ClientIdentity]] = {
            k.hash: (
                k,
                ClientIdentity(
                    id=k.id,
                    method="api_key",
                    tier=k.tier,
                    roles=frozenset(k.roles),
                    scopes=frozenset(k.scopes),
                ),
            )
            for k in config.api_keys
        }

    async def start(self) -> None:
        if self._started:
            return
        if self._issuer_keys is not None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._issuer_keys.session = self._session
            await self._issuer_keys.refresh()
        self._started = True

    async def stop(self) -> None:
        self._started = False
        if self._issuer_keys is not None:
            await self._issuer_keys.stop()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def authenticate(
        self,
        request: web.Request,
        methods: tuple[str, ...],
        *,
        anonymous_tier: str | None = None,
        peer: str | None = None,
    ) -> ClientIdentity:
        """The caller of `request`, by the first of `methods` whose credential it carries.

        `methods` is the route's `auth` ("jwt", "api_key", "none"). A credential that is present
        is verified and, if bad, refused with 401 right away. Without any credential, "none"
        gives `ClientIdentity(id="anon:<peer>", method="anonymous", tier=anonymous_tier)`, where
        `peer` is the client address the caller established (trusted proxies considered;
        default `request.remote`); otherwise the answer is 401 with a challenge.
        """
        if not self._started:
            raise NotStartedError("Authenticator is not started: await authenticator.start()")
        if not _METHODS.issuperset(methods):
            raise ConfigurationError(f"unknown auth methods {sorted(set(methods) - _METHODS)}")
        for method in methods:
            if method == "jwt":
                token = self._bearer_token(request, methods)
                if token is not None:
                    return await self._verify_jwt(token, methods)
            elif method == "api_key":
                key = request.headers.get(self._config.api_key_header)
                if key is not None:
                    return self._verify_api_key(key, methods)
        if "none" in methods:
            return ClientIdentity(
                id=f"anon:{peer or request.remote or 'unknown'}",
                method="anonymous",
                tier=anonymous_tier,
            )
        raise self._unauthorized("missing credentials", methods)

    # -- JWT --

    def _bearer_token(self, request: web.Request, methods: tuple[str, ...]) -> str | None:
        """The token of the request's one `Authorization: Bearer` header or its one session
        cookie. A repeated header or cookie is a 400 (a gateway that checks one copy while an
        upstream reads another is a classic confusion); a token with bytes no JWT can hold is
        a 401 before any parser sees it."""
        headers = request.headers.getall(hdrs.AUTHORIZATION, [])
        if len(headers) > 1:
            raise GatewayError(
                400, "Bad Request", "the Authorization header is sent more than once"
            )
        if headers:
            scheme, _, token = headers[0].strip().partition(" ")
            if scheme.lower() != "bearer":
                raise self._unauthorized("unsupported authorization scheme", methods)
            return self._compact(token.strip(), methods)
        cookie = self._jwt_config().cookie
        if not cookie:
            return None
        values = [
            value
            for header in request.headers.getall(hdrs.COOKIE, [])
            for name, _, value in (part.strip().partition("=") for part in header.split(";"))
            if name == cookie
        ]
        if len(values) > 1:
            raise GatewayError(400, "Bad Request", f"the {cookie} cookie is sent more than once")
        return (
            self._compact(values[0].strip().strip('"'), methods) if values and values[0] else None
        )

    def _compact(self, token: str, methods: tuple[str, ...]) -> str:
        """`token` if it is spelled like a JWS compact serialization (base64url and dots)."""
        if not token.isascii() or not _COMPACT.fullmatch(token):
            raise self._unauthorized("malformed token", methods, bad_token=True)
        return token

    def _jwt_config(self) -> JwtConfig:
        if self._config.jwt is None:
            raise ConfigurationError("a route accepts jwt but auth.jwt is not configured")
        return self._config.jwt

    async def _verify_jwt(self, token: str, methods: tuple[str, ...]) -> ClientIdentity:
        config = self._jwt_config()
        cache = self._verified
        digest = b""
        if cache is not None:
            digest = hashlib.sha256(token.encode("ascii")).digest()  # _compact: ASCII only
            known = cache.get(digest, self._wall_clock())
            if known is not None and (
                known.kid is None
                or (
                    self._issuer_keys is not None
                    and self._issuer_keys.current(known.kid) is known.key
                )
            ):
                return known.identity
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise self._unauthorized("malformed token", methods, bad_token=True) from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise self._unauthorized("algorithm not allowed", methods, bad_token=True)
        key: str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        signing: _SigningKey | None = None
        if alg == "HS256":
            assert config.hs256_secret is not None  # JwtConfig guarantees it
            key = config.hs256_secret
        else:
            signing = await self._signing_key(header.get("kid"), alg, methods)
            key = signing.key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],  # pinned above: an allowed alg whose key type was checked
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options={"require": _REQUIRED_CLAIMS, "enforce_minimum_key_length": True},
            )
        except (jwt.PyJWTError, ValueError) as exc:
            raise self._unauthorized(_jwt_reason(exc), methods, bad_token=True) from exc
        subject = claims["sub"]
        if not subject or not _printable(subject):
            raise self._unauthorized("malformed claim sub", methods, bad_token=True)
        scopes = claims.get("scope")
        tier = claims.get(self._config.tier_claim)
        identity = ClientIdentity(
            id=subject,
            method="jwt",
            tier=tier if isinstance(tier, str) and tier and _printable(tier) else None,
            roles=_names(claims.get("roles"), separators=" ,"),
            scopes=_names(scopes if scopes is not None else claims.get("scp"), separators=" "),
            claims=claims,
        )
        if cache is not None:
            nbf = claims.get("nbf")
            cache.put(
                digest,
                _Verified(
                    identity=identity,
                    kid=None if signing is None else header["kid"],
                    key=signing,
                    not_before=float(nbf) - config.leeway if nbf is not None else float("-inf"),
                    not_after=float(claims["exp"]) + config.leeway,
                ),
            )
        return identity

    async def _signing_key(self, kid: Any, alg: str, methods: tuple[str, ...]) -> _SigningKey:
        if not isinstance(kid, str) or not kid:
            raise self._unauthorized("missing key id (kid)", methods, bad_token=True)
        assert self._issuer_keys is not None  # RS256/ES256 in algorithms need a jwks_url
        found = await self._issuer_keys.find(kid)
        if found is None:
            raise self._unauthorized("unknown signing key", methods, bad_token=True)
        if not found.fits(alg):
            raise self._unauthorized(
                "signing key does not fit the algorithm", methods, bad_token=True
            )
        return found

    # -- API keys --

    def _verify_api_key(self, key: str, methods: tuple[str, ...]) -> ClientIdentity:
        try:
            digest = hash_api_key(key)
        except UnicodeEncodeError:  # not a key we could ever have issued
            digest = ""
        found = self._api_keys.get(digest)
        if found is None or not hmac.compare_digest(found[0].hash, digest):
            raise self._unauthorized("unknown API key", methods)
        return found[1]

    # -- refusals --

    def _unauthorized(
        self, reason: str, methods: tuple[str, ...], bad_token: bool = False
    ) -> GatewayError:
        challenges = []
        if "jwt" in methods:
            bearer = f'Bearer realm="{REALM}"'
            if bad_token:  # RFC 6750 §3; the reasons are fixed strings without quotes
                bearer += f', error="invalid_token", error_description="{reason}"'
            challenges.append(bearer)
        if "api_key" in methods:
            challenges.append(f'ApiKey realm="{REALM}", header="{self._config.api_key_header}"')
        headers = {"WWW-Authenticate": ", ".join(challenges)} if challenges else {}
        return GatewayError(401, "Unauthorized", reason, headers=headers)


def _printable(value: str) -> bool:
    return value.isprintable() and len(value) <= _MAX_HEADER_VALUE


def _names(value: Any, *, separators: str) -> frozenset[str]:
    """Role or scope names from a claim: a list, or one string split at any of `separators`.

    Names holding a separator, whitespace or a control character are dropped: forwarded joined
    by spaces, `["admin x"]` would otherwise reach the upstream as the two roles admin and x.
    """
    if isinstance(value, str):
        for separator in separators[1:]:
            value = value.replace(separator, separators[0])
        items: list[Any] = value.split()
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return frozenset()
    return frozenset(
        item
        for item in items
        if isinstance(item, str)
        and item
        and _printable(item)
        and not any(c.isspace() or c in separators for c in item)
    )


# -- authorization and forwarding ----------------------------------------------------------------


def authorize(
    identity: ClientIdentity, roles: Collection[str] = (), scopes: Collection[str] = ()
) -> None:
    """Refuse with 403 unless `identity` has one of `roles` (if any) and every one of `scopes`."""
    if roles and identity.roles.isdisjoint(roles):
        raise GatewayError(403, "Forbidden", f"needs role {' or '.join(sorted(roles))}")
    missing = sorted(set(scopes) - identity.scopes)
    if missing:
        raise GatewayError(403, "Forbidden", f"needs scope {' '.join(missing)}")


def forwarded_headers(
    identity: ClientIdentity, forward_claims: Mapping[str, str]
) -> dict[str, str]:
    """The headers telling the upstream who called: `AuthConfig.forward_claims` applied.

    `sub`, `roles`, `scope`, `scp` and `tier` come from the identity, so JWT and API-key callers
    forward alike: `x-user-id: alice`, `x-user-roles: admin ops`, `x-user-scopes: orders:read
    orders:write`, `x-client-tier: gold`. Roles and scopes are sorted and joined by single spaces
    (as OAuth joins scopes); a name never holds a space (see `_names`). Any other claim is taken
    from the JWT: a string, number or boolean (`true`/`false`) as it is, a list of strings joined
    by spaces, anything else left out. An anonymous caller forwards only its tier.

    A value with a control character (CR/LF would split the header and smuggle another) or
    longer than 4096 characters is left out, as are empty values.
    """
    derived: dict[str, str | None] = {
        "sub": identity.id,
        "roles": " ".join(sorted(identity.roles)),
        "scope": " ".join(sorted(identity.scopes)),
        "scp": " ".join(sorted(identity.scopes)),
        "tier": identity.tier,
    }
    headers: dict[str, str] = {}
    for claim, header in forward_claims.items():
        if identity.method == "anonymous" and claim != "tier":
            continue
        value = derived[claim] if claim in derived else _claim_text(identity.claims.get(claim))
        if not value:
            continue
        if not _printable(value):
            log.info("not forwarding claim %r of %s: unsafe header value", claim, identity.id)
            continue
        headers[header] = value
    return headers


def _claim_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)
    return None


def strip_forwarded(
    headers: Mapping[str, str], forward_claims: Mapping[str, str]
) -> dict[str, str]:
    """A copy of the client's `headers` without the ones `forwarded_headers` sets (any case).

    A client sending `X-User-Id: admin` must not reach the upstream with it, on any route, even
    an anonymous one. `Authorization` and the API-key header are kept: whether the credential
    travels on is the caller's decision. A header given several times keeps its last value.
    """
    spoofable = {name.lower() for name in forward_claims.values()}
    return {name: value for name, value in headers.items() if name.lower() not in spoofable}
