"""A live feed of the events on some topics, for pushing them to HTTP clients.

An `EventFeed` reads its topics without a consumer group, from the end (every gateway or
service instance sees every event, and nothing is committed: a feed is a view, not a worker).
It keeps the last `replay` events in memory, so a client that reconnects with the id of the last
event it saw gets what it missed, and hands each new event to the listeners whose `EventFilter`
matches it:

    feed = EventFeed(bus.transport, ["shop.orders"], replay=2000)
    await feed.start()
    listener = feed.listen(EventFilter(key="order-17"), after=last_event_id)
    async for event in listener:          # FeedEvent: envelope (data = JSON bytes) + position
        ...

Memory is bounded everywhere: the replay buffer holds `replay` events, and each listener's queue
holds `capacity` events. A listener whose client does not keep up is closed with a reason
(`FeedClosed`) instead of buffering without end; the push bridges tell the client why.

Records that are not CloudEvents are skipped (and counted in `skipped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from framework.errors import FeedClosed, MsaError, NotStartedError
from framework.messages import Envelope, from_binary
from framework.resilience import Backoff
from framework.types import Record, TopicPartition, Transport, TransportConsumer

__all__ = ["EventFeed", "EventFilter", "FeedClosed", "FeedEvent", "FeedListener"]

log = logging.getLogger("framework.translate.feed")
FETCH_BACKOFF = Backoff(initial=0.2, maximum=5.0)
"""Between fetches that failed: the feed's clients keep their streams and wait."""
_MISSING = object()


class FeedEvent:
    """One event as the feed saw it: the envelope (data still JSON bytes) and its position."""

    __slots__ = ("_data", "envelope", "offset", "partition", "topic")

    def __init__(self, envelope: Envelope[bytes], record: Record) -> None:
        self.envelope = envelope
        self.topic = record.topic
        self.partition = record.partition
        self.offset = record.offset
        self._data: Any = _MISSING

    @property
    def id(self) -> str:
        return self.envelope.id

    def data(self) -> Any:
        """The payload decoded as JSON (once), or None when it is not JSON."""
        if self._data is _MISSING:
            try:
                self._data = orjson.loads(self.envelope.data)
            except orjson.JSONDecodeError:
                self._data = None
        return self._data


