"""Authentication, authorization, claim forwarding and QoS through a running gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from framework.gateway.app import Gateway
from framework.gateway.auth import hash_api_key
from tests.framework.gateway.conftest import ADMIN_HASH, GatewayFactory, Upstream, base
from tests.framework.gateway.test_auth import (  # the issuer's keys and JWKS server
    AUDIENCE,
    ISSUER,
    Jwks,
    Keys,
    forge,
    jwks,
    keys,
    token,
)

__all__ = ["jwks", "keys"]  # fixtures used by the tests below


def config(jwks: Jwks, upstream: Upstream) -> str:
    return f"""
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
  max_concurrency: 4
auth:
  jwt: {{jwks_url: "{jwks.url}", issuer: "{ISSUER}", audience: "{AUDIENCE}"}}
  api_keys:
    - {{id: partner, hash: "{hash_api_key("partner-key")}", tier: premium, roles: [partner]}}
tiers:
  free: {{rate: 2, burst: 3, daily_quota: 100}}
  premium: {{rate: 1000, burst: 1000}}
default_tier: free
upstreams:
  shop: {{targets: ["{upstream.url}"]}}
routes:
  - name: me
    match: {{methods: [GET], path: /me}}
    auth: jwt
    upstream: shop
  - name: admin
    match: {{path: /admin, prefix: true}}
    auth: [jwt, api_key]
    roles: [admin]
    upstream: shop
  - name: partner
    match: {{path: /partner, prefix: true}}
    auth: api_key
    upstream: shop
  - name: public
    match: {{path: /public, prefix: true}}
    upstream: shop
  - name: slow
    match: {{path: /slow}}
    auth: api_key
    upstream: shop
"""


async def call(
    http: aiohttp.ClientSession, gateway: Gateway, path: str, **headers: str
) -> tuple[int, Any, Any]:
    async with http.get(f"{base(gateway)}{path}", headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_jwt_routes_forward_verified_claims_and_refuse_everything_else(
    make_gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    keys: Keys,
    jwks: Jwks,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(config(jwks, upstreams["a"]))
    good = token(keys.rsa_key, roles=["customer"], tier="premium")
    status, body, _ = await call(
        http, gateway, "/me", Authorization=f"Bearer {good}", **{"x-user-id": "mallory"}
    )
    assert status == 200
    assert body["headers"]["x-user-id"] == "alice"  # the verified subject, not the spoofed one
    assert body["headers"]["x-user-roles"] == "customer"

    refusals = {
        "no token": {},
        "alg none": {"Authorization": "Bearer " + forge({"alg": "none"}, {"sub": "x"})},
        "expired": {"Authorization": "Bearer " + token(keys.rsa_key, exp=1)},
        "wrong audience": {"Authorization": "Bearer " + token(keys.rsa_key, aud="other")},
        "unknown kid": {"Authorization": "Bearer " + token(keys.rsa_next, kid="rsa-9")},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
    }
    for case, headers in refusals.items():
        status, problem, response_headers = await call(http, gateway, "/me", **headers)
        assert status == 401, case
        assert problem["status"] == 401, case
        assert "WWW-Authenticate" in response_headers, case

    status, _, _ = await call(http, gateway, "/admin/x", Authorization=f"Bearer {good}")
    assert status == 403
    admin_token = token(keys.rsa_key, roles=["admin"])
    assert (await call(http, gateway, "/admin/x", Authorization=f"Bearer {admin_token}"))[0] == 200


async def test_api_keys_tiers_rate_limits_and_load_shedding(
    make_gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    jwks: Jwks,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(config(jwks, upstreams["a"]))
    status, body, _ = await call(http, gateway, "/partner/x", **{"x-api-key": "partner-key"})
    assert status == 200
    assert body["headers"]["x-user-id"] == "partner"
    assert (await call(http, gateway, "/partner/x", **{"x-api-key": "nope"}))[0] == 401

    # Anonymous clients get the free tier: a burst of 3, then 429 with Retry-After.
    statuses = [(await call(http, gateway, "/public/x"))[0] for _ in range(5)]
    assert statuses[:3] == [200, 200, 200]
    assert 429 in statuses[3:]
    status, _, headers = await call(http, gateway, "/public/x")
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    # The premium key is not held back by the free clients' limit.
    premium = [
        (await call(http, gateway, "/partner/y", **{"x-api-key": "partner-key"}))[0]
        for _ in range(10)
    ]
    assert premium == [200] * 10

    # More requests at once than max_concurrency (4): the rest are shed with 503 at once.
    async def slow() -> int:
        async with http.get(
            f"{base(gateway)}/slow?ms=600", headers={"x-api-key": "partner-key"}
        ) as response:
            return response.status

    results = await asyncio.gather(*(slow() for _ in range(8)))
    assert results.count(200) >= 4
    assert 503 in results
