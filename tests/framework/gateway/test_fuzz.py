"""Bounded fuzzing of the gateway's path, header and credential handling: never a 5xx.

Hypothesis writes raw requests (paths from a dangerous alphabet and random bytes, header names
and values with bytes that are not UTF-8, broken credentials) on plain sockets to a real
`msa gateway` process in front of a recording upstream. Every answer must be a status line
below 500, or the connection closed; and whatever reaches the upstream stays inside its route,
holds no dot segment once decoded and no internal endpoint. `derandomize=True` and a fixed
`max_examples`: CI runs the same inputs every time, in well under a minute.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections import Counter
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.framework.gateway.conftest import ADMIN_HASH
from tests.framework.gateway.recording_upstream import GatewayProcess, RecordingUpstream
from tests.framework.gateway.test_auth import AUDIENCE, ISSUER, jwk, token

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None)
_STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")
OUTCOMES: Counter[str] = Counter()
"""`answered` or `closed`, over every fuzzed request: a gateway that drops every connection
must not pass by saying nothing."""


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def upstream(issuer_key: rsa.RSAPrivateKey) -> Iterator[RecordingUpstream]:
    recording = RecordingUpstream(jwks={"keys": [jwk(issuer_key, "rsa-1")]})
    recording.start()
    try:
        yield recording
    finally:
        recording.stop()


@pytest.fixture(scope="module")
def gateway(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    config = f"""\
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
  max_body: 4096
  signing_key: "fuzz-signing-key-0b7e3c5d9a214f68"
auth:
  jwt:
    jwks_url: "{upstream.issuer_url}/.well-known/jwks.json"
    issuer: "{ISSUER}"
    audience: "{AUDIENCE}"
    cookie: session
  api_keys: [{{id: partner, hash: "sha256:{"0" * 64}"}}]
upstreams:
  shop: {{targets: ["{upstream.url}"]}}
routes:
  - {{name: cart, match: {{path: /api/cart, prefix: true}}, auth: jwt, upstream: shop,
     strip_prefix: /api}}
  - {{name: products, match: {{path: /api/products, prefix: true}}, upstream: shop,
     rewrite: "/products/{{tail}}"}}
  - {{name: svc, match: {{path: /svc, prefix: true}}, upstream: shop, strip_prefix: /svc}}
  - {{name: pages, match: {{path: /pages, prefix: true}}, upstream: shop, rewrite: "/{{tail}}"}}
  - {{name: partner, match: {{path: /partner, prefix: true}}, auth: api_key, upstream: shop}}
  - {{name: files, match: {{methods: [GET, PUT], path: /api/files, prefix: true}}, auth: jwt,
     files: {{base_url: "http://files.test/blobs"}}}}
  - {{name: storefront, match: {{path: /, prefix: true}}, upstream: shop}}
"""
    process = GatewayProcess.start(config, tmp_path_factory.mktemp("fuzz"), name="fuzz")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def bearer(issuer_key: rsa.RSAPrivateKey) -> bytes:
    """A valid credential line, so jwt routes get as far as their paths."""
    return b"Authorization: Bearer " + token(issuer_key, exp=2_000_000_000).encode()


def roundtrip(port: int, request: bytes) -> int | None:
    """Write `request` on a new connection and read until the server closes it: the status, or
    None when it closed without answering. No answer within 10 s fails the example."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # it closed early: what it answered is still there
            sock.sendall(request)
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer within 10 s to {request[:200]!r}") from None
            if not data:
                break
            received += data
    if not received:
        OUTCOMES["closed"] += 1
        return None
    status = _STATUS.match(received)
    assert status is not None, f"not a status line: {received[:200]!r} for {request[:200]!r}"
    OUTCOMES["answered"] += 1
    return int(status.group(1))


def request(method: bytes, target: bytes, *headers: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: gw.test", *headers]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def _no_line_breaks(value: bytes) -> bytes:
    """Framing is the smuggling tests' business: here a request is always one request."""
    return value.replace(b"\r", b"").replace(b"\n", b"")


# -- paths -----------------------------------------------------------------------------------------

PIECES = [
    b"/", b".", b"..", b";", b"%", b"2", b"e", b"E", b"f", b"F", b"5", b"c", b"C", b"0", b"a",
    b"\\", b"?", b"#", b":", b"@", b"~", b"&", b"=", b"+", b"%2e", b"%2E", b"%2f", b"%2F",
    b"%5c", b"%00", b"%25", b"%3b", b"%c0%ae", b"\xc0\xae", b"\xff", b"metrics", b"ready",
    b"docs", b"alive",
]  # fmt: skip
PATHS = st.lists(
    st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=3)), max_size=24
).map(lambda pieces: _no_line_breaks(b"".join(pieces)))
PREFIXES = {  # request prefix -> what the upstream path must start with
    b"/api/cart/": b"/cart",
    b"/api/products/": b"/products/",
    b"/svc/": b"/",
    b"/pages/": b"/",
    b"/api/files/": b"/",
    b"/": b"/",
}
INTERNAL = (b"/metrics", b"/alive", b"/ready", b"/docs")
_probes = iter(range(1, 10**9))


