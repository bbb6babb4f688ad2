"""Stream processing with Faust inside a service: CloudEvents agents, tables, one lifecycle.

`StreamsResource` runs a `faust.App` as one of a service's resources. Agents consume our
CloudEvents (binary mode: `ce_*` headers, JSON payload) as typed payloads; tables are Faust's
changelog-backed tables, optionally windowed:

    class Dashboard(Service):
        name = "dashboard"

        def __init__(self, settings: ServiceSettings | None = None) -> None:
            super().__init__(settings)
            self.streams = self.use(StreamsResource(self))       # Faust app id "dashboard-streams"
            self.per_minute = self.streams.table(
                "orders-per-minute", default=int, tumbling=60, expires=3600
            )
            self.streams.agent("shop.orders.events", OrderPlaced)(self.count_orders)

        async def count_orders(self, events: CloudEvents[OrderPlaced]) -> None:
            async for envelope, order in events:                # (Envelope[OrderPlaced], payload)
                self.per_minute[order.customer_id] += 1          # in the window of envelope.time

        @route("GET", "/orders-per-minute/{customer}")
        async def read(self, request: web.Request) -> web.Response:
            customer = request.match_info["customer"]
            return json_response({"now": self.per_minute.window_value(customer, time.time())})

How Faust runs here, and the promises that follow:

- **In the service's loop, as a service, never as a worker.** `start()` builds a fresh
  `faust.App` (`web_enabled=False`, `autodiscover=False`) and awaits `app.start()`, which
  returns once the app joined its consumer group, got its partitions and recovered its tables
  from their changelogs; `stop()` awaits `app.stop()` (the consumer commits what its agents
  finished and leaves the group, the producer flushes). Faust's `Worker`, which installs signal
  handlers and runs its own loop, is never used: the service's own SIGTERM handling stops it.
  Each `start()` makes a new app, so a resource can be started again after `stop()`.
- **Faust's threads stay Faust's.** faust-streaming's aiokafka consumer fetches on a thread
  with a loop of its own (its `ConsumerThread`) and hands records over; agents, tables, the
  producer and Faust's timers run as tasks in the service's loop. Nothing installs signal
  handlers, and `stop()` leaves no task or thread behind.
- **Kafka settings are the service's**: `kafka=`, else the service's `KafkaTransport` settings,
  else `KAFKA_*` from the service's settings' env, else from the process environment.
- **The app id is `<service name>-streams`**, which is also its consumer group: distinct from
  the group of the service's `@handles` subscriptions (Faust's partition assignor cannot share
  a group with plain consumers).
- **Tables are co-partitioned with the agents' topics.** Before starting, the resource makes
  sure every agent topic exists (created with the transport's defaults when missing) and gives
  the tables (and so their changelog topics, which Faust creates) the same partition count.
  The store is `memory://` by default (state is rebuilt from the changelog at start); pass
  `store="rocksdb://"` with `python-rocksdb` installed to keep it on disk in `datadir`.
- **Windowed tables use event time**: a window is chosen by the CloudEvent's `time` (the
  `ce_time` header) of the record being processed, not by the clock of this process.
- **Agents never die of a bad record.** A record that is not a CloudEvent, or whose payload is
  not a valid `payload_type`, is logged and skipped (`outcome="undecodable"`); events of other
  CloudEvents types on the topic are skipped silently (`outcome="ignored"`). If the agent's own
  code raises, Faust logs it and restarts the agent at the next record (the failing record is
  not retried), counted as `outcome="failed"`.
- **Metrics**: `msa_stream_events_total{agent, outcome}` in the service's registry, outcome one
  of processed, ignored, undecodable, failed. **Readiness**: `check()` (which `/ready` calls)
  is true only between a completed `start()` and `stop()`, while the app has not crashed.

Delivery is at-least-once (Faust's default `processing_guarantee`): after a crash, records
processed since the last commit are processed again, so table updates should be idempotent or
tolerate the rare duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from framework.errors import (
    ConfigurationError,
    DecodeError,
    MessageError,
    NotStartedError,
    TransportError,
)
from framework.messages import Envelope, decode_payload, from_binary, type_name
from framework.types import Record, TopicSpec

try:
    import faust
    from faust.types import EventT
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        'framework.streams needs faust-streaming: pip install "msa-framework[streams]"'
    ) from exc

if TYPE_CHECKING:
    from framework.bus.kafka import KafkaSettings
    from framework.service import Service

__all__ = ["AgentFunction", "CloudEvents", "StreamTable", "StreamsResource"]

T = TypeVar("T")
log = logging.getLogger("framework.streams")

CloudEvents: TypeAlias = AsyncIterator[tuple[Envelope[T], T]]
"""What an agent iterates: `(envelope, payload)`, where `envelope.data is payload`."""

AgentFunction: TypeAlias = Callable[[CloudEvents[T]], Awaitable[None]]
"""`async def agent(events: CloudEvents[Payload]) -> None`: runs for as long as the app runs."""

_OUTCOMES = ("processed", "ignored", "undecodable", "failed")


@dataclass(frozen=True, kw_only=True)
class _AgentSpec:
    topic: str
    payload_type: Any
    event_type: str
    name: str
    concurrency: int
    function: Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class _TableSpec:
    name: str
    default: Callable[[], Any] | None
    tumbling: float | None
    expires: float | None
    key_index: bool
    use_partitioner: bool
    options: Mapping[str, Any] = field(default_factory=dict)


def _record_of(event: EventT[Any]) -> Record:
    """The framework `Record` of a Faust event read with raw key and value serializers."""
    message = event.message
    raw_headers: Any = message.headers or ()
    if isinstance(raw_headers, Mapping):
        raw_headers = raw_headers.items()
    headers = tuple(
        (str(name), value if isinstance(value, bytes) else str(value).encode())
        for name, value in raw_headers
    )
    value = message.value
    if not isinstance(value, bytes):
        raise DecodeError(
            f"record {message.topic}[{message.partition}]@{message.offset} has no value"
        )
    key = message.key
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=key if isinstance(key, bytes) else None,
        value=value,
        headers=headers,
        timestamp_ms=int(message.timestamp * 1000),
    )


def cloudevent_time(event: EventT[Any] | None = None) -> float:
    """The `ce_time` of a Faust event as a Unix timestamp (the record timestamp without one,
    the clock outside a stream): the time windowed tables use."""
    if event is None:
        return time.time()
    raw: Any = event.message.headers or ()
    items = raw.items() if isinstance(raw, Mapping) else raw
    for name, value in items:
        if name == "ce_time":
            with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
                text = value.decode() if isinstance(value, bytes) else str(value)
                return datetime.fromisoformat(text).timestamp()
    return float(event.message.timestamp)


class StreamTable(MutableMapping[Any, Any]):
    """A table declared on a `StreamsResource`; a mapping view of the running app's table.

    Reading and writing delegate to the Faust table (`faust`), which exists only while the
    resource is started. Write to it from agents only: a write is sent to the table's changelog
    in the partition of the record being processed (or of the key with `use_partitioner`).
    A windowed table (`tumbling=`) answers `table[key]` with Faust's `WindowSet` (its
    `.current()`, `.now()`, `.delta(seconds)`, `+= n`); `window_value(key, at)` reads the
    window that contains `at`, also outside agents (HTTP handlers).
    """

    def __init__(self, resource: StreamsResource, spec: _TableSpec) -> None:
        self._resource = resource
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def faust(self) -> Any:
        """The running app's `faust.Table` (or its `WindowWrapper` when windowed)."""
        table = self._resource._tables.get(self.spec.name)
        if table is None:
            raise NotStartedError(
                f"table {self.spec.name!r} exists only while its StreamsResource is started"
            )
        return table

    def window_value(self, key: Any, at: float | datetime) -> Any:
        """The value of `key` in the window that contains `at` (a windowed table only)."""
        if self.spec.tumbling is None:
            raise ConfigurationError(f"table {self.spec.name!r} is not windowed")
        timestamp = at.timestamp() if isinstance(at, datetime) else float(at)
        return self.faust.relative_to(timestamp)[key].value()

    def __getitem__(self, key: Any) -> Any:
        return self.faust[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.faust[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.faust[key]

    def __contains__(self, key: object) -> bool:
        return key in self.faust

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.faust.keys()))

    def __len__(self) -> int:
        return len(self.faust)

    def __repr__(self) -> str:
        return f"<StreamTable {self.spec.name!r}>"


