"""Gateway authentication: JWTs against a real JWKS server, API keys, authorization, forwarding."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from framework.errors import ConfigurationError, NotStartedError
from framework.gateway.auth import (
    Authenticator,
    authorize,
    forwarded_headers,
    hash_api_key,
    strip_forwarded,
)
from framework.gateway.config import ApiKeyConfig, AuthConfig, JwtConfig
from framework.gateway.types import ClientIdentity, GatewayError
from tests.framework.gateway.conftest import Clock

ISSUER = "https://id.example.test"
AUDIENCE = "shop-api"
HS_SECRET = "an-hs256-secret-that-is-long-enough-0123456789"
GOLD_KEY = "gold-key-6b1d2c"
FORWARD = AuthConfig().forward_claims


# -- keys, tokens and the issuer's JWKS server -----------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    rsa_next: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_next=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
    )


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


def token(key: Any, kid: str | None = "rsa-1", alg: str = "RS256", **claims: Any) -> str:
    """A signed token; a claim given as None is left out."""
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers=headers
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300, **extra}


@dataclass
class Jwks:
    """The issuer's key endpoint, whose answer and health the tests change."""

    keys: list[dict[str, Any]]
    url: str = ""
    fetches: int = 0
    down: bool = False
    body: bytes | None = None
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a fetch arrives."""
    answering: asyncio.Event = field(default_factory=asyncio.Event)
    """Fetches are answered while this is set; a test clears it to hold them."""

    def __post_init__(self) -> None:
        self.answering.set()


@pytest.fixture
async def jwks(keys: Keys) -> AsyncIterator[Jwks]:
    state = Jwks(keys=[jwk(keys.rsa_key, "rsa-1"), jwk(keys.ec_key, "ec-1")])

    async def serve(request: web.Request) -> web.Response:
        state.fetches += 1
        state.asked.set()
        await state.answering.wait()
        if state.down:
            return web.Response(status=503)
        if state.body is not None:
            return web.Response(body=state.body, content_type="application/json")
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("/.well-known/jwks.json"))
    yield state
    await server.close()


@dataclass
class Made:
    clock: Clock = field(default_factory=Clock)
    started: list[Authenticator] = field(default_factory=list)


MakeAuth = Callable[..., Awaitable[Authenticator]]


@pytest.fixture
async def made() -> AsyncIterator[Made]:
    made = Made()
    yield made
    for authenticator in made.started:
        await authenticator.stop()


@pytest.fixture
def make_auth(jwks: Jwks, made: Made) -> MakeAuth:
    async def make(
        *,
        start: bool = True,
        session: aiohttp.ClientSession | None = None,
        wall_clock: Callable[[], float] = time.time,
        **jwt_options: Any,
    ) -> Authenticator:
        options: dict[str, Any] = {
            "jwks_url": jwks.url,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            **jwt_options,
        }
        config = AuthConfig(
            jwt=JwtConfig(**options),
            api_keys=(
                ApiKeyConfig(
                    id="partner-gold",
                    hash=hash_api_key(GOLD_KEY),
                    tier="gold",
                    roles=("partner",),
                    scopes=("orders:read",),
                ),
            ),
        )
        authenticator = Authenticator(
            config, session=session, clock=made.clock, wall_clock=wall_clock
        )
        if start:
            await authenticator.start()
            made.started.append(authenticator)
        return authenticator

    return make


def request(headers: dict[str, str] | None = None, peer: str | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 40000) if peer else None
    return make_mocked_request("GET", "/api/orders", headers=headers or {}, transport=transport)


def bearer(value: str) -> web.Request:
    return request({"Authorization": f"Bearer {value}"})


async def refused(
    authenticator: Authenticator, req: web.Request, methods: tuple[str, ...] = ("jwt",)
) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await authenticator.authenticate(req, methods)
    return caught.value


# -- valid tokens ---------------------------------------------------------------------------------


async def test_valid_rs256_token_gives_the_identity_with_roles_scopes_and_tier(
    make_auth: MakeAuth, keys: Keys
) -> None:
    authenticator = await make_auth()
    signed = token(
        keys.rsa_key, roles=["admin", "ops"], scope="orders:read orders:write", tier="gold"
    )

    identity = await authenticator.authenticate(bearer(signed), ("jwt",))

    assert identity.id == "alice"
    assert identity.method == "jwt"
    assert identity.tier == "gold"
    assert identity.roles == {"admin", "ops"}
    assert identity.scopes == {"orders:read", "orders:write"}
    assert identity.claims["iss"] == ISSUER


async def test_valid_es256_token_with_string_roles_and_scp_list(
    make_auth: MakeAuth, keys: Keys
) -> None:
    authenticator = await make_auth()
    signed = token(keys.ec_key, kid="ec-1", alg="ES256", roles="admin,ops support", scp=["a", "b"])

    identity = await authenticator.authenticate(bearer(signed), ("jwt",))

    assert identity.id == "alice"
    assert identity.roles == {"admin", "ops", "support"}
    assert identity.scopes == {"a", "b"}
    assert identity.tier is None


async def test_tier_comes_from_the_configured_claim(keys: Keys, jwks: Jwks, made: Made) -> None:
    config = AuthConfig(
        jwt=JwtConfig(jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE), tier_claim="plan"
    )
    authenticator = Authenticator(config, clock=made.clock)
    await authenticator.start()
    made.started.append(authenticator)

    identity = await authenticator.authenticate(
        bearer(token(keys.rsa_key, plan="silver", tier="gold")), ("jwt",)
    )

    assert identity.tier == "silver"


async def test_any_configured_audience_is_accepted(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth(audience=("web", AUDIENCE))

    identity = await authenticator.authenticate(
        bearer(token(keys.rsa_key, aud=["other", AUDIENCE])), ("jwt",)
    )

    assert identity.id == "alice"


async def test_leeway_accepts_a_token_expired_moments_ago(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth(leeway=30)

    identity = await authenticator.authenticate(
        bearer(token(keys.rsa_key, exp=int(time.time()) - 10)), ("jwt",)
    )

    assert identity.id == "alice"


async def test_roles_with_spaces_or_control_characters_are_dropped(
    make_auth: MakeAuth, keys: Keys
) -> None:
    authenticator = await make_auth()
    signed = token(keys.rsa_key, roles=["viewer", "admin x", "ops\r\nx-evil: 1", 7, ""])

    identity = await authenticator.authenticate(bearer(signed), ("jwt",))

    assert identity.roles == {"viewer"}


# -- tokens that must be refused ------------------------------------------------------------------


def _tampered(keys: Keys) -> str:
    header, payload, signature = token(keys.rsa_key, roles=["viewer"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def _hs256_with_public_key(keys: Keys) -> str:
    pem = keys.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


SECURITY_CASES: dict[str, tuple[Callable[[Keys], str], str]] = {
    "alg none, unsigned": (
        lambda k: forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims()),
        "algorithm not allowed",
    ),
    "alg None": (
        lambda k: forge({"alg": "None", "kid": "rsa-1"}, claims()),
        "algorithm not allowed",
    ),
    "alg missing": (lambda k: forge({"kid": "rsa-1"}, claims()), "algorithm not allowed"),
    "HS256 signed with the RSA public key (key confusion)": (
        _hs256_with_public_key,
        "algorithm not allowed",
    ),
    "expired": (
        lambda k: token(k.rsa_key, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "token expired",
    ),
    "nbf in the future": (
        lambda k: token(k.rsa_key, nbf=int(time.time()) + 3600),
        "token not yet valid",
    ),
    "wrong issuer": (lambda k: token(k.rsa_key, iss="https://evil.test"), "wrong issuer"),
    "wrong audience": (lambda k: token(k.rsa_key, aud="another-api"), "wrong audience"),
    "missing exp": (lambda k: token(k.rsa_key, exp=None), "missing claim exp"),
    "missing iss": (lambda k: token(k.rsa_key, iss=None), "missing claim iss"),
    "missing aud": (lambda k: token(k.rsa_key, aud=None), "missing claim aud"),
    "missing sub": (lambda k: token(k.rsa_key, sub=None), "missing claim sub"),
    "sub with CR/LF": (
        lambda k: token(k.rsa_key, sub="alice\r\nx-user-id: root"),
        "malformed claim sub",
    ),
    "tampered payload": (_tampered, "signature invalid"),
    "signed by another key under a known kid": (
        lambda k: token(k.rsa_next, kid="rsa-1"),
        "signature invalid",
    ),
    "RS256 whose kid names an EC key": (
        lambda k: token(k.rsa_key, kid="ec-1"),
        "signing key does not fit the algorithm",
    ),
    "ES256 whose kid names an RSA key": (
        lambda k: token(k.ec_key, kid="rsa-1", alg="ES256"),
        "signing key does not fit the algorithm",
    ),
    "no kid": (lambda k: token(k.rsa_key, kid=None), "missing key id (kid)"),
    "garbage": (lambda k: "not-a-token", "malformed token"),
    "two segments": (lambda k: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0", "malformed token"),
    "bad base64": (lambda k: "!!!.###.$$$", "malformed token"),
    "header not JSON": (lambda k: f"{b64(b'{nope')}.{b64(b'{}')}.", "malformed token"),
    "payload not JSON": (
        lambda k: token(k.rsa_key).split(".")[0] + "." + b64(b"[1") + ".c2ln",
        "signature invalid",
    ),
    "empty bearer": (lambda k: "", "malformed token"),
}


@pytest.mark.parametrize("case", SECURITY_CASES, ids=list(SECURITY_CASES))
async def test_bad_tokens_are_refused_with_a_specific_reason(
    make_auth: MakeAuth, keys: Keys, case: str
) -> None:
    authenticator = await make_auth()
    build, reason = SECURITY_CASES[case]
    bad = build(keys)

    error = await refused(authenticator, bearer(bad))

    assert (error.status, error.title, error.detail) == (401, "Unauthorized", reason)
    challenge = error.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="gateway", error="invalid_token"')
    if len(bad) > 10:
        assert bad not in str(error)
        assert bad not in challenge


async def test_refusals_chain_the_pyjwt_error(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, bearer(token(keys.rsa_key, exp=int(time.time()) - 3600)))

    assert isinstance(error.__cause__, jwt.ExpiredSignatureError)


# -- the issuer's key set -------------------------------------------------------------------------


async def test_a_burst_of_unknown_kids_costs_the_issuer_one_fetch(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made
) -> None:
    authenticator = await make_auth()
    assert jwks.fetches == 1  # at start

    # Within 10 s of the last fetch an unknown kid is refused without asking the issuer.
    error = await refused(authenticator, bearer(token(keys.rsa_key, kid="made-up")))
    assert (error.detail, jwks.fetches) == ("unknown signing key", 1)

    made.clock.advance(11)
    jwks.answering.clear()  # the issuer holds the refetch while the burst arrives
    jwks.asked.clear()
    burst = [
        asyncio.ensure_future(
            authenticator.authenticate(bearer(token(keys.rsa_key, kid=f"random-{n}")), ("jwt",))
        )
        for n in range(50)
    ]
    await jwks.asked.wait()
    assert not any(call.done() for call in burst), "they all wait for the refetch"
    jwks.answering.set()
    outcomes = await asyncio.gather(*burst, return_exceptions=True)

    assert all(isinstance(o, GatewayError) and o.status == 401 for o in outcomes)
    assert {o.detail for o in outcomes if isinstance(o, GatewayError)} == {"unknown signing key"}
    assert jwks.fetches == 2

    for n in range(20):
        await refused(authenticator, bearer(token(keys.rsa_key, kid=f"again-{n}")))
    assert jwks.fetches == 2

    made.clock.advance(10)
    await refused(authenticator, bearer(token(keys.rsa_key, kid="later")))
    assert jwks.fetches == 3


async def test_rotation_a_new_kid_works_after_refetch_and_a_removed_one_stops(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made
) -> None:
    authenticator = await make_auth()
    assert (await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))).id == "alice"

    jwks.keys = [jwk(keys.rsa_next, "rsa-2")]  # the issuer rotates: rsa-1 is retired
    made.clock.advance(11)

    identity = await authenticator.authenticate(bearer(token(keys.rsa_next, kid="rsa-2")), ("jwt",))
    assert identity.id == "alice"
    assert jwks.fetches == 2

    error = await refused(authenticator, bearer(token(keys.rsa_key, kid="rsa-1")))
    assert error.detail == "unknown signing key"
    assert jwks.fetches == 2


async def test_requests_for_a_new_kid_all_wait_for_the_one_refetch(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made
) -> None:
    authenticator = await make_auth()
    jwks.keys = [*jwks.keys, jwk(keys.rsa_next, "rsa-2")]
    made.clock.advance(11)
    signed = token(keys.rsa_next, kid="rsa-2")
    jwks.answering.clear()
    jwks.asked.clear()

    first = asyncio.ensure_future(authenticator.authenticate(bearer(signed), ("jwt",)))
    await jwks.asked.wait()  # its fetch is under way (the issuer holds it) when the others arrive
    others = [
        asyncio.ensure_future(authenticator.authenticate(bearer(signed), ("jwt",)))
        for _ in range(20)
    ]
    await asyncio.sleep(0)  # one turn of the loop: each of the others reaches the refetch
    assert not any(call.done() for call in [first, *others]), "they all wait for the refetch"
    jwks.answering.set()
    identities = await asyncio.gather(first, *others)

    assert {identity.id for identity in identities} == {"alice"}
    assert jwks.fetches == 2


async def test_the_key_set_is_refetched_once_it_is_older_than_jwks_refresh(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made
) -> None:
    authenticator = await make_auth(jwks_refresh=60)

    made.clock.advance(30)
    await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))
    assert jwks.fetches == 1

    made.clock.advance(31)
    await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))
    await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))
    assert jwks.fetches == 2


@pytest.mark.parametrize(
    "failure",
    ["down", "not json", "no keys", "only unusable keys"],
)
async def test_a_failed_refetch_keeps_the_last_good_set(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made, failure: str
) -> None:
    authenticator = await make_auth(jwks_refresh=60)
    if failure == "down":
        jwks.down = True
    elif failure == "not json":
        jwks.body = b"<html>oops</html>"
    elif failure == "no keys":
        jwks.body = b'{"keys": []}'
    else:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        jwks.keys = [jwk(small, "weak"), {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]
    made.clock.advance(61)

    identity = await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))

    assert identity.id == "alice"
    assert jwks.fetches == 2


async def test_jwks_down_at_start_refuses_tokens_with_401_then_recovers(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made
) -> None:
    jwks.down = True
    authenticator = await make_auth()  # start() logs the failure and does not raise

    error = await refused(authenticator, bearer(token(keys.rsa_key)))
    assert (error.status, error.detail) == (401, "unknown signing key")

    jwks.down = False
    made.clock.advance(10)
    assert (await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))).id == "alice"


async def test_an_unreachable_jwks_url_is_a_401_not_a_crash(keys: Keys, made: Made) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = AuthConfig(
        jwt=JwtConfig(jwks_url=f"http://127.0.0.1:{port}/jwks", issuer=ISSUER, audience=AUDIENCE)
    )
    authenticator = Authenticator(config, clock=made.clock)
    await authenticator.start()
    made.started.append(authenticator)

    error = await refused(authenticator, bearer(token(keys.rsa_key)))

    assert (error.status, error.detail) == (401, "unknown signing key")


async def test_a_shared_session_is_used_and_left_open(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks
) -> None:
    async with aiohttp.ClientSession() as session:
        authenticator = await make_auth(session=session, start=False)
        await authenticator.start()
        await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))
        await authenticator.stop()
        assert not session.closed
        assert jwks.fetches == 1


async def test_authenticate_before_start_is_refused(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth(start=False)

    with pytest.raises(NotStartedError):
        await authenticator.authenticate(bearer(token(keys.rsa_key)), ("jwt",))


# -- where the token comes from, HS256 ------------------------------------------------------------


async def test_token_from_the_configured_cookie(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth(cookie="session")

    identity = await authenticator.authenticate(
        request({"Cookie": f"session={token(keys.rsa_key, sub='bob')}"}), ("jwt",)
    )
    assert identity.id == "bob"

    error = await refused(authenticator, request({"Cookie": "session=garbage"}))
    assert error.detail == "malformed token"


async def test_the_cookie_is_ignored_unless_configured(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, request({"Cookie": f"session={token(keys.rsa_key)}"}))

    assert error.detail == "missing credentials"


async def test_a_non_bearer_authorization_is_refused(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, request({"Authorization": "Basic YWxpY2U6cHc="}))

    assert (error.status, error.detail) == (401, "unsupported authorization scheme")


async def test_hs256_when_configured(keys: Keys, made: Made) -> None:
    config = AuthConfig(
        jwt=JwtConfig(
            issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",), hs256_secret=HS_SECRET
        )
    )
    authenticator = Authenticator(config, clock=made.clock)
    await authenticator.start()
    made.started.append(authenticator)

    identity = await authenticator.authenticate(
        bearer(token(HS_SECRET, kid=None, alg="HS256")), ("jwt",)
    )
    assert identity.id == "alice"

    wrong = await refused(authenticator, bearer(token(HS_SECRET[::-1], kid=None, alg="HS256")))
    assert wrong.detail == "signature invalid"
    rs256 = await refused(authenticator, bearer(token(keys.rsa_key)))
    assert rs256.detail == "algorithm not allowed"


def test_a_short_hs256_secret_is_refused_at_construction() -> None:
    config = AuthConfig(
        jwt=JwtConfig(issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",), hs256_secret="s")
    )

    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        Authenticator(config)


# -- API keys, method order, anonymous callers ----------------------------------------------------


async def test_a_valid_api_key_gives_its_configured_identity(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    identity = await authenticator.authenticate(request({"X-Api-Key": GOLD_KEY}), ("api_key",))

    assert identity == ClientIdentity(
        id="partner-gold",
        method="api_key",
        tier="gold",
        roles=frozenset({"partner"}),
        scopes=frozenset({"orders:read"}),
    )


@pytest.mark.parametrize("key", ["wrong-key", "", GOLD_KEY + " ", "gold-\u00e9"])
async def test_an_unknown_api_key_is_refused(make_auth: MakeAuth, key: str) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, request({"x-api-key": key}), ("api_key",))

    assert (error.status, error.detail) == (401, "unknown API key")
    assert error.headers == {"WWW-Authenticate": 'ApiKey realm="gateway", header="x-api-key"'}


async def test_missing_credentials_name_every_accepted_scheme(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, request(), ("jwt", "api_key"))

    assert (error.status, error.detail) == (401, "missing credentials")
    assert error.headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", ApiKey realm="gateway", header="x-api-key"'
    )
    api_key_only = await refused(authenticator, request(), ("api_key",))
    assert api_key_only.headers["WWW-Authenticate"].startswith("ApiKey ")


async def test_methods_are_tried_in_order(make_auth: MakeAuth, keys: Keys) -> None:
    authenticator = await make_auth()
    both = {"Authorization": f"Bearer {token(keys.rsa_key)}", "x-api-key": GOLD_KEY}

    assert (await authenticator.authenticate(request(both), ("jwt", "api_key"))).method == "jwt"
    assert (await authenticator.authenticate(request(both), ("api_key", "jwt"))).method == (
        "api_key"
    )
    only_key = request({"x-api-key": GOLD_KEY})
    assert (await authenticator.authenticate(only_key, ("jwt", "api_key"))).id == "partner-gold"


async def test_a_bad_first_credential_does_not_fall_through_to_the_next(
    make_auth: MakeAuth,
) -> None:
    authenticator = await make_auth()
    req = request({"Authorization": "Bearer garbage", "x-api-key": GOLD_KEY})

    error = await refused(authenticator, req, ("jwt", "api_key"))

    assert error.detail == "malformed token"


async def test_open_routes_give_an_anonymous_identity(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    identity = await authenticator.authenticate(
        request(peer="203.0.113.7"), ("none",), anonymous_tier="free"
    )
    assert identity == ClientIdentity(id="anon:203.0.113.7", method="anonymous", tier="free")

    behind_proxy = await authenticator.authenticate(
        request(peer="10.0.0.1"), ("jwt", "none"), peer="198.51.100.4"
    )
    assert (behind_proxy.id, behind_proxy.tier) == ("anon:198.51.100.4", None)


async def test_a_none_only_route_ignores_credentials(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    identity = await authenticator.authenticate(
        request({"Authorization": "Bearer garbage"}, peer="203.0.113.7"), ("none",)
    )

    assert identity.method == "anonymous"


@pytest.mark.parametrize(
    ("headers", "methods", "reason"),
    [
        ({"Authorization": "Bearer garbage"}, ("jwt", "none"), "malformed token"),
        ({"x-api-key": "wrong"}, ("api_key", "none"), "unknown API key"),
    ],
)
async def test_a_bad_credential_on_an_open_route_is_still_refused(
    make_auth: MakeAuth, headers: dict[str, str], methods: tuple[str, ...], reason: str
) -> None:
    authenticator = await make_auth()

    error = await refused(authenticator, request(headers, peer="203.0.113.7"), methods)

    assert (error.status, error.detail) == (401, reason)


async def test_an_unknown_method_is_a_configuration_error(make_auth: MakeAuth) -> None:
    authenticator = await make_auth()

    with pytest.raises(ConfigurationError, match="basic"):
        await authenticator.authenticate(request(), ("basic",))


# -- authorization --------------------------------------------------------------------------------

ALICE = ClientIdentity(
    id="alice",
    method="jwt",
    tier="gold",
    roles=frozenset({"ops"}),
    scopes=frozenset({"orders:read", "orders:write"}),
)


def test_authorize_needs_one_role_and_every_scope() -> None:
    authorize(ALICE, ("admin", "ops"), ("orders:read",))
    authorize(ALICE, (), ("orders:read", "orders:write"))
    authorize(ClientIdentity(id="anon:x", method="anonymous"))


@pytest.mark.parametrize(
    ("roles", "scopes", "detail"),
    [
        (("admin", "billing"), (), "needs role admin or billing"),
        (
            (),
            ("orders:read", "refunds:write", "orders:delete"),
            "needs scope orders:delete refunds:write",
        ),
        (("ops",), ("refunds:write",), "needs scope refunds:write"),
    ],
)
def test_authorize_refuses_with_403(
    roles: tuple[str, ...], scopes: tuple[str, ...], detail: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        authorize(ALICE, roles, scopes)

    assert (caught.value.status, caught.value.title, caught.value.detail) == (
        403,
        "Forbidden",
        detail,
    )


# -- what the upstream is told --------------------------------------------------------------------


def test_forwarded_headers_of_a_jwt_caller() -> None:
    identity = ClientIdentity(
        id="alice",
        method="jwt",
        tier="gold",
        roles=frozenset({"ops", "admin"}),
        scopes=frozenset({"orders:write", "orders:read"}),
        claims={"email": "alice@example.test", "mfa": True, "groups": ["a", "b"], "obj": {}},
    )
    forward = {**FORWARD, "email": "x-user-email", "mfa": "x-user-mfa", "groups": "x-groups"}
    forward["obj"] = "x-obj"

    assert forwarded_headers(identity, forward) == {
        "x-user-id": "alice",
        "x-user-roles": "admin ops",
        "x-user-scopes": "orders:read orders:write",
        "x-client-tier": "gold",
        "x-user-email": "alice@example.test",
        "x-user-mfa": "true",
        "x-groups": "a b",
    }


def test_forwarded_headers_of_api_key_and_anonymous_callers() -> None:
    key = ClientIdentity(id="partner-gold", method="api_key", tier="gold")
    anonymous = ClientIdentity(id="anon:203.0.113.7", method="anonymous", tier="free")

    assert forwarded_headers(key, FORWARD) == {"x-user-id": "partner-gold", "x-client-tier": "gold"}
    assert forwarded_headers(anonymous, FORWARD) == {"x-client-tier": "free"}


def test_values_with_control_characters_are_not_forwarded() -> None:
    identity = ClientIdentity(
        id="alice\r\nx-user-roles: admin",
        method="jwt",
        tier="gold\n",
        roles=frozenset({"ops"}),
        claims={"email": "a@example.test\r\nX-Admin: 1", "name": "Al\x00ice"},
    )
    forward = {**FORWARD, "email": "x-user-email", "name": "x-user-name"}

    headers = forwarded_headers(identity, forward)

    assert headers == {"x-user-roles": "ops"}
    assert not any("\r" in v or "\n" in v for v in headers.values())


async def test_a_crlf_claim_in_a_real_token_is_not_forwarded(
    make_auth: MakeAuth, keys: Keys
) -> None:
    authenticator = await make_auth()
    signed = token(keys.rsa_key, email="a@example.test\r\nx-user-id: root", tier="gold\r\n")

    identity = await authenticator.authenticate(bearer(signed), ("jwt",))
    headers = forwarded_headers(identity, {**FORWARD, "email": "x-user-email"})

    assert headers == {"x-user-id": "alice"}


def test_strip_forwarded_removes_spoofed_identity_headers_in_any_case() -> None:
    client = CIMultiDict(
        {
            "X-User-Id": "root",
            "x-user-roles": "admin",
            "X-USER-SCOPES": "*",
            "X-Client-Tier": "platinum",
            "Authorization": "Bearer t",
            "X-Api-Key": "k",
            "Accept": "application/json",
        }
    )

    assert strip_forwarded(client, FORWARD) == {
        "Authorization": "Bearer t",
        "X-Api-Key": "k",
        "Accept": "application/json",
    }


def test_hash_api_key_is_the_configured_form() -> None:
    digest = hash_api_key("secret")

    assert digest == "sha256:" + hashlib.sha256(b"secret").hexdigest()
    assert ApiKeyConfig(id="k", hash=digest).hash == digest


# -- verified tokens remembered -------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens `jwt.decode` checked (signature and claims), in order."""
    checked: list[str] = []
    original = jwt.decode

    def decode(token: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return original(token, *args, **kwargs)

    monkeypatch.setattr("framework.gateway.auth.jwt.decode", decode)
    return checked


async def test_a_verified_token_is_checked_once_then_remembered(
    make_auth: MakeAuth, keys: Keys, decodes: list[str]
) -> None:
    authenticator = await make_auth()
    alice = token(keys.rsa_key)
    first = await authenticator.authenticate(bearer(alice), ("jwt",))
    again = [await authenticator.authenticate(bearer(alice), ("jwt",)) for _ in range(3)]
    assert again == [first, first, first]
    assert decodes == [alice]
    bob = token(keys.rsa_key, sub="bob")
    assert (await authenticator.authenticate(bearer(bob), ("jwt",))).id == "bob"
    assert decodes == [alice, bob]


async def test_a_refused_token_is_not_remembered(
    make_auth: MakeAuth, keys: Keys, decodes: list[str]
) -> None:
    authenticator = await make_auth()
    bad = _tampered(keys)
    for _ in range(2):
        assert (await refused(authenticator, bearer(bad))).status == 401
    assert decodes == [bad, bad]


async def test_a_remembered_token_is_checked_again_once_its_exp_passed(
    make_auth: MakeAuth, keys: Keys, decodes: list[str]
) -> None:
    wall = Clock(now=time.time())
    authenticator = await make_auth(wall_clock=wall, leeway=30)
    alice = token(keys.rsa_key, exp=int(wall.now) + 300)
    await authenticator.authenticate(bearer(alice), ("jwt",))
    wall.advance(300 + 29)  # within the leeway: still valid
    await authenticator.authenticate(bearer(alice), ("jwt",))
    assert len(decodes) == 1
    wall.advance(2)  # past exp + leeway by the wall clock: the full check again
    await authenticator.authenticate(bearer(alice), ("jwt",))
    assert len(decodes) == 2


async def test_a_token_not_valid_yet_is_not_taken_from_the_cache_early(
    make_auth: MakeAuth, keys: Keys, decodes: list[str]
) -> None:
    wall = Clock(now=time.time())
    authenticator = await make_auth(wall_clock=wall, leeway=0)
    soon = token(keys.rsa_key, nbf=int(wall.now) - 1)
    await authenticator.authenticate(bearer(soon), ("jwt",))
    wall.advance(-5)  # the wall clock stepped back before nbf: not from the cache
    await authenticator.authenticate(bearer(soon), ("jwt",))
    assert len(decodes) == 2


async def test_a_rotation_sends_a_remembered_token_through_the_full_check(
    make_auth: MakeAuth, keys: Keys, jwks: Jwks, made: Made, decodes: list[str]
) -> None:
    authenticator = await make_auth(jwks_refresh=60)
    old = token(keys.rsa_key)
    await authenticator.authenticate(bearer(old), ("jwt",))
    await authenticator.authenticate(bearer(old), ("jwt",))
    assert len(decodes) == 1

    jwks.keys = [jwk(keys.rsa_next, "rsa-2")]  # the issuer retires rsa-1
    made.clock.advance(61)  # the key set is stale: a cached token is not trusted on it
    error = await refused(authenticator, bearer(old))
    assert error.detail == "unknown signing key"
    assert jwks.fetches == 2


async def test_the_cache_is_bounded_and_can_be_turned_off(
    make_auth: MakeAuth, keys: Keys, decodes: list[str]
) -> None:
    small = await make_auth(cache_size=2)
    a, b, c = (token(keys.rsa_key, sub=name) for name in ("a", "b", "c"))
    for signed in (a, b, c, c, b, a):  # a was the least recently used when c came
        await small.authenticate(bearer(signed), ("jwt",))
    assert decodes == [a, b, c, a]

    decodes.clear()
    off = await make_auth(cache_size=0)
    for _ in range(3):
        await off.authenticate(bearer(a), ("jwt",))
    assert decodes == [a, a, a]
