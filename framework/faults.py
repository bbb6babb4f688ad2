"""Fault injection: switches a person flips to watch the system cope, seen by every process.

Like the feature flags of the OpenTelemetry Demo (flagd), but stored on the bus itself, so they
reach every process of every service without another server:

    switches = FaultSwitches(bus)            # the table of every service's switches
    await switches.start()                   # reads topic msa.faults to its end, then follows it
    await switches.set("payments", latency_ms=500, rates={"decline_rate": 0.25})
    switches.get("payments")                 # Switches(latency_ms=500, paused=False, ...)
    await switches.clear("payments")         # back to no faults

A service obeys its own switches when `ServiceSettings.faults` is on (`MSA_FAULTS=1`; off by
default). Its `FaultInjector` (`Service.faults`) applies them to every message handler:

- `latency_ms` (0 to 10000): sleeps that long before each of the service's message handlers;
- `paused`: pauses every subscription of the service (`Subscription.pause`): its consumers stop
  fetching but keep their partitions, so the lag grows; clearing it resumes them and it drains;
- `crash_next`: ends the process abruptly when it is about to handle its next message, with
  `os._exit(CRASH_EXIT_CODE)`: no graceful stop, nothing committed, like a SIGKILL. That message
  was not handled; another replica or the restarted process receives it again;
- rates (`Switches.rate(name)`, 0.0 to 1.0): switches of the service's own domain, which it reads
  itself; the shop's payments service declines `rate("decline_rate")` of its authorizations.

**Storage.** One compacted topic, `msa.faults` (one partition, `cleanup.policy=compact`). The
record key is the service's name and the value is all its switches, a CloudEvent of type
`msa.faults.switches` in binary mode like every event, so compaction keeps exactly the current
switches of each service. Every process reads the topic without a consumer group from its
beginning (`start()` returns once it has read up to the end it found, so a restarted process
knows its switches before its first message) and then follows it, on the in-memory bus and on
Kafka alike. A write returns once the writer's own reader has read it back.

**crash_next without a crash loop.** Arming the switch gives it a fresh id. A process about to
crash first *claims* that id: it publishes a `msa.faults.crash-claimed` record for the service
and waits until its own reader has read it back. The log's order decides: a claim wins only if,
where it stands in the log, the switch is still armed with that id (no claim and no new arming
came between); only a won claim clears the switch, and only its writer exits, once the claim is
in the log. So the restarted process reads the switch cleared and does not crash again; of two
replicas that saw the same switch, exactly one crashes; re-arming while a claim is on its way is
not lost; and a claim that cannot be written (the broker is away) crashes nothing, the next
message tries again. Every reader applies the records in the same order, so all agree on the
winner. (Compaction can leave a lost claim as a service's last record: a reader that finds no
earlier record then takes the switches the claim carries, its writer's view with crash_next
cleared. A crash switch is never re-armed by it.)

A record that is not one of these CloudEvents, or whose data does not validate, is logged and
skipped; an empty value (a tombstone) resets the service's switches.

The switches act on the bus's message handlers only: HTTP routes, an outbox relay and consumers
outside the bus (Faust agents) are not slowed, paused or crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from framework.bus import Bus, Message
from framework.errors import (
    ConfigurationError,
    MessageError,
    MsaError,
    NotStartedError,
    TransportError,
)
from framework.messages import decode_payload, from_binary, message_type, new_id, validate_payload
from framework.observability.tracing import use_service
from framework.resilience import Backoff
from framework.types import Record, RecordMetadata, TopicPartition, TopicSpec, TransportConsumer

__all__ = [
    "CLAIM_TYPE",
    "CRASH_EXIT_CODE",
    "FAULTS_TOPIC",
    "MAX_LATENCY_MS",
    "SWITCHES_TYPE",
    "CrashClaim",
    "FaultInjector",
    "FaultSwitches",
    "Switches",
    "SwitchesListener",
]

log = logging.getLogger("framework.faults")

FAULTS_TOPIC: Final = "msa.faults"
"""The compacted topic of every service's switches (key: the service's name)."""
SWITCHES_TYPE: Final = "msa.faults.switches"
CLAIM_TYPE: Final = "msa.faults.crash-claimed"
MAX_LATENCY_MS: Final = 10_000
CRASH_EXIT_CODE: Final = 137
"""The exit status of a process `crash_next` ended: what a shell reports for SIGKILL (128 + 9)."""
CATCH_UP_TIMEOUT: Final = 30.0
"""Seconds `FaultSwitches.start` waits to have read the topic up to its end."""
READ_BACK_TIMEOUT: Final = 10.0
"""Seconds a write waits for its own reader to read it back."""
_FOLLOW_BACKOFF: Final = Backoff(initial=0.2, maximum=5.0)
_KEPT_CLAIMS: Final = 1024

RateName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]


@message_type(SWITCHES_TYPE)
class Switches(BaseModel):
    """One service's fault switches: the value of its record on the topic.

    `crash_next` is the id of an armed crash (None: not armed); `crash_armed` says whether it is.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    latency_ms: int = Field(default=0, ge=0, le=MAX_LATENCY_MS)
    paused: bool = False
    crash_next: str | None = Field(default=None, min_length=1, max_length=64)
    rates: dict[RateName, Rate] = Field(default_factory=dict, max_length=32)

    @property
    def crash_armed(self) -> bool:
        return self.crash_next is not None

    def rate(self, name: str) -> float:
        """The domain switch `name`, from 0.0 (never) to 1.0 (always); 0.0 when unset."""
        return self.rates.get(name, 0.0)


