"""HTTP <-> message bus bridges: synchronous outside, asynchronous inside.

Two exchange patterns, each a small object whose `handle` is an aiohttp handler, so a service
mounts it with `app.router.add_post(...)` and the gateway routes to it from its config:

`AcceptedPublish` - fire and forget. The body is decoded by its content type (JSON, XML, form),
optionally reshaped by a `FieldMapping`, validated as the payload type, and published as a
CloudEvent; once the broker acknowledged it the answer is `202 Accepted` with the event id and a
status URL (also in `Location`). The event starts its own correlation (its `correlationid` is its
id), so every event the system emits because of it carries that id, and the `StatusTracker`
reports them at the status URL:

    tracker = StatusTracker(feed, states={"shop.order.confirmed": "completed",
                                          "shop.order.rejected": "failed"})
    place = AcceptedPublish(bus, "shop.orders.commands", payload_type=PlaceOrder,
                            key_from="customer_id", tracker=tracker,
                            status_url="/orders/status/{id}")
    app.router.add_post("/orders", place.handle)
    app.router.add_get("/orders/status/{id}", tracker.handle)

    POST /orders  ->  202 {"id": "9f2c...", "status": "/orders/status/9f2c...", "state": "accepted"}
    GET /orders/status/9f2c...  ->  200 {"id": ..., "state": "completed", "events": [...]}

`RequestReply` - the caller waits: the request is published with a reply topic and the
correlated reply is awaited (`Bus.request`). The reply is encoded as the caller's `Accept` asks;
a handler error comes back as the status its error type maps to (`errors={"OutOfStock": 409}`,
otherwise 502), and no reply within `timeout` is a `504 Gateway Timeout`.

Bad input is a problem response and nothing is published: 400 (undecodable body, mapping
error), 415 (unsupported content type), 406 (no acceptable reply type), 422 (payload does not
validate).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from framework.bus import Bus
from framework.errors import (
    PayloadValidationError,
    PublishError,
    RemoteError,
    RequestTimeout,
    TranslationError,
    TransportError,
)
from framework.http import json_response, problem, translation_problem
from framework.messages import Envelope, encode_payload, validate_payload
from framework.translate.codecs import CodecRegistry, default_registry
from framework.translate.feed import EventFeed, EventFilter, FeedEvent
from framework.translate.mapping import FieldMapping

__all__ = ["AcceptedPublish", "KeyFrom", "RequestReply", "StatusTracker"]

log = logging.getLogger("framework.translate.http_bus")

KeyFrom = str | Callable[[web.Request, Any], str | None] | None
"""Where a message's partition key comes from: `"{name}"` is a path parameter, any other string
a dotted path into the decoded body, or a function of the request and the body."""


def _resolve_key(
    key_from: KeyFrom, request: web.Request, document: Any, params: Mapping[str, str] | None
) -> str | None:
    if key_from is None:
        return None
    if callable(key_from):
        return key_from(request, document)
    if key_from.startswith("{") and key_from.endswith("}"):
        found = request.match_info if params is None else params
        return found.get(key_from[1:-1])
    value: Any = document
    for part in key_from.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        raise TranslationError(f"the body has no {key_from!r} to key the message by", path=key_from)
    return value if isinstance(value, str) else str(value)


@dataclass(kw_only=True)
class _Decoding:
    """Body -> validated payload: codec by content type, field mapping, payload type."""

    payload_type: Any = None
    mapping: FieldMapping | None = None
    codecs: CodecRegistry = field(default_factory=default_registry)
    max_body: int = 1 << 20

    async def read(self, request: web.Request, body: bytes | None = None) -> tuple[Any, Any]:
        """(mapped document, validated payload) of the request's body (or `body`, when the
        caller read it already); raises TranslationError or PayloadValidationError."""
        if body is None:
            if request.content_length is not None and request.content_length > self.max_body:
                raise TranslationError(f"the body is larger than {self.max_body} bytes")
            body = await request.read()
        if len(body) > self.max_body:
            raise TranslationError(f"the body is larger than {self.max_body} bytes")
        if not body:
            raise TranslationError("the request body is empty")
        codec = self.codecs.for_content_type(request.headers.get("Content-Type"))
        document = codec.decode(body)
        if self.mapping is not None:
            document = self.mapping.apply(document)
        if self.payload_type is None:
            return document, document
        return document, validate_payload(document, self.payload_type)


def _input_problem(exc: Exception) -> web.Response:
    if isinstance(exc, PayloadValidationError):
        return problem(422, "Unprocessable Content", str(exc), errors=exc.errors)
    assert isinstance(exc, TranslationError)
    return translation_problem(exc)


# -- fire and forget ---------------------------------------------------------------------------


class AcceptedPublish:
    """HTTP -> bus: validate, publish, answer 202 with the event id and a status URL."""

    def __init__(
        self,
        bus: Bus,
        topic: str,
        *,
        payload_type: Any = None,
        event_type: str | None = None,
        key_from: KeyFrom = None,
        mapping: FieldMapping | None = None,
        codecs: CodecRegistry | None = None,
        tracker: StatusTracker | None = None,
        status_url: str | None = None,
        max_body: int = 1 << 20,
    ) -> None:
        if payload_type is None and event_type is None:
            raise ValueError("AcceptedPublish needs a payload_type or an event_type")
        self.bus = bus
        self.topic = topic
        self.event_type = event_type
        self.key_from = key_from
        self.tracker = tracker
        self.status_url = status_url
        self._decoding = _Decoding(
            payload_type=payload_type,
            mapping=mapping,
            codecs=codecs or default_registry(),
            max_body=max_body,
        )

    async def handle(
        self,
        request: web.Request,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The aiohttp handler (`body`: the request body, if the caller has read it; `params`:
        the path parameters, when not `request.match_info` - the gateway's)."""
        try:
            document, payload = await self._decoding.read(request, body)
            key = _resolve_key(self.key_from, request, document, params)
        except (TranslationError, PayloadValidationError) as exc:
            return _input_problem(exc)
        envelope = self.bus.envelope(payload, key=key, type=self.event_type)
        envelope.correlationid = envelope.id  # a new conversation: its events carry this id
        envelope.causationid = None
        if self.tracker is not None:
            self.tracker.accepted(envelope)  # before publishing: no event can beat it
        try:
            await self.bus.publish_envelope(self.topic, envelope)
        except (PublishError, TransportError) as exc:
            if self.tracker is not None:
                self.tracker.forget(envelope.id)
            log.warning("could not publish to %s: %s", self.topic, exc)
            return problem(503, "Service Unavailable", "the message bus did not take the request")
        answer: dict[str, Any] = {"id": envelope.id, "state": "accepted"}
        headers: dict[str, str] = {}
        if self.status_url is not None:
            url = self.status_url.format(id=envelope.id)
            answer["status"] = url
            headers["Location"] = url
        return json_response(answer, status=202, headers=headers)


