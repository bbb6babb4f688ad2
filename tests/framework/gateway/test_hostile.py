"""Hostile clients against a real `msa gateway` process and an upstream that records what it gets.

Each table below holds one hostile request per row, with the answer it must get. A row asserts
the status, that the answer leaks nothing (no traceback, no source path, no credential the
client sent, no upstream address; the gateway's own refusals are `application/problem+json`),
that no `100 Continue` came first, and that the upstream never saw the request: every request
carries a probe id (`?probe=p17`, also `x-probe: p17`) that the recording upstream matches.
Controls (valid requests) must reach it. Requests are written on raw sockets, so nothing tidies
a path or a header on the way.

One gateway process serves the module (`gateway`); slow clients, header limits and HTTP/0.9 use
a second one with short `gateway.limits` (`limits_gateway`), the 500-slow-sockets test a third
(`crowd_gateway`) and the disconnect test its own. Near the end the main gateway is stopped and
its whole stderr read (no traceback for any hostile request); the last test re-checks that no
refused probe reached the upstream since, and prints the counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from framework.errors import SignatureError
from framework.gateway.config import GatewayConfigError, parse_config
from framework.gateway.signing import sign_url, verify_signed_path
from tests.framework.gateway.conftest import ADMIN_HASH, ADMIN_TOKEN, REPO
from tests.framework.gateway.recording_upstream import (
    Answer,
    GatewayProcess,
    Recorded,
    RecordingUpstream,
    exchange,
    read_answer,
)
from tests.framework.gateway.test_auth import AUDIENCE, ISSUER, b64, jwk, token

SIGNING_KEY = "hostile-suite-signing-key-5f0c2a9b7d3e41f6a8c0"
API_KEY = "partner-key-7c1e9a40d2"
API_KEY_HASH = "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
FILES_BASE = "http://files.test/blobs"
SECRETS = (SIGNING_KEY, API_KEY, ADMIN_TOKEN)
"""Never in any answer, whatever the request."""
BAIT = {
    "/attacker/jwks.json": b"",  # filled with the attacker's key set by the `upstream` fixture
    "/attacker/cert.pem": b"-----BEGIN CERTIFICATE-----\nbait\n-----END CERTIFICATE-----\n",
    "/xxe": b"root:x:0:0:bait-from-the-issuer:/root:/bin/sh\n",
    "/dtd": b"<!ENTITY % all \"<!ENTITY leak SYSTEM 'file:///etc/passwd'>\"> %all;",
}
"""Documents a hostile token or XML body points at, on the issuer: the gateway must never fetch
any of them."""
ANY_4XX = tuple(range(400, 500))
_FILE_PATH = re.compile(r"\.py\b|File \"")
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


# -- the suite's counts ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the module sent, read by the last test."""

    sent: Counter[str] = field(default_factory=Counter)
    """Hostile requests by category."""
    refused: int = 0
    """Hostile requests answered with a 4xx or a closed connection."""
    cleaned: int = 0
    """Hostile requests that passed with the hostile part removed (spoofed headers)."""
    controls: int = 0
    tamperings: int = 0
    """Signed URLs altered and checked in-process (not HTTP requests)."""
    slow_sockets: int = 0
    rows_run: int = 0
    refused_probes: set[str] = field(default_factory=set)
    banners: dict[str, list[str]] = field(default_factory=dict)
    """`Server` header values of every answer -> the requests they answered."""


TALLY = Tally()
_probes = itertools.count(1)


def new_probe() -> str:
    return f"p{next(_probes)}"


def note(answer: Answer, label: str) -> Answer:
    """Remember the answer's `Server` header for the banner test; `label` names the request."""
    for banner in answer.values("Server"):
        TALLY.banners.setdefault(banner, []).append(label)
    return answer


# -- keys, tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    issuer_rsa: rsa.RSAPrivateKey
    issuer_ec: ec.EllipticCurvePrivateKey
    attacker_rsa: rsa.RSAPrivateKey
    attacker_ec: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Kit:
    """What a row needs to build its request."""

    keys: Keys
    issuer_url: str

    def token(self, **claims: Any) -> str:
        """A valid token of `alice` (claims given as None are left out)."""
        return token(self.keys.issuer_rsa, **claims)

    def public_pem(self) -> bytes:
        return self.keys.issuer_rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def payload(**changes: Any) -> dict[str, Any]:
    """Valid claims with `changes` applied; a claim changed to None is left out."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def signed_rs(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """RS256 over any header: PyJWT would refuse to write some of the headers tried here."""
    signing_input = _segments(header, claims)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def signed_hs(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """HMAC by hand: PyJWT warns about the short secrets tried here."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    signing_input = _segments(header, claims)
    mac = hmac.new(secret, signing_input.encode(), digest[header["alg"]]).digest()
    return f"{signing_input}.{b64(mac)}"


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_segments(header, claims)}.{b64(signature)}"


def tampered_payload(kit: Kit) -> str:
    header, _, signature = kit.token().split(".")
    return f"{header}.{b64(json.dumps(payload(roles=['admin'])).encode())}.{signature}"


def tampered_header(kit: Kit) -> str:
    _, body, signature = kit.token().split(".")
    return f"{b64(json.dumps({'alg': 'RS256', 'kid': 'ec-1'}).encode())}.{body}.{signature}"


def flipped_signature(kit: Kit) -> str:
    head, _, signature = kit.token().rpartition(".")
    return f"{head}.{('A' if signature[0] != 'A' else 'B')}{signature[1:]}"


# -- raw requests ----------------------------------------------------------------------------------


def _line(header: str | bytes) -> bytes:
    return header if isinstance(header, bytes) else header.encode()


def http(
    method: str,
    path: str,
    probe: str,
    *headers: str | bytes,
    body: bytes = b"",
    host: str | None = "gw.test",
    close: bool = True,
) -> bytes:
    """One HTTP/1.1 request, byte for byte: `path` gets `probe=<probe>` in its query, the
    headers get `x-probe`, `Host` (unless None), `Content-Length` for a body (unless a framing
    header is given) and `Connection: close` (unless `close=False` or one is given)."""
    target = f"{path}{'&' if '?' in path else '?'}probe={probe}"
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]  # "\xff" in a path: the byte
    if host is not None:
        lines.append(f"Host: {host}".encode())
    lines.append(f"x-probe: {probe}".encode())
    lines += [_line(h) for h in headers]
    names = {line.split(b":", 1)[0].strip().lower() for line in lines[1:]}
    if body and not names & {b"content-length", b"transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}".encode())
    if close and b"connection" not in names:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def bearer(value: str | bytes) -> bytes:
    return b"Authorization: Bearer " + _line(value)


def credentials_in(request: bytes) -> list[str]:
    """The credentials a request carries (bearer tokens, API keys, cookie values), as latin-1."""
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    found = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "authorization":
            found.append(value.partition(" ")[2] or value)
        elif name in ("x-api-key", "x-admin-token"):
            found.append(value)
        elif name == "cookie":
            found += [part.partition("=")[2] for part in value.split(";")]
    return [secret.strip() for secret in found if len(secret.strip()) >= 8]


# -- what every answer must (not) hold ----------------------------------------------------------


def assert_leaks_nothing(answer: Answer, request: bytes, upstream: RecordingUpstream) -> None:
    text = answer.raw.decode("latin-1")
    assert "Traceback" not in text, text[:2000]
    assert not _FILE_PATH.search(text), text[:2000]
    for secret in (*SECRETS, *credentials_in(request)):
        assert secret not in text, f"the answer holds a credential the client sent: {text[:500]}"
    for port in (upstream.port, upstream.issuer_port):
        for host in ("127.0.0.1", "localhost"):
            assert f"{host}:{port}" not in text, f"the answer names an upstream: {text[:500]}"


Answerer = Literal["gateway", "parser", "either"]
"""Who may answer a refusal: the gateway itself (a problem document), aiohttp's HTTP parser or the
connection guard before a request is parsed (any short body), or either."""


def assert_refused(
    answer: Answer,
    request: bytes,
    probe: str,
    upstream: RecordingUpstream,
    *,
    expect: tuple[int, ...],
    answered_by: Answerer = "gateway",
    closed_ok: bool = False,
    challenge: bool = False,
) -> None:
    if answer.status is None or 400 <= answer.status < 500:
        TALLY.refused += 1
        TALLY.refused_probes.update((probe, f"{probe}-inner"))
    if answer.status is None and closed_ok:
        assert answer.raw == b"", f"not an HTTP answer (HTTP/0.9?): {answer.raw[:300]!r}"
    else:
        assert answer.status in expect, (
            f"expected {expect if len(expect) < 5 else 'a 4xx'}, got {answer.status}: "
            f"{answer.raw[:600]!r}"
        )
    assert not answer.interim, f"{answer.interim} before the refusal (100 Continue)"
    if answered_by == "gateway" or (
        answered_by == "either" and answer.content_type == "application/problem+json"
    ):
        assert answer.content_type == "application/problem+json", answer.raw[:600]
        assert answer.json()["status"] == answer.status
    if challenge:
        assert answer.header("WWW-Authenticate"), answer.raw[:600]
    assert_leaks_nothing(answer, request, upstream)
    assert not upstream.saw(probe), f"the upstream saw it: {upstream.with_probe(probe)}"
    assert not upstream.saw(f"{probe}-inner"), "a request smuggled inside it reached the upstream"
    for path in BAIT:
        assert upstream.fetches(path) == 0, f"the gateway fetched {path} for a client"


