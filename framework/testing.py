"""Testing kit: run a service in-process, publish to it, await what it handled and published.

    async def test_ships_paid_orders() -> None:
        async with ServiceHarness(Shipping(ServiceSettings(http_port=-1))) as harness:
            await harness.publish("orders", OrderPaid(order_id="o-1"), key="o-1")
            [handled] = await harness.handled(OrderPaid)
            assert handled.error is None
            [scheduled] = harness.published(ShipmentScheduled)
            assert scheduled.data.order_id == "o-1"
            harness.mock(Shipping.on_order_paid).assert_called_once_with(OrderPaid(order_id="o-1"))

The harness runs the service on whatever transport it was built with: the in-memory transport by
default (fast, deterministic), or `KafkaTransport` to run the very same test on a real broker.
The pytest plugin (`framework.pytest_plugin`, loaded automatically) provides `msa_transport`
and `msa_harness` fixtures.

What it records, each as a list and an awaitable that waits for `count` of a type (`of`: a
payload class - a pydantic model, a dataclass or a `msgspec.Struct` alike - or a CloudEvents type
name):

- `handled_log` / `await handled(of)`: every handler run that finished, one `Handled` per
  attempt (a message retried three times is three entries, with `attempt` 1, 2 and 3).
- `published_log` / `published(of)` / `await wait_published(of)`: what the service published.
- `dead_letters` / `await dead_lettered(of)`: every dead letter the service published, as the
  transport acknowledged it on the dead-letter topic (`framework.bus.dlq.DeadLetter`: error type,
  e.g. `unhandled-type` or `framework.errors.PayloadValidationError`, error message, attempts,
  original topic, partition and offset, and the record itself).
- `rejected` / `await wait_rejected(of)`: every record refused before any handler ran
  (`framework.bus.consumer.RejectedRecord`): a payload that fails validation, an envelope that
  cannot be decoded, a type no handler takes. These never reach a handler or the consume
  middleware, so they are not in `handled_log`; they are here with their error, and (unless the
  subscription skips them) in `dead_letters` too.
- `mock(handler)`: a `unittest.mock.Mock` called with the payload of each run of that handler
  (each attempt), for `assert_called_once_with(payload)` and the like. It only records.

A wait that times out says what the harness saw instead: the types handled, published,
dead-lettered and rejected so far, with counts.

**Consumer groups on a real broker.** On any transport but the in-memory one, the harness runs
every subscription of the service in a consumer group of its own: the service's group plus a
unique suffix (`group_suffix`, e.g. `orders-test-1f2e3d4c`), starting at the end of its topics as
they are when the harness starts (`Bus.isolate_groups`). So a test against a shared broker never
joins the group of a deployed instance of the same service (never takes its partitions), and
never handles, nor acts on, what was on a shared topic before the test: publish after entering
the harness. `group_suffix=""` keeps the service's own groups (and their committed offsets);
another explicit suffix isolates the groups with it, on any transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from unittest.mock import Mock

from framework.bus import MemoryTransport, Message, Outgoing
from framework.bus.consumer import RejectedRecord
from framework.bus.dlq import DeadLetter
from framework.errors import ConfigurationError
from framework.messages import CE_PREFIX, Envelope, new_id, to_binary, type_name
from framework.observability.tracing import current_correlation_id, current_trace, new_root_header
from framework.service import Service
from framework.types import RecordMetadata

__all__ = ["Handled", "ServiceHarness"]


@dataclass(frozen=True, slots=True)
class Handled:
    """One handler run (one attempt) the harness saw finish: the message, and its error if it
    raised. Each attempt has its own `message`, so `message.attempt` tells which it was."""

    message: Message[Any]
    error: BaseException | None
    result: Any = None


def _wanted_name(wanted: type | str | None) -> str | None:
    if wanted is None or isinstance(wanted, str):
        return wanted
    return type_name(wanted)


def _matches(event_type: str | None, wanted: type | str | None) -> bool:
    return wanted is None or event_type == _wanted_name(wanted)


def _describe(wanted: type | str | None) -> str:
    return _wanted_name(wanted) or "message"


def _letter_type(letter: DeadLetter) -> str | None:
    """The CloudEvents type of a dead letter (None for a record that is not a CloudEvent)."""
    raw = letter.record.header(CE_PREFIX + "type")
    return raw.decode(errors="replace") if raw is not None else None


def _rejected_type(rejected: RejectedRecord) -> str | None:
    return rejected.envelope.type if rejected.envelope is not None else None


def _tally(items: Iterable[str]) -> str:
    counts = Counter(items)
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())) or "nothing"


class ServiceHarness:
    """Runs one service and records what it handles, publishes, dead-letters and rejects.

    `group_suffix`: isolates the service's consumer groups with it (`Bus.isolate_groups`); by
    default a unique one on any transport but the in-memory one, none in memory ("" keeps the
    service's own groups). See the module docstring.
    """

    def __init__(self, service: Service, *, group_suffix: str | None = None) -> None:
        if service.bus.started:
            raise ConfigurationError("build the harness before the service starts")
        self.service = service
        self.handled_log: list[Handled] = []
        self.published_log: list[Outgoing] = []
        self.dead_letters: list[DeadLetter] = []
        """Every dead letter the service published, in the order they were acknowledged."""
        self.rejected: list[RejectedRecord] = []
        """Every record the service refused before any handler ran, in order."""
        self._mocks: dict[str, Mock] = {}
        self._changed = asyncio.Condition()
        if group_suffix is None:
            in_memory = isinstance(service.bus.transport, MemoryTransport)
            group_suffix = "" if in_memory else f"-test-{new_id()[:8]}"
        self.group_suffix = group_suffix
        if group_suffix:
            service.bus.isolate_groups(group_suffix)
        service.add_consume_middleware(self._record_handled)
        service.add_publish_middleware(self._record_published)
        service.bus.on_dead_letter.append(self._record_dead_letter)
        service.bus.on_rejected.append(self._record_rejected)

    # -- recording ------------------------------------------------------------------------------

    async def _record_handled(
        self, message: Message[Any], call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        if message.handler:
            self._mock_of(message.handler)(message.data)
        try:
            result = await call_next(message)
        except BaseException as exc:
            await self._note(self.handled_log, Handled(message, exc))
            raise
        await self._note(self.handled_log, Handled(message, None, result))
        return result

    async def _record_published(
        self, outgoing: Outgoing, call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        result = await call_next(outgoing)
        await self._note(self.published_log, outgoing)
        return result

    async def _record_dead_letter(self, letter: DeadLetter) -> None:
        await self._note(self.dead_letters, letter)

    async def _record_rejected(self, rejected: RejectedRecord) -> None:
        await self._note(self.rejected, rejected)

    async def _note(self, log: list[Any], entry: Any) -> None:
        log.append(entry)
        async with self._changed:
            self._changed.notify_all()

    def _mock_of(self, handler: str) -> Mock:
        mock = self._mocks.get(handler)
        if mock is None:
            mock = self._mocks[handler] = Mock(name=f"{type(self.service).__name__}.{handler}")
        return mock

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> ServiceHarness:
        await self.service.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop(grace=5)

    # -- acting ---------------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        extensions: dict[str, str] | None = None,
    ) -> RecordMetadata:
        """Publish to the service's transport as an outside producer would (source "tests").

        The envelope continues the current correlation id and trace when the test set them
        (`use_correlation_id`, `use_trace`); else it starts both: its correlation id is its own
        id, its `traceparent` a new trace, as for the first message of a request.
        """
        trace = current_trace.get()
        envelope = Envelope(
            type=type or type_name(data.__class__),
            source="tests",
            data=data,
            partitionkey=key,
            traceparent=trace.child_header() if trace is not None else new_root_header(),
            extensions=extensions or {},
        )
        envelope.correlationid = current_correlation_id.get() or envelope.id
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

    async def request(
        self, topic: str, data: Any, *, reply_type: Any = None, timeout: float = 5.0
    ) -> Any:
        if not self.service.bus.started:
            raise ConfigurationError("the harness's service is not running")
        return await self.service.bus.request(topic, data, reply_type=reply_type, timeout=timeout)

    # -- asserting ------------------------------------------------------------------------------

    async def handled(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Handled]:
        """Wait until `count` handler runs for `of` (a payload class or type name) finished."""
        return await self._wait(
            lambda: [h for h in self.handled_log if _matches(h.message.envelope.type, of)],
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
            if _matches(o.envelope.type, of) and (topic is None or o.topic == topic)
        ]

    async def wait_published(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Envelope[Any]]:
        """Wait until the service published `count` envelopes of `of`."""
        return await self._wait(
            lambda: self.published(of), count, timeout, f"{count} published {_describe(of)}(s)"
        )

    async def dead_lettered(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[DeadLetter]:
        """Wait until the service dead-lettered `count` records of `of` (a payload class or a
        CloudEvents type; None: any record, also one that is not a CloudEvent)."""
        return await self._wait(
            lambda: [d for d in self.dead_letters if _matches(_letter_type(d), of)],
            count,
            timeout,
            f"{count} dead-lettered {_describe(of)}(s)",
        )

    async def wait_rejected(
        self, of: type | str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[RejectedRecord]:
        """Wait until the service refused `count` records of `of` before any handler ran."""
        return await self._wait(
            lambda: [r for r in self.rejected if _matches(_rejected_type(r), of)],
            count,
            timeout,
            f"{count} rejected {_describe(of)}(s)",
        )

    def mock(self, handler: str | Callable[..., Any]) -> Mock:
        """The `Mock` called with the payload of each run of `handler` (its name, or the method:
        `harness.mock(Shipping.on_order_paid)`), to assert on as on any mock:

            harness.mock("on_order_paid").assert_called_once_with(OrderPaid(order_id="o-1"))

        It records calls from the start of the test, whenever it is asked for; it does not
        replace the handler (its `return_value` and `side_effect` are not used).
        """
        name = handler if isinstance(handler, str) else getattr(handler, "__name__", "")
        known = {info.attribute for info in self.service.__msa_handlers__}
        if name not in known and name not in self._mocks:
            raise ConfigurationError(
                f"{type(self.service).__name__} has no handler {name!r} "
                f"(its handlers: {', '.join(sorted(known)) or 'none'})"
            )
        return self._mock_of(name)

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
                        f"timed out after {timeout}s waiting for {what}; saw {len(found)}. "
                        f"{self.summary()}"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()

    def summary(self) -> str:
        """What the harness saw so far, by type with counts (what a timed-out wait reports)."""
        failed = [h.message.envelope.type for h in self.handled_log if h.error is not None]
        handled = _tally(h.message.envelope.type for h in self.handled_log)
        if failed:
            handled += f" (failed: {_tally(failed)})"
        published = _tally(o.envelope.type for o in self.published_log)
        letters = _tally(f"{_letter_type(d) or '?'} [{d.error_type}]" for d in self.dead_letters)
        rejected = _tally(
            f"{_rejected_type(r) or '?'} [{type(r.error).__name__}]" for r in self.rejected
        )
        return (
            f"The service handled {handled}; published {published}; "
            f"dead-lettered {letters}; rejected {rejected}."
        )
