"""Test doubles shared by several test modules."""

from __future__ import annotations

import asyncio

from framework.bus import MemoryTransport
from framework.errors import PublishError
from framework.types import Headers, RecordMetadata


class FlakyTransport(MemoryTransport):
    """Refuses the next `failures` sends, as a broker that is down would; `refused` counts the
    sends refused so far. Set `failures` to 0 to bring the broker back."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.refused = 0

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
        immediate: bool = False,
    ) -> asyncio.Future[RecordMetadata]:
        if self.failures > 0:
            self.failures -= 1
            self.refused += 1
            raise PublishError("broker down")
        return await super().send(
            topic, value, key=key, headers=headers, partition=partition, immediate=immediate
        )
