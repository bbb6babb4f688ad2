"""Format and protocol translation against what people write without the framework.

    eval "$(scripts/devservices env)"                # KAFKA_BOOTSTRAP (and KAFKA_VERSION)
    .venv/bin/python benchmarks/translate.py          # full run, about 2.5 minutes on 2 cores
    .venv/bin/python benchmarks/translate.py --quick  # a smoke run, under a minute

The document is a realistic order of exactly 1,024 bytes of JSON (a customer object, a shipping
address, a list of 5 lines, a null, a boolean; a note pads it). One process, one uvloop event
loop: HTTP server, load generator and Kafka clients share one core, the broker the rest.

Scenarios (each compared with a named baseline in the same run):

1. JSON -> XML - `convert(body, "application/json", "application/xml")` (orjson, then
   `XmlCodec.encode`). Baseline: `xmltodict.unparse({"root": json.loads(body)}).encode()`,
   the usual library pair (`.encode()` so both give the bytes an HTTP body needs).
2. XML -> JSON - `convert(body, "application/xml", "application/json")`: defusedxml, which
   refuses DTDs, entity declarations and external references, then orjson. Baseline:
   `json.dumps(xmltodict.parse(body)).encode()`, xmltodict on expat with its default
   `disable_entities=True` (entity declarations refused; a DTD without entities is read).
   The input is the XML scenario 1 produced; both outputs are checked to hold the same values.
3. field mapping - 7 operations on the order (rename a top-level and a nested field, nest two
   fields under a new object, pick `lines[0].sku` to the top, a display name from two fields by
   template, a constant, drop a field). Ours: `FieldMapping.apply`. Baseline: a hand-written
   function doing exactly that without mutating its input (the floor). Reference: `glom` with
   the equivalent spec (it builds the target, so the spec names every field kept). All three
   are checked to give the same document before timing.
   Scenarios 1-3: rounds of `--iterations` calls, implementations interleaved round by round,
   the collector's heap frozen first; the median round is reported, the best in the notes.
4. HTTP -> Kafka, 202 - an aiohttp server on 127.0.0.1 runs `AcceptedPublish(bus, topic,
   payload_type=Order, key_from="order_id")` on a `Bus(KafkaTransport(...))`; a load
   generator in the same process (one `aiohttp.ClientSession`, 32 workers) POSTs N JSON orders
   (default 3000). Baseline: a hand-written aiohttp handler - `orjson.loads`,
   `Order.model_validate`, raw `AIOKafkaProducer.send_and_wait` of the payload JSON keyed by
   the order id, 202 `{"id": ...}`. Both answer only after the broker acknowledged the record
   (acks=all, idempotence, linger_ms=5: our `KafkaSettings` defaults, for both). Rate = N / wall
   time; latency per request at the client. Afterwards every response must have been 202 and
   the topic must hold exactly warm-up + N records (end minus beginning offsets).
5. HTTP <-> Kafka request/reply - `RequestReply(bus, topic, payload_type=Order,
   reply_type=Quote)` in the aiohttp app; a responder `Bus` (its own `KafkaTransport`, same
   process) subscribed to the topic returns a small `Quote`. N/10 sequential requests (5a,
   latency) then N with 32 in flight (5b, throughput). Baseline: "direct HTTP (no broker)", an
   aiohttp handler that validates the order and returns the same quote itself - the cost of
   the synchronous call without Kafka in between.

Scenarios 4 and 5 run `--repeat` times (default 3), ours and the baseline interleaved, and the
median run (by rate) is kept. Every measurement has a time limit, so a hung broker becomes an
ERROR row; the exit status is 1 after an error row. Topics are fresh for the run
(`bench-<time>-<pid>-...`, 3 partitions) and deleted at the end, reply topics included. CPU
us/op is the process's CPU time per operation: in 4 and 5 that includes the load generator.
No targets are set for this script: the ratio column compares each row with its scenario's
baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aiohttp
import orjson
import uvloop
import xmltodict
from _common import Clock, Result, environment, median, render, require_env
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError
from glom import Val, glom
from pydantic import BaseModel, ValidationError

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message
from framework.bus.kafka import KafkaSettings, KafkaTransport
from framework.messages import message_type, new_id, type_name
from framework.translate import (
    AcceptedPublish,
    Constant,
    Drop,
    FieldMapping,
    Nest,
    Pick,
    Rename,
    RequestReply,
    Template,
    convert,
)

log = logging.getLogger("benchmarks.translate")
T = TypeVar("T")

PAYLOAD_BYTES = 1024
ORDERS = 1024
"""Distinct orders (and partition keys) the HTTP load cycles through."""
IN_FLIGHT = 32
PARTITIONS = 3
HTTP_WARM = 200
JSON_TYPE, XML_TYPE = "application/json", "application/xml"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the document ---------------------------------------------------------------------------------


class Customer(BaseModel):
    id: str
    first_name: str
    last_name: str
    email: str


class Address(BaseModel):
    street: str
    city: str
    postcode: str
    country: str


class Line(BaseModel):
    sku: str
    name: str
    quantity: int
    unit_price_cents: int
    gift_wrap: bool


@message_type("bench.translate.order")
class Order(BaseModel):
    order_id: str
    customer: Customer
    placed_at: datetime
    channel: str
    currency: str
    total_cents: int
    shipping: Address
    lines: list[Line]
    coupon: str | None
    internal_ref: str
    note: str


@message_type("bench.translate.quote")
class Quote(BaseModel):
    order_id: str
    total_cents: int
    currency: str


def order_document(i: int) -> dict[str, Any]:
    """Order `i` as a JSON-like dict whose orjson encoding is exactly `PAYLOAD_BYTES` long."""
    lines = [
        {
            "sku": f"SKU-{(i * 7 + n) % 997:05d}",
            "name": f"Stoneware mug, glaze {n}",
            "quantity": n + 1,
            "unit_price_cents": 1250 + 10 * n,
            "gift_wrap": n == 2,
        }
        for n in range(5)
    ]
    doc: dict[str, Any] = {
        "order_id": f"order-{i:08d}",
        "customer": {
            "id": f"customer-{i % 5000:06d}",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "email": "ada.lovelace@example.com",
        },
        "placed_at": f"2026-11-25T08:00:{i % 60:02d}.123Z",
        "channel": "web",
        "currency": "EUR",
        "total_cents": sum(line["quantity"] * line["unit_price_cents"] for line in lines),
        "shipping": {
            "street": "Keizersgracht 123",
            "city": "Amsterdam",
            "postcode": "1015 CJ",
            "country": "NL",
        },
        "lines": lines,
        "coupon": None,
        "internal_ref": f"erp-{i:010d}",
        "note": "",
    }
    doc["note"] = "n" * (PAYLOAD_BYTES - len(orjson.dumps(doc)))
    return doc


def quote(order: Order) -> Quote:
    return Quote(order_id=order.order_id, total_cents=order.total_cents, currency=order.currency)


# -- plumbing -------------------------------------------------------------------------------------


class BrokerUnreachable(Exception):
    pass


async def quietly(closing: Awaitable[Any], what: str) -> None:
    """Await a stop/close, bounded: a broker that went away must not hang the run."""
    try:
        async with asyncio.timeout(15):
            await closing
    except Exception as exc:  # the measurement is over; a failed close only gets logged
        log.warning("%s: %s", what, exc)


class Topics:
    """Fresh topics for this run; deletes every topic of the run (reply topics too) at the end."""

    def __init__(self, bootstrap: str, run: str) -> None:
        self.bootstrap, self.run = bootstrap, run
        self.made = 0
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")

    async def __aenter__(self) -> Topics:
        """Connect, waiting up to 30 s for a broker that is (re)starting."""
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.admin.start()
                return self
            except KafkaError as exc:
                await self.admin.close()
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"cannot reach Kafka at {self.bootstrap} ({exc}); is it running? "
                        'eval "$(scripts/devservices up)"'
                    ) from exc
                self.admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.bootstrap, client_id="bench-admin"
                )
                await asyncio.sleep(1)

    async def __aexit__(self, *exc: object) -> None:
        async def delete() -> None:
            prefix = f"bench-{self.run}-"
            names = [t for t in await self.admin.list_topics() if t.startswith(prefix)]
            if names:
                await self.admin.delete_topics(names)

        await quietly(delete(), "deleting the run's topics")
        await quietly(self.admin.close(), "closing the admin client")

    async def fresh(self, name: str) -> str:
        self.made += 1
        topic = f"bench-{self.run}-{name}-{self.made}"
        await self.admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        await asyncio.sleep(0.2)  # let the new partitions get their leader before first use
        return topic


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    """Our KafkaSettings' producer defaults, for the hand-written baseline's producer."""
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "acks": settings.acks,
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
        "max_request_size": settings.max_request_size,
        "request_timeout_ms": settings.request_timeout_ms,
    }


async def bounded(what: str, seconds: float, work: Awaitable[Any]) -> Any:
    """`work`'s result, or an error string if it raises or overruns `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        return f"timed out after {seconds:.0f}s"
    except Exception as exc:  # report and carry on with the next measurement
        log.warning("%s failed", what, exc_info=True)
        return f"{type(exc).__name__}: {exc}"