# -- fixtures: the recording upstream and the gateway processes ------------------------------------


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        issuer_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        issuer_ec=ec.generate_private_key(ec.SECP256R1()),
        attacker_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        attacker_ec=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture(scope="module")
def upstream(keys: Keys) -> Iterator[RecordingUpstream]:
    bait = {
        **BAIT,
        "/attacker/jwks.json": json.dumps({"keys": [jwk(keys.attacker_rsa, "attacker")]}).encode(),
    }
    recording = RecordingUpstream(
        jwks={"keys": [jwk(keys.issuer_rsa, "rsa-1"), jwk(keys.issuer_ec, "ec-1")]}, bait=bait
    )
    recording.start()
    try:
        yield recording
    finally:
        recording.stop()


@pytest.fixture(scope="module")
def kit(keys: Keys, upstream: RecordingUpstream) -> Kit:
    return Kit(keys=keys, issuer_url=upstream.issuer_url)


def gateway_config(
    upstream: RecordingUpstream, *, limits: str | None = None, max_concurrency: int = 1000
) -> str:
    """The suite's gateway: one route of each kind the hostile requests aim at."""
    limits_line = f"  limits: {limits}\n" if limits is not None else ""
    return f"""\
gateway:
  name: hostile
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
  max_body: 4096
  max_concurrency: {max_concurrency}
  signing_key: "{SIGNING_KEY}"
{limits_line}auth:
  jwt:
    jwks_url: "{upstream.issuer_url}/.well-known/jwks.json"
    issuer: "{ISSUER}"
    audience: "{AUDIENCE}"
    cookie: session
  api_keys: [{{id: partner, hash: "{API_KEY_HASH}", roles: [partner]}}]
upstreams:
  shop: {{targets: ["{upstream.url}"]}}
routes:
  - name: alive-by-name        # an exact route may name an internal path on purpose
    match: {{methods: [GET], path: /alive}}
    upstream: shop
  - name: cart                 # jwt, strip_prefix
    match: {{path: /api/cart, prefix: true}}
    auth: jwt
    upstream: shop
    strip_prefix: /api
  - name: admin-stock          # jwt with a role
    match: {{path: /api/admin, prefix: true}}
    auth: jwt
    roles: [admin]
    upstream: shop
    strip_prefix: /api
  - name: products             # rewrite
    match: {{path: /api/products, prefix: true}}
    upstream: shop
    rewrite: "/products/{{tail}}"
  - name: pages                # rewrite to the upstream's root
    match: {{methods: [GET], path: /pages, prefix: true}}
    upstream: shop
    rewrite: "/{{tail}}"
  - name: svc                  # strip_prefix to the upstream's root
    match: {{path: /svc, prefix: true}}
    upstream: shop
    strip_prefix: /svc
  - name: partner              # api_key
    match: {{path: /partner, prefix: true}}
    auth: api_key
    upstream: shop
  - name: xml-orders           # XML in, JSON to the upstream
    match: {{methods: [POST], path: /api/xml-orders}}
    upstream: shop
    max_body: 16384
    transform: {{request_format: application/json}}
  - name: files                # signed URLs
    match: {{methods: [GET, PUT], path: /api/files, prefix: true}}
    auth: jwt
    files: {{base_url: "{FILES_BASE}", ttl: 60}}
  - name: open
    match: {{path: /open, prefix: true}}
    upstream: shop
  - name: storefront           # the catch-all
    match: {{path: /, prefix: true}}
    upstream: shop
"""