@message_type(CLAIM_TYPE)
class CrashClaim(BaseModel):
    """A process's claim of an armed `crash_next` (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    arm: str = Field(min_length=1, max_length=64)
    instance: str = Field(max_length=200)
    switches: Switches
    """The claimer's view of the service's switches, crash_next cleared."""


NO_FAULTS: Final = Switches()

SwitchesListener = Callable[[str, Switches], None]
"""Called with a service's name and its new switches whenever they change."""


class _GroupLess:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


def _check_service(service: str) -> None:
    if not service or len(service) > 200 or not service.isprintable():
        raise ConfigurationError(f"not a service name: {service!r}")


class FaultSwitches:
    """Every service's switches, as the compacted topic holds them; see the module docstring.

    Start it after its bus (`start()` needs the bus's transport running); `get` answers from
    memory, `set`, `clear` and `claim_crash` write through the bus.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        topic: str = FAULTS_TOPIC,
        catch_up_timeout: float = CATCH_UP_TIMEOUT,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.catch_up_timeout = catch_up_timeout
        self._switches: dict[str, Switches] = {}
        self._read_to: dict[int, int] = {}
        """Partition -> the offset after the last record read."""
        self._claims: dict[tuple[int, int], bool] = {}
        """(partition, offset) of each claim read -> whether it won."""
        self._changed = asyncio.Condition()
        self._listeners: list[SwitchesListener] = []
        self._consumer: TransportConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None

    # -- reading ------------------------------------------------------------------------------

    def get(self, service: str) -> Switches:
        """`service`'s switches as read so far (no faults when it has no record)."""
        return self._switches.get(service, NO_FAULTS)

    def all(self) -> dict[str, Switches]:
        """Every service that has a record, and its switches."""
        return dict(self._switches)

    def on_change(self, listener: SwitchesListener) -> None:
        """Call `listener(service, switches)` after each change read from the topic."""
        self._listeners.append(listener)

    @property
    def started(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Declare the topic, read it up to its end (within `catch_up_timeout`; later records
        apply as they come), then follow it."""
        if self._task is not None:
            return
        transport = self.bus.transport
        await transport.declare(
            [TopicSpec(name=self.topic, partitions=1, config={"cleanup.policy": "compact"})]
        )
        consumer = transport.consumer(
            [self.topic], group=None, listener=_GroupLess(), start_from="earliest"
        )
        await consumer.start()
        try:
            count = await transport.partitions_for(self.topic)
            partitions = [TopicPartition(self.topic, p) for p in range(count)]
            ends = await consumer.end_offsets(partitions)
        except BaseException:
            with contextlib.suppress(MsaError):
                await consumer.stop()
            raise
        self._consumer, self._partitions = consumer, partitions
        with use_service(self.bus.source):
            self._task = asyncio.create_task(self._follow(consumer), name=f"faults:{self.topic}")
        try:
            async with asyncio.timeout(self.catch_up_timeout):
                await self._until(lambda: self._has_read(ends))
        except TimeoutError:
            log.warning(
                "fault switches: %s was not read to its end within %.0fs; switches apply as "
                "they are read",
                self.topic,
                self.catch_up_timeout,
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(MsaError):
                await consumer.stop()

    async def _follow(self, consumer: TransportConsumer) -> None:
        failures = 0
        while True:
            try:
                records = await consumer.fetch(timeout=1.0, max_records=500)
            except MsaError as exc:
                failures += 1
                log.warning("fault switches: reading %s failed (%s); retrying", self.topic, exc)
                await asyncio.sleep(_FOLLOW_BACKOFF.delay(failures))
                continue
            failures = 0
            if not records:
                continue
            async with self._changed:
                for record in records:
                    self._apply(record)
                self._changed.notify_all()

    def _apply(self, record: Record) -> None:
        self._read_to[record.partition] = record.offset + 1
        service = (record.key or b"").decode("utf-8", errors="replace")
        if not service:
            log.warning(
                "fault switches: skipping %s@%d: it has no key", record.topic, record.offset
            )
            return
        previous = self._switches.get(service)
        if not record.value:  # a tombstone
            switches = NO_FAULTS
        else:
            try:
                envelope = from_binary(record)
                if envelope.type == SWITCHES_TYPE:
                    switches = decode_payload(envelope.data, Switches)
                elif envelope.type == CLAIM_TYPE:
                    claim = decode_payload(envelope.data, CrashClaim)
                    switches = self._settle_claim(record, previous, claim)
                else:
                    raise MessageError(f"unknown type {envelope.type!r}")
            except MessageError as exc:
                log.warning(
                    "fault switches: skipping %s@%d (key %r): %s",
                    record.topic,
                    record.offset,
                    service,
                    exc,
                )
                return
        self._switches[service] = switches
        if switches != (previous or NO_FAULTS):
            for listener in list(self._listeners):
                try:
                    listener(service, switches)
                except Exception:
                    log.exception("fault switches: listener %r failed", listener)

    def _settle_claim(
        self, record: Record, previous: Switches | None, claim: CrashClaim
    ) -> Switches:
        """The switches after `claim`, and whether it won (module docstring)."""
        won = previous is not None and previous.crash_next == claim.arm
        self._claims[(record.partition, record.offset)] = won
        if len(self._claims) > _KEPT_CLAIMS:  # nobody waits for the oldest any more
            del self._claims[next(iter(self._claims))]
        if previous is None:  # compacted history: the claimer's view is all there is
            return claim.switches.model_copy(update={"crash_next": None})
        return previous.model_copy(update={"crash_next": None}) if won else previous

    def _has_read(self, ends: Mapping[TopicPartition, int]) -> bool:
        return all(self._read_to.get(tp.partition, 0) >= end for tp, end in ends.items())

    async def _until(self, ready: Callable[[], bool]) -> None:
        if self._task is None:
            raise NotStartedError("FaultSwitches used before start()")
        async with self._changed:
            await self._changed.wait_for(ready)

    async def _read_back(self, written: RecordMetadata) -> None:
        try:
            async with asyncio.timeout(READ_BACK_TIMEOUT):
                await self._until(lambda: self._read_to.get(written.partition, 0) > written.offset)
        except TimeoutError:
            raise TransportError(
                f"the fault switches written to {written.topic}@{written.offset} were not read "
                f"back within {READ_BACK_TIMEOUT:.0f}s"
            ) from None

    async def _write(self, service: str, data: BaseModel) -> RecordMetadata:
        written = await self.bus.publish(self.topic, data, key=service, subject=service)
        assert isinstance(written, RecordMetadata)  # confirm=True: the acknowledgement itself
        await self._read_back(written)
        return written

    async def _read_to_end(self) -> None:
        """Wait until everything on the topic now is read (so a write starts from the latest)."""
        consumer = self._consumer
        if consumer is None:
            raise NotStartedError("FaultSwitches used before start()")
        ends = await consumer.end_offsets(self._partitions)
        try:
            async with asyncio.timeout(READ_BACK_TIMEOUT):
                await self._until(lambda: self._has_read(ends))
        except TimeoutError:
            raise TransportError(f"{self.topic} was not read to its end in time") from None

    # -- writing ------------------------------------------------------------------------------

    async def set(
        self,
        service: str,
        *,
        latency_ms: int | None = None,
        paused: bool | None = None,
        crash_next: bool | None = None,
        rates: Mapping[str, float] | None = None,
    ) -> Switches:
        """Change some of `service`'s switches (None: leave it as it is) and return them as
        every reader will have them. `crash_next=True` arms a crash (an armed one stays as it
        is); `rates` are merged into the service's rates.

        Raises `PayloadValidationError` for a value out of range, `ConfigurationError` for an
        empty service name, and a `BusError` when the switches could not be written.
        """
        _check_service(service)
        await self._read_to_end()
        current = self.get(service)
        values: dict[str, Any] = current.model_dump()
        if latency_ms is not None:
            values["latency_ms"] = latency_ms
        if paused is not None:
            values["paused"] = paused
        if crash_next is not None:
            values["crash_next"] = (current.crash_next or new_id()) if crash_next else None
        if rates is not None:
            values["rates"] = {**current.rates, **rates}
        await self._write(service, validate_payload(values, Switches))
        return self.get(service)

    async def clear(self, service: str) -> Switches:
        """Switch every fault of `service` off."""
        _check_service(service)
        await self._write(service, NO_FAULTS)
        return self.get(service)

    async def claim_crash(self, service: str, arm: str) -> bool:
        """Claim `service`'s crash switch armed as `arm` for this process: True when the claim
        won, and the caller is the one to crash (module docstring). Raises a `BusError` when
        the claim could not be written or read back."""
        current = self.get(service)
        if current.crash_next != arm:
            return False
        claim = CrashClaim(
            arm=arm,
            instance=self.bus.instance_id,
            switches=current.model_copy(update={"crash_next": None}),
        )
        written = await self._write(service, claim)
        return self._claims.pop((written.partition, written.offset), False)


class FaultInjector:
    """Applies one service's switches to its bus: consume middleware (`apply`) for latency
    and crashes, and the subscriptions' pause for `paused`. `Service` makes one when its
    settings say `faults`; add `apply` as consume middleware before the bus starts, and
    `start()` it after.

    `exit` (default `os._exit`) and `sleep` (default `asyncio.sleep`) are what a crash and a
    latency call; a test passes its own. An `exit` that returns lets the handler run.
    """

    def __init__(
        self,
        bus: Bus,
        service: str,
        *,
        switches: FaultSwitches | None = None,
        exit: Callable[[int], object] = os._exit,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        _check_service(service)
        self.bus = bus
        self.service = service
        self.switches = switches if switches is not None else FaultSwitches(bus)
        self._owns_switches = switches is None
        self.exit = exit
        self.sleep = sleep
        self._started = asyncio.Event()
        self._claiming: asyncio.Task[bool] | None = None
        self._claiming_arm: str | None = None
        self._exited_for: str | None = None
        self.switches.on_change(self._changed)

    @property
    def current(self) -> Switches:
        """This service's switches now."""
        return self.switches.get(self.service)

    async def start(self) -> None:
        """Read the switches (when this injector owns its `FaultSwitches`), then apply them;
        handlers wait for this."""
        if self._owns_switches:
            await self.switches.start()
        self._pause(self.current.paused)
        self._started.set()

    async def stop(self) -> None:
        self._started.clear()
        claiming, self._claiming = self._claiming, None
        if claiming is not None and not claiming.done():
            claiming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claiming
        if self._owns_switches:
            await self.switches.stop()

    async def apply(self, message: Message[Any], call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        """Consume middleware: crash or wait as the switches say, then handle the message."""
        if not self._started.is_set():
            await self._started.wait()
        switches = self.current
        if switches.crash_next is not None:
            await self._crash(switches.crash_next)
        if switches.latency_ms:
            await self.sleep(switches.latency_ms / 1000)
        return await call_next(message)

    def _changed(self, service: str, switches: Switches) -> None:
        if service == self.service and self._started.is_set():
            self._pause(switches.paused)

    def _pause(self, paused: bool) -> None:
        subscriptions = [s for s in self.bus.subscriptions if s.paused != paused]
        for subscription in subscriptions:
            if paused:
                subscription.pause()
            else:
                subscription.resume()
        if subscriptions:
            log.warning(
                "fault injection: %s %s consumer(s) of %s",
                "paused" if paused else "resumed",
                len(subscriptions),
                self.service,
            )

    async def _crash(self, arm: str) -> None:
        if self._claiming is None or self._claiming_arm != arm:
            self._claiming_arm = arm
            self._claiming = asyncio.ensure_future(self._claim(arm))
        won = await asyncio.shield(self._claiming)
        if won and self._exited_for != arm:
            self._exited_for = arm
            log.critical(
                "fault injection: crash_next of %s claimed by instance %s: exiting now, "
                "without a graceful stop (exit status %d)",
                self.service,
                self.bus.instance_id,
                CRASH_EXIT_CODE,
            )
            for handler in logging.getLogger().handlers:  # os._exit flushes nothing
                with contextlib.suppress(Exception):
                    handler.flush()
            self.exit(CRASH_EXIT_CODE)

    async def _claim(self, arm: str) -> bool:
        try:
            return await self.switches.claim_crash(self.service, arm)
        except MsaError as exc:
            log.warning(
                "fault injection: could not claim the crash switch of %s (%s); the next "
                "message tries again",
                self.service,
                exc,
            )
            self._claiming = None
            return False
