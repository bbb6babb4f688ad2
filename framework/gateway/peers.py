"""The workers of one gateway (`msa gateway --workers N`) answering as one, over unix sockets.

With N workers (`framework.gateway.workers`) every worker counts only the requests it served.
Worker 0 serves the admin API on the admin port; the others serve `peer_app` on a unix socket
each, in a directory only the gateway's user can enter (the file system is the access control:
the peer app asks no token). Worker 0 answers for all:

    own = gateway.meter.snapshot()
    fetched = [orjson.loads(body) for body in await get_all(peers, "/peer/metering")]
    merge_metering([own, *fetched])              # GET /admin/metering: every number summed
    merge_metrics([gateway.metrics.render(), *await get_all(peers, "/peer/metrics")])
                                                 # GET /metrics: each worker's series,
                                                 # labelled worker="0", "1", ...
    await post_all(peers, "/peer/reload")        # POST /admin/reload, after its own

A worker that does not answer (restarting, stuck) is left out of a GET, with a warning, so the
admin API still answers with what the others report; a POST reports it as a 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from framework.gateway.config import GatewayConfig, GatewayConfigError
from framework.gateway.metering import Meter
from framework.http import problem
from framework.observability.metrics import CONTENT_TYPE, MetricsRegistry

__all__ = [
    "PEER_TIMEOUT",
    "RELOAD_TIMEOUT",
    "WORKER_LABEL",
    "PeerGateway",
    "get_all",
    "merge_metering",
    "merge_metrics",
    "peer_app",
    "post_all",
    "refused_reload",
]

log = logging.getLogger("framework.gateway.peers")

PEER_TIMEOUT = 5.0
"""Seconds a worker gets to answer a GET (`get_all`)."""
RELOAD_TIMEOUT = 30.0
"""Seconds a worker gets to reload (`post_all`): it starts the new config's pools and
authentication, which may fetch a JWKS, before it answers."""
WORKER_LABEL = "worker"
"""The label `merge_metrics` adds: the worker's position in the list it merges (with a worker
left out by `get_all`, the ones after it move up a place for that scrape)."""


class PeerGateway(Protocol):
    """What the peer app needs of a `framework.gateway.app.Gateway` (which imports this module,
    so the app is described here rather than imported)."""

    @property
    def meter(self) -> Meter: ...

    @property
    def metrics(self) -> MetricsRegistry: ...

    async def reload(self) -> GatewayConfig: ...


def refused_reload(exc: GatewayConfigError) -> web.Response:
    """The answer to a reload whose config was refused, on the admin API and the peer API
    alike: 400 with every problem."""
    return problem(
        400,
        "Bad Request",
        "the new config was refused; the old one keeps serving",
        problems=exc.problems,
    )


def peer_app(gateway: PeerGateway) -> web.Application:
    """The app a worker other than worker 0 serves on its unix socket.

    `GET /peer/metering`: `gateway.meter.snapshot()` as JSON; `GET /peer/metrics`: its
    Prometheus text; `POST /peer/reload`: re-read the config file, 200 `{"reloaded": true,
    "routes": n}`, or a 400 problem listing the refused config's `problems` (the old config keeps
    serving).
    """

    async def metering(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(gateway.meter.snapshot()), content_type="application/json"
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def reload(request: web.Request) -> web.Response:
        try:
            config = await gateway.reload()
        except GatewayConfigError as exc:
            return refused_reload(exc)
        return web.Response(
            body=orjson.dumps({"reloaded": True, "routes": len(config.routes)}),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/peer/metering", metering)
    app.router.add_get("/peer/metrics", metrics)
    app.router.add_post("/peer/reload", reload)
    return app


async def _call(socket: str, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """`method path` on the peer app at `socket`: its status and body, or 503 and a problem
    body when it does not answer within `timeout` seconds."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=socket),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as session,
            session.request(method, f"http://worker{path}") as response,
        ):
            return response.status, await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        why = str(exc) or type(exc).__name__
        log.warning("gateway worker at %s did not answer %s %s: %s", socket, method, path, why)
        body = {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": f"the gateway worker at {socket} did not answer: {why}",
        }
        return 503, orjson.dumps(body)


async def get_all(
    peers: Sequence[str], path: str, *, timeout: float = PEER_TIMEOUT
) -> list[bytes | None]:
    """GET `path` from every peer at once: each one's body, in the order of `peers`, or None
    for one that did not answer 200 (logged), so a position stays a worker's."""
    answers = await asyncio.gather(*(_call(peer, "GET", path, timeout) for peer in peers))
    bodies: list[bytes | None] = []
    for peer, (status, body) in zip(peers, answers, strict=True):
        if status == 200:
            bodies.append(body)
            continue
        bodies.append(None)
        if status != 503:  # a 503 was logged by _call
            log.warning("gateway worker at %s answered GET %s with %d", peer, path, status)
    return bodies


async def post_all(
    peers: Sequence[str], path: str, *, timeout: float = RELOAD_TIMEOUT
) -> list[tuple[int, bytes]]:
    """POST `path` to every peer at once: each one's status and body, in the order of `peers`
    (503 and a problem body for one that did not answer)."""
    return list(await asyncio.gather(*(_call(peer, "POST", path, timeout) for peer in peers)))


def merge_metering(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The workers' `Meter.snapshot()`s as one: every number summed, per client, route and
    status class (a client, route or status class only some workers saw is kept as they report
    it)."""
    merged: dict[str, Any] = {}
    for snapshot in snapshots:
        _add(merged, snapshot)
    return merged


def _add(total: dict[str, Any], part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, Mapping):
            _add(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class _Families(Collector):
    """Hands `generate_latest` metric families that are already built."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_metrics(texts: Sequence[bytes | None]) -> bytes:
    """The workers' Prometheus expositions as one: `texts[i]` is worker i's (None: it did not
    answer, and is left out of this scrape), and each of its samples gets the label
    `worker="i"` (replacing one of that name), so every series stays a worker's own and sums
    are left to queries (`sum without (worker) (...)`).

    One HELP and TYPE per family, described as the first worker that has it describes it; a
    family another worker exposes with a different type is left out of that worker's part (and
    logged) rather than making the whole exposition invalid. Counters keep their `_total`
    samples and histograms their `_bucket`, `_sum` and `_count`.
    """
    families: dict[str, Metric] = {}
    for index, text in enumerate(texts):
        if text is None:
            continue
        worker = str(index)
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
            elif merged.type != family.type:
                log.warning(
                    "metric %s is a %s in gateway worker %s, a %s in an earlier one: left out",
                    family.name,
                    family.type,
                    worker,
                    merged.type,
                )
                continue
            merged.samples.extend(
                sample._replace(labels={**sample.labels, WORKER_LABEL: worker})
                for sample in family.samples
            )
    return generate_latest(_Families(families.values()))