@pytest.fixture(scope="module")
def gateway(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("hostile")
    process = GatewayProcess.start(gateway_config(upstream), directory, name="main")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def limits_gateway(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Short timeouts and small header limits, so slow-client tests await them."""
    config = gateway_config(
        upstream,
        limits="{header_timeout: 1, body_timeout: 1, max_header_bytes: 16384, max_headers: 50}",
        max_concurrency=16,
    )
    process = GatewayProcess.start(config, tmp_path_factory.mktemp("limits"), name="limits")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def crowd_gateway(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """16 concurrency slots and timeouts long enough that 500 slow sockets stay open."""
    config = gateway_config(
        upstream, limits="{header_timeout: 30, body_timeout: 30}", max_concurrency=16
    )
    process = GatewayProcess.start(config, tmp_path_factory.mktemp("crowd"), name="crowd")
    try:
        yield process
    finally:
        process.stop()


# -- the tables ------------------------------------------------------------------------------------

Build = Callable[[Kit, str], bytes]
"""(kit, probe id) -> the raw request."""


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hostile request and the answer it must get."""

    name: str
    build: Build
    expect: tuple[int, ...]
    answered_by: Answerer = "gateway"
    closed_ok: bool = False
    """A connection closed without an answer is a refusal too."""
    challenge: bool = False
    """A 401 that must carry `WWW-Authenticate`."""
    after_interim: bytes = b""
    """What to send if the server (wrongly) says `100 Continue` first."""


def params(rows: list[Hostile]) -> list[Any]:
    return [pytest.param(row, id=row.name) for row in rows]


async def run_hostile(
    row: Hostile,
    category: str,
    port: int,
    kit: Kit,
    upstream: RecordingUpstream,
    *,
    sentinel: bool = False,
) -> Answer:
    TALLY.rows_run += 1
    TALLY.sent[category] += 1
    probe = new_probe()
    request = row.build(kit, probe)
    follow = None
    if sentinel:  # a last request on the same connection: anything smuggled is handled by then
        follow = http("GET", "/open/sentinel", f"{probe}-sentinel")
    answer = await exchange(port, request, after_interim=row.after_interim, sentinel=follow)
    note(answer, f"{category}: {row.name}")
    assert_refused(
        answer,
        request,
        probe,
        upstream,
        expect=row.expect,
        answered_by=row.answered_by,
        closed_ok=row.closed_ok,
        challenge=row.challenge,
    )
    return answer


# JWT forgery: every row is a GET on the jwt + strip_prefix route, answered 401 with a challenge.

Token = Callable[[Kit], str | bytes]
NOW = int(time.time())
RS_HEADER = b64(b'{"alg":"RS256","kid":"rsa-1"}')


def _none(**header: Any) -> Token:
    return lambda k: unsigned(header, payload())


def _attacker(**header: Any) -> Token:
    """RS256 signed with the attacker's key, under `header`."""
    return lambda k: signed_rs({"alg": "RS256", **header}, payload(), k.keys.attacker_rsa)


def _issuer_signed(**header: Any) -> Token:
    """RS256 signed with the issuer's own key, under an odd `header`."""
    return lambda k: signed_rs({"alg": "RS256", **header}, payload(), k.keys.issuer_rsa)


def _claims(**claims: Any) -> Token:
    """Signed by the issuer, but with claims it must not accept."""
    return lambda k: signed_rs(
        {"alg": "RS256", "kid": "rsa-1"}, payload(**claims), k.keys.issuer_rsa
    )


def _pointing(field_name: str, path: str, kid: str = "attacker") -> Token:
    """The attacker's token naming where its key is (`jku`, `x5u`) on the issuer's host."""
    return lambda k: signed_rs(
        {"alg": "RS256", "kid": kid, field_name: f"{k.issuer_url}{path}"},
        payload(),
        k.keys.attacker_rsa,
    )


def _key(key: str, **options: Any) -> Token:
    """`token()` signed by one of the keys in `Keys`."""
    return lambda k: token(getattr(k.keys, key), **options)


def _hs_public(alg: str, form: str = "pem", kid: str | None = "rsa-1") -> Token:
    """HS* keyed with the issuer's public key (the RS/HS confusion)."""

    def make(k: Kit) -> str:
        public = k.keys.issuer_rsa.public_key()
        secret = {
            "pem": k.public_pem(),
            "der": public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "n": jwk(k.keys.issuer_rsa, "rsa-1")["n"].encode(),
        }[form]
        header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
        return signed_hs(header, payload(roles=["admin"]), secret)

    return make


def _hs(secret: bytes, **header: Any) -> Token:
    return lambda k: signed_hs({"alg": "HS256", **header}, payload(), secret)


def _valid_with(make: Callable[[bytes], bytes]) -> Token:
    """A valid token, changed by `make`."""
    return lambda k: make(k.token().encode())


def _other_signature(k: Kit) -> str:
    return k.token(sub="bob").rpartition(".")[0] + "." + k.token().rpartition(".")[2]


JWT_CASES: list[tuple[str, Token]] = [
    # alg none and friends
    ("alg none", _none(alg="none", typ="JWT")),
    ("alg None", _none(alg="None")),
    ("alg NONE", _none(alg="NONE")),
    ("alg nOnE", _none(alg="nOnE")),
    ("alg none, kid of the issuer", _none(alg="none", kid="rsa-1")),
    ("alg none with a signature", lambda k: unsigned({"alg": "none"}, payload(), b"sig")),
    ("alg missing", _none(kid="rsa-1")),
    ("alg empty", _none(alg="", kid="rsa-1")),
    ("alg null", _none(alg=None, kid="rsa-1")),
    ("alg a list", _none(alg=["RS256"], kid="rsa-1")),
    # HS/RS key confusion
    ("HS256 keyed with the issuer's public PEM", _hs_public("HS256")),
    ("HS256 keyed with the public PEM, no kid", _hs_public("HS256", kid=None)),
    ("HS384 keyed with the public PEM", _hs_public("HS384")),
    ("HS512 keyed with the public PEM", _hs_public("HS512")),
    ("HS256 keyed with the public DER", _hs_public("HS256", "der")),
    ("HS256 keyed with the JWK modulus", _hs_public("HS256", "n")),
    # foreign keys, keys that do not fit the algorithm
    ("foreign RSA key under the issuer's kid", _attacker(kid="rsa-1")),
    ("foreign RSA key under its own kid", _attacker(kid="attacker")),
    ("foreign EC key under the issuer's EC kid", _key("attacker_ec", kid="ec-1", alg="ES256")),
    ("issuer's EC key under the RSA kid", _key("issuer_ec", kid="rsa-1", alg="ES256")),
    ("issuer's RSA key under the EC kid", _key("issuer_rsa", kid="ec-1")),
    ("RS256 without a kid", _key("issuer_rsa", kid=None)),
    ("PS256 with the issuer's key", _key("issuer_rsa", alg="PS256")),
    ("RS512 with the issuer's key", _key("issuer_rsa", alg="RS512")),
    # kid injection
    ("kid ../../../../dev/null, HS256 empty key", _hs(b"", kid="../../../../dev/null")),
    ("kid /dev/null", _attacker(kid="/dev/null")),
    ("kid ../../etc/passwd", _attacker(kid="../../../../../../etc/passwd")),
    ("kid SQL union, HS256 keyed 'secret'", _hs(b"secret", kid="x' UNION SELECT 'secret' -- ")),
    ("kid SQL or-true", _attacker(kid="' OR '1'='1")),
    ("kid shell substitution", _attacker(kid="$(touch /tmp/pwned)|id")),
    ("kid a URL", lambda k: _attacker(kid=f"{k.issuer_url}/attacker/jwks.json")(k)),
    ("kid with a NUL", _attacker(kid="rsa-1\u0000x")),
    ("kid with CR LF", _attacker(kid="rsa-1\r\nx-user-roles: admin")),
    ("kid a number", _attacker(kid=1)),
    ("kid a list", _issuer_signed(kid=["rsa-1"])),
    ("kid an object", _issuer_signed(kid={"$ne": None})),
    ("kid of 4,000 characters", _attacker(kid="k" * 4000)),
    # keys the token points at or carries
    ("jku to the attacker's key set", _pointing("jku", "/attacker/jwks.json")),
    ("jku with the issuer's kid", _pointing("jku", "/attacker/jwks.json", kid="rsa-1")),
    ("x5u to the attacker's certificate", _pointing("x5u", "/attacker/cert.pem")),
    ("embedded jwk", lambda k: _attacker(kid="attacker", jwk=jwk(k.keys.attacker_rsa, "a"))(k)),
    ("embedded x5c", _attacker(x5c=["MIIB" + "A" * 200])),
    # claims
    ("expired an hour ago", _claims(exp=NOW - 3600, iat=NOW - 7200)),
    ("expired two minutes ago (past the leeway)", _claims(exp=NOW - 120, iat=NOW - 600)),
    ("nbf an hour ahead", _claims(nbf=NOW + 3600)),
    ("iat an hour ahead", _claims(iat=NOW + 3600)),
    ("wrong issuer", _claims(iss="https://evil.example")),
    ("issuer with a trailing slash", _claims(iss=ISSUER + "/")),
    ("no issuer", _claims(iss=None)),
    ("wrong audience", _claims(aud="another-api")),
    ("audience list without ours", _claims(aud=["a", "b"])),
    ("no audience", _claims(aud=None)),
    ("no exp", _claims(exp=None)),
    ("no sub", _claims(sub=None)),
    ("empty sub", _claims(sub="")),
    ("sub a number", _claims(sub=42)),
    ("sub with CR LF", _claims(sub="alice\r\nx-user-roles: admin")),
    ("sub of 5,000 characters", _claims(sub="a" * 5000)),
    # tampering
    ("payload changed, signature kept", tampered_payload),
    ("header changed, signature kept", tampered_header),
    ("signature stripped", lambda k: k.token().rpartition(".")[0] + "."),
    ("signature of another token", _other_signature),
    ("signature with a flipped character", flipped_signature),
    # garbage
    ("garbage 'abc'", lambda k: "abc"),
    ("garbage 'a.b.c'", lambda k: "a.b.c"),
    ("garbage '..'", lambda k: ".."),
    ("garbage '....'", lambda k: "...."),
    ("header only", lambda k: RS_HEADER),
    ("header not JSON", lambda k: f"{b64(b'not json')}.{b64(b'{}')}.c2ln"),
    ("payload not JSON", lambda k: f"{RS_HEADER}.{b64(b'[[[')}.c2ln"),
    ("6,000 characters of base64", lambda k: base64.urlsafe_b64encode(os.urandom(4500))),
    ("bearer with spaces inside", lambda k: "a b c"),
    # bytes that are not UTF-8
    ("non-UTF-8 token", lambda k: b"\xff\xfe\xfd\xfc-not-utf8"),
    ("valid token then a 0x80 byte", _valid_with(lambda t: t + b"\x80")),
    ("non-UTF-8 in every segment", lambda k: b"\xc3\x28.\xa0\xa1.\xe2\x28\xa1"),
    ("non-UTF-8 inside a valid signature", _valid_with(lambda t: t[:-10] + b"\xc0\xae" + t[-8:])),
]
OTHER_CREDENTIALS: list[tuple[str, Callable[[Kit], bytes]]] = [
    ("empty bearer", lambda k: b"Authorization: Bearer"),
    ("Basic scheme", lambda k: b"Authorization: Basic " + base64.b64encode(b"alice:pass-word")),
    ("Digest scheme", lambda k: b'Authorization: Digest username="alice", response="0123abcd"'),
    ("non-UTF-8 without a scheme", lambda k: b"Authorization: \xff\xfe\xfd\xfc"),
    ("Basic scheme with non-UTF-8", lambda k: b"Authorization: Basic \xff\xfe\xfd\xfc\xfb"),
    ("cookie: alg none", lambda k: b"Cookie: session=" + _line(_none(alg="none")(k))),
    ("cookie: foreign key", lambda k: b"Cookie: session=" + _line(_attacker(kid="rsa-1")(k))),
    ("cookie: expired", lambda k: b"Cookie: session=" + _line(_claims(exp=NOW - 3600)(k))),
    ("cookie: non-UTF-8", lambda k: b"Cookie: session=\xff\xfe\xfd\xfc-not-utf8"),
]


def _on_cart(credential: Callable[[Kit], bytes]) -> Build:
    return lambda kit, probe: http("GET", "/api/cart/items", probe, credential(kit))


def _bearer_of(make: Token) -> Callable[[Kit], bytes]:
    return lambda kit: bearer(make(kit))


JWT_ROWS = [
    Hostile(name, _on_cart(_bearer_of(make)), (401,), challenge=True) for name, make in JWT_CASES
] + [Hostile(name, _on_cart(line), (401,), challenge=True) for name, line in OTHER_CREDENTIALS]


@pytest.mark.parametrize("row", params(JWT_ROWS))
async def test_forged_and_broken_tokens_get_401(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "jwt", gateway.port, kit, upstream)


# Authorization: a valid identity without the route's role, or a role claimed some other way.


def role(name: str, *headers: str, claims: dict[str, Any] | None = None) -> Hostile:
    """A GET on the route that needs role admin: 403 with a token, 401 without one."""

    def build(kit: Kit, probe: str) -> bytes:
        credential = [] if claims is None else [bearer(kit.token(**claims))]
        return http("GET", "/api/admin/stock", probe, *credential, *headers)

    if claims is None:
        return Hostile(name, build, (401,), challenge=True)
    return Hostile(name, build, (403,))


ROLE_ROWS = [
    role("valid token without roles", claims={}),
    role("role user", claims={"roles": ["user"]}),
    role("role ADMIN (case)", claims={"roles": ["ADMIN"]}),
    role("role 'admin x' as one name", claims={"roles": ["admin x"]}),
    role("role 'admin' with a newline", claims={"roles": ["admin\n"]}),
    role("role administrator", claims={"roles": "administrator"}),
    role("roles an object", claims={"roles": {"admin": True}}),
    role("claim 'role' instead of 'roles'", claims={"role": "admin"}),
    role("scope admin, no role", claims={"scope": "admin"}),
    role("nested realm_access roles", claims={"realm_access": {"roles": ["admin"]}}),
    role("non-admin token + x-user-roles: admin", "x-user-roles: admin", claims={}),
    role(
        "non-admin token + X-User-Roles, x-user-id",
        "X-User-Roles: admin",
        "x-user-id: root",
        claims={},
    ),
    role("no token + x-user-roles: admin", "x-user-roles: admin", "x-user-id: alice"),
    role("a valid API key on a jwt-only route", f"x-api-key: {API_KEY}"),
]


@pytest.mark.parametrize("row", params(ROLE_ROWS))
async def test_a_role_is_only_what_the_verified_token_says(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "roles", gateway.port, kit, upstream)


# Credentials and Host given twice: which one counts is ambiguous, so the request is refused.

Line = Callable[[Kit], bytes]


def _fixed(line: bytes) -> Line:
    return lambda kit: line


def _valid(kit: Kit) -> bytes:
    return bearer(kit.token())


def _alg_none(kit: Kit) -> bytes:
    return bearer(unsigned({"alg": "none"}, payload(roles=["admin"])))


def _bob(kit: Kit) -> bytes:
    return b"authorization: Bearer " + kit.token(sub="bob").encode()


def _session(sub: str) -> Line:
    return lambda kit: f"Cookie: session={kit.token(sub=sub)}".encode()


def _session_twice(kit: Kit) -> bytes:
    forged = unsigned({"alg": "none"}, payload(roles=["admin"]))
    return f"Cookie: session={kit.token()}; session={forged}".encode()


KEY, WRONG_KEY = f"x-api-key: {API_KEY}".encode(), b"x-api-key: wrong-key-000000"
CART, PARTNER = "/api/cart/items", "/partner/orders"


def twice(name: str, path: str, *lines: Line, answered_by: Answerer = "gateway") -> Hostile:
    def build(kit: Kit, probe: str) -> bytes:
        return http("GET", path, probe, *[line(kit) for line in lines])

    return Hostile(name, build, (400,), answered_by)


DUPLICATE_ROWS = [
    twice("two Authorization: valid, then alg none", CART, _valid, _alg_none),
    twice("two Authorization: alg none, then valid", CART, _alg_none, _valid),
    twice("two Authorization: the same valid token", CART, _valid, _valid),
    twice("Authorization and authorization", CART, _valid, _bob),
    twice("two x-api-key: valid, then wrong", PARTNER, _fixed(KEY), _fixed(WRONG_KEY)),
    twice("two x-api-key: wrong, then valid", PARTNER, _fixed(WRONG_KEY), _fixed(KEY)),
    twice("two Cookie headers with a session each", CART, _session("alice"), _session("bob")),
    twice("two Cookie headers, one a session", CART, _fixed(b"Cookie: theme=dark"), _session("a")),
    twice("the session cookie twice in one header", CART, _session_twice),
    # aiohttp's parser refuses a second Host itself: its own 400 is allowed.
    twice("two Host: open route", "/open/x", _fixed(b"Host: evil.example"), answered_by="either"),
    twice("two Host: jwt route", CART, _valid, _fixed(b"Host: evil.example"), answered_by="either"),
]


@pytest.mark.parametrize("row", params(DUPLICATE_ROWS))
async def test_credentials_or_host_given_twice_get_400(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "duplicates", gateway.port, kit, upstream)


# Spoofed identity, forwarding and tracing headers: the request passes, the spoof does not.

Check = Callable[[Recorded], None]


@dataclass(frozen=True, slots=True)
class Spoof:
    name: str
    build: Build
    check: Check
    """Asserts what the upstream received."""


def only(name: str, value: str) -> Check:
    def check(record: Recorded) -> None:
        assert record.values(name) == [value], f"{name}: {record.values(name)}"

    return check


def never(name: str, *spoofs: str) -> Check:
    def check(record: Recorded) -> None:
        for value in record.values(name):
            assert not any(s in value for s in spoofs), f"{name}: {value!r} reached the upstream"

    return check


def all_of(*checks: Check) -> Check:
    def check(record: Recorded) -> None:
        for each in checks:
            each(record)

    return check


def _cart(*headers: str | bytes, claims: dict[str, Any] | None = None) -> Build:
    return lambda kit, probe: http(
        "GET", CART, probe, bearer(kit.token(**(claims or {}))), *headers
    )


def _gateway_headers(record: Recorded) -> None:
    assert record.values("x-user-id") == ["alice"], record.values("x-user-id")
    assert record.values("x-user-roles") == ["admin"], record.values("x-user-roles")
    assert len(record.values("x-gtxid")) == 1, record.values("x-gtxid")
    assert record.values("x-gtxid")[0]
    _valid_traceparent(record)
    assert record.values("X-Forwarded-For") == ["127.0.0.1"], record.values("X-Forwarded-For")
    assert not record.values("Connection"), record.values("Connection")


def _new_gtxid(record: Recorded) -> None:
    assert len(record.values("x-gtxid")) == 1, record.values("x-gtxid")
    assert record.values("x-gtxid")[0] not in ("../../etc passwd", "")


def _valid_traceparent(record: Recorded) -> None:
    assert len(record.values("traceparent")) == 1, record.values("traceparent")
    assert _TRACEPARENT.fullmatch(record.values("traceparent")[0]), record.values("traceparent")


NAMED_BY_CONNECTION = (
    "Connection: close, x-user-id, x-user-roles, x-gtxid, traceparent, X-Forwarded-For"
)
XFF = "X-Forwarded-For"

SPOOF_ROWS = [
    Spoof("x-user-id: admin", _cart("x-user-id: admin"), only("x-user-id", "alice")),
    Spoof("X-USER-ID: admin (case)", _cart("X-USER-ID: admin"), only("x-user-id", "alice")),
    Spoof("x-user-roles: admin", _cart("x-user-roles: admin"), never("x-user-roles", "admin")),
    Spoof("x-user-scopes", _cart("x-user-scopes: orders:write"), never("x-user-scopes", "orders")),
    Spoof("x-client-tier: gold", _cart("x-client-tier: gold"), never("x-client-tier", "gold")),
    Spoof("XFF: another address", _cart(f"{XFF}: 203.0.113.9"), only(XFF, "127.0.0.1")),
    Spoof("XFF: a list", _cart(f"{XFF}: 127.0.0.1, 203.0.113.9"), only(XFF, "127.0.0.1")),
    Spoof(
        "XFF twice", _cart(f"{XFF}: 203.0.113.9", f"{XFF}: 198.51.100.7"), only(XFF, "127.0.0.1")
    ),
    Spoof(
        "X-Forwarded-Host",
        _cart("X-Forwarded-Host: evil.example"),
        only("X-Forwarded-Host", "gw.test"),
    ),
    Spoof(
        "X-Forwarded-Proto", _cart("X-Forwarded-Proto: https"), only("X-Forwarded-Proto", "http")
    ),
    Spoof(
        "Forwarded: for, proto, host",
        _cart("Forwarded: for=203.0.113.9;proto=https;host=evil.example"),
        never("Forwarded", "203.0.113.9", "evil.example"),
    ),
    Spoof("X-Real-IP", _cart("X-Real-IP: 203.0.113.9"), never("X-Real-IP", "203.0.113.9")),
    Spoof(
        "identity headers on an open route",
        lambda k, p: http("GET", "/open/x", p, "x-user-id: admin", "x-user-roles: admin"),
        all_of(never("x-user-id", "admin"), never("x-user-roles", "admin")),
    ),
    Spoof(
        "x-user-id on an API-key route",
        lambda k, p: http("GET", PARTNER, p, KEY, "x-user-id: admin"),
        only("x-user-id", "partner"),
    ),
    Spoof(
        "Connection naming the gateway's own headers",
        _cart(NAMED_BY_CONNECTION, claims={"roles": ["admin"]}),
        _gateway_headers,
    ),
    Spoof(
        "Connection naming a client header",
        _cart("Connection: close, x-secret", "x-secret: s3cr3t"),
        never("x-secret", "s3cr3t"),
    ),
    Spoof(
        "Connection naming XFF, plus a spoofed XFF",
        _cart(f"Connection: keep-alive, {XFF}", f"{XFF}: 203.0.113.9"),
        only(XFF, "127.0.0.1"),
    ),
    Spoof("x-gtxid that is not an id", _cart("x-gtxid: ../../etc passwd"), _new_gtxid),
    Spoof("traceparent garbage", _cart("traceparent: 00-zzzz-\u00e9-01"), _valid_traceparent),
    Spoof(
        "Proxy-Authorization",
        _cart("Proxy-Authorization: Basic YWRtaW46YWRtaW4="),
        never("Proxy-Authorization", "Basic"),
    ),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in SPOOF_ROWS])
async def test_spoofed_headers_never_reach_the_upstream_as_sent(
    row: Spoof, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    TALLY.rows_run += 1
    TALLY.sent["spoofing"] += 1
    probe = new_probe()
    answer = note(await exchange(gateway.port, row.build(kit, probe)), f"spoofing: {row.name}")
    assert answer.status == 200, answer.raw[:600]
    TALLY.cleaned += 1
    seen = upstream.with_probe(probe)
    assert len(seen) == 1, seen
    row.check(seen[0])


# Bytes that are not UTF-8 in headers other than credentials: a 4xx, or they pass; never a 5xx.


def _open(*headers: str | bytes, path: str = "/open/bytes", method: str = "GET") -> Build:
    return lambda kit, probe: http(method, path, probe, *headers)


NON_UTF8_ROWS: list[tuple[str, Build]] = [
    ("User-Agent", _open(b"User-Agent: \xff\xfe")),
    ("a custom header in latin-1", _open(b"X-Custom: caf\xe9")),
    ("Accept", _open(b"Accept: \xff")),
    ("Accept-Encoding", _open(b"Accept-Encoding: gzip\xff")),
    ("Accept-Language", _open(b"Accept-Language: \xc3\x28")),
    ("Origin", _open(b"Origin: http://\xff.example")),
    ("Referer", _open(b"Referer: http://x.example/\xff")),
    ("Cookie on an open route", _open(b"Cookie: a=\xff\xfe")),
    ("Host", lambda k, p: http("GET", "/open/bytes", p, b"Host: gw\xff.test", host=None)),
    ("x-gtxid", _open(b"x-gtxid: \xff\xfe")),
    ("traceparent", _open(b"traceparent: 00-\xff\xfe")),
    ("X-Forwarded-For", _open(b"X-Forwarded-For: \xff\xfe")),
    ("x-user-id", _open(b"x-user-id: \xff\xfe")),
    ("If-None-Match", _open(b'If-None-Match: "\xff"')),
    ("Range", _open(b"Range: bytes=\xff")),
    ("Connection naming a non-UTF-8 header", _open(b"Connection: close, x-\xff")),
    ("a header name", _open(b"X-\xff\xfe: 1")),
    ("Authorization on an open route", _open(b"Authorization: Bearer \xff\xfe")),
    ("x-api-key", _open(b"x-api-key: \xff\xfe\xfd\xfc\xfb", path=PARTNER)),
    ("the path", _open(path="/open/\xff\xfe")),
    (
        "Content-Type of an XML body",
        lambda k, p: http(
            "POST", "/api/xml-orders", p, b"Content-Type: application/\xff", body=b"<o>1</o>"
        ),
    ),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=n) for n, b in NON_UTF8_ROWS])
