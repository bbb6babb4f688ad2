"""The protocol bridges, each run on the in-memory bus and on a real Apache Kafka broker.

HTTP -> bus (202 + status), HTTP <-> bus request/reply (504 on timeout), queue-and-drain to an
HTTP backend (pace, retries, dead letters), and bus -> SSE / WebSocket (filters, resume,
backpressure).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

from framework.bus import (
    Bus,
    ConsumerOptions,
    HandlerSpec,
    MemoryTransport,
    Message,
    Outgoing,
    RetryPolicy,
)
from framework.messages import Envelope, message_type, to_binary, type_name
from framework.translate.drain import QueueAndDrain, TokenBucket
from framework.translate.feed import EventFeed, EventFilter
from framework.translate.http_bus import AcceptedPublish, RequestReply, StatusTracker
from framework.translate.mapping import FieldMapping, Rename
from framework.translate.push import RequestFilter, SseBridge, WebSocketBridge
from framework.types import Record, Transport


@message_type("test.order.place")
class PlaceOrder(BaseModel):
    order_id: str
    sku: str
    quantity: int


@message_type("test.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    quantity: int


@message_type("test.order.confirmed")
class OrderConfirmed(BaseModel):
    order_id: str


@message_type("test.stock.asked")
@dataclass
class StockQuery:
    sku: str


@dataclass
class StockLevel:
    sku: str
    available: int


class OutOfStock(Exception):
    pass


@pytest.fixture
async def buses(make_transport: Callable[[], Transport]) -> AsyncIterator[tuple[Bus, Bus]]:
    """(edge, worker): the bus the bridges use, and the one the services behind them use."""
    edge, worker = Bus(make_transport(), source="edge"), Bus(make_transport(), source="worker")
    yield edge, worker
    await edge.stop(grace=1)
    await worker.stop(grace=1)


async def client_for(app: web.Application) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def options(group: str) -> ConsumerOptions:
    fast = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2, jitter=0)
    return ConsumerOptions(group=group, commit_interval=0.05, retry=fast)


# -- HTTP -> bus, 202 + status -------------------------------------------------------------------


async def test_accepted_publish_answers_202_and_the_status_url_follows_the_events(
    buses: tuple[Bus, Bus], topic_name: str
) -> None:
    edge, worker = buses
    commands, events = f"{topic_name}.commands", f"{topic_name}.events"
    received: list[Message[PlaceOrder]] = []

    async def place(message: Message[PlaceOrder]) -> None:
        received.append(message)
        order = message.data
        key = order.order_id  # one key: the two events stay in order
        await worker.publish(events, OrderPlaced(order_id=key, quantity=order.quantity), key=key)
        await worker.publish(events, OrderConfirmed(order_id=key), key=key)

    worker.subscribe(
        [commands], {type_name(PlaceOrder): HandlerSpec(PlaceOrder, place)}, options("orders")
    )
    await worker.start()
    await edge.start()
    feed = EventFeed(edge.transport, [events], poll_timeout=0.1)
    await feed.start()
    tracker = StatusTracker(feed, states={"test.order.confirmed": "completed"})
    bridge = AcceptedPublish(
        edge,
        commands,
        payload_type=PlaceOrder,
        key_from="order_id",
        tracker=tracker,
        status_url="/orders/status/{id}",
        mapping=FieldMapping([Rename("qty", "quantity")]),
    )
    app = web.Application()
    app.router.add_post("/orders", bridge.handle)
    app.router.add_get("/orders/status/{id}", tracker.handle)
    client = await client_for(app)
    try:
        # JSON and XML bodies are the same command; the mapping renames qty -> quantity.
        first = await client.post("/orders", json={"order_id": "o-1", "sku": "mug", "qty": 2})
        xml = b"<order><order_id>o-2</order_id><sku>cup</sku><qty>3</qty></order>"
        second = await client.post("/orders", data=xml, headers={"Content-Type": "application/xml"})
        assert first.status == second.status == 202
        accepted = [await first.json(), await second.json()]
        assert [a["state"] for a in accepted] == ["accepted", "accepted"]
        assert first.headers["Location"] == accepted[0]["status"]
        assert accepted[0]["status"] == f"/orders/status/{accepted[0]['id']}"

        await eventually(lambda: len(received) == 2, what="both commands handled")
        by_order = {m.data.order_id: m for m in received}
        assert by_order["o-2"].data == PlaceOrder(order_id="o-2", sku="cup", quantity=3)
        assert by_order["o-1"].key == "o-1"
        assert by_order["o-1"].envelope.correlationid == accepted[0]["id"]

        async def state_of(status_url: str) -> dict[str, Any]:
            response = await client.get(status_url)
            assert response.status == 200
            document: dict[str, Any] = await response.json()
            return document

        for answer, order_id in zip(accepted, ["o-1", "o-2"], strict=True):
            deadline = time.monotonic() + 20
            while (status := await state_of(answer["status"]))["state"] != "completed":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            assert [e["type"] for e in status["events"]] == [
                "test.order.placed",
                "test.order.confirmed",
            ]
            assert status["events"][0]["data"]["order_id"] == order_id
            assert status["type"] == "test.order.place"

        missing = await client.get("/orders/status/nope")
        assert missing.status == 404
        assert missing.content_type == "application/problem+json"
    finally:
        await client.close()
        await feed.stop()


async def test_accepted_publish_refuses_bad_bodies_with_problems_and_publishes_nothing(
    buses: tuple[Bus, Bus], topic_name: str
) -> None:
    edge, worker = buses
    received: list[Message[PlaceOrder]] = []

    async def place(message: Message[PlaceOrder]) -> None:
        received.append(message)

    published: list[Outgoing] = []

    async def record(outgoing: Outgoing, call_next: Callable[[Outgoing], Awaitable[Any]]) -> Any:
        published.append(outgoing)
        return await call_next(outgoing)

    worker.subscribe(
        [topic_name], {type_name(PlaceOrder): HandlerSpec(PlaceOrder, place)}, options("orders")
    )
    edge.add_publish_middleware(record)  # every publish of the bridge passes here
    await worker.start()
    await edge.start()
    bridge = AcceptedPublish(edge, topic_name, payload_type=PlaceOrder, key_from="order_id")
    app = web.Application()
    app.router.add_post("/orders", bridge.handle)
    client = await client_for(app)
    try:
        cases: list[tuple[dict[str, Any], int]] = [
            ({"json": {"order_id": "o-1", "sku": "mug"}}, 422),  # quantity missing
            ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
            ({"data": b"", "headers": {"Content-Type": "application/json"}}, 400),
            ({"data": b"a,b", "headers": {"Content-Type": "text/csv"}}, 415),
            (
                {
                    "data": b'<?xml version="1.0"?><!DOCTYPE o [<!ENTITY x "boom">]><o>&x;</o>',
                    "headers": {"Content-Type": "application/xml"},
                },
                400,
            ),
        ]
        for kwargs, status in cases:
            response = await client.post("/orders", **kwargs)
            assert response.status == status, await response.text()
            assert response.content_type == "application/problem+json"
            assert (await response.json())["status"] == status
        assert published == []  # a refused request published nothing
        good = await client.post("/orders", json={"order_id": "o-9", "sku": "mug", "quantity": 1})
        assert good.status == 202
        assert [o.envelope.data.order_id for o in published] == ["o-9"]
        await eventually(lambda: len(received) == 1, what="the good command")
        assert [m.data.order_id for m in received] == ["o-9"]
    finally:
        await client.close()


# -- HTTP <-> bus request/reply ------------------------------------------------------------------


async def test_request_reply_answers_with_the_reply_maps_errors_and_times_out_with_504(
    buses: tuple[Bus, Bus], topic_name: str
) -> None:
    edge, worker = buses

    async def stock(message: Message[StockQuery]) -> StockLevel:
        if message.data.sku == "gone":
            raise OutOfStock("no gone left")
        return StockLevel(sku=message.data.sku, available=7)

    worker.subscribe(
        [topic_name], {type_name(StockQuery): HandlerSpec(StockQuery, stock)}, options("stock")
    )
    await worker.start()
    await edge.start()
    bridge = RequestReply(
        edge, topic_name, payload_type=StockQuery, errors={"OutOfStock": 409}, timeout=10
    )
    silent = RequestReply(edge, f"{topic_name}.nobody", payload_type=StockQuery, timeout=0.5)
    app = web.Application()
    app.router.add_post("/stock", bridge.handle)
    app.router.add_post("/silent", silent.handle)
    client = await client_for(app)
    try:
        answer = await client.post("/stock", json={"sku": "mug"})
        assert answer.status == 200, await answer.text()
        assert await answer.json() == {"sku": "mug", "available": 7}

        as_xml = await client.post(
            "/stock",
            data=b"sku=mug",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/xml",
            },
        )
        assert as_xml.status == 200
        assert as_xml.content_type == "application/xml"
        text = await as_xml.text()
        assert "<sku>mug</sku>" in text
        assert "<available>7</available>" in text

        refused = await client.post("/stock", json={"sku": "gone"})
        assert refused.status == 409
        problem = await refused.json()
        assert problem["error"] == "OutOfStock"
        assert "no gone left" in problem["detail"]

        timed_out = await client.post("/silent", json={"sku": "mug"})
        assert timed_out.status == 504
        assert timed_out.content_type == "application/problem+json"
        assert "within 0.5s" in (await timed_out.json())["detail"]

        not_acceptable = await client.post(
            "/stock", json={"sku": "mug"}, headers={"Accept": "image/png"}
        )
        assert not_acceptable.status == 406
    finally:
        await client.close()


# -- queue and drain -----------------------------------------------------------------------------


class Backend:
    """An HTTP backend that records what it got, fails the first try of `flaky` paths with
    503 and refuses `poison` paths with 400. It answers nothing until `open` is set."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str, bytes, str | None]] = []
        self.tried: set[str] = set()
        self.open = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key")
        self.hits.append((request.method, request.path_qs, body, key))
        await self.open.wait()
        if "flaky" in request.path and key not in self.tried:
            self.tried.add(key or "")
            return web.Response(status=503, headers={"Retry-After": "0.1"})
        if "poison" in request.path:
            return web.Response(status=400, text="no such thing")
        return web.Response(status=204)