@dataclass
class _Tracked:
    accepted_at: float
    event_type: str
    events: list[dict[str, Any]] = field(default_factory=list)
    state: str = "accepted"


class StatusTracker:
    """What became of accepted requests: the events correlated to each, and a state.

    `states` maps event types to a state name; the state of a request is the one of the newest
    correlated event that has one ("processing" when events came but none has a state yet,
    "accepted" before any). Entries live `ttl` seconds; at most `max_entries` are kept (the
    oldest go first). An id this instance did not accept is looked up among the events the
    feed still holds, so a status URL works on every instance behind a load balancer while
    the feed remembers its events.
    """

    def __init__(
        self,
        feed: EventFeed,
        *,
        states: Mapping[str, str] | None = None,
        ttl: float = 3600.0,
        max_entries: int = 100_000,
        max_events: int = 50,
    ) -> None:
        self.feed = feed
        self.states = dict(states or {})
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_events = max_events
        self._entries: OrderedDict[str, _Tracked] = OrderedDict()
        feed.tap(self._on_event)

    def accepted(self, envelope: Envelope[Any]) -> None:
        self._expire()
        self._entries[envelope.id] = _Tracked(time.time(), envelope.type)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, event_id: str) -> None:
        self._entries.pop(event_id, None)

    def status(self, event_id: str) -> dict[str, Any] | None:
        """The status document of an accepted id, or None when it is unknown here."""
        self._expire()
        entry = self._entries.get(event_id)
        if entry is None:
            events = self.feed.recent(EventFilter(correlationid=event_id))
            if not events:
                return None
            entry = _Tracked(0.0, "")
            for event in events:
                self._record(entry, event)
        document: dict[str, Any] = {"id": event_id, "state": entry.state, "events": entry.events}
        if entry.accepted_at:
            document["accepted_at"] = entry.accepted_at
            document["type"] = entry.event_type
        return document

    async def handle(self, request: web.Request) -> web.Response:
        """GET handler; the id is the `id` path parameter."""
        event_id = request.match_info.get("id", "")
        document = self.status(event_id)
        if document is None:
            return problem(404, "Not Found", f"no accepted request {event_id!r} is known")
        return json_response(document)

    def _on_event(self, event: FeedEvent) -> None:
        correlation = event.envelope.correlationid
        if correlation is None or event.envelope.id == correlation:
            return
        entry = self._entries.get(correlation)
        if entry is not None:
            self._record(entry, event)

    def _record(self, entry: _Tracked, event: FeedEvent) -> None:
        envelope = event.envelope
        if len(entry.events) < self.max_events:
            entry.events.append(
                {
                    "id": envelope.id,
                    "type": envelope.type,
                    "source": envelope.source,
                    "time": envelope.time.isoformat(),
                    "data": event.data(),
                }
            )
        state = self.states.get(envelope.type)
        if state is not None:
            entry.state = state
        elif entry.state == "accepted":
            entry.state = "processing"

    def _expire(self) -> None:
        horizon = time.time() - self.ttl
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.accepted_at >= horizon:
                break
            entries.popitem(last=False)


