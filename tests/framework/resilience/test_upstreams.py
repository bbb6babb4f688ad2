"""The upstream pool raises the framework's errors; the gateway's pool raises them as its own.

The pool's behaviour (balancing, retries, breaker, ejection, admission) is tested through the
gateway's pool in tests/framework/gateway/test_upstreams.py, which is this pool with its errors
translated; the adaptive limit on its own in test_adaptive.py.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import aiohttp
import pytest
from pydantic import ValidationError

from framework.errors import (
    MsaError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from framework.gateway.config import UpstreamConfig as GatewayUpstreamConfig
from framework.gateway.types import GatewayError
from framework.gateway.upstreams import UpstreamPool as GatewayUpstreamPool
from framework.resilience import AdaptiveConfig, RetryConfig, UpstreamConfig, UpstreamPool
from framework.resilience.http1 import UpstreamConnectionError
from tests.framework.gateway.conftest import Clock, eventually
from tests.framework.gateway.test_upstreams import Instance, closed_port_url


@pytest.mark.parametrize(
    ("client", "cause"),
    [("http1", UpstreamConnectionError), ("aiohttp", aiohttp.ClientError)],
)
async def test_an_unreachable_upstream_is_a_framework_error(
    client: Literal["http1", "aiohttp"], cause: type[Exception]
) -> None:
    pool = UpstreamPool("svc", UpstreamConfig(targets=(closed_port_url(),), client=client))
    await pool.start()
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            await pool.send("POST", "/orders", headers={}, body=b"{}")
    finally:
        await pool.stop()

    assert isinstance(caught.value, MsaError)
    assert (caught.value.status, caught.value.title) == (502, "Bad Gateway")
    assert caught.value.detail == "upstream svc could not be reached"
    assert isinstance(caught.value.__cause__, cause)  # translated at the edge


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


async def test_a_call_over_capacity_is_shed_as_a_framework_error() -> None:
    upstream = Instance("i0", Clock())
    await upstream.start()
    pool = UpstreamPool(
        "svc", UpstreamConfig(targets=(upstream.url,), max_connections=1, queue_timeout=0.05)
    )
    await pool.start()
    try:
        busy = asyncio.create_task(pool.send("GET", "/?hold", headers={}, body=None))
        await eventually(lambda: upstream.hits == 1)
        with pytest.raises(UpstreamUnavailable) as caught:
            await pool.send("GET", "/", headers={}, body=None)
        upstream.release.set()
        assert (await busy).status == 200
    finally:
        upstream.release.set()
        await pool.stop()
        await upstream.stop()

    assert (caught.value.status, caught.value.title) == (503, "Service Unavailable")
    assert caught.value.detail == "upstream svc is at capacity"
    assert caught.value.headers == {"Retry-After": "1"}
    assert pool.snapshot()["counters"]["shed"] == 1


def test_admission_defaults_shed_within_a_quarter_second_and_adapt() -> None:
    config = UpstreamConfig(targets=("http://127.0.0.1:8080",))
    assert config.queue_timeout == 0.25
    assert config.adaptive == AdaptiveConfig()
    assert config.adaptive.initial_limit is None, "it starts at max_connections"

    fixed = UpstreamConfig.model_validate(
        {"targets": ["http://127.0.0.1:8080"], "adaptive": None, "queue_timeout": 0}
    )
    assert (fixed.adaptive, fixed.queue_timeout) == (None, 0)
    with pytest.raises(ValidationError):
        UpstreamConfig(targets=("http://127.0.0.1:8080",), queue_timeout=-1)