class CountingBucket(TokenBucket):
    """A token bucket that counts the tokens it gave out."""

    granted = 0

    async def take(self) -> None:
        await super().take()
        self.granted += 1


async def test_queue_and_drain_delivers_at_the_backend_pace_retries_and_dead_letters(
    buses: tuple[Bus, Bus], topic_name: str
) -> None:
    edge, worker = buses
    backend = Backend()
    backend_server = TestServer(backend.app)
    await backend_server.start_server()
    rate = 20.0
    drain = QueueAndDrain(
        worker,
        topic_name,
        str(backend_server.make_url("")),
        rate=rate,
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2, jitter=0),
    )
    bucket = drain.bucket = CountingBucket(rate)
    accept = QueueAndDrain(edge, topic_name, "http://unused.invalid", rate=1)
    drain.attach()
    letters: list[Message[bytes]] = []

    async def on_letter(message: Message[bytes]) -> None:
        letters.append(message)

    worker.subscribe(
        [f"{topic_name}.dlq"], {"*": HandlerSpec(bytes, on_letter)}, options("dlq-reader")
    )
    await drain.start()
    await worker.start()
    await edge.start()
    app = web.Application()
    app.router.add_route("*", "/erp/{tail:.*}", accept.accept)
    client = await client_for(app)
    try:
        answers = []
        for n in range(12):
            answers.append(
                await client.post(
                    f"/erp/invoices/{n}?copy=1", data=b"invoice %d" % n, headers={"X-Gtxid": "g1"}
                )
            )
        flaky = await client.put("/erp/flaky/1", data=b"once more")
        poison = await client.post("/erp/poison/1", data=b"bad")
        # Accepting does not wait for the backend: all 14 were accepted while it answered none.
        assert [a.status for a in [*answers, flaky, poison]] == [202] * 14
        assert drain.delivered == 0
        backend.open.set()
        ids = [(await a.json())["id"] for a in answers]

        await eventually(lambda: len(letters) == 1, what="the poison request dead-lettered")
        await eventually(lambda: drain.delivered == 13, what="every good request delivered")
        letter = letters[0]
        assert letter.record.header("msa-dlq-error-message") is not None
        assert b"400" in (letter.record.header("msa-dlq-error-message") or b"")
        assert letter.data == b"bad"

        invoices = [hit for hit in backend.hits if "/erp/invoices/" in hit[1]]
        assert sorted(hit[1] for hit in invoices) == sorted(
            f"/erp/invoices/{n}?copy=1" for n in range(12)
        )
        assert {hit[3] for hit in invoices} == set(ids)  # Idempotency-Key = the event id
        assert all(hit[0] == "POST" for hit in invoices)
        assert {hit[2] for hit in invoices} == {b"invoice %d" % n for n in range(12)}
        flaky_hits = [hit for hit in backend.hits if "flaky" in hit[1]]
        assert [hit[0] for hit in flaky_hits] == ["PUT", "PUT"]  # 503, then delivered
        # The pace: every call to the backend, retries included, waited for a token of the
        # bucket (whose rate the test below checks on a clock of its own).
        assert bucket.granted == len(backend.hits) == 12 + 2 + 1
    finally:
        backend.open.set()  # no request left waiting, whatever failed
        await client.close()
        await drain.stop()
        await backend_server.close()


