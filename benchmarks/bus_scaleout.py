"""Scale-out for `bus.py`: 1 or more consumer processes in one group, a CPU-bound handler.

The parent (`run_scale_out`) starts `processes` workers (this file run as a script), waits until
the group has spread the topic's partitions over all of them, then produces the messages and
times how long the workers take to handle them all. Producing after the group settled keeps
the first worker's head start and the rebalance out of the measurement; the producer's own
CPU (about 50 us a message) is a small part of the handlers' (about 1 ms).

A worker runs our Bus with a typed subscription (envelope decoded, payload validated) whose
handler hashes the payload `hash_rounds` times (sha256): CPU-bound work that blocks the event
loop, as real computation does. It talks to the parent in JSON lines on stdout (`assigned`,
`handled`, and a `final` report after the parent writes `stop` to its stdin).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bus_table import Sample

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.types import TopicPartition

__all__ = ["SCALE_OUT", "run_scale_out"]

SCALE_OUT = "4. scale-out (processes)"
WORKER = os.path.abspath(__file__)


async def run_scale_out(
    settings: KafkaSettings,
    topic: str,
    group: str,
    *,
    processes: int,
    messages: int,
    hash_rounds: int,
    payload: str,
    produce: Callable[[], Awaitable[None]],
    partitions: int = 12,
) -> Sample:
    config = {
        "bootstrap": settings.bootstrap_servers,
        "topic": topic,
        "group": group,
        "hash_rounds": hash_rounds,
        "payload": payload,
    }
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    states: list[dict[str, Any]] = [{"assigned": 0, "handled": 0} for _ in workers]
    changed = asyncio.Event()
    finals: list[asyncio.Future[dict[str, Any]]] = [
        asyncio.get_running_loop().create_future() for _ in workers
    ]

    async def read(index: int, worker: asyncio.subprocess.Process) -> None:
        assert worker.stdout is not None
        async for line in worker.stdout:
            report = json.loads(line)
            if "final" in report:
                finals[index].set_result(report)
                return
            states[index].update(report)
            changed.set()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            changed.clear()
            await changed.wait()

    readers = [asyncio.create_task(read(i, w)) for i, w in enumerate(workers)]
    try:
        await until(
            lambda: (
                sum(s["assigned"] for s in states) == partitions
                and all(s["assigned"] for s in states)
            )
        )
        await asyncio.sleep(0.5)  # the group has settled: no member is still joining
        go = time.time()
        await produce()
        await until(lambda: sum(s["handled"] for s in states) >= messages)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"stop\n")
            await worker.stdin.drain()
        reports = [await future for future in finals]
    finally:
        for worker in workers:
            if worker.returncode is None:
                try:
                    async with asyncio.timeout(20):
                        await worker.wait()
                except TimeoutError:
                    worker.kill()
                    await worker.wait()
        for reader in readers:
            reader.cancel()
    last = max(r["last"] for r in reports if r["count"])
    cpu = sum(r["cpu"] for r in reports)
    counts = "/".join(str(r["count"]) for r in reports)
    return Sample(
        rate=messages / (last - go),
        cpu_us=cpu / messages * 1e6,
        note=f"messages per worker {counts}" if processes > 1 else "",
    )


# -- the worker ---------------------------------------------------------------------------------


def _say(**report: Any) -> None:
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


class _CountingListener:
    """Passes rebalances on and tells the parent how many partitions this worker holds."""

    def __init__(self, inner: Any, held: set[TopicPartition]) -> None:
        self._inner, self._held = inner, held

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        await self._inner.on_revoked(partitions)
        self._held.difference_update(partitions)
        _say(assigned=len(self._held))

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        await self._inner.on_assigned(partitions)
        self._held.update(partitions)
        _say(assigned=len(self._held))


class _ReportingTransport(KafkaTransport):
    held: set[TopicPartition]

    def consumer(self, topics: Sequence[str], **options: Any) -> Any:
        options["listener"] = _CountingListener(options["listener"], self.held)
        return super().consumer(topics, **options)


async def _work(config: dict[str, Any]) -> None:
    from bus import OrderPlaced, make_order, msgspec_codec

    cls = OrderPlaced if config["payload"] == "pydantic" else msgspec_codec([make_order(0)]).cls
    rounds = int(config["hash_rounds"])
    transport = _ReportingTransport(
        KafkaSettings(bootstrap_servers=config["bootstrap"], client_id="bench-scale")
    )
    transport.held = set()
    bus = Bus(transport, source="bench.scale")
    count = 0
    first = last = cpu_first = cpu_last = 0.0

    async def on_order(message: Message[Any]) -> None:
        nonlocal count, first, last, cpu_first, cpu_last
        if not count:
            first, cpu_first = time.time(), time.process_time()
        value = message.record.value or b""
        for _ in range(rounds):
            hashlib.sha256(value).digest()
        count += 1
        last, cpu_last = time.time(), time.process_time()

    bus.subscribe(
        [config["topic"]],
        {"bench.order.placed": HandlerSpec(cls, on_order)},
        ConsumerOptions(group=config["group"]),
    )
    await bus.start()

    async def tell_progress() -> None:
        told = -1
        while True:
            if count != told:
                told = count
                _say(handled=count)
            await asyncio.sleep(0.05)

    progress = asyncio.create_task(tell_progress())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" from the parent
    progress.cancel()
    await bus.stop()
    # CPU from this worker's first handled message to its last: the handling, not the start-up
    _say(final=True, count=count, first=first, last=last, cpu=cpu_last - cpu_first)


if __name__ == "__main__":
    import logging

    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # rebalance chatter
    uvloop.run(_work(json.loads(sys.argv[1])))
