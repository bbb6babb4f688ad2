"""Reading a topic back the way a second, group-less client would, for assertions."""

from __future__ import annotations

import asyncio

from framework.types import Record, TopicPartition, Transport


class NoRebalance:
    """A rebalance listener for readers that have nothing to commit."""

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


async def read_topic(
    transport: Transport, topic: str, *, count: int, timeout: float = 60.0
) -> list[Record]:
    """The first `count` records of `topic` (every partition, from the start); `timeout` only
    bounds a test that would otherwise hang."""
    reader = transport.consumer([topic], group=None, listener=NoRebalance())
    await reader.start()
    found: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < count:
                found += await reader.fetch(timeout=0.2, max_records=100)
    finally:
        await reader.stop()
    return found