def report(results: Sequence[Result]) -> None:
    for result in results:
        rate = result.error or f"{result.rate:>10,.0f} {result.unit}"
        p = f"  p50 {result.p50:.2f} ms  p99 {result.p99:.2f} ms" if result.latencies_ms else ""
        print(f"  {result.scenario:<38} {result.implementation:<26} {rate}{p}", flush=True)


def error_row(scenario: str, implementation: str, semantics: str, error: str) -> Result:
    return Result(
        scenario=scenario, implementation=implementation, semantics=semantics, rate=0, error=error
    )


# -- 1-3. formats, no I/O -------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    semantics: str
    work: Callable[[], Any]
    baseline: bool = False
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)


def cpu_bound(scenario: str, candidates: Sequence[Candidate], *, iterations: int) -> list[Result]:
    """Rounds of `iterations` calls per candidate, interleaved; the median round reported."""
    rounds = 7
    for candidate in candidates:
        for _ in range(max(1, iterations // 10)):
            candidate.work()
    gc.collect()
    gc.freeze()  # the collector then scans only what each candidate leaves behind
    try:
        for _ in range(rounds):
            for candidate in candidates:
                work = candidate.work
                clock = Clock()
                clock.start()
                for _ in range(iterations):
                    work()
                clock.stop()
                candidate.walls.append(clock.wall)
                candidate.cpus.append(clock.us_per(iterations))
    finally:
        gc.unfreeze()
    results = []
    for candidate in candidates:
        best = min(candidate.walls)
        results.append(
            Result(
                scenario=scenario,
                implementation=candidate.name,
                semantics=candidate.semantics,
                rate=iterations / median(candidate.walls),
                unit="op/s",
                cpu_us_per_op=median(candidate.cpus),
                baseline=candidate.baseline,
                note=(
                    f"median of {rounds} x {iterations:,}; best round {iterations / best:,.0f} "
                    f"op/s ({best / iterations * 1e6:.1f} us/op)"
                ),
            )
        )
    report(results)
    return results


def json_to_xml(json_body: bytes, *, iterations: int) -> list[Result]:
    def ours() -> bytes:
        return convert(json_body, JSON_TYPE, XML_TYPE)

    def xmltodict_pair() -> bytes:
        return cast(str, xmltodict.unparse({"root": json.loads(json_body)})).encode()

    # the same document either way, read back by one parser
    assert xmltodict.parse(ours()) == xmltodict.parse(xmltodict_pair())
    return cpu_bound(
        "1. JSON -> XML, 1 KiB order",
        [
            Candidate(
                "json + xmltodict",
                "json.loads, xmltodict.unparse, encode",
                xmltodict_pair,
                baseline=True,
            ),
            Candidate("convert()", "orjson, XmlCodec.encode", ours),
        ],
        iterations=iterations,
    )


def xml_to_json(xml_body: bytes, *, iterations: int) -> list[Result]:
    def ours() -> bytes:
        return convert(xml_body, XML_TYPE, JSON_TYPE)

    def xmltodict_pair() -> bytes:
        return json.dumps(xmltodict.parse(xml_body)).encode()

    # ours gives the root element's content, xmltodict a {"root": ...} wrapper around it
    assert orjson.loads(ours()) == json.loads(xmltodict_pair())["root"]
    return cpu_bound(
        "2. XML -> JSON, 1 KiB order",
        [
            Candidate(
                "xmltodict + json",
                "expat; entity decls refused, DTD read",
                xmltodict_pair,
                baseline=True,
            ),
            Candidate("convert()", "defusedxml: refuses DTDs/entities", ours),
        ],
        iterations=iterations,
    )


MAPPING = FieldMapping(
    [
        Rename("order_id", "orderId"),
        Rename("shipping.postcode", "shipping.postalCode"),
        Nest(["currency", "total_cents"], "amount"),
        Pick("lines[0].sku", "firstSku"),
        Template("customerName", "{customer.first_name} {customer.last_name}"),
        Constant("schemaVersion", 2),
        Drop("internal_ref"),
    ]
)


def by_hand(doc: dict[str, Any]) -> dict[str, Any]:
    """What `MAPPING` does, written out: copies of the changed objects, the input untouched."""
    out = dict(doc)
    out["orderId"] = out.pop("order_id")
    shipping = dict(out["shipping"])
    shipping["postalCode"] = shipping.pop("postcode")
    out["shipping"] = shipping
    out["amount"] = {"currency": out.pop("currency"), "total_cents": out.pop("total_cents")}
    out["firstSku"] = out["lines"][0]["sku"]
    customer = out["customer"]
    out["customerName"] = f"{customer['first_name']} {customer['last_name']}"
    out["schemaVersion"] = 2
    del out["internal_ref"]
    return out


GLOM_SPEC = {
    "orderId": "order_id",
    "customer": "customer",
    "placed_at": "placed_at",
    "channel": "channel",
    "shipping": {
        "street": "shipping.street",
        "city": "shipping.city",
        "postalCode": "shipping.postcode",
        "country": "shipping.country",
    },
    "lines": "lines",
    "coupon": "coupon",
    "note": "note",
    "amount": {"currency": "currency", "total_cents": "total_cents"},
    "firstSku": "lines.0.sku",
    "customerName": lambda t: f"{t['customer']['first_name']} {t['customer']['last_name']}",
    "schemaVersion": Val(2),
}


def field_mapping(doc: dict[str, Any], *, iterations: int) -> list[Result]:
    before = orjson.dumps(doc)
    expected = by_hand(doc)
    assert MAPPING.apply(doc) == expected, "FieldMapping and the hand-written function differ"
    assert glom(doc, GLOM_SPEC) == expected, "glom and the hand-written function differ"
    assert orjson.dumps(doc) == before, "a mapping changed its input"
    return cpu_bound(
        f"3. field mapping, {len(MAPPING.operations)} ops",
        [
            Candidate(
                "hand-written function",
                "dict copies of the changed paths",
                lambda: by_hand(doc),
                baseline=True,
            ),
            Candidate(
                "FieldMapping.apply", "declarative, copy-on-write", lambda: MAPPING.apply(doc)
            ),
            Candidate(
                "glom (reference)",
                "target spec naming every output field",
                lambda: glom(doc, GLOM_SPEC),
            ),
        ],
        iterations=iterations,
    )


# -- 4 and 5. HTTP in front of Kafka ---------------------------------------------------------------


@dataclass
class Context:
    settings: KafkaSettings
    topics: Topics
    run: str
    bodies: list[bytes]
    groups: int = 0


@dataclass
class Load:
    """One stretch of requests: its clock, latencies and response statuses."""

    clock: Clock
    latencies_ms: list[float]
    statuses: Counter[int]
    n: int
    last_body: bytes = b""

    @property
    def rate(self) -> float:
        return self.n / self.clock.wall


@contextlib.asynccontextmanager
async def serve(path: str, handler: Handler) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 (a free port) answering POST `path`; yields its URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}{path}"
    finally:
        await quietly(runner.cleanup(), "stopping the HTTP server")


async def drive(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes], *, n: int, in_flight: int
) -> Load:
    """`n` POSTs from `in_flight` workers, each sending its next request once answered."""
    headers = {"Content-Type": JSON_TYPE, "Accept": JSON_TYPE}
    counter = iter(range(n))
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    last = b""

    async def worker() -> None:
        nonlocal last
        for i in counter:
            began = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                last = await resp.read()
                statuses[resp.status] += 1
            latencies.append((time.perf_counter() - began) * 1000)

    clock = Clock()
    clock.start()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    clock.stop()
    return Load(clock, latencies, statuses, n, last)