async def test_a_token_bucket_keeps_its_rate_and_burst() -> None:
    now = 0.0
    bucket = TokenBucket(rate=64, burst=2, clock=lambda: now)  # a token every 1/64 s
    # The burst is there at once (0: taken); then the wait for the next token.
    assert [bucket.try_take() for _ in range(3)] == [0, 0, 1 / 64]
    now += 1 / 128
    assert bucket.try_take() == 1 / 128  # half of one has accrued
    now += 1 / 128
    assert bucket.try_take() == 0
    now += 10  # idle for long: the bucket holds its burst, no more
    assert [bucket.try_take() for _ in range(3)] == [0, 0, 1 / 64]

    waiting = asyncio.create_task(bucket.take())
    await asyncio.sleep(0)  # it looked, found no token, and waits for one
    assert not waiting.done()
    now += 1 / 64
    await asyncio.wait_for(waiting, 5)
    assert bucket.try_take() == 1 / 64  # it took the token that accrued

    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0)


# -- bus -> SSE / WebSocket ---------------------------------------------------------------------


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":") and ": " in line:
                name, value = line.split(": ", 1)
                fields[name] = value
        if fields:
            events.append(fields)
    return events


async def read_sse_events(response: Any, count: int, timeout: float = 20) -> list[dict[str, str]]:
    """Read an SSE stream until it holds `count` events with an `event:` field."""
    buffer = ""
    async with asyncio.timeout(timeout):
        while True:
            chunk = await response.content.readany()
            if not chunk:
                break
            buffer += chunk.decode()
            events = [e for e in parse_sse(buffer) if "event" in e]
            if len(events) >= count and buffer.endswith("\n\n"):
                return events
    return [e for e in parse_sse(buffer) if "event" in e]


