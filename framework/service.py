"""Services: declarative handlers and routes, resources, and a lifecycle with written promises.

    @message_type("shop.order.placed")
    class OrderPlaced(BaseModel):
        order_id: str
        total: Decimal

    class Shipping(Service):
        name = "shipping"
        publishes = {"shipping": [ShipmentScheduled]}

        def __init__(self, settings: ServiceSettings | None = None) -> None:
            super().__init__(settings)
            self.db = self.use(MongoResource(...))          # started before the bus, stopped after

        @handles("orders", concurrency=32)
        async def on_order_placed(self, event: OrderPlaced) -> None:
            await self.publish("shipping", ShipmentScheduled(order_id=event.order_id),
                               key=event.order_id)

        @route("GET", "/shipments/{order_id}")
        async def get_shipment(self, request: web.Request) -> web.Response: ...

Run it with `msa run shop.shipping:Shipping`, or in tests with `framework.testing.ServiceHarness`.

A handler's first parameter after `self` is annotated with its payload type (a pydantic model, a
dataclass or a `msgspec.Struct`; a type neither pydantic nor msgspec can validate is refused with
`ConfigurationError` when the class is defined); its CloudEvents type is `type_name(payload type)`
unless `@handles(type=...)` says otherwise. An optional second parameter receives the `Message`
(envelope, record, attempt). A return value is the reply when the message was a request. Handlers
with the same topics, group and options share one consumer-group member (`Subscription`); the
group defaults to the service's name, so every replica of a service shares the work.

Lifecycle, in this order (the promises Kubernetes probes rely on):

- `start()`: the HTTP side starts first (`/alive` answers 200, `/ready` 503); then resources
  start in the order they were `use`d; then the bus (and every subscription) starts; then, when
  `settings.faults` is on, the fault switches are read (`framework.faults`; handlers wait for
  them); then `on_start()`; only then is the service ready (`/ready` 200).
- `stop(grace)` (what SIGTERM triggers): ready goes false at once (`/ready` 503, so the Pod
  leaves its Service's endpoints); the HTTP side drains (`framework.http`): every response
  says `Connection: close` (kept-alive clients reconnect elsewhere), HTTP requests under way
  finish while resources and bus still serve them, and later ones are answered 503 "not
  processed" (probes excepted); then fetching stops; handlers already running finish; done
  offsets are committed; consumers leave their groups; the fault switches' reader stops;
  `on_stop()` runs; resources stop in reverse order; the HTTP side stops last. The HTTP drain
  and the consumers' drain share `grace` seconds (resources bound their own stops, e.g.
  `PostgresResource.close_timeout`). Records fetched but not started are not committed, so
  another replica receives them.
- `kill()`: stops at once, without draining or committing (tests of crash recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar, get_type_hints, runtime_checkable

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.transports import transport_from_env, transport_name
from framework.errors import ConfigurationError
from framework.faults import FaultInjector
from framework.messages import Envelope, check_payload_type, is_declared, type_name
from framework.observability.metrics import MetricsRegistry
from framework.types import (
    ConsumeMiddleware,
    HandlerInfo,
    PublishMiddleware,
    RecordMetadata,
    RouteInfo,
    Transport,
)

__all__ = [
    "HandlerInfo",
    "Resource",
    "RouteInfo",
    "Service",
    "ServiceSettings",
    "handles",
    "route",
]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")
log = logging.getLogger("framework.service")


@runtime_checkable
class Resource(Protocol):
    """Something a service owns and starts/stops with it (a pool, a client, a relay)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """How a service runs; `from_env()` reads the environment in one place.

    MSA_TRANSPORT (memory | kafka; unset: kafka when KAFKA_BOOTSTRAP is set, else memory),
    KAFKA_BOOTSTRAP (and the other KAFKA_* of `KafkaSettings`; see `framework.bus.transports`),
    MSA_HTTP_HOST, MSA_HTTP_PORT (0 picks a free port; -1 turns the HTTP side off),
    MSA_SHUTDOWN_GRACE (seconds), MSA_INSTANCE_ID, MSA_LOG_LEVEL, MSA_LOG_FORMAT, MSA_FAULTS
    (1: obey the fault-injection switches, `framework.faults`; default 0).
    """

    transport: str = "memory"
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    shutdown_grace: float = 25.0
    instance_id: str | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    faults: bool = False
    """Obey this service's fault-injection switches (`framework.faults`): off unless asked."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from the environment (`os.environ` unless given).

        The transport is explicit: `MSA_TRANSPORT` names it; when it is unset, a set
        `KAFKA_BOOTSTRAP` means Kafka (a process given a broker never falls back to the
        in-memory bus in silence), and neither means the in-memory bus. A malformed value is a
        `ConfigurationError` that names the variable and the value.
        """
        env = dict(os.environ if environ is None else environ)

        def number(name: str, default: str, kind: type[int] | type[float]) -> Any:
            raw = env.get(name, "").strip() or default
            try:
                return kind(raw)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise ConfigurationError(f"{name} must be {what}, not {raw!r}") from None

        def flag(name: str) -> bool:
            raw = env.get(name, "").strip().lower()
            if raw in ("", "0", "false", "no", "off"):
                return False
            if raw in ("1", "true", "yes", "on"):
                return True
            raise ConfigurationError(f"{name} must be 1 or 0, not {raw!r}")

        return cls(
            transport=transport_name(env),
            http_host=env.get("MSA_HTTP_HOST", "0.0.0.0"),
            http_port=number("MSA_HTTP_PORT", "8080", int),
            shutdown_grace=number("MSA_SHUTDOWN_GRACE", "25", float),
            instance_id=env.get("MSA_INSTANCE_ID") or None,
            log_level=env.get("MSA_LOG_LEVEL", "INFO"),
            log_format=env.get("MSA_LOG_FORMAT", "json"),
            faults=flag("MSA_FAULTS"),
            env=env,
        )

    @property
    def http_enabled(self) -> bool:
        return self.http_port >= 0

    def make_transport(self) -> Transport:
        """A new transport: `transport`, set up from `env` (`framework.bus.transport_from_env`)."""
        return transport_from_env(self.env, name=self.transport)


