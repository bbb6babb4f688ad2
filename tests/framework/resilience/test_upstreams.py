"""The upstream pool raises the framework's errors; the gateway's pool raises them as its own.

The pool's behaviour (balancing, retries, breaker, ejection) is tested through the gateway's pool
in tests/framework/gateway/test_upstreams.py, which is this pool with its errors translated.
"""

from __future__ import annotations

import aiohttp
import pytest

from framework.errors import MsaError, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from framework.gateway.config import UpstreamConfig as GatewayUpstreamConfig
from framework.gateway.types import GatewayError
from framework.gateway.upstreams import UpstreamPool as GatewayUpstreamPool
from framework.resilience import RetryConfig, UpstreamConfig, UpstreamPool
from tests.framework.gateway.test_upstreams import closed_port_url


async def test_an_unreachable_upstream_is_a_framework_error() -> None:
    pool = UpstreamPool("svc", UpstreamConfig(targets=(closed_port_url(),)))
    await pool.start()
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            await pool.send("POST", "/orders", headers={}, body=b"{}")
    finally:
        await pool.stop()

    assert isinstance(caught.value, MsaError)
    assert (caught.value.status, caught.value.title) == (502, "Bad Gateway")
    assert caught.value.detail == "upstream svc could not be reached"
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)  # translated at the edge


async def test_the_gateway_pool_answers_the_same_failure_as_a_gateway_error() -> None:
    config = GatewayUpstreamConfig(targets=(closed_port_url(),), retry=RetryConfig(attempts=1))
    pool = GatewayUpstreamPool("svc", config)
    await pool.start()
    try:
        with pytest.raises(GatewayError) as caught:
            await pool.send("GET", "/", headers={}, body=None)
    finally:
        await pool.stop()

    assert (caught.value.status, caught.value.title) == (502, "Bad Gateway")
    assert caught.value.detail == "upstream svc could not be reached"
    assert isinstance(caught.value.__cause__, UpstreamUnreachable)


def test_upstream_errors_say_what_a_gateway_answers() -> None:
    assert GatewayUpstreamConfig is UpstreamConfig  # one config, re-exported by the gateway
    timeout = UpstreamTimeout("upstream svc did not answer within 2 s")
    assert isinstance(timeout, UpstreamError)
    assert isinstance(timeout, TimeoutError)
    assert (timeout.status, timeout.title, timeout.headers) == (504, "Gateway Timeout", {})