@pytest.fixture
async def streaming(
    buses: tuple[Bus, Bus], topic_name: str
) -> AsyncIterator[
    tuple[Bus, EventFeed, TestClient[web.Request, web.Application], SseBridge, WebSocketBridge]
]:
    edge, worker = buses
    await worker.start()
    feed = EventFeed(edge.transport, [topic_name], replay=100, capacity=8, poll_timeout=0.1)
    await edge.start()
    await feed.start()
    filters = RequestFilter(key="{order_id}", query=("type",))
    sse = SseBridge(feed, filters, capacity=8, heartbeat=0.2, write_timeout=2)
    ws = WebSocketBridge(feed, filters, capacity=8, write_timeout=2)
    app = web.Application()
    app.router.add_get("/orders/{order_id}/events", sse.handle)
    app.router.add_get("/orders/{order_id}/ws", ws.handle)
    client = await client_for(app)
    yield worker, feed, client, sse, ws
    await feed.stop()  # first: it ends the open streams, so the server need not wait for them
    await client.close()


Streaming = tuple[
    Bus, EventFeed, TestClient[web.Request, web.Application], SseBridge, WebSocketBridge
]


async def wait_for_listeners(feed: EventFeed, count: int) -> None:
    await eventually(lambda: feed.listeners == count, what=f"{count} feed listener(s)")


async def test_sse_streams_the_events_of_one_key_and_resumes_after_last_event_id(
    streaming: Streaming, topic_name: str
) -> None:
    worker, feed, client, _, _ = streaming
    response = await client.get("/orders/o-1/events")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    await wait_for_listeners(feed, 1)
    await worker.publish(topic_name, OrderPlaced(order_id="o-1", quantity=1), key="o-1")
    await worker.publish(topic_name, OrderPlaced(order_id="o-2", quantity=5), key="o-2")
    await worker.publish(topic_name, OrderConfirmed(order_id="o-1"), key="o-1")
    events = await read_sse_events(response, 2)
    assert [e["event"] for e in events] == ["test.order.placed", "test.order.confirmed"]
    first = orjson.loads(events[0]["data"])
    assert first["data"] == {"order_id": "o-1", "quantity": 1}
    assert first["id"] == events[0]["id"]
    assert first["specversion"] == "1.0"
    response.close()
    await wait_for_listeners(feed, 0)

    # The browser reconnects with the last id it saw: it gets only what came after.
    await worker.publish(topic_name, OrderPlaced(order_id="o-1", quantity=2), key="o-1")
    await eventually(lambda: feed.seen == 4, what="the feed saw the 4th event")
    resumed = await client.get("/orders/o-1/events", headers={"Last-Event-ID": events[0]["id"]})
    replayed = await read_sse_events(resumed, 2)
    assert [orjson.loads(e["data"])["data"] for e in replayed] == [
        {"order_id": "o-1"},
        {"order_id": "o-1", "quantity": 2},
    ]
    resumed.close()

    # An id the feed does not hold: the stream says so first, then goes on live.
    gap = await client.get("/orders/o-1/events", headers={"Last-Event-ID": "unknown"})
    assert (await read_sse_events(gap, 1))[0]["event"] == "reset"
    gap.close()

    typed = await client.get("/orders/o-1/events?type=test.order.confirmed")
    await wait_for_listeners(feed, 1)
    await worker.publish(topic_name, OrderPlaced(order_id="o-1", quantity=3), key="o-1")
    await worker.publish(topic_name, OrderConfirmed(order_id="o-1"), key="o-1")
    assert [e["event"] for e in await read_sse_events(typed, 1)] == ["test.order.confirmed"]
    typed.close()

    refused = await client.get("/orders/o-1/events?colour=red")
    assert refused.status == 400


