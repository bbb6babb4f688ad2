"""What the outbox relay tests of both databases share: a publish middleware that marks what it
passes, and the bus's count of published messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from framework.bus import Bus, Outgoing

STAMP = "stamp"


class StampingMiddleware:
    """A publish middleware that adds the extension `stamp: relayed` to every envelope it
    passes (a `ce_stamp` header on the bus) and keeps what it saw."""

    def __init__(self) -> None:
        self.seen: list[Outgoing] = []

    async def __call__(
        self, outgoing: Outgoing, call_next: Callable[[Outgoing], Awaitable[Any]]
    ) -> Any:
        outgoing.envelope.extensions[STAMP] = "relayed"
        self.seen.append(outgoing)
        return await call_next(outgoing)


def messages_out(bus: Bus, topic: str, type: str) -> float:
    """`msa_messages_out_total{topic, type}` of the bus."""
    return bus.metrics.messages_out.labels(topic=topic, type=type).value
