"""The upstream pool raises the framework's errors; the gateway's pool raises them as its own.

The pool's behaviour (balancing, retries, breaker, ejection, admission) is tested through the
gateway's pool in tests/framework/gateway/test_upstreams.py, which is this pool with its errors
translated; the adaptive limit on its own in test_adaptive.py. Here: the errors, and how a
draining instance's "not processed" refusal is sent again (any method, on a new connection).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import aiohttp
import pytest
from aiohttp import web
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
from framework.types import NOT_PROCESSED
from tests.framework.gateway.conftest import Clock, eventually
from tests.framework.gateway.test_upstreams import Instance, closed_port_url

CLIENTS = pytest.mark.parametrize("client", ["http1", "aiohttp"])
RETRY_AT_ONCE = RetryConfig(attempts=3, backoff=0)


class Refusing(Instance):
    """An `Instance` that records every request (method, body) and answers its first `refusals`
    503: "not processed" (`X-MSA-Not-Processed: 1`, a draining framework service's refusal) when
    `not_processed`, a plain 503 (an overloaded service, which may have done the work) if not."""

    def __init__(self, name: str, *, refusals: int = 0, not_processed: bool = True) -> None:
        super().__init__(name, Clock())
        self.refusals = refusals
        self.not_processed = not_processed
        self.requests: list[tuple[str, bytes]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, await request.read()))
        if len(self.requests) <= self.refusals:
            headers = {NOT_PROCESSED: "1"} if self.not_processed else {}
            return web.Response(status=503, headers=headers)
        return await super()._handle(request)


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


# -- a POST refused "not processed" (a draining service) is sent again --------------------------


@CLIENTS
async def test_a_post_refused_as_not_processed_is_sent_to_another_instance(
    client: Literal["http1", "aiohttp"],
) -> None:
    draining, other = Refusing("i0", refusals=1), Refusing("i1")
    await draining.start()
    await other.start()
    pool = UpstreamPool(
        "svc", UpstreamConfig(targets=(draining.url, other.url), retry=RETRY_AT_ONCE, client=client)
    )
    await pool.start()
    try:
        # Round robin starts with the first target: the draining one.
        response = await pool.send("POST", "/orders", headers={}, body=b'{"n": 1}')
    finally:
        await pool.stop()
        await draining.stop()
        await other.stop()

    assert response.status == 200
    assert response.instance == other.url
    assert response.json()["instance"] == "i1"
    assert response.attempts == 2
    assert draining.requests == [("POST", b'{"n": 1}')]
    assert other.requests == [("POST", b'{"n": 1}')], "sent again, body and all, exactly once"
    assert pool.retries == 1


@CLIENTS
async def test_a_lone_instance_gets_the_refused_post_again(
    client: Literal["http1", "aiohttp"],
) -> None:
    lone = Refusing("i0", refusals=1)
    await lone.start()
    pool = UpstreamPool(
        "svc", UpstreamConfig(targets=(lone.url,), retry=RETRY_AT_ONCE, client=client)
    )
    await pool.start()
    try:
        response = await pool.send("POST", "/orders", headers={}, body=b"{}")
    finally:
        await pool.stop()
        await lone.stop()

    assert response.status == 200
    assert response.instance == lone.url
    assert response.attempts == 2
    assert lone.requests == [("POST", b"{}"), ("POST", b"{}")]
    assert pool.retries == 1


@CLIENTS
async def test_a_post_answered_a_plain_503_is_not_retried(
    client: Literal["http1", "aiohttp"],
) -> None:
    overloaded = Refusing("i0", refusals=1, not_processed=False)
    other = Refusing("i1")
    await overloaded.start()
    await other.start()
    pool = UpstreamPool(
        "svc",
        UpstreamConfig(targets=(overloaded.url, other.url), retry=RETRY_AT_ONCE, client=client),
    )
    await pool.start()
    try:
        response = await pool.send("POST", "/orders", headers={}, body=b"{}")
    finally:
        await pool.stop()
        await overloaded.stop()
        await other.stop()

    assert response.status == 503, "the caller gets the upstream's own answer"
    assert NOT_PROCESSED not in response.headers
    assert response.instance == overloaded.url
    assert response.attempts == 1
    assert overloaded.requests == [("POST", b"{}")]
    assert other.requests == [], "it may have done the work: never sent twice"
    assert pool.retries == 0


class Draining:
    """One address whose connections opened before `drain()` lead to a draining pod (503 "not
    processed", then the connection closes) and later ones to a live pod: a Kubernetes Service
    whose conntrack keeps kept-alive connections on the pod that left its endpoints."""

    def __init__(self) -> None:
        self.old: set[int] = set()
        self.draining = False
        self.both_in = asyncio.Event()
        self.in_flight = 0
        self.answered: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        connection = id(request.transport)
        if not self.draining:  # two requests at once: two kept-alive connections
            self.old.add(connection)
            self.in_flight += 1
            if self.in_flight == 2:
                self.both_in.set()
            await self.both_in.wait()
            return web.Response(text="warm")
        if connection in self.old:
            self.answered.append("refused")
            response = web.Response(status=503, headers={NOT_PROCESSED: "1"})
            response.force_close()
            return response
        self.answered.append("served")
        return web.Response(text="served")


async def test_a_refusal_closes_the_other_idle_connections_to_the_draining_instance() -> None:
    """Its other kept-alive connections lead to the same draining pod: the retry must not take
    one of them (it would be refused again, and the caller would see the 503)."""
    service = Draining()
    await service.start()
    pool = UpstreamPool(
        "orders", UpstreamConfig(targets=(service.url,), retry=RetryConfig(attempts=2, backoff=0))
    )
    await pool.start()
    try:
        warm = await asyncio.gather(
            *(pool.send("GET", "/warm", headers={}, body=None) for _ in range(2))
        )
        assert [r.status for r in warm] == [200, 200]
        assert len(service.old) == 2
        service.draining = True
        response = await pool.send("POST", "/orders", headers={}, body=b"{}")
    finally:
        await pool.stop()
        await service.stop()

    assert (response.status, response.body) == (200, b"served")
    assert response.attempts == 2
    assert service.answered == ["refused", "served"]
