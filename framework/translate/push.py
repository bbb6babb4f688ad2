"""Kafka -> browsers: Server-Sent Events and WebSocket streams of live events.

Both bridges read an `EventFeed` (one group-less reader per process, shared by every client)
and send each client the events its filter matches, as CloudEvents in the JSON format:

    feed = EventFeed(bus.transport, ["shop.orders"], replay=2000)
    order_events = RequestFilter(key="{order_id}", query=("type",))
    app.router.add_get("/orders/{order_id}/events", SseBridge(feed, order_events).handle)
    app.router.add_get("/orders/{order_id}/ws", WebSocketBridge(feed, order_events).handle)

SSE: each event is `id: <event id>`, `event: <CloudEvents type>`, `data: <the event as JSON>`.
A reconnecting browser sends `Last-Event-ID` (EventSource does this by itself; `?lastEventId=`
works too) and first gets the events it missed, while the feed still holds them; when it does
not, the stream starts with `event: reset` so the client reloads its state. Comment lines keep
idle connections open through proxies (`heartbeat`).

WebSocket: each event is one text message (the event as JSON). A client resumes with
`?lastEventId=...` on the URL, like SSE; what it sends is read (for pings and its close) and
ignored. Close codes: 1001 when the server stops, 1008 when the client was too slow (the reason
says so).

Backpressure: a client's events wait in a queue of `capacity` events; a client that lets it
fill (or does not take a write within `write_timeout`) is disconnected with a reason - an
`event: close` with `{"reason": ...}` on SSE, close code 1008 on WebSocket - and memory stays
bounded whatever the clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from framework.messages import to_structured
from framework.translate.feed import EventFeed, EventFilter, FeedClosed, FeedEvent, FeedListener

__all__ = ["FilterFrom", "RequestFilter", "SseBridge", "WebSocketBridge"]

log = logging.getLogger("framework.translate.push")

FilterFrom = Callable[[web.Request, Mapping[str, str]], EventFilter]
"""What a request subscribes to, given the request and its path parameters; raise
`web.HTTPBadRequest` for a bad filter."""


def _fill(template: str | None, params: Mapping[str, str]) -> str | None:
    if template is None:
        return None
    try:
        return template.format_map(params)
    except KeyError as exc:
        raise web.HTTPInternalServerError(text=f"the route has no path parameter {exc}") from None


@dataclass(frozen=True, kw_only=True)
class RequestFilter:
    """A declarative `FilterFrom`: fixed criteria, `{name}` templates filled from path
    parameters, and the query parameters a client may add (`type`, `key`, `subject`,
    `source`, or `data.<path>`); `type` takes a comma-separated list.

        RequestFilter(types={"shop.order.confirmed"}, data={"order_id": "{order_id}"})
    """

    types: frozenset[str] | None = None
    key: str | None = None
    subject: str | None = None
    source: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    query: Sequence[str] = ()

    def __call__(self, request: web.Request, params: Mapping[str, str]) -> EventFilter:
        types = frozenset(self.types) if self.types is not None else None
        key, subject, source = (
            _fill(self.key, params),
            _fill(self.subject, params),
            _fill(self.source, params),
        )
        data = {path: _fill(value, params) or "" for path, value in self.data.items()}
        allowed = set(self.query)
        for name, value in request.query.items():
            if name == "lastEventId":
                continue
            if name not in allowed and not (name.startswith("data.") and "data.*" in allowed):
                raise web.HTTPBadRequest(
                    text=f"unknown filter {name!r}; this stream takes: "
                    + (", ".join(sorted(allowed)) or "none")
                )
            if name == "type":
                asked = frozenset(t for t in value.split(",") if t)
                types = asked if types is None else types & asked
            elif name == "key":
                key = value
            elif name == "subject":
                subject = value
            elif name == "source":
                source = value
            elif name.startswith("data."):
                data[name[5:]] = value
        return EventFilter(types=types, key=key, subject=subject, source=source, data=data)


def _event_json(event: FeedEvent) -> bytes:
    return to_structured(event.envelope)


class _PushBridge:
    """What both push bridges share: the feed, the client's filter, its queue's capacity, the
    write timeout, and the count of clients dropped for being slow."""

    def __init__(
        self,
        feed: EventFeed,
        filter_from: FilterFrom | None,
        *,
        capacity: int,
        heartbeat: float,
        write_timeout: float,
    ) -> None:
        self.feed = feed
        self.filter_from = filter_from or RequestFilter()
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.write_timeout = write_timeout
        self.dropped = 0

    def _listen(
        self, request: web.Request, params: Mapping[str, str] | None, after: str | None
    ) -> FeedListener:
        """The client's listener; `params`: the path parameters, when not `match_info` (the
        gateway matches routes itself)."""
        match = self.filter_from(request, request.match_info if params is None else params)
        return self.feed.listen(match, after=after, capacity=self.capacity)


class SseBridge(_PushBridge):
    """Server-Sent Events from an `EventFeed`, filtered per client, resumable."""

    def __init__(
        self,
        feed: EventFeed,
        filter_from: FilterFrom | None = None,
        *,
        capacity: int = 256,
        heartbeat: float = 15.0,
        write_timeout: float = 10.0,
        retry_ms: int = 2000,
    ) -> None:
        super().__init__(
            feed, filter_from, capacity=capacity, heartbeat=heartbeat, write_timeout=write_timeout
        )
        self.retry_ms = retry_ms

    async def handle(
        self, request: web.Request, params: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        """The aiohttp handler; `params`: the path parameters, when not `request.match_info`
        (the gateway matches routes itself)."""
        after = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
        listener = self._listen(request, params, after)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx-style proxies: do not buffer the stream
            }
        )
        try:
            await response.prepare(request)
            await self._write(response, b"retry: %d\n\n" % self.retry_ms)
            if listener.gap:
                reason = orjson.dumps({"reason": "events since Last-Event-ID are not held"})
                await self._write(response, b"event: reset\ndata: " + reason + b"\n\n")
            await self._stream(listener, response)
        except (ConnectionResetError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                self.dropped += 1
                log.info(
                    "SSE client %s dropped: a write waited %ss", request.remote, self.write_timeout
                )
            listener.close("the client went away")
        finally:
            listener.close("the stream ended")
        return response

    async def _stream(self, listener: FeedListener, response: web.StreamResponse) -> None:
        while True:
            try:
                event = await listener.next(timeout=self.heartbeat)
            except FeedClosed as closed:
                if closed.reason.startswith("slow client"):
                    self.dropped += 1
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    reason = orjson.dumps({"reason": closed.reason})
                    await self._write(response, b"event: close\ndata: " + reason + b"\n\n")
                return
            if event is None:
                await self._write(response, b": keep-alive\n\n")
                continue
            await self._write(
                response,
                b"id: %s\nevent: %s\ndata: %s\n\n"
                % (event.id.encode(), event.envelope.type.encode(), _event_json(event)),
            )

    async def _write(self, response: web.StreamResponse, chunk: bytes) -> None:
        async with asyncio.timeout(self.write_timeout):
            await response.write(chunk)


class WebSocketBridge(_PushBridge):
    """A WebSocket stream of the events from an `EventFeed`, filtered per client."""

    def __init__(
        self,
        feed: EventFeed,
        filter_from: FilterFrom | None = None,
        *,
        capacity: int = 256,
        heartbeat: float = 20.0,
        write_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            feed, filter_from, capacity=capacity, heartbeat=heartbeat, write_timeout=write_timeout
        )

    async def handle(
        self, request: web.Request, params: Mapping[str, str] | None = None
    ) -> web.WebSocketResponse:
        """The aiohttp handler; `params` as for `SseBridge.handle`."""
        socket = web.WebSocketResponse(heartbeat=self.heartbeat, max_msg_size=64 * 1024)
        await socket.prepare(request)
        listener = self._listen(request, params, request.query.get("lastEventId"))
        reader = asyncio.create_task(self._read_until_closed(socket, listener))
        try:
            if listener.gap:
                await socket.send_bytes(
                    orjson.dumps(
                        {"type": "reset", "reason": "events since lastEventId are not held"}
                    )
                )
            async for event in listener:
                async with asyncio.timeout(self.write_timeout):
                    await socket.send_str(_event_json(event).decode())
        except TimeoutError:
            listener.close(f"slow client: a write waited {self.write_timeout}s")
        except ConnectionResetError:
            listener.close("the client went away")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            reason = listener.closed_reason or "the stream ended"
            listener.close(reason)
            if "slow" in reason:  # one count per dropped client, whichever way it was slow
                self.dropped += 1
            if not socket.closed:
                code = 1001 if "shutting down" in reason else 1008 if "slow" in reason else 1000
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.write_timeout):
                        await socket.close(code=code, message=reason[:120].encode())
        return socket

    async def _read_until_closed(
        self, socket: web.WebSocketResponse, listener: FeedListener
    ) -> None:
        """Read (and ignore) what the client sends, so pings and its close are processed."""
        async for _ in socket:
            pass
        listener.close("the client went away")
