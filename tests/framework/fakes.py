"""Test doubles shared by several test modules."""

from __future__ import annotations

import asyncio

from framework.bus import MemoryTransport
from framework.errors import PublishError
from framework.types import Headers, RecordMetadata


class FlakyTransport(MemoryTransport):
    """Refuses the first `failures` sends, as a broker that is down would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        if self.failures > 0:
            self.failures -= 1
            raise PublishError("broker down")
        return await super().send(topic, value, key=key, headers=headers, partition=partition)