# -- request/reply ----------------------------------------------------------------------------


class RequestReply:
    """HTTP <-> bus request/reply: publish, await the correlated reply, answer with it."""

    def __init__(
        self,
        bus: Bus,
        topic: str,
        *,
        payload_type: Any = None,
        reply_type: Any = None,
        event_type: str | None = None,
        key_from: KeyFrom = None,
        mapping: FieldMapping | None = None,
        reply_mapping: FieldMapping | None = None,
        errors: Mapping[str, int] | None = None,
        timeout: float = 5.0,
        codecs: CodecRegistry | None = None,
        max_body: int = 1 << 20,
    ) -> None:
        if payload_type is None and event_type is None:
            raise ValueError("RequestReply needs a payload_type or an event_type")
        self.bus = bus
        self.topic = topic
        self.reply_type = reply_type
        self.event_type = event_type
        self.key_from = key_from
        self.reply_mapping = reply_mapping
        self.errors = dict(errors or {})
        self.timeout = timeout
        self.codecs = codecs or default_registry()
        self._decoding = _Decoding(
            payload_type=payload_type, mapping=mapping, codecs=self.codecs, max_body=max_body
        )

    async def handle(
        self,
        request: web.Request,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The aiohttp handler (`body` and `params` as for `AcceptedPublish.handle`)."""
        try:
            answer_codec = self.codecs.for_accept(request.headers.get("Accept"))
            document, payload = await self._decoding.read(request, body)
            key = _resolve_key(self.key_from, request, document, params)
        except (TranslationError, PayloadValidationError) as exc:
            return _input_problem(exc)
        try:
            reply = await self.bus.request(
                self.topic,
                payload,
                key=key,
                type=self.event_type,
                reply_type=self.reply_type,
                timeout=self.timeout,
            )
        except RequestTimeout:
            return problem(
                504, "Gateway Timeout", f"no reply from {self.topic!r} within {self.timeout}s"
            )
        except RemoteError as exc:
            status = self.errors.get(exc.error_type, 502)
            title = "Bad Gateway" if status == 502 else exc.error_type
            return problem(status, title, exc.remote_message, error=exc.error_type)
        except (PublishError, TransportError) as exc:
            log.warning("request to %s failed: %s", self.topic, exc)
            return problem(503, "Service Unavailable", "the message bus did not take the request")
        value = _plain(reply)
        try:
            if self.reply_mapping is not None:
                value = self.reply_mapping.apply(value)
            body = answer_codec.encode(value)
        except TranslationError as exc:
            log.error("the reply from %s cannot be translated: %s", self.topic, exc)
            return problem(502, "Bad Gateway", f"the reply cannot be translated: {exc}")
        return web.Response(body=body, content_type=answer_codec.media_type)


def _plain(value: Any) -> Any:
    """A reply as JSON-like values (models and dataclasses dumped)."""
    if isinstance(value, dict | list | str | int | float | bool) or value is None:
        return value
    return orjson.loads(encode_payload(value))