def expect(load: Load, status: int, what: str) -> None:
    if set(load.statuses) != {status}:
        raise RuntimeError(f"{what}: expected only {status}, got {dict(load.statuses)}")


async def records_in(ctx: Context, topic: str) -> int:
    """How many records `topic` holds: end minus beginning offsets, read without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=ctx.settings.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(partitions)
        begins = await consumer.beginning_offsets(partitions)
        return sum(ends[tp] - begins[tp] for tp in partitions)
    finally:
        await quietly(consumer.stop(), "stopping the counting consumer")


ImplFactory = Callable[[Context, str], contextlib.AbstractAsyncContextManager[Handler]]


@contextlib.asynccontextmanager
async def ours_accepted(ctx: Context, topic: str) -> AsyncIterator[Handler]:
    bus = Bus(KafkaTransport(ctx.settings), source=f"bench-{ctx.run}-gateway")
    await bus.start()
    try:
        yield AcceptedPublish(bus, topic, payload_type=Order, key_from="order_id").handle
    finally:
        await quietly(bus.stop(grace=5), "stopping the gateway bus")


@contextlib.asynccontextmanager
async def raw_accepted(ctx: Context, topic: str) -> AsyncIterator[Handler]:
    producer = AIOKafkaProducer(**producer_options(ctx.settings))
    await producer.start()

    async def handle(request: web.Request) -> web.Response:
        try:
            order = Order.model_validate(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        except ValidationError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        event_id = new_id()
        await producer.send_and_wait(
            topic, order.model_dump_json().encode(), key=order.order_id.encode()
        )
        return web.Response(body=orjson.dumps({"id": event_id}), status=202, content_type=JSON_TYPE)

    try:
        yield handle
    finally:
        await quietly(producer.stop(), "stopping the raw producer")


async def accepted_run(ctx: Context, make: ImplFactory, label: str, *, n: int) -> Load:
    topic = await ctx.topics.fresh(f"accepted-{label}")
    async with (
        make(ctx, topic) as handler,
        serve("/orders", handler) as url,
        aiohttp.ClientSession() as session,
    ):
        warm = await drive(session, url, ctx.bodies, n=HTTP_WARM, in_flight=IN_FLIGHT)
        load = await drive(session, url, ctx.bodies, n=n, in_flight=IN_FLIGHT)
    expect(warm, 202, "warm-up")
    expect(load, 202, "measured requests")
    held = await records_in(ctx, topic)
    if held != HTTP_WARM + n:
        raise RuntimeError(f"{topic} holds {held} records, expected {HTTP_WARM + n}")
    return load


@contextlib.asynccontextmanager
async def ours_rpc(ctx: Context, topic: str) -> AsyncIterator[Handler]:
    responder = Bus(KafkaTransport(ctx.settings), source=f"bench-{ctx.run}-pricing")

    async def on_order(message: Message[Order]) -> Quote:
        return quote(message.data)

    ctx.groups += 1
    responder.subscribe(
        [topic],
        {type_name(Order): HandlerSpec(Order, on_order)},
        ConsumerOptions(group=f"bench-{ctx.run}-pricing-{ctx.groups}"),
    )
    gateway = Bus(KafkaTransport(ctx.settings), source=f"bench-{ctx.run}-gateway")
    await responder.start()
    try:
        await gateway.start()
        try:
            yield RequestReply(
                gateway,
                topic,
                payload_type=Order,
                reply_type=Quote,
                key_from="order_id",
                timeout=10,  # the first requests wait for the responder's group to form
            ).handle
        finally:
            await quietly(gateway.stop(grace=5), "stopping the gateway bus")
    finally:
        await quietly(responder.stop(grace=5), "stopping the responder bus")


@contextlib.asynccontextmanager
async def direct_rpc(ctx: Context, topic: str) -> AsyncIterator[Handler]:
    async def handle(request: web.Request) -> web.Response:
        try:
            order = Order.model_validate(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        except ValidationError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.Response(body=quote(order).model_dump_json().encode(), content_type=JSON_TYPE)

    yield handle


async def rpc_run(
    ctx: Context, make: ImplFactory, label: str, *, sequential: int, concurrent: int
) -> tuple[Load, Load]:
    topic = await ctx.topics.fresh(f"rpc-{label}")
    expected = quote(Order.model_validate_json(ctx.bodies[0]))
    async with (
        make(ctx, topic) as handler,
        serve("/quotes", handler) as url,
        aiohttp.ClientSession() as session,
    ):
        first = await drive(session, url, ctx.bodies, n=1, in_flight=1)
        expect(first, 200, "first request")
        if Quote.model_validate_json(first.last_body) != expected:
            raise RuntimeError(f"unexpected reply {first.last_body!r}")
        expect(await drive(session, url, ctx.bodies, n=20, in_flight=1), 200, "warm-up")
        expect(await drive(session, url, ctx.bodies, n=HTTP_WARM, in_flight=IN_FLIGHT), 200, "warm")
        one_by_one = await drive(session, url, ctx.bodies, n=sequential, in_flight=1)
        together = await drive(session, url, ctx.bodies, n=concurrent, in_flight=IN_FLIGHT)
    expect(one_by_one, 200, "sequential requests")
    expect(together, 200, "concurrent requests")
    return one_by_one, together


def median_load(loads: Sequence[Load]) -> Load:
    return sorted(loads, key=lambda load: load.rate)[len(loads) // 2]


def load_note(loads: Sequence[Load], errors: Sequence[str], unit: str) -> str:
    parts = []
    if errors:
        parts.append(f"{len(errors)} run(s) failed and were left out ({errors[0][:90]})")
    if len(loads) > 1:
        parts.append(
            f"{len(loads)} runs: " + ", ".join(f"{x.rate:,.0f}" for x in loads) + f" {unit}"
        )
    if loads:
        kept = median_load(loads)
        parts.append(
            f"median run: max {max(kept.latencies_ms):,.1f} ms, machine CPU "
            f"{kept.clock.machine_busy} busy"
        )
    return "; ".join(parts)


@dataclass
class Variant:
    name: str
    semantics: str
    make: ImplFactory
    baseline: bool = False
    runs: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def accepted_scenario(ctx: Context, *, n: int, repeat: int) -> list[Result]:
    scenario = "4. HTTP -> Kafka, 202"
    variants = [
        Variant(
            "hand-written aiohttp",
            "validate, send_and_wait(payload), 202",
            raw_accepted,
            baseline=True,
        ),
        Variant("AcceptedPublish", "validate, CloudEvent, ack awaited, 202", ours_accepted),
    ]
    for _ in range(repeat):  # interleaved, so a change in the machine's load hits both
        for variant in variants:
            label = "raw" if variant.baseline else "ours"
            outcome = await bounded(
                f"{scenario} / {variant.name}",
                60 + n / 100,
                accepted_run(ctx, variant.make, label, n=n),
            )
            if isinstance(outcome, str):
                variant.errors.append(outcome)
                print(f"  {scenario:<38} {variant.name:<26} {outcome}", flush=True)
                continue
            variant.runs.append(outcome)
            print(f"  {scenario:<38} {variant.name:<26} {outcome.rate:>10,.0f} req/s", flush=True)
    results = []
    for variant in variants:
        if not variant.runs:
            results.append(
                error_row(scenario, variant.name, variant.semantics, "; ".join(variant.errors))
            )
            continue
        kept = median_load(variant.runs)
        results.append(
            Result(
                scenario=scenario,
                implementation=variant.name,
                semantics=variant.semantics,
                rate=kept.rate,
                unit="req/s",
                latencies_ms=kept.latencies_ms,
                cpu_us_per_op=kept.clock.us_per(kept.n),
                baseline=variant.baseline,
                note=load_note(variant.runs, variant.errors, "req/s")
                + f"; every response 202, the topic held {HTTP_WARM} + {n:,} records",
            )
        )
    return results


async def rpc_scenario(
    ctx: Context, *, sequential: int, concurrent: int, repeat: int
) -> list[Result]:
    scenarios = ("5a. HTTP <-> Kafka req/reply, sequential", f"5b. same, {IN_FLIGHT} in flight")
    variants = [
        Variant(
            "direct HTTP (no broker)", "validate + quote in the handler", direct_rpc, baseline=True
        ),
        Variant("RequestReply", "publish, await reply via Kafka", ours_rpc),
    ]
    progress = "5. HTTP <-> Kafka request/reply"
    for _ in range(repeat):
        for variant in variants:
            label = "direct" if variant.baseline else "ours"
            outcome = await bounded(
                f"{scenarios[0]} / {variant.name}",
                90 + (sequential + concurrent) / 50,
                rpc_run(ctx, variant.make, label, sequential=sequential, concurrent=concurrent),
            )
            if isinstance(outcome, str):
                variant.errors.append(outcome)
                print(f"  {progress:<38} {variant.name:<26} {outcome}", flush=True)
                continue
            variant.runs.append(outcome)
            one, many = outcome
            print(
                f"  {progress:<38} {variant.name:<26} {one.rate:>10,.0f} req/s sequential, "
                f"{many.rate:,.0f} req/s {IN_FLIGHT} in flight",
                flush=True,
            )
    results = []
    for index, scenario in enumerate(scenarios):
        for variant in variants:
            if not variant.runs:
                results.append(
                    error_row(scenario, variant.name, variant.semantics, "; ".join(variant.errors))
                )
                continue
            loads = [run[index] for run in variant.runs]
            kept = median_load(loads)
            results.append(
                Result(
                    scenario=scenario,
                    implementation=variant.name,
                    semantics=variant.semantics,
                    rate=kept.rate,
                    unit="req/s",
                    latencies_ms=kept.latencies_ms,
                    cpu_us_per_op=kept.clock.us_per(kept.n),
                    baseline=variant.baseline,
                    note=load_note(loads, variant.errors if index == 0 else [], "req/s"),
                )
            )
    return results


# -- main -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, bootstrap: str) -> list[Result]:
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="bench-translate")
    doc = order_document(42)
    json_body = orjson.dumps(doc)
    xml_body = convert(json_body, JSON_TYPE, XML_TYPE)
    results: list[Result] = []
    began = time.perf_counter()
    print(f"JSON -> XML ... (XML body {len(xml_body)} B)", flush=True)
    results += json_to_xml(json_body, iterations=args.iterations)
    print("XML -> JSON ...", flush=True)
    results += xml_to_json(xml_body, iterations=args.iterations)
    print("field mapping ...", flush=True)
    results += field_mapping(doc, iterations=args.iterations)
    run_id = f"{int(time.time())}-{os.getpid()}"
    async with Topics(bootstrap, run_id) as topics:
        ctx = Context(
            settings=settings,
            topics=topics,
            run=run_id,
            bodies=[orjson.dumps(order_document(i)) for i in range(ORDERS)],
        )
        print(f"HTTP -> Kafka, 202 ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await accepted_scenario(ctx, n=args.requests, repeat=args.repeat)
        print(f"HTTP <-> Kafka request/reply ... ({time.perf_counter() - began:.0f} s)", flush=True)
        results += await rpc_scenario(
            ctx,
            sequential=max(1, args.requests // 10),
            concurrent=args.requests,
            repeat=args.repeat,
        )
    return results


def revision() -> str:
    """The repository's commit, and whether framework/ differs from it (numbers move with it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("log", "-1", "--format=%h %s")
        dirty = git("status", "--porcelain", "--", "framework")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit[:72]}" + (" + uncommitted changes in framework/" if dirty else "")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