def handles(
    topics: str | Sequence[str],
    *,
    type: str | None = None,
    group: str | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Mark a method as the handler of its payload type on `topics`.

    `options` are `ConsumerOptions` fields (concurrency, ordering, retry, retry_mode, ...).
    """
    topic_list = (topics,) if isinstance(topics, str) else tuple(topics)
    unknown = set(options) - set(ConsumerOptions.__dataclass_fields__) - {"group"}
    if unknown:
        raise ConfigurationError(f"@handles: unknown consumer option(s) {sorted(unknown)}")

    def mark(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"@handles: {fn.__qualname__} must be `async def`")
        fn.__msa_handler__ = HandlerInfo(  # type: ignore[attr-defined]
            topics=topic_list, type=type, group=group, options=options
        )
        return fn

    return mark


def route(method: str, path: str, *, body: Any = None, response: Any = None) -> Callable[[F], F]:
    """Mark a method as an HTTP route of the service's aiohttp app.

    `body`/`response` (optional payload types) document the route in `/docs/openapi.json`.
    """

    def mark(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"@route: {fn.__qualname__} must be `async def`")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        fn.__msa_route__ = RouteInfo(  # type: ignore[attr-defined]
            method=method.upper(), path=path, summary=summary, body=body, response=response
        )
        return fn

    return mark


def _inspect_handler(cls: type, attribute: str, fn: Callable[..., Any]) -> HandlerInfo:
    info: HandlerInfo = fn.__msa_handler__  # type: ignore[attr-defined]
    params = list(inspect.signature(fn).parameters.values())[1:]
    if not params or len(params) > 2:
        raise ConfigurationError(
            f"{cls.__name__}.{attribute}: a handler takes (self, payload[, message])"
        )
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise ConfigurationError(
            f"{cls.__name__}.{attribute}: cannot resolve hints: {exc}"
        ) from exc
    payload_type = hints.get(params[0].name)
    if payload_type is None:
        raise ConfigurationError(
            f"{cls.__name__}.{attribute}: annotate the payload parameter {params[0].name!r} "
            "with its type (a pydantic model, a dataclass or a msgspec.Struct)"
        )
    try:
        check_payload_type(payload_type)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{cls.__name__}.{attribute}: the payload parameter {params[0].name!r}: {exc}"
        ) from exc.__cause__
    return replace(
        info, payload_type=payload_type, wants_message=len(params) == 2, attribute=attribute
    )


class Service:
    """Base class of a service. See the module docstring for the lifecycle promises."""

    name: ClassVar[str] = ""
    publishes: ClassVar[Mapping[str, Sequence[type]]] = {}
    """Topics this service publishes to, and their payload types (for AsyncAPI)."""

    __msa_handlers__: ClassVar[tuple[HandlerInfo, ...]] = ()
    __msa_routes__: ClassVar[tuple[RouteInfo, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__.lower()
        handlers: list[HandlerInfo] = []
        routes: list[RouteInfo] = []
        seen: set[str] = set()
        for klass in cls.__mro__:
            for attribute, value in vars(klass).items():
                if attribute in seen:
                    continue
                seen.add(attribute)
                if hasattr(value, "__msa_handler__"):
                    handlers.append(_inspect_handler(cls, attribute, value))
                if hasattr(value, "__msa_route__"):
                    routes.append(replace(value.__msa_route__, attribute=attribute))
        cls.__msa_handlers__ = tuple(handlers)
        cls.__msa_routes__ = tuple(routes)

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        transport: Transport | None = None,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.settings = settings or ServiceSettings.from_env()
        # `is None`, not `or`: an empty registry is falsy (it has a length).
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        self.bus = Bus(
            transport or self.settings.make_transport(),
            source=self.name,
            metrics=self.metrics,
            instance_id=self.settings.instance_id,
        )
        self.faults: FaultInjector | None = None
        """Applies this service's fault-injection switches, when `settings.faults` is on."""
        if self.settings.faults:
            self.faults = FaultInjector(self.bus, self.name)
            self.bus.add_consume_middleware(self.faults.apply)
        self._resources: list[Resource] = []
        self._ready = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._http: Any = None
        self._subscribed = False

    # -- composition ----------------------------------------------------------------------------

    RT = TypeVar("RT", bound=Resource)

    def use(self, resource: RT) -> RT:
        """Own `resource`: started before the bus in `start()`, stopped after it in `stop()`."""
        if self._ready:
            raise ConfigurationError("use() resources before the service starts")
        self._resources.append(resource)
        return resource

    @property
    def resources(self) -> tuple[Resource, ...]:
        """The resources this service `use`s, in start order."""
        return tuple(self._resources)

    def add_publish_middleware(self, middleware: PublishMiddleware) -> None:
        self.bus.add_publish_middleware(middleware)

    def add_consume_middleware(self, middleware: ConsumeMiddleware) -> None:
        self.bus.add_consume_middleware(middleware)

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    @property
    def stopping(self) -> bool:
        """True from the moment `stop()` or `kill()` began (`/ready` answers 503)."""
        return self._stopping

    @property
    def http_port(self) -> int | None:
        """The port the HTTP side listens on (after start), or None."""
        return self._http.port if self._http is not None else None

    # -- hooks ----------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Called after resources and the bus started, before the service reports ready."""

    async def on_stop(self) -> None:
        """Called after the bus drained and committed, before resources stop."""

    async def check_ready(self) -> dict[str, bool]:
        """Readiness of dependencies for `/ready`; override to add checks (name -> ok)."""
        checks = {"bus": self.bus.started, "consumers": not self.bus.failed_subscriptions()}
        for resource in self._resources:
            check = getattr(resource, "check", None)
            if check is not None:
                try:
                    checks[type(resource).__name__] = bool(await check())
                except Exception:
                    checks[type(resource).__name__] = False
        return checks

    # -- messaging ------------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,
        subject: str | None = None,
        confirm: bool = True,
    ) -> RecordMetadata | asyncio.Future[RecordMetadata]:
        return await self.bus.publish(
            topic, data, key=key, type=type, subject=subject, confirm=confirm
        )

    async def request(
        self,
        topic: str,
        data: Any,
        *,
        reply_type: type[R] | None = None,
        key: str | None = None,
        timeout: float = 10.0,
    ) -> R:
        return await self.bus.request(topic, data, reply_type=reply_type, key=key, timeout=timeout)

    def _subscribe_handlers(self) -> None:
        groups: dict[tuple[Any, ...], dict[str, HandlerSpec]] = {}
        options_by_key: dict[tuple[Any, ...], ConsumerOptions] = {}
        for info in self.__msa_handlers__:
            group = info.group or self.name
            options = ConsumerOptions(group=group, **info.options)
            key = (info.topics, options)
            handlers = groups.setdefault(key, {})
            options_by_key[key] = options
            event_type = info.type or type_name(info.payload_type)
            if info.type is None and not is_declared(event_type):
                log.warning(
                    "%s.%s handles type %r, which no @message_type in this process declares: "
                    "it only receives events whose CloudEvents type is exactly %r (decorate "
                    "%s with @message_type(...), or pass @handles(..., type=...)); events of "
                    "other types on %s are unhandled=%r",
                    type(self).__name__,
                    info.attribute,
                    event_type,
                    event_type,
                    getattr(info.payload_type, "__qualname__", info.payload_type),
                    ", ".join(info.topics),
                    options.unhandled,
                )
            if event_type in handlers:
                raise ConfigurationError(
                    f"{type(self).__name__}: two handlers for {event_type!r} on {info.topics}"
                )
            handlers[event_type] = HandlerSpec(
                payload_type=info.payload_type,
                call=self._bind_handler(info),
                name=info.attribute,
            )
        seen: dict[tuple[str, str], ConsumerOptions] = {}
        for key, handlers in groups.items():
            topics, options = key
            for topic in topics:
                other = seen.setdefault((options.group, topic), options)
                if other != options:
                    # Two subscriptions in one group would split the topic's partitions between
                    # them, and each would meet the other's types as unhandled.
                    raise ConfigurationError(
                        f"{type(self).__name__}: the handlers of group {options.group!r} on "
                        f"{topic!r} give different consumer options ({other} and {options}); "
                        "give them the same options, or another group"
                    )
            self.bus.subscribe(topics, handlers, options_by_key[key])

    def _bind_handler(self, info: HandlerInfo) -> Callable[[Message[Any]], Awaitable[Any]]:
        method = getattr(self, info.attribute)
        if info.wants_message:

            async def call_with_message(message: Message[Any]) -> Any:
                return await method(message.envelope.data, message)

            return call_with_message

        async def call(message: Message[Any]) -> Any:
            return await method(message.envelope.data)

        return call

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._subscribed:
            self._subscribe_handlers()
            self._subscribed = True
        if self.settings.http_enabled and self._http is None:
            # Imported here so that `import framework` does not import aiohttp (a process that
            # only consumes never needs it); framework.http does not import this module.
            from framework.http import ServiceHttp

            http = ServiceHttp(self)
            try:
                await http.start()
            except BaseException:  # e.g. the port is in use: leave nothing half-started
                await http.stop()
                raise
            self._http = http
        started: list[Resource] = []
        try:
            for resource in self._resources:
                await resource.start()
                started.append(resource)
            await self.bus.start()
            if self.faults is not None:
                await self.faults.start()
            await self.on_start()
        except BaseException:
            await self.bus.stop(grace=0)
            if self.faults is not None:
                await self.faults.stop()
            for resource in reversed(started):
                with contextlib.suppress(Exception):
                    await resource.stop()
            if self._http is not None:
                await self._http.stop()
                self._http = None
            raise
        self._ready = True
        log.info(
            "service %s started on %s; consumer groups: %s",
            self.name,
            describe_transport(self.bus.transport),
            ", ".join(sorted({s.group for s in self.bus.subscriptions})) or "none",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (see the module docstring). Safe to call twice: a second call
        returns once the first one has stopped the service."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace if grace is None else grace
        log.info("service %s stopping (grace %.1fs)", self.name, grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            if self._http is not None:
                await self._http.drain(grace)
            try:
                await self.bus.stop(grace=max(0.0, deadline - loop.time()))
            finally:
                if self.faults is not None:
                    await self.faults.stop()
            await self.on_stop()
        finally:
            for resource in reversed(self._resources):
                try:
                    await resource.stop()
                except Exception:
                    log.exception("stopping %r failed", resource)
            if self._http is not None:
                await self._http.stop()
                self._http = None
            self._ready = False
            self._stopped.set()
            log.info("service %s stopped", self.name)

    async def kill(self) -> None:
        """Stop at once: no draining, no commits (to test crash recovery)."""
        self._stopping = True
        await self.bus.abort()
        if self.faults is not None:
            await self.faults.stop()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        self._ready = False
        self._stopped.set()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def envelope(self, data: Any, **attributes: Any) -> Envelope[Any]:
        return self.bus.envelope(data, **attributes)


def describe_transport(transport: Transport) -> str:
    """Which transport a process uses, for its start-up log line: `kafka (brokers ...)`."""
    settings = getattr(transport, "settings", None)
    brokers = getattr(settings, "bootstrap_servers", None)
    if brokers is None:
        return f"the {transport.name} transport (in this process only)"
    protocol = getattr(settings, "security_protocol", "PLAINTEXT")
    return f"the {transport.name} transport (brokers {brokers}, {protocol})"