async def test_a_slow_sse_client_is_dropped_with_a_reason_and_memory_stays_bounded(
    streaming: Streaming, topic_name: str
) -> None:
    _, feed, client, sse, _ = streaming
    response = await client.get("/orders/o-1/events")
    await wait_for_listeners(feed, 1)
    (listener,) = list(feed._listeners)
    # More events than the client's queue holds arrive before the bridge can write one.
    for n in range(8 + 5):
        feed.publish_local(record_for(topic_name, OrderPlaced(order_id="o-1", quantity=n)))
    assert listener.closed_reason is not None
    assert "slow client" in listener.closed_reason
    assert listener.pending == 0
    events = await read_sse_events(response, 1)
    assert events[-1]["event"] == "close"
    assert "slow client" in orjson.loads(events[-1]["data"])["reason"]
    await wait_for_listeners(feed, 0)
    assert sse.dropped == 1


async def test_websocket_streams_filtered_events_and_closes_slow_clients_with_1008(
    streaming: Streaming, topic_name: str
) -> None:
    worker, feed, client, _, ws_bridge = streaming
    socket = await client.ws_connect("/orders/o-7/ws")
    await wait_for_listeners(feed, 1)
    await worker.publish(topic_name, OrderPlaced(order_id="o-8", quantity=1), key="o-8")
    await worker.publish(topic_name, OrderPlaced(order_id="o-7", quantity=4), key="o-7")
    message = await socket.receive(timeout=20)
    assert message.type == WSMsgType.TEXT
    event = orjson.loads(message.data)
    assert event["type"] == "test.order.placed"
    assert event["data"]["order_id"] == "o-7"

    for n in range(8 + 5):
        feed.publish_local(record_for(topic_name, OrderPlaced(order_id="o-7", quantity=n)))
    while True:
        closing = await socket.receive(timeout=20)
        if closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            break
    assert socket.close_code == 1008
    await wait_for_listeners(feed, 0)
    assert ws_bridge.dropped == 1  # counted once, however it was slow
    await socket.close()


def record_for(topic: str, payload: Any) -> Record:
    envelope = Envelope(
        type=type_name(type(payload)), source="test", data=payload, partitionkey=payload.order_id
    )
    key, value, headers = to_binary(envelope)
    return Record(topic=topic, partition=0, offset=0, key=key, value=value, headers=headers)


async def test_event_filters_match_types_keys_and_data_paths() -> None:
    feed = EventFeed(MemoryTransport(), ["t"])
    event_record = record_for("t", OrderPlaced(order_id="o-1", quantity=3))
    feed.publish_local(event_record)
    (event,) = feed.recent(EventFilter())
    assert EventFilter(key="o-1").matches(event)
    assert not EventFilter(key="o-2").matches(event)
    assert EventFilter(types=frozenset({"test.order.placed"})).matches(event)
    assert not EventFilter(types=frozenset({"x"})).matches(event)
    assert EventFilter(data={"quantity": "3", "order_id": "o-1"}).matches(event)
    assert not EventFilter(data={"quantity": "4"}).matches(event)
    assert not EventFilter(data={"missing.path": "x"}).matches(event)
    feed.publish_local(raw_record("t", b"not a cloudevent"))  # skipped, counted
    assert feed.skipped == 1
    assert feed.seen == 1


def raw_record(topic: str, value: bytes) -> Record:
    return Record(topic=topic, partition=0, offset=1, key=None, value=value, headers=())
