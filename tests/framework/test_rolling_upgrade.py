"""A rolling upgrade at process level, the way a Deployment does it, under load.

Two replicas of a service run as `msa run` processes on real Kafka, behind the gateway. While
clients send HTTP requests through the gateway and events to the service's topic, each replica
is replaced in turn: start the new one, wait until it is ready, SIGTERM the old one (which drains
and commits). Every HTTP request must succeed and every event must be handled exactly once: a
replica that drains on SIGTERM commits what it handled before its partitions move, so the new
one redelivers nothing (what is handled is counted per event, not collected in a set, so a
duplicate would show). Killing a replica (SIGKILL) is the distributed chaos test's part
(tests/example_shop/test_chaos.py), where the inbox turns redeliveries into no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.types import TopicSpec
from tests.example_shop.conftest import free_ports
from tests.framework.gateway.conftest import ADMIN_HASH, GatewayFactory, make_gateway
from tests.framework.upgrade_service import Done, Item

pytestmark = pytest.mark.kafka
__all__ = ["make_gateway"]  # the gateway fixture, shared from the gateway tests
REPO = Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        self.name, self.port, self.env = name, port, env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, **self.env, "REPLICA": self.name, "MSA_HTTP_PORT": str(self.port)}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "framework.cli",
            "run",
            "tests.framework.upgrade_service:Worker",
            env=env,
            cwd=str(REPO),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def wait_ready(self, http: aiohttp.ClientSession, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{self.port}/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"replica {self.name} did not become ready")

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            return await self.process.wait()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_replacing_replicas_one_at_a_time_loses_no_request_and_no_event(
    kafka_bootstrap: str, topic_name: str, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    topics = {"UPGRADE_IN": f"{topic_name}.in", "UPGRADE_OUT": f"{topic_name}.out"}
    env = {
        "MSA_TRANSPORT": "kafka",
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MSA_SHUTDOWN_GRACE": "10",
        "MSA_LOG_LEVEL": "WARNING",
        **topics,
    }
    client = Bus(KafkaTransport(KafkaSettings(bootstrap_servers=kafka_bootstrap)), source="load")
    await client.start()
    await client.transport.declare(
        [TopicSpec(name=topics["UPGRADE_IN"], partitions=4), TopicSpec(name=topics["UPGRADE_OUT"])]
    )
    done: dict[int, list[str]] = {}
    progressed = asyncio.Event()

    async def on_done(message: Message[Done]) -> None:
        done.setdefault(message.data.n, []).append(message.data.replica)
        progressed.set()

    await client.subscribe_running(
        [topics["UPGRADE_OUT"]],
        {"upgrade.done": HandlerSpec(Done, on_done)},
        ConsumerOptions(group=f"{topic_name}-results", commit_interval=0.1),
    )

    ports = free_ports(4)
    old = [Replica("v1-a", ports[0], env), Replica("v1-b", ports[1], env)]
    new = [Replica("v2-a", ports[2], env), Replica("v2-b", ports[3], env)]
    replicas = old + new
    try:
        for replica in old:
            await replica.start()
        for replica in old:
            await replica.wait_ready(http)
        targets = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
        gateway = await make_gateway(
            f"""
gateway:
  listen: {{host: 127.0.0.1, port: 0}}
  admin: {{host: 127.0.0.1, port: 0, token_hashes: ["{ADMIN_HASH}"]}}
upstreams:
  worker:
    targets: [{targets}]
    health: {{path: /ready, interval: 0.2, timeout: 0.5, healthy_after: 1, unhealthy_after: 1}}
    retry: {{attempts: 3, budget: 1.0}}
routes:
  - name: work
    match: {{methods: [GET], path: /work}}
    upstream: worker
"""
        )
        await asyncio.sleep(1.0)  # the health checks take the not-yet-started ports out

        statuses: list[int] = []
        served_by: set[str] = set()
        sent = 0
        stop = asyncio.Event()

        async def http_load() -> None:
            url = f"http://127.0.0.1:{gateway.port}/work"
            while not stop.is_set():
                async with http.get(url) as response:
                    statuses.append(response.status)
                    if response.status == 200:
                        served_by.add((await response.json())["replica"])
                await asyncio.sleep(0.005)

        async def event_load() -> None:
            nonlocal sent
            while not stop.is_set():
                await client.publish(topics["UPGRADE_IN"], Item(n=sent), key=str(sent))
                sent += 1
                await asyncio.sleep(0.01)

        loads = [asyncio.create_task(http_load()) for _ in range(4)]
        loads.append(asyncio.create_task(event_load()))
        await asyncio.sleep(1.0)
        for retiring, replacement in zip(old, new, strict=True):
            await replacement.start()
            await replacement.wait_ready(http)
            await asyncio.sleep(0.6)  # the gateway's health check admits it
            assert await retiring.terminate() == 0  # drained and committed: a clean exit
            await asyncio.sleep(1.0)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*loads)

        assert sent > 100
        assert len(statuses) > 200
        failures = [s for s in statuses if s != 200]
        assert failures == [], (
            f"{len(failures)} of {len(statuses)} requests failed: {failures[:10]}"
        )
        assert {"v1-a", "v1-b", "v2-a", "v2-b"} <= served_by  # old and new both served

        deadline = time.monotonic() + 60
        while len(done) < sent and time.monotonic() < deadline:
            progressed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await progressed.wait()
        missing = sorted(set(range(sent)) - set(done))
        assert missing == [], f"{len(missing)} of {sent} events never handled: {missing[:20]}"
        duplicates = {n: by for n, by in done.items() if len(by) > 1}
        assert duplicates == {}, f"{len(duplicates)} of {sent} events handled twice: {duplicates}"
        handlers = {replica for by in done.values() for replica in by}
        assert {"v2-a", "v2-b"} <= handlers  # the new replicas took over the partitions
    finally:
        for replica in replicas:
            await replica.kill()
        await client.stop(grace=2)