NOTES = """\
Semantics:
- 1/2: ours returns the root element's content on XML -> JSON ({...}); xmltodict wraps it in
  {"root": {...}}. Both read every value back as text (XML has no numbers or booleans); an
  empty element is null. Ours also caps body size (1 MiB) and depth (64), and refuses any DTD.
- 3: FieldMapping and the hand-written function copy only the objects on changed paths and
  share the rest with the input; glom builds a new top-level object and shipping from a spec
  that must list every field kept (dropping = leaving it out), sharing the other sub-objects.
- 4: both wait for the broker's ack (acks=all, idempotence, linger_ms=5) before answering. Ours
  publishes a CloudEvent in binary mode (~10 ce_* headers, a new correlation id) and answers
  {"id", "state"}; the baseline sends the bare payload JSON with no headers. Same key, same
  partitioner (murmur2 of the order id).
- 5: ours crosses Kafka twice (request topic, then the gateway's reply topic, both through the
  transport's non-lingering producer) and the responder's consumer group; the baseline is the
  same validation and reply with no broker at all, i.e. the price of the asynchronous hop.
- CPU us/op for 4 and 5 is the whole process: load generator, HTTP server, Kafka clients."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--requests", type=int, help="HTTP requests per run (default 3000)")
    parser.add_argument("--iterations", type=int, help="calls per round in 1-3 (default 10000)")
    parser.add_argument("--repeat", type=int, help="interleaved runs of 4 and 5 (default 3)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (500 if args.quick else 3000)
    args.iterations = args.iterations or (1000 if args.quick else 10000)
    args.repeat = args.repeat or (1 if args.quick else 3)

    bootstrap = require_env(
        "KAFKA_BOOTSTRAP",
        'Start the dev broker and export its address: eval "$(scripts/devservices env)"',
    )
    defaults = KafkaSettings(bootstrap_servers=bootstrap)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The clients' retry chatter (leader elections on new topics) would bury the table;
    # failures still surface as error rows.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    print(f"benchmarks/translate.py - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        environment(
            [
                "msa-framework",
                "aiohttp",
                "aiokafka",
                "pydantic",
                "orjson",
                "defusedxml",
                "xmltodict",
                "glom",
                "uvloop",
            ],
            extra=[
                ("Framework", revision()),
                ("Kafka", f"{os.environ.get('KAFKA_VERSION', 'unknown version')} at {bootstrap}"),
                ("Loop", "uvloop; HTTP server, load generator and Kafka clients in one process"),
                (
                    "Producers",
                    f"acks={defaults.acks}, enable_idempotence={defaults.enable_idempotence}, "
                    f"linger_ms={defaults.linger_ms} (our KafkaSettings defaults) for both sides",
                ),
                (
                    "Counts",
                    f"1-3: 7 rounds x {args.iterations:,} calls; 4: {args.requests:,} requests "
                    f"({IN_FLIGHT} in flight, {HTTP_WARM} warm-up first); 5: "
                    f"{max(1, args.requests // 10):,} sequential + {args.requests:,} with "
                    f"{IN_FLIGHT} in flight; {args.repeat} interleaved run(s), median kept",
                ),
                (
                    "Shape",
                    f"order JSON {PAYLOAD_BYTES} B, {ORDERS} order ids as keys, 3 partitions",
                ),
                ("Load", f"{load_average()} at start (other processes share these cores)"),
            ],
        )
    )
    began = time.perf_counter()
    try:
        results = uvloop.run(run(args, bootstrap))
    except BrokerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(results))
    print()
    print(NOTES)
    print(
        f"\n(total {time.perf_counter() - began:.0f} s; load average {load_average()} at the end)"
    )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
