"""Testing kit: run a service in-process, publish to it, await what it handled and published.

    async def test_ships_paid_orders() -> None:
        async with ServiceHarness(Shipping(ServiceSettings(http_port=-1))) as harness:
            await harness.publish("orders", OrderPaid(order_id="o-1"), key="o-1")
            [handled] = await harness.handled(OrderPaid)
            assert handled.error is None
            [scheduled] = harness.published(ShipmentScheduled)
            assert scheduled.data.order_id == "o-1"

The harness runs the service on whatever transport it was built with: the in-memory transport by
default (fast, deterministic), or `KafkaTransport` to run the very same test on a real broker.
The pytest plugin (`framework.pytest_plugin`, loaded automatically) provides `msa_transport`
and `msa_harness` fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from framework.bus import Message, Outgoing
from framework.errors import ConfigurationError
from framework.messages import Envelope, to_binary, type_name
from framework.service import Service
from framework.types import RecordMetadata

__all__ = ["Handled", "ServiceHarness"]


@dataclass(frozen=True, slots=True)
class Handled:
    """One handler run the harness saw finish: the message, and its error if it raised."""

    message: Message[Any]
    error: BaseException | None
    result: Any = None


def _matches(envelope: Envelope[Any], wanted: type | str | None) -> bool:
    if wanted is None:
        return True
    name = wanted if isinstance(wanted, str) else type_name(wanted)
    return envelope.type == name


def _describe(wanted: type | str | None) -> str:
    if wanted is None:
        return "message"
    return wanted if isinstance(wanted, str) else type_name(wanted)


class ServiceHarness:
    """Runs one service and records every message it handles and publishes."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.handled_log: list[Handled] = []
        self.published_log: list[Outgoing] = []
        self._changed = asyncio.Condition()
        service.add_consume_middleware(self._record_handled)
        service.add_publish_middleware(self._record_published)

    async def _record_handled(
        self, message: Message[Any], call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        try:
            result = await call_next(message)
        except BaseException as exc:
            await self._note(Handled(message, exc))
            raise
        await self._note(Handled(message, None, result))
        return result

    async def _record_published(
        self, outgoing: Outgoing, call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        result = await call_next(outgoing)
        self.published_log.append(outgoing)
        async with self._changed:
            self._changed.notify_all()
        return result

    async def _note(self, handled: Handled) -> None:
        self.handled_log.append(handled)
        async with self._changed:
            self._changed.notify_all()

    async def __aenter__(self) -> ServiceHarness:
        await self.service.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop(grace=5)

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        extensions: dict[str, str] | None = None,
    ) -> RecordMetadata:
        """Publish to the service's transport as an outside producer would (source "tests")."""
        envelope = Envelope(
            type=type or type_name(data.__class__),
            source="tests",
            data=data,
            partitionkey=key,
            extensions=extensions or {},
        )
        record_key, value, headers = to_binary(envelope)
        future = await self.service.bus.transport.send(
            topic, value, key=record_key, headers=headers
        )
        return await future

    async def send_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> RecordMetadata:
        """Publish raw bytes (a foreign or broken record) to the service's transport."""
        future = await self.service.bus.transport.send(topic, value, key=key, headers=headers)
        return await future

    async def handled(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Handled]:
        """Wait until `count` handler runs for `of` (a payload class or type name) finished."""
        return await self._wait(
            lambda: [h for h in self.handled_log if _matches(h.message.envelope, of)],
            count,
            timeout,
            f"{count} handled {_describe(of)}(s)",
        )

    def published(
        self, of: type | str | None = None, *, topic: str | None = None
    ) -> list[Envelope[Any]]:
        """Envelopes the service published so far, filtered by payload type and topic."""
        return [
            o.envelope
            for o in self.published_log
            if _matches(o.envelope, of) and (topic is None or o.topic == topic)
        ]

    async def wait_published(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Envelope[Any]]:
        return await self._wait(
            lambda: self.published(of), count, timeout, f"{count} published {_describe(of)}(s)"
        )

    async def _wait(
        self, select: Callable[[], list[Any]], count: int, timeout: float, what: str
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                found = select()
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout}s waiting for {what}; saw {len(found)}"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()

    async def request(
        self, topic: str, data: Any, *, reply_type: Any = None, timeout: float = 5.0
    ) -> Any:
        if not self.service.bus.started:
            raise ConfigurationError("the harness's service is not running")
        return await self.service.bus.request(topic, data, reply_type=reply_type, timeout=timeout)