def assert_inside_its_route(raw_path: str, must_start: bytes) -> None:
    path = unquote_to_bytes(raw_path.split("?", 1)[0].encode("latin-1"))
    assert path.startswith(must_start), f"{raw_path!r} left its route ({must_start!r})"
    for segment in re.split(rb"[/\\]", path):
        assert segment.split(b";", 1)[0] not in (b".", b".."), f"{raw_path!r}: a dot segment"
    for internal in INTERNAL:
        assert path != internal, f"{raw_path!r} reached an internal endpoint"
        assert not path.startswith(internal + b"/"), f"{raw_path!r} reached an internal endpoint"


@FUZZ
@given(prefix=st.sampled_from(sorted(PREFIXES)), path=PATHS)
def test_fuzzed_paths_never_get_a_5xx(
    gateway: GatewayProcess, upstream: RecordingUpstream, bearer: bytes, prefix: bytes, path: bytes
) -> None:
    probe = f"f{next(_probes)}"
    sent = request(b"GET", prefix + path, bearer, f"x-probe: {probe}".encode())
    status = roundtrip(gateway.port, sent)
    assert status is None or status < 500, f"{status} for {sent[:300]!r}"
    for record in upstream.with_probe(probe):
        assert_inside_its_route(record.raw_path, PREFIXES[prefix])


# -- headers ---------------------------------------------------------------------------------------

FRAMING = {b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade"}
NAMES = [
    b"Authorization", b"Cookie", b"Host", b"x-api-key", b"x-user-id", b"x-user-roles",
    b"X-Forwarded-For", b"X-Forwarded-Host", b"Forwarded", b"X-Real-IP", b"traceparent",
    b"x-gtxid", b"Content-Type", b"Accept", b"Accept-Encoding", b"Origin", b"Range",
    b"If-None-Match", b"Proxy-Authorization", b"TE", b"Keep-Alive", b"Via", b"X-\xff",
]  # fmt: skip
VALUES = [
    b"", b" ", b"\t", b"\x00", b"\xff\xfe", b"\xc3\x28", b"admin", b"127.0.0.1, 10.0.0.1",
    b"close, x-user-id", b"Bearer \xff", b"Bearer a.b.c", b"session=\xff; session=x", b"..",
    b"%00", b"gzip, deflate, br", b"bytes=0-0,-1", b"*/*;q=\xff", b"application/xml",
]  # fmt: skip
HEADER_NAMES = (
    st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=16))
    .map(_no_line_breaks)
    .filter(lambda name: bool(name) and name.strip().lower() not in FRAMING)
)
HEADER_VALUES = st.one_of(st.sampled_from(VALUES), st.binary(max_size=48)).map(_no_line_breaks)
TARGETS = [b"/open/fuzz", b"/api/cart/fuzz", b"/partner/fuzz", b"/api/products/fuzz"]


@FUZZ
@given(
    target=st.sampled_from(TARGETS),
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), min_size=1, max_size=4),
)
def test_fuzzed_headers_never_get_a_5xx(
    gateway: GatewayProcess, bearer: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    lines = [name + b": " + value for name, value in headers]
    sent = request(b"GET", target, bearer, *lines)
    status = roundtrip(gateway.port, sent)
    assert status is None or status < 500, f"{status} for {sent[:300]!r}"


# -- credentials -----------------------------------------------------------------------------------

TOKEN_PIECES = [
    b"eyJhbGciOiJub25lIn0", b"eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIn0", b"e30", b".", b"..",
    b"=", b"-", b"_", b"\xff", b"\x80", b"\xc3\x28", b" ", b"\t", b"Bearer ", b"%00", b"\x00",
]  # fmt: skip
CREDENTIALS = st.lists(
    st.one_of(st.sampled_from(TOKEN_PIECES), st.binary(min_size=1, max_size=12)), max_size=16
).map(lambda pieces: _no_line_breaks(b"".join(pieces)))
PLACES = [  # where a credential goes: (admin port?, target, header prefix)
    (False, b"/api/cart/fuzz", b"Authorization: Bearer "),
    (False, b"/api/cart/fuzz", b"Authorization: "),
    (False, b"/api/cart/fuzz", b"Cookie: session="),
    (False, b"/partner/fuzz", b"x-api-key: "),
    (True, b"/admin/config", b"Authorization: Bearer "),
]


@FUZZ
@given(place=st.sampled_from(PLACES), credential=CREDENTIALS)
def test_fuzzed_credentials_never_get_a_5xx(
    gateway: GatewayProcess, place: tuple[bool, bytes, bytes], credential: bytes
) -> None:
    on_admin, target, header = place
    sent = request(b"GET", target, header + credential)
    status = roundtrip(gateway.admin_port if on_admin else gateway.port, sent)
    assert status is None or status < 500, f"{status} for {sent[:300]!r}"


# -- the fuzzing was not vacuous -------------------------------------------------------------------


def test_the_fuzzed_gateway_answered(gateway: GatewayProcess, bearer: bytes) -> None:
    """A valid request is served, and most fuzzed requests got a status line, not a hang-up."""
    assert roundtrip(gateway.port, request(b"GET", b"/api/cart/items", bearer)) == 200
    if OUTCOMES:
        assert OUTCOMES["answered"] >= 0.9 * sum(OUTCOMES.values()), OUTCOMES


def test_nothing_leaked_into_the_log(gateway: GatewayProcess) -> None:
    code = gateway.stop()  # SIGTERM: it finishes what it has, then its stderr is complete
    stderr = gateway.stderr()
    assert "Traceback" not in stderr, stderr[-4000:]
    assert code == 0, stderr[-4000:]