async def test_non_utf8_bytes_never_give_a_5xx(
    build: Build, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    TALLY.rows_run += 1
    TALLY.sent["non-UTF-8 headers"] += 1
    probe = new_probe()
    request = build(kit, probe)
    answer = note(await exchange(gateway.port, request), "non-UTF-8 headers")
    assert answer.status is None or answer.status < 500, answer.raw[:600]
    if answer.status is None or answer.status >= 400:
        assert_refused(
            answer, request, probe, upstream, expect=ANY_4XX, answered_by="either", closed_ok=True
        )
    else:
        TALLY.cleaned += 1


# Traversal spellings on every route kind: 400 (or 404), never forwarded.

SPELLINGS: list[tuple[str, str]] = [
    ("..", "../private/x"),
    (".", "./private/x"),
    ("..;", "..;/private/x"),
    (".;x", ".;x/private/x"),
    ("..;x", "..;x/private/x"),
    ("%2e%2e", "%2e%2e/private/x"),
    ("%2E%2e", "%2E%2e/private/x"),
    (".%2e", ".%2e/private/x"),
    ("%2e%2e;", "%2e%2e;/private/x"),
    ("..%3b", "..%3b/private/x"),
    ("%2f", "..%2fprivate%2fx"),
    ("%2F", "..%2Fprivate%2Fx"),
    ("%5c", "..%5cprivate%5cx"),
    ("backslash", "..\\private\\x"),
    ("%00", "private%00/x"),
    ("%252e%252e", "%252e%252e/private/x"),
    ("%252f", "..%252fprivate%252fx"),
    ("%c0%ae%c0%ae", "%c0%ae%c0%ae/private/x"),
]
ROUTE_KINDS: list[tuple[str, str, bool]] = [  # (kind, prefix, needs a token)
    ("strip_prefix", "/api/cart", True),
    ("rewrite", "/api/products", False),
    ("catch-all", "", False),
    ("files", "/api/files", True),
]


def _traversal(prefix: str, tail: str, with_token: bool) -> Build:
    def build(kit: Kit, probe: str) -> bytes:
        credential = [bearer(kit.token())] if with_token else []
        return http("GET", f"{prefix}/{tail}", probe, *credential)

    return build


PATH_ROWS = [
    Hostile(f"{kind}: {label}", _traversal(prefix, tail, token_needed), (400, 404))
    for kind, prefix, token_needed in ROUTE_KINDS
    for label, tail in SPELLINGS
]


@pytest.mark.parametrize("row", params(PATH_ROWS))
async def test_traversal_spellings_are_refused_on_every_route_kind(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "paths", gateway.port, kit, upstream)


# An upstream's internal endpoints are not forwarded by prefix routes (an exact route may name
# one: see the controls).


def internal(path: str, expect: tuple[int, ...] = (404,), method: str = "GET") -> Hostile:
    return Hostile(f"{method} {path}", _open(path=path, method=method), expect)


INTERNAL_ROWS = [
    internal("/metrics"),
    internal("/metrics/"),
    internal("/metrics?format=prometheus"),
    internal("/metrics", method="POST"),
    internal("/ready"),
    internal("/ready/"),
    internal("/alive/x"),  # only /alive itself is named by an exact route
    internal("/docs"),
    internal("/docs/"),
    internal("/docs/openapi.json"),
    internal("/%6detrics", (400, 404)),  # an encoded m
    internal("//metrics", (400, 404)),
    internal("/svc/metrics"),  # strip_prefix /svc
    internal("/svc/ready"),
    internal("/svc/alive"),
    internal("/svc/docs/openapi.json"),
    internal("/pages/metrics"),  # rewrite /{tail}
    internal("/pages/docs/index.html"),
]


@pytest.mark.parametrize("row", params(INTERNAL_ROWS))
async def test_prefix_routes_do_not_forward_internal_endpoints(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "internal paths", gateway.port, kit, upstream)


# Request smuggling shapes: a 4xx (aiohttp's parser may answer itself) or a closed connection;
# neither the request nor a request smuggled inside it is forwarded.


def _inner(probe: str) -> bytes:
    return (
        f"GET /open/inner?probe={probe}-inner HTTP/1.1\r\nHost: gw.test\r\n"
        f"x-probe: {probe}-inner\r\n\r\n"
    ).encode()


def _zero_then_inner(probe: str) -> bytes:
    return b"0\r\n\r\n" + _inner(probe)


def _hello_then_inner(probe: str) -> bytes:
    return b"hello" + _inner(probe)


def smuggled(name: str, *headers: bytes, body: bytes | Callable[[str], bytes] = b"") -> Hostile:
    """A POST on the open route with these framing headers and body."""

    def build(kit: Kit, probe: str) -> bytes:
        head = f"POST /open/smuggle?probe={probe} HTTP/1.1\r\nHost: gw.test\r\nx-probe: {probe}\r\n"
        content = body(probe) if callable(body) else body
        return head.encode() + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + content

    return Hostile(name, build, ANY_4XX, "parser", closed_ok=True)


def raw(name: str, make: Callable[[str], str]) -> Hostile:
    return Hostile(name, lambda k, probe: make(probe).encode(), ANY_4XX, "parser", closed_ok=True)


def cl(value: str | int) -> bytes:
    return f"Content-Length: {value}".encode()


CHUNKED = b"Transfer-Encoding: chunked"
ZERO, HELLO = _zero_then_inner, _hello_then_inner

SMUGGLING_ROWS = [
    smuggled("CL + TE", cl(5), CHUNKED, body=ZERO),
    smuggled("TE + CL", CHUNKED, cl(5), body=ZERO),
    smuggled("CL 0 + TE", cl(0), CHUNKED, body=ZERO),
    smuggled("two equal Content-Length", cl(5), cl(5), body=HELLO),
    smuggled("two different Content-Length", cl(5), cl(60), body=HELLO),
    smuggled("Content-Length list '5, 5'", cl("5, 5"), body=HELLO),
    smuggled("TE 'chunked, identity'", b"Transfer-Encoding: chunked, identity", body=ZERO),
    smuggled("TE 'xchunked'", b"Transfer-Encoding: xchunked", body=ZERO),
    smuggled("TE chunked twice", CHUNKED, CHUNKED, body=ZERO),
    smuggled("TE chunked + TE identity", CHUNKED, b"Transfer-Encoding: identity", body=ZERO),
    smuggled("space before the colon of TE", b"Transfer-Encoding : chunked", body=ZERO),
    smuggled("space before the colon of CL", b"Content-Length : 5", body=HELLO),
    smuggled("TE value on an obs-fold line", b"Transfer-Encoding:", b" chunked", body=ZERO),
    smuggled("obs-fold in another header", b"X-Folded: one", b" two", cl(0)),
    smuggled("bare CR inside a header", b"X-A: a\rX-Injected: 1", cl(0)),
    smuggled("NUL inside a header", b"X-A: a\x00b", cl(0)),
    smuggled("a header line without a colon", b"X-No-Colon", cl(0)),
    smuggled("invalid chunk size", CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n"),
    smuggled("negative chunk size", CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n"),
    smuggled("chunk size over 64 bits", CHUNKED, body=b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n"),
    smuggled("chunk size with a leading space", CHUNKED, body=b" 5\r\nhello\r\n0\r\n\r\n"),
    smuggled("chunk without its CRLF", CHUNKED, body=lambda p: b"5\r\nhelloXX" + ZERO(p)),
    smuggled("Content-Length -1", cl(-1)),
    smuggled("Content-Length +5", cl("+5"), body=HELLO),
    smuggled("Content-Length 0x5", cl("0x5"), body=HELLO),
    smuggled("Content-Length '5 5'", cl("5 5"), body=HELLO),
    raw(
        "bare LF line endings",
        lambda p: f"GET /open/lf?probe={p} HTTP/1.1\nHost: gw.test\nx-probe: {p}\n\n",
    ),
    raw(
        "TE chunked in HTTP/1.0",
        lambda p: (
            f"POST /open/old?probe={p} HTTP/1.0\r\nHost: gw.test\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{_inner(p).decode()}"
        ),
    ),
]


@pytest.mark.parametrize("row", params(SMUGGLING_ROWS))
async def test_smuggling_shapes_are_refused_and_never_forwarded(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "smuggling", gateway.port, kit, upstream, sentinel=True)


# Sizes: bodies over max_body (4,096 here; 16,384 on the XML route), 100-continue, long URLs.


def _post(path: str, *headers: bytes, body: bytes = b"") -> Build:
    return lambda kit, probe: http("POST", path, probe, *headers, body=body)


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"


XML = b"Content-Type: application/xml"
EXPECT = b"Expect: 100-continue"
XML_ORDERS = "/api/xml-orders"

SIZE_ROWS = [
    Hostile("Content-Length over max_body", _post("/open/big", body=b"x" * 5000), (413,)),
    Hostile("a terabyte declared, nothing sent", _post("/open/big", cl(10**12)), (413,)),
    Hostile("Content-Length of 30 digits", _post("/open/big", cl("9" * 30)), (400, 413), "either"),
    Hostile(
        "chunked over max_body",
        _post("/open/big", CHUNKED, body=_chunked(*[b"y" * 1024] * 5)),
        (413,),
    ),
    Hostile("one 64 KiB chunk", _post("/open/big", CHUNKED, body=_chunked(b"z" * 65536)), (413,)),
    Hostile(
        "over the XML route's max_body",
        _post(XML_ORDERS, XML, body=b"<o>" + b"x" * 20000 + b"</o>"),
        (413,),
    ),
    Hostile(
        "Expect 100-continue over max_body",
        _post("/open/big", EXPECT, cl(5000)),
        (413, 417),
        "either",
        after_interim=b"x" * 5000,
    ),
    Hostile(
        "Expect 100-continue over the route's max_body",
        _post(XML_ORDERS, XML, EXPECT, cl(20000)),
        (413, 417),
        "either",
        after_interim=b"x" * 20000,
    ),
    Hostile("Expect 200-ok", _post("/open/big", b"Expect: 200-ok", body=b"{}"), (417,), "either"),
]


@pytest.mark.parametrize("row", params(SIZE_ROWS))
async def test_bodies_over_the_limit_get_413_without_100_continue(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "sizes", gateway.port, kit, upstream)


def _headers(count: int, size: int) -> Build:
    return _open(*[f"X-Filler-{i}: {'h' * size}" for i in range(count)])


HEADER_LIMIT_ROWS = [  # on `limits_gateway`: max_header_bytes 16,384, max_headers 50, timeouts 1 s
    Hostile("90 headers of 8,000 bytes", _headers(90, 8000), (431,), "parser"),
    Hostile("60 small headers", _headers(60, 10), (431,), "parser"),
    Hostile("200 small headers", _headers(200, 10), (431,), "parser"),
    Hostile("3 headers of 6,000 bytes", _headers(3, 6000), (431,), "parser"),
    Hostile("a Cookie of 20,000 bytes", _open("Cookie: c=" + "c" * 20000), (431,), "parser"),
    Hostile("one header of 20,000 bytes", _open("X-Big: " + "b" * 20000), (431,), "parser"),
    Hostile("a URL of 20,000 bytes", _open(path="/open/" + "u" * 20000), (414, 431), "parser"),
    # HTTP/0.9 (no version, no headers): a 4xx status line or a closed connection. On this
    # gateway, whose header timeout is short, since the first line alone looks unfinished.
    raw("HTTP/0.9 request line", lambda p: f"GET /open/x?probe={p}\r\n"),
    raw("HTTP/0.9 GET /", lambda p: f"GET /?probe={p}\r\n\r\n"),
]


async def test_the_limits_gateway_serves_ordinary_requests(
    limits_gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    """The control for the rows below: headers within the limits pass."""
    TALLY.controls += 1
    probe = new_probe()
    answer = await exchange(limits_gateway.port, http("GET", "/open/x", probe, *["X-A: a"] * 40))
    note(answer, "control: limits gateway")
    assert answer.status == 200, answer.raw[:600]
    assert upstream.saw(probe)


@pytest.mark.parametrize("row", params(HEADER_LIMIT_ROWS))
async def test_oversized_heads_get_431_and_http_0_9_is_refused(
    row: Hostile, limits_gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "request heads", limits_gateway.port, kit, upstream)


# XML bombs and other hostile documents on the route that turns XML into JSON.


def _laughs() -> bytes:
    entities = [' <!ENTITY lol0 "lol">']
    for level in range(1, 10):
        entities.append(f' <!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">')
    prolog = '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n' + "\n".join(entities) + "\n]>\n"
    return (prolog + "<lolz>&lol9;</lolz>").encode()


def xml(name: str, document: str | Callable[[Kit], str], content_type: bytes = XML) -> Hostile:
    def build(kit: Kit, probe: str) -> bytes:
        body = document(kit) if callable(document) else document
        return http("POST", XML_ORDERS, probe, content_type, body=body.encode())

    return Hostile(name, build, ANY_4XX)


QUADRATIC = f'<!DOCTYPE r [<!ENTITY a "{"A" * 5000}">]><r>{"&a;" * 1000}</r>'
FILE_ENTITY = '<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><r>&xxe;</r>'

XML_ROWS = [
    xml("billion laughs", _laughs().decode()),
    xml("quadratic blowup", QUADRATIC),
    xml("external entity: a file", FILE_ENTITY),
    xml(
        "external entity: a URL",
        lambda k: FILE_ENTITY.replace("file:///etc/passwd", f"{k.issuer_url}/xxe"),
    ),
    xml(
        "parameter entity from a URL",
        lambda k: f'<!DOCTYPE r [<!ENTITY % p SYSTEM "{k.issuer_url}/dtd"> %p;]><r>&leak;</r>',
    ),
    xml("external DTD", lambda k: f'<!DOCTYPE r SYSTEM "{k.issuer_url}/dtd"><r/>'),
    xml("2,000 nested elements", "<a>" * 2000 + "</a>" * 2000),
    xml("malformed XML", "<order><id>1</order>"),
    xml("2,000 nested JSON arrays", "[" * 2000 + "]" * 2000, b"Content-Type: application/json"),
]


@pytest.mark.parametrize("row", params(XML_ROWS))
async def test_xml_bombs_and_entities_get_4xx(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "XML", gateway.port, kit, upstream)


# The admin API, on its own port.

WRONG = "Authorization: Bearer wrong-token-0000"
VALID_ADMIN = f"Authorization: Bearer {ADMIN_TOKEN}"


def admin(
    name: str,
    *headers: str | bytes,
    expect: tuple[int, ...] = (401,),
    path: str = "/admin/config",
    method: str = "GET",
) -> Hostile:
    return Hostile(name, _open(*headers, path=path, method=method), expect)


ADMIN_ROWS = [
    admin("no token"),
    admin("wrong token", WRONG),
    admin("empty bearer", "Authorization: Bearer"),
    admin("the token under Basic", "Authorization: Basic " + b64(f"a:{ADMIN_TOKEN}".encode())),
    admin("the token's hash as the token", f"Authorization: Bearer {ADMIN_HASH}"),
    admin("the token and one more character", f"{VALID_ADMIN}x"),
    admin("the token's first half", VALID_ADMIN[:-9]),
    admin("non-UTF-8 token", b"Authorization: Bearer \xff\xfe\xfd\xfc", expect=(400, 401)),
    admin("the token then a non-UTF-8 byte", VALID_ADMIN.encode() + b"\xff", expect=(400, 401)),
    admin("two Authorization: valid, then wrong", VALID_ADMIN, WRONG, expect=(400, 401)),
    admin("two Authorization: wrong, then valid", WRONG, VALID_ADMIN, expect=(400, 401)),
    admin("two Authorization: valid twice", VALID_ADMIN, VALID_ADMIN, expect=(400, 401)),
    admin("wrong token on /admin/routes", WRONG, path="/admin/routes"),
    admin("wrong token on /admin/upstreams", WRONG, path="/admin/upstreams"),
    admin("wrong token on /admin/metering", WRONG, path="/admin/metering"),
    admin("no token on POST /admin/reload", path="/admin/reload", method="POST"),
]


@pytest.mark.parametrize("row", params(ADMIN_ROWS))
async def test_the_admin_api_refuses_every_bad_token(
    row: Hostile, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    await run_hostile(row, "admin API", gateway.admin_port, kit, upstream)


ADMIN_ON_MAIN = [("GET", "/admin/config"), ("GET", "/admin/routes"), ("POST", "/admin/reload")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ON_MAIN)
async def test_admin_paths_on_the_main_port_are_not_the_admin_api(
    method: str, path: str, gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    TALLY.rows_run += 1
    TALLY.sent["admin API"] += 1
    probe = new_probe()
    request = http(method, path, probe, VALID_ADMIN)
    answer = note(await exchange(gateway.port, request), f"admin API: main port {path}")
    assert answer.status is not None, answer.raw[:600]
    assert answer.status < 500, answer.raw[:600]
    if answer.status == 200:  # the catch-all forwarded it: the upstream's echo, not the admin's
        assert answer.json().get("recorded") is True, answer.body[:600]
        TALLY.cleaned += 1
    else:
        assert_refused(answer, request, probe, upstream, expect=ANY_4XX)


# -- controls: valid requests reach the upstream ---------------------------------------------------

CONTROLS: list[tuple[str, Build, str]] = [  # (name, request, the path the upstream must get)
    ("jwt + strip_prefix", _on_cart(_valid), "/cart/items"),
    ("jwt from the session cookie", _on_cart(_session("alice")), "/cart/items"),
    ("jwt with the admin role", role("", claims={"roles": ["admin"]}).build, "/admin/stock"),
    ("rewrite", _open(path="/api/products/42"), "/products/42"),
    ("strip_prefix to the root", _open(path="/svc/orders/7"), "/orders/7"),
    ("api key", _open(KEY, path=PARTNER), PARTNER),
    ("open", _open(path="/open/x"), "/open/x"),
    ("catch-all", _open(path="/"), "/"),
    ("an exact route naming /alive", _open(path="/alive"), "/alive"),
    ("XML to JSON", _post(XML_ORDERS, XML, body=b"<order><id>1</id></order>"), XML_ORDERS),
    ("a body under the limit", _post("/open/small", body=b"x" * 4000), "/open/small"),
    (
        "a chunked body under the limit",
        _post("/open/small", CHUNKED, body=_chunked(b"x" * 1000, b"y" * 1000)),
        "/open/small",
    ),
    ("Expect 100-continue under the limit", _post("/open/small", EXPECT, body=b"x"), "/open/small"),
]


@pytest.mark.parametrize(("build", "path"), [pytest.param(b, u, id=n) for n, b, u in CONTROLS])
async def test_valid_requests_reach_the_upstream(
    build: Build, path: str, gateway: GatewayProcess, kit: Kit, upstream: RecordingUpstream
) -> None:
    TALLY.controls += 1
    probe = new_probe()
    answer = note(await exchange(gateway.port, build(kit, probe)), f"control {path}")
    assert answer.status == 200, answer.raw[:600]
    seen = upstream.with_probe(probe)
    assert len(seen) == 1, seen
    assert seen[0].raw_path.split("?", 1)[0] == path


async def test_a_files_route_answers_a_url_that_verifies_only_as_issued(
    gateway: GatewayProcess, kit: Kit
) -> None:
    TALLY.controls += 1
    request = http("GET", "/api/files/invoices/17.pdf", new_probe(), _valid(kit))
    answer = note(await exchange(gateway.port, request), "control: files")
    assert answer.status == 200, answer.raw[:600]
    url = urlsplit(answer.json()["url"])
    assert f"{url.scheme}://{url.netloc}" == "http://files.test"
    query = dict(parse_qsl(url.query))
    verify_signed_path(url.path, query, SIGNING_KEY, method="GET", prefix="/blobs")
    with pytest.raises(SignatureError):
        verify_signed_path(url.path, query, SIGNING_KEY, method="PUT", prefix="/blobs")
    with pytest.raises(SignatureError):
        other = url.path.replace("17", "18")
        verify_signed_path(other, query, SIGNING_KEY, method="GET", prefix="/blobs")


# -- slow clients ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slow:
    name: str
    start: Callable[[str], bytes]
    """What the client sends at once (probe id -> bytes)."""
    drip: bytes = b""
    """Then one such byte every 0.2 s, until the server answers or closes."""


def _head(probe: str, *headers: str, method: str = "POST") -> bytes:
    lines = [f"{method} /open/slow?probe={probe} HTTP/1.1", "Host: gw.test", f"x-probe: {probe}"]
    return "\r\n".join([*lines, *headers, "", ""]).encode()


def _unfinished_head(probe: str) -> bytes:
    return f"GET /open/slow?probe={probe} HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ".encode()


def _ten_of_1000(probe: str) -> bytes:
    return _head(probe, "Content-Length: 1000") + b"x" * 10


SLOW_ROWS = [
    Slow("nothing after connecting", lambda p: b""),
    Slow("half a request line", lambda p: f"GET /open/slow?probe={p} HT".encode()),
    Slow("headers never finished", _unfinished_head),
    Slow("headers dripped a byte at a time", _unfinished_head, drip=b"a"),
    Slow("10 of 1,000 body bytes, then nothing", _ten_of_1000),
    Slow("a chunked body that stops", lambda p: _head(p, CHUNKED.decode()) + b"5\r\nhello\r\n"),
    Slow("a body dripped a byte at a time", _ten_of_1000, drip=b"x"),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in SLOW_ROWS])
async def test_slow_headers_and_bodies_get_408_or_are_closed(
    row: Slow, limits_gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    TALLY.rows_run += 1
    TALLY.sent["slow clients"] += 1
    probe = new_probe()
    reader, writer = await asyncio.open_connection("127.0.0.1", limits_gateway.port)

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.2)  # the client's pace, not a wait for the server
                writer.write(row.drip)
                await writer.drain()

    dripping = asyncio.create_task(drip()) if row.drip else None
    try:
        writer.write(row.start(probe))
        await writer.drain()
        async with asyncio.timeout(20):  # the timeouts are 1 s; this only bounds a hang
            answer = note(await read_answer(reader), f"slow clients: {row.name}")
    finally:
        if dripping is not None:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert_refused(
        answer,
        row.start(probe),
        probe,
        upstream,
        expect=(408,),
        answered_by="parser",
        closed_ok=True,
    )


async def test_other_clients_are_served_while_500_slow_sockets_are_open(
    crowd_gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    """Half never finish their headers, half send 10 of 1,000 body bytes; max_concurrency 16."""
    port = crowd_gateway.port
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_slow(index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        probe = new_probe()
        writer.write(_unfinished_head(probe) if index % 2 else _ten_of_1000(probe))
        await writer.drain()
        return reader, writer

    try:
        async with asyncio.timeout(120):  # only bounds a hang
            for batch in range(0, 500, 50):
                slow += await asyncio.gather(*(open_slow(i) for i in range(batch, batch + 50)))
            TALLY.slow_sockets += len(slow)
            async with aiohttp.ClientSession() as session:

                async def ordinary() -> int:
                    TALLY.controls += 1
                    probe = new_probe()
                    url = f"http://127.0.0.1:{port}/open/ordinary?probe={probe}"
                    async with session.get(url) as response:
                        await response.read()
                    assert upstream.saw(probe) or response.status != 200
                    return response.status

                statuses = [await ordinary() for _ in range(20)]
                for _ in range(3):
                    statuses += await asyncio.gather(*(ordinary() for _ in range(8)))
            assert statuses == [200] * len(statuses), Counter(statuses)
            still_open = sum(not reader.at_eof() for reader, _ in slow)
            assert still_open == 500, f"only {still_open} of the 500 slow sockets are still open"
    finally:
        for _, writer in slow:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in slow), return_exceptions=True)


async def test_a_client_leaving_mid_body_logs_no_traceback(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """On a gateway of its own, whose whole stderr is read once the process has exited."""
    process = GatewayProcess.start(gateway_config(upstream), tmp_path, name="disconnect")
    leavers: list[tuple[Callable[[str], bytes], bool]] = [  # (what is sent, reset instead of FIN)
        (_ten_of_1000, False),
        (lambda p: _head(p, CHUNKED.decode()) + b"400\r\nab", False),
        (_ten_of_1000, True),
        (lambda p: _unfinished_head(p)[:-3], False),
    ]
    try:
        for start, reset in leavers:
            TALLY.sent["disconnects"] += 1
            probe = new_probe()
            _, writer = await asyncio.open_connection("127.0.0.1", process.port)
            writer.write(start(probe))
            await writer.drain()
            if reset:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            assert not upstream.saw(probe)
        TALLY.controls += 1  # it still serves
        answer = await exchange(process.port, http("GET", "/open/after", new_probe()))
        assert answer.status == 200, answer.raw[:600]
    finally:
        code = process.stop()  # SIGTERM: it finishes what it has, then its stderr is complete
    stderr = process.stderr()
    assert "Traceback" not in stderr, stderr[-4000:]
    assert code == 0, stderr[-4000:]


# -- no version banner -----------------------------------------------------------------------------


async def test_no_answer_names_the_server_software(gateway: GatewayProcess) -> None:
    """These answers, and every answer the module noted before."""
    requests = [
        (gateway.port, http("GET", "/open/x", new_probe()), "proxied (the upstream is aiohttp)"),
        (gateway.port, http("GET", "/api/cart/x", new_probe()), "401"),
        (gateway.port, http("GET", "/api/products/%2e%2e/x", new_probe()), "400"),
        (gateway.port, http("POST", "/open/x", new_probe(), body=b"x" * 5000), "413"),
        (gateway.port, b"GET /x HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n", "parser's 400"),
        (gateway.admin_port, http("GET", "/alive", new_probe()), "admin /alive"),
        (gateway.admin_port, http("GET", "/admin/config", new_probe()), "admin 401"),
    ]
    for port, request, label in requests:
        answer = note(await exchange(port, request), f"banner: {label}")
        assert answer.status is not None, f"no answer to the {label} request"
    leaking = {
        banner: f"{len(labels)} answers, e.g. {sorted(set(labels))[:8]}"
        for banner, labels in TALLY.banners.items()
        if "aiohttp" in banner.lower() or "python" in banner.lower()
    }
    assert not leaking, f"Server headers naming the software: {leaking}"


# -- signed URLs (library level, in-process) -------------------------------------------------------

T0 = 1_900_000_000.0


@dataclass(frozen=True, slots=True)
class Verification:
    """One call of `verify_signed_path`."""

    path: str
    query: dict[str, str]
    method: str = "GET"
    prefix: str = "/blobs"
    now: float = T0 + 1
    key: str = SIGNING_KEY

    def verify(self) -> None:
        verify_signed_path(
            self.path, self.query, self.key, method=self.method, prefix=self.prefix, now=self.now
        )


def issued(path: str = "/invoices/17.pdf", method: str = "GET") -> Verification:
    url = urlsplit(sign_url(FILES_BASE, path, SIGNING_KEY, ttl=300, method=method, now=T0))
    return Verification(path=url.path, query=dict(parse_qsl(url.query)), method=method)


Tamper = Callable[[Verification], Verification]


def _query(**changes: str | None) -> Tamper:
    def change(check: Verification) -> Verification:
        query = {**check.query, **changes}
        return replace(check, query={k: v for k, v in query.items() if v is not None})

    return change


def _signature(change: Callable[[str], str]) -> Tamper:
    return lambda c: _query(signature=change(c.query["signature"]))(c)


def _path(path: str, prefix: str = "/blobs") -> Tamper:
    return lambda c: replace(c, path=path, prefix=prefix)


TAMPERINGS: list[tuple[str, Tamper]] = [
    ("another file", _path("/blobs/invoices/18.pdf")),
    ("a sibling directory", _path("/blobs/receipts/17.pdf")),
    (".. out of the prefix", _path("/blobs/../invoices/17.pdf")),
    ("encoded .. in the path", _path("/blobs/%2e%2e/blobs/invoices/17.pdf")),
    ("the path outside the prefix", _path("/invoices/17.pdf")),
    ("another prefix", _path("/private/invoices/17.pdf", prefix="/private")),
    ("a longer prefix", _path("/blobsX/invoices/17.pdf")),
    ("prefix in another case", _path("/Blobs/invoices/17.pdf")),
    ("a trailing slash", _path("/blobs/invoices/17.pdf/")),
    ("a double slash", _path("/blobs//invoices/17.pdf")),
    ("another method", lambda c: replace(c, method="PUT")),
    ("the method in the query changed", lambda c: replace(_query(method="PUT")(c), method="PUT")),
    ("expired", lambda c: replace(c, now=T0 + 301)),
    ("expiry pushed back", _query(expires=str(int(T0) + 3600))),
    ("expiry not a number", _query(expires="soon")),
    ("no expiry", _query(expires=None)),
    ("one signature digit changed", _signature(lambda s: ("0" if s[0] != "0" else "1") + s[1:])),
    ("signature truncated", _signature(lambda s: s[:32])),
    ("signature upper-cased", _signature(str.upper)),
    ("signature empty", _query(signature="")),
    ("no signature", _query(signature=None)),
    ("the signature of another file", _signature(lambda s: issued("/x.pdf").query["signature"])),
    ("another key", lambda c: replace(c, key="another-signing-key-0123456789abcdef")),
]


@pytest.mark.parametrize("tamper", [pytest.param(t, id=n) for n, t in TAMPERINGS])
def test_a_tampered_signed_url_is_refused(tamper: Tamper) -> None:
    TALLY.tamperings += 1
    check = issued()
    check.verify()  # as issued, it verifies
    with pytest.raises(SignatureError):
        tamper(check).verify()


def test_a_signed_url_verifies_for_its_own_method_path_and_time() -> None:
    issued().verify()
    issued(method="PUT").verify()
    replace(issued(), now=T0 + 299).verify()


def test_a_path_escaping_its_prefix_is_never_signed_into_a_valid_url() -> None:
    TALLY.tamperings += 1
    try:
        check = issued("/a/../../private/x")
    except ValueError:  # refusing to sign it is as good
        return
    with pytest.raises(SignatureError):
        check.verify()


# -- built-in development secrets ------------------------------------------------------------------

DEV_SECRET_CONFIGS = {
    "signing_key": 'gateway:\n  listen: {port: 0}\n  signing_key: "dev-only-signing-key"\n',
    "hs256_secret": (
        "gateway:\n  listen: {port: 0}\nauth:\n  jwt:\n    issuer: i\n    audience: a\n"
        '    algorithms: [HS256]\n    hs256_secret: "dev-only-hs256-secret-0123456789abcdef"\n'
    ),
}


@pytest.mark.parametrize("text", [pytest.param(t, id=n) for n, t in DEV_SECRET_CONFIGS.items()])
def test_a_built_in_development_secret_is_refused_unless_development_is_on(text: str) -> None:
    with pytest.raises(GatewayConfigError):
        parse_config(text, source="dev.yaml", env={})
    allowed = text.replace("gateway:\n", "gateway:\n  development: true\n", 1)
    parse_config(allowed, source="dev.yaml", env={})


def test_the_web_profile_needs_a_real_signing_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FILES_SIGNING_KEY"}
    check = [sys.executable, "-m", "framework.cli", "gateway", "--check"]
    check.append("example_shop/gateway/web.yaml")
    refused = subprocess.run(check, cwd=REPO, env=env, capture_output=True, timeout=60)
    assert refused.returncode != 0, refused.stdout
    assert b"signing_key" in (refused.stderr + refused.stdout).lower(), refused.stderr
    env["FILES_SIGNING_KEY"] = "a-real-signing-key-from-the-environment-0123456789"
    accepted = subprocess.run(check, cwd=REPO, env=env, capture_output=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr


# -- last: the gateway's log, the counts -----------------------------------------------------------

HOSTILE_TABLES: tuple[list[Any], ...] = (
    JWT_ROWS,
    ROLE_ROWS,
    DUPLICATE_ROWS,
    SPOOF_ROWS,
    NON_UTF8_ROWS,
    PATH_ROWS,
    INTERNAL_ROWS,
    SMUGGLING_ROWS,
    SIZE_ROWS,
    HEADER_LIMIT_ROWS,
    XML_ROWS,
    ADMIN_ROWS,
    ADMIN_ON_MAIN,
    SLOW_ROWS,
)
ROWS = sum(len(table) for table in HOSTILE_TABLES)


def test_the_gateway_logged_no_traceback_for_any_hostile_request(gateway: GatewayProcess) -> None:
    code = gateway.stop()  # SIGTERM: it finishes what it has, then its stderr is complete
    stderr = gateway.stderr()
    assert "Traceback" not in stderr, stderr[-4000:]
    assert code == 0, stderr[-4000:]


def test_summary(upstream: RecordingUpstream, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-checks every refused probe against the upstream, prints the counts."""
    late = sorted(p for p in TALLY.refused_probes if upstream.saw(p))
    sent = sum(TALLY.sent.values())
    categories = ", ".join(f"{name} {count}" for name, count in TALLY.sent.items())
    with capsys.disabled():
        print(
            f"\nhostile clients: {sent} requests ({categories}); {TALLY.refused} refused, "
            f"{TALLY.cleaned} passed with the hostile part removed, {TALLY.controls} controls; "
            f"{TALLY.slow_sockets} slow sockets held open; {TALLY.tamperings} signed-URL "
            f"tamperings (in-process); {ROWS} rows in the tables"
        )
    assert not late, f"refused requests that reached the upstream afterwards: {late}"
    assert ROWS >= 200
    if TALLY.rows_run >= ROWS:  # the whole module ran
        assert sent >= 200