class StreamsResource:
    """Runs a Faust app with a service: agents over CloudEvents, tables. See the module
    docstring for the lifecycle and its promises.

    `store` is Faust's table store URL; `partitions` forces the tables' partition count
    (normally that of the agents' topics); `datadir` is where Faust keeps local data (a
    temporary directory, removed at stop, when not given); `start_timeout` bounds `start()`
    (joining the group and recovering tables); `options` are further `faust.App` settings.
    """

    def __init__(
        self,
        service: Service,
        *,
        kafka: KafkaSettings | None = None,
        app_id: str | None = None,
        store: str = "memory://",
        partitions: int | None = None,
        datadir: str | None = None,
        start_timeout: float = 60.0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not (app_id or service.name):
            raise ConfigurationError("StreamsResource needs app_id= or a service with a name")
        self.service = service
        self.app_id = app_id or f"{service.name}-streams"
        self.store = store
        self.partitions = partitions
        self.datadir = datadir
        self.start_timeout = start_timeout
        self.options = dict(options or {})
        self._kafka = kafka
        self._agents: list[_AgentSpec] = []
        self._table_specs: dict[str, _TableSpec] = {}
        self._tables: dict[str, Any] = {}
        self._app: faust.App | None = None
        self._own_datadir: str | None = None
        self._ready = False
        self._events = service.metrics.counter(
            "msa_stream_events_total",
            "Records seen by stream agents, by outcome (processed, ignored, undecodable, failed).",
            ("agent", "outcome"),
        )

    # -- declaring ------------------------------------------------------------------------------

    def agent(
        self,
        topic: str,
        payload_type: type[T],
        *,
        type: str | None = None,
        name: str | None = None,
        concurrency: int = 1,
    ) -> Callable[[AgentFunction[T]], AgentFunction[T]]:
        """Run the decorated function as a Faust agent on `topic`.

        It receives `CloudEvents[payload_type]`: the events of CloudEvents type `type`
        (default `type_name(payload_type)`), decoded and validated. `name` (default: the
        function's name) labels its metrics and names the Faust agent; `concurrency` runs that
        many copies of it.
        """
        self._refuse_while_running("agent()")
        event_type = type or type_name(payload_type)

        def register(function: AgentFunction[T]) -> AgentFunction[T]:
            agent_name = name or str(getattr(function, "__name__", "agent"))
            if any(spec.name == agent_name for spec in self._agents):
                raise ConfigurationError(f"two stream agents are named {agent_name!r}")
            self._agents.append(
                _AgentSpec(
                    topic=topic,
                    payload_type=payload_type,
                    event_type=event_type,
                    name=agent_name,
                    concurrency=concurrency,
                    function=function,
                )
            )
            for outcome in _OUTCOMES:  # exposed at zero from the start
                self._events.labels(agent=agent_name, outcome=outcome)
            return function

        return register

    def table(
        self,
        name: str,
        *,
        default: Callable[[], Any] | None = None,
        tumbling: float | None = None,
        expires: float | None = None,
        key_index: bool = False,
        use_partitioner: bool = False,
        **options: Any,
    ) -> StreamTable:
        """Declare a table (a changelog-backed mapping), windowed when `tumbling` is given.

        `tumbling` is the window size in seconds and `expires` how long a window is kept;
        `key_index` lets a windowed table list its keys; `use_partitioner` writes each key's
        changelog to the partition of the key instead of the record's (for tables whose keys
        differ from the agents' record keys, in a single-replica app). `options` go to
        `app.Table` (e.g. `value_type`, `help`).
        """
        self._refuse_while_running("table()")
        if name in self._table_specs:
            raise ConfigurationError(f"table {name!r} is declared twice")
        if expires is not None and tumbling is None:
            raise ConfigurationError("expires= needs a windowed table (tumbling=)")
        spec = _TableSpec(
            name=name,
            default=default,
            tumbling=tumbling,
            expires=expires,
            key_index=key_index,
            use_partitioner=use_partitioner,
            options=options,
        )
        self._table_specs[name] = spec
        return StreamTable(self, spec)

    # -- state ----------------------------------------------------------------------------------

    @property
    def app(self) -> faust.App:
        """The running Faust app (for what this module does not wrap)."""
        if self._app is None:
            raise NotStartedError("the Faust app exists only while the StreamsResource runs")
        return self._app

    @property
    def ready(self) -> bool:
        """Started, partitions assigned and tables recovered, and not crashed."""
        app = self._app
        return self._ready and app is not None and not app.crashed and not app.should_stop

    async def check(self) -> bool:
        """Readiness for the service's `/ready`."""
        return self.ready

    def events_total(self, agent: str, outcome: str = "processed") -> int:
        """How many records agent `agent` saw with `outcome` (see the module docstring)."""
        return int(self._events.labels(agent=agent, outcome=outcome).value)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._app is not None:
            return
        if not self._agents:
            raise ConfigurationError(
                f"StreamsResource {self.app_id!r} has no agents: declare some with agent()"
            )
        kafka = self._kafka_settings()
        partitions = self.partitions or await self._topic_partitions(kafka)
        try:
            self._app = app = self._build_app(kafka, partitions)
            await self._declare_changelogs(app, kafka, partitions)
            async with _timeout(self.start_timeout, self.app_id, kafka.bootstrap_servers):
                await app.start()
            if app.crashed:
                raise TransportError(
                    f"Faust app {self.app_id!r} crashed while starting: {app.crash_reason!r}"
                ) from app.crash_reason
        except BaseException:
            await self._shutdown()
            raise
        self._ready = True
        log.info(
            "streams %s started: %d agent(s), %d table(s), %d partition(s)",
            self.app_id,
            len(self._agents),
            len(self._table_specs),
            partitions,
        )

    async def stop(self) -> None:
        if self._app is None:
            return
        self._ready = False
        await self._shutdown()
        log.info("streams %s stopped", self.app_id)

    # -- internals ------------------------------------------------------------------------------

    def _refuse_while_running(self, what: str) -> None:
        if self._app is not None:
            raise ConfigurationError(f"{what}: declare agents and tables before the start")

    def _kafka_settings(self) -> KafkaSettings:
        from framework.bus.kafka import KafkaSettings, KafkaTransport

        if self._kafka is not None:
            return self._kafka
        transport = self.service.bus.transport
        if isinstance(transport, KafkaTransport):
            return transport.settings
        env = self.service.settings.env
        return KafkaSettings.from_env(environ=env if "KAFKA_BOOTSTRAP" in env else os.environ)

    async def _topic_partitions(self, kafka: KafkaSettings) -> int:
        """Create missing agent topics; the one partition count they share."""
        from framework.bus.kafka import KafkaTransport

        topics = sorted({spec.topic for spec in self._agents})
        transport = KafkaTransport(kafka)
        await transport.start()
        try:
            counts = {topic: await transport.partitions_for(topic) for topic in topics}
        finally:
            await transport.stop()
        if len(set(counts.values())) > 1:
            raise ConfigurationError(
                f"the topics of {self.app_id!r} have different partition counts {counts}: "
                "tables must be co-partitioned with them; give partitions= explicitly"
            )
        return next(iter(counts.values()))

    async def _declare_changelogs(
        self, app: faust.App, kafka: KafkaSettings, partitions: int
    ) -> None:
        """Create the tables' changelog topics (as Faust would: same names, cleanup policy,
        retention and partitions) and wait for their leaders, before the app starts.

        Faust creates them itself during start, but its agents may write to a changelog before
        the broker's metadata knows it; aiokafka then fails inside its partitioner and the agent
        crashes, again and again. A declared topic with elected leaders is never that new.
        """
        from mode.utils.times import want_seconds

        from framework.bus.kafka import KafkaTransport

        specs = []
        for table in app.tables.values():
            topic = table.changelog_topic
            config = {key: str(value) for key, value in (topic.config or {}).items()}
            policy = [
                f for f, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on
            ]
            if policy:
                config["cleanup.policy"] = ",".join(sorted(policy))
            if topic.retention:
                config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
            specs.append(
                TopicSpec(
                    name=topic.get_topic_name(),
                    partitions=topic.partitions or partitions,
                    replication_factor=topic.replicas or app.conf.topic_replication_factor or 1,
                    config=config,
                )
            )
        if not specs:
            return
        transport = KafkaTransport(kafka)
        await transport.start()
        try:
            await transport.declare(specs)
        finally:
            await transport.stop()

    def _build_app(self, kafka: KafkaSettings, partitions: int) -> faust.App:
        if self.datadir is None:
            self._own_datadir = tempfile.mkdtemp(prefix=f"msa-streams-{self.app_id}-")
        options: dict[str, Any] = {
            "broker": [
                f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")
            ],
            "broker_client_id": kafka.client_id,
            "broker_request_timeout": kafka.request_timeout,
            "broker_session_timeout": kafka.session_timeout_ms / 1000,
            "broker_heartbeat_interval": kafka.heartbeat_interval_ms / 1000,
            "broker_max_poll_interval": kafka.max_poll_interval_ms / 1000,
            "store": self.store,
            "web_enabled": False,
            "autodiscover": False,
            "topic_partitions": partitions,
            "datadir": self.datadir or self._own_datadir,
        }
        credentials = _credentials(kafka)
        if credentials is not None:
            options["broker_credentials"] = credentials
        options.update(self.options)
        app = faust.App(self.app_id, **options)
        for spec in self._table_specs.values():
            self._tables[spec.name] = _make_table(app, spec)
        for agent in self._agents:
            topic = app.topic(agent.topic, key_serializer="raw", value_serializer="raw")
            app.agent(topic, name=f"{self.app_id}.{agent.name}", concurrency=agent.concurrency)(
                self._faust_agent(agent)
            )
        return app

    def _faust_agent(self, spec: _AgentSpec) -> Callable[[Any], Awaitable[None]]:
        counter = self._events
        processed = counter.labels(agent=spec.name, outcome="processed")
        ignored = counter.labels(agent=spec.name, outcome="ignored")
        undecodable = counter.labels(agent=spec.name, outcome="undecodable")
        failed = counter.labels(agent=spec.name, outcome="failed")

        async def decoded(stream: Any) -> AsyncGenerator[tuple[Envelope[Any], Any], None]:
            async with contextlib.aclosing(stream.events()) as events:
                async for event in events:
                    try:
                        record = _record_of(event)
                        envelope = from_binary(record)
                        if envelope.type != spec.event_type:
                            ignored.inc()
                            continue
                        payload = decode_payload(record.value, spec.payload_type)
                    except (MessageError, UnicodeDecodeError) as exc:
                        undecodable.inc()
                        message = event.message
                        log.warning(
                            "stream agent %s skipped %s[%s]@%s: %s",
                            spec.name,
                            message.topic,
                            message.partition,
                            message.offset,
                            exc,
                        )
                        continue
                    typed: Envelope[Any] = replace(envelope, data=payload)
                    yield typed, payload
                    processed.inc()  # the agent asked for the next one: it is done with this

        async def run(stream: Any) -> None:
            events = decoded(stream)
            try:
                await spec.function(events)
            except Exception:
                failed.inc()
                raise
            finally:
                await events.aclose()

        return run

    async def _shutdown(self) -> None:
        app, self._app = self._app, None
        self._tables.clear()
        try:
            if app is not None:
                await app.stop()
        finally:
            if self._own_datadir is not None:
                shutil.rmtree(self._own_datadir, ignore_errors=True)
                self._own_datadir = None


@contextlib.asynccontextmanager
async def _timeout(seconds: float, app_id: str, bootstrap: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise TransportError(
            f"Kafka at {bootstrap}: Faust app {app_id!r} did not join its group and recover "
            f"its tables within {seconds:g}s"
        ) from exc


def _make_table(app: faust.App, spec: _TableSpec) -> Any:
    table = app.Table(
        spec.name,
        default=spec.default,
        use_partitioner=spec.use_partitioner,
        **spec.options,
    )
    if spec.tumbling is None:
        return table
    # `relative_to` is missing from faust's WindowWrapperT protocol, not from the class.
    windowed: Any = table.tumbling(spec.tumbling, expires=spec.expires, key_index=spec.key_index)
    return windowed.relative_to(cloudevent_time)


def _credentials(kafka: KafkaSettings) -> Any:
    """Faust's credentials for the transport's security settings (None for PLAINTEXT)."""
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return None
    import ssl

    context: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        context = kafka.ssl_context or ssl.create_default_context()
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=kafka.sasl_plain_username,
        password=kafka.sasl_plain_password,
        ssl_context=context,
        mechanism=kafka.sasl_mechanism or "PLAIN",
    )