def _lookup(document: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(document, dict):
            return _MISSING
        document = document.get(part, _MISSING)
        if document is _MISSING:
            return _MISSING
    return document


@dataclass(frozen=True, kw_only=True)
class EventFilter:
    """Which events a client wants. Every given criterion must hold (an empty filter takes all).

    `data` compares fields of the payload by dotted path with the string form of their value,
    e.g. `EventFilter(types={"shop.order.confirmed"}, data={"order_id": "o-17"})`.
    """

    types: Collection[str] | None = None
    key: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    source: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    _paths: tuple[tuple[tuple[str, ...], str], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        if self.types is not None and not isinstance(self.types, frozenset):
            object.__setattr__(self, "types", frozenset(self.types))
        paths = tuple((tuple(path.split(".")), value) for path, value in self.data.items())
        object.__setattr__(self, "_paths", paths)

    def matches(self, event: FeedEvent) -> bool:
        envelope = event.envelope
        if self.types is not None and envelope.type not in self.types:
            return False
        if self.key is not None and envelope.partitionkey != self.key:
            return False
        if self.subject is not None and envelope.subject != self.subject:
            return False
        if self.correlationid is not None and envelope.correlationid != self.correlationid:
            return False
        if self.source is not None and envelope.source != self.source:
            return False
        paths = self._paths
        if paths:
            document = event.data()
            for path, expected in paths:
                value = _lookup(document, path)
                if value is _MISSING or _as_text(value) != expected:
                    return False
        return True


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


class FeedListener:
    """One client's bounded queue of matching events. Iterate it, or call `next()`."""

    def __init__(self, feed: EventFeed, match: EventFilter, capacity: int) -> None:
        self.filter = match
        self.capacity = capacity
        self.gap = False
        """True when the client asked to resume after an event the feed no longer holds (or
        never saw): it may have missed events and should reload its state."""
        self._feed = feed
        self._queue: deque[FeedEvent] = deque()
        self._wakeup = asyncio.Event()
        self.closed_reason: str | None = None

    def offer(self, event: FeedEvent) -> None:
        """Queue an event; a full queue closes the listener (the client is too slow)."""
        if self.closed_reason is not None:
            return
        if len(self._queue) >= self.capacity:
            self.close(f"slow client: {self.capacity} events were waiting to be sent")
            return
        self._queue.append(event)
        self._wakeup.set()

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.clear()
            self._feed._forget(self)
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def next(self, timeout: float | None = None) -> FeedEvent | None:
        """The next event; None after `timeout` seconds without one. Raises `FeedClosed`."""
        while not self._queue:
            if self.closed_reason is not None:
                raise FeedClosed(self.closed_reason)
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    if not self._queue:
                        return None
        if self.closed_reason is not None:
            raise FeedClosed(self.closed_reason)
        return self._queue.popleft()

    def __aiter__(self) -> AsyncIterator[FeedEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[FeedEvent]:
        with contextlib.suppress(FeedClosed):
            while True:
                event = await self.next()
                if event is not None:
                    yield event


class _NoRebalance:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


class EventFeed:
    """Every event on `topics` from the moment `start()` returns, fanned out to listeners."""

    def __init__(
        self,
        transport: Transport,
        topics: Sequence[str],
        *,
        replay: int = 1000,
        capacity: int = 256,
        poll_timeout: float = 0.5,
    ) -> None:
        if not topics:
            raise ValueError("an EventFeed needs at least one topic")
        if replay < 0 or capacity < 1:
            raise ValueError("replay must be >= 0 and capacity >= 1")
        self.transport = transport
        self.topics = tuple(topics)
        self.capacity = capacity
        self.poll_timeout = poll_timeout
        self.skipped = 0
        self.seen = 0
        self._recent: deque[FeedEvent] = deque(maxlen=replay)
        self._listeners: set[FeedListener] = set()
        self._taps: list[Callable[[FeedEvent], None]] = []
        self._consumer: TransportConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def start(self) -> None:
        """Start reading at the end of every partition (only events from now on are seen)."""
        if self._task is not None:
            return
        consumer = self.transport.consumer(
            list(self.topics), group=None, listener=_NoRebalance(), start_from="latest"
        )
        await consumer.start()
        self._consumer = consumer
        self._task = asyncio.create_task(self._read(consumer), name=f"feed:{','.join(self.topics)}")

    async def stop(self) -> None:
        """Stop reading and close every listener ("the server is shutting down")."""
        task, self._task = self._task, None
        if task is not None:  # a reader with nothing to finish: cancel it at once
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in list(self._listeners):
            listener.close("the server is shutting down")
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(MsaError):
                await consumer.stop()

    def tap(self, callback: Callable[[FeedEvent], None]) -> None:
        """Call `callback` with every event (synchronously, in order); for status tracking."""
        self._taps.append(callback)

    def listen(
        self, match: EventFilter, *, after: str | None = None, capacity: int | None = None
    ) -> FeedListener:
        """A listener for events matching `match`; with `after` (the id of the last event the
        client saw), first the held events that came after it. Raises `NotStartedError`."""
        if self._task is None:
            raise NotStartedError("EventFeed.listen before start()")
        listener = FeedListener(self, match, capacity or self.capacity)
        if after:
            missed = self._after(after)
            if missed is None:
                listener.gap = True
            else:
                for event in missed:
                    if match.matches(event):
                        listener.offer(event)
        if listener.closed_reason is None:
            self._listeners.add(listener)
        return listener

    def recent(self, match: EventFilter) -> list[FeedEvent]:
        """The held events that match, oldest first."""
        return [event for event in self._recent if match.matches(event)]

    def _after(self, event_id: str) -> Iterable[FeedEvent] | None:
        recent = self._recent
        for index in range(len(recent) - 1, -1, -1):
            if recent[index].id == event_id:
                return [recent[n] for n in range(index + 1, len(recent))]
        return None

    def _forget(self, listener: FeedListener) -> None:
        self._listeners.discard(listener)

    def publish_local(self, record: Record) -> None:
        """Take one record as if it had been read (used by the reader; handy in tests)."""
        try:
            envelope = from_binary(record)
        except MsaError:
            self.skipped += 1
            return
        event = FeedEvent(envelope, record)
        self.seen += 1
        self._recent.append(event)
        for tap in self._taps:
            try:
                tap(event)
            except Exception:  # a broken tap must not stop the feed
                log.exception("feed tap %r failed on event %s", tap, event.id)
        for listener in list(self._listeners):
            if listener.filter.matches(event):
                listener.offer(event)

    async def _read(self, consumer: TransportConsumer) -> None:
        failures = 0
        while True:
            try:
                records = await consumer.fetch(timeout=self.poll_timeout, max_records=500)
                failures = 0
            except MsaError as exc:
                failures += 1
                log.warning("feed on %s: fetch failed (%s); retrying", self.topics, exc)
                await asyncio.sleep(FETCH_BACKOFF.delay(failures))
                continue
            for record in records:
                self.publish_local(record)
