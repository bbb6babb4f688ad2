"""Queue-and-drain: accept HTTP requests at once, deliver them to a backend at its own pace.

A backend that takes 20 requests a second should not see the 2,000 a burst of clients sends.
`QueueAndDrain.accept` takes the request, puts it on a topic (method, path, query, chosen headers
and the raw body, as a CloudEvent of type `msa.http.request`) and answers `202 Accepted` with its
id once the broker holds it. A consumer group then delivers the queued requests to the backend
no faster than `rate` per second (a token bucket shared by the group member's workers):

    drain = QueueAndDrain(bus, "legacy.erp.inbox", "http://erp.internal:8080", rate=20)
    drain.attach()                               # before bus.start(): the delivering consumer
    app.router.add_route("*", "/erp/{tail:.*}", drain.accept)
    ...
    await drain.start()                          # the HTTP client session; stop() closes it

Delivery is at least once: every attempt carries `Idempotency-Key: <event id>` so the backend
can drop repeats. A 2xx answer completes the request. 408, 425, 429 and 5xx answers, timeouts
and connection failures are retried with the retry policy's exponential backoff (a
`Retry-After` header, when sent, sets the delay); after `retry.max_attempts` attempts, or at
once for any other 4xx answer, the request goes to the dead-letter topic `<topic>.dlq` with the
reason in its headers (`msa dlq replay` sends it again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aiohttp
import orjson
from aiohttp import web

from framework.bus import Bus, ConsumerOptions, HandlerSpec, Message, RetryPolicy, Subscription
from framework.errors import PublishError, Reject, RetryLater, TransportError
from framework.http import json_response, problem
from framework.messages import Envelope
from framework.resilience import TokenBucket

__all__ = ["HTTP_REQUEST_TYPE", "QueueAndDrain", "TokenBucket"]

log = logging.getLogger("framework.translate.drain")

HTTP_REQUEST_TYPE = "msa.http.request"
_RETRYABLE = frozenset({408, 425, 429})
_FORWARDED = ("content-type", "accept", "authorization", "x-request-id", "x-gtxid", "traceparent")


class QueueAndDrain:
    """HTTP -> topic -> HTTP backend at a fixed pace, with retries and a dead-letter topic."""

    def __init__(
        self,
        bus: Bus,
        topic: str,
        backend: str,
        *,
        rate: float,
        burst: int = 1,
        group: str | None = None,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        path: str | None = None,
        forward_headers: Sequence[str] = _FORWARDED,
        max_body: int = 1 << 20,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.backend = backend.rstrip("/")
        self.path = path
        self.group = group or f"{topic}.drain"
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=60.0)
        self.timeout = timeout
        self.forward_headers = tuple(h.lower() for h in forward_headers)
        self.max_body = max_body
        self.bucket = TokenBucket(rate, burst)
        self.delivered = 0
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def _subscription_args(self) -> tuple[list[str], dict[str, HandlerSpec], ConsumerOptions]:
        return (
            [self.topic],
            {HTTP_REQUEST_TYPE: HandlerSpec(bytes, self._deliver, name="drain")},
            ConsumerOptions(
                group=self.group, concurrency=self.concurrency, ordering="none", retry=self.retry
            ),
        )

    def attach(self) -> Subscription:
        """Subscribe the delivering consumer (call before `bus.start()`)."""
        return self.bus.subscribe(*self._subscription_args())

    async def attach_running(self) -> Subscription:
        """Subscribe the delivering consumer on a bus that has started."""
        return await self.bus.subscribe_running(*self._subscription_args())

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=max(self.concurrency, 1)),
            )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- accepting -------------------------------------------------------------------------------

    async def accept(self, request: web.Request, body: bytes | None = None) -> web.Response:
        """The HTTP handler: queue the request, answer 202 with its id (`body`: the request
        body, if the caller has read it)."""
        if body is None:
            if request.content_length is not None and request.content_length > self.max_body:
                return problem(413, "Content Too Large", f"the body exceeds {self.max_body} bytes")
            body = await request.read()
        if len(body) > self.max_body:
            return problem(413, "Content Too Large", f"the body exceeds {self.max_body} bytes")
        headers = {
            k.lower(): v for k, v in request.headers.items() if k.lower() in self.forward_headers
        }
        envelope = self.bus.envelope(body, type=HTTP_REQUEST_TYPE)
        envelope.datacontenttype = request.headers.get("Content-Type", "application/octet-stream")
        envelope.correlationid = envelope.id
        envelope.extensions = {
            "httpmethod": request.method,
            "httppath": self.path or request.rel_url.path,
            "httpquery": request.rel_url.raw_query_string,
            "httpheaders": orjson.dumps(headers).decode(),
        }
        try:
            await self.bus.publish_envelope(self.topic, envelope)
        except (PublishError, TransportError) as exc:
            log.warning("could not queue a request on %s: %s", self.topic, exc)
            return problem(503, "Service Unavailable", "the queue did not take the request")
        return json_response({"id": envelope.id, "state": "queued"}, status=202)

    # -- delivering ------------------------------------------------------------------------------

    async def _deliver(self, message: Message[bytes]) -> None:
        session = self._session
        if session is None:
            raise RetryLater("the drain's HTTP client is not started", delay=1.0)
        envelope: Envelope[bytes] = message.envelope
        extensions = envelope.extensions
        method = extensions.get("httpmethod", "POST")
        url = self.backend + extensions.get("httppath", "/")
        query = extensions.get("httpquery")
        if query:
            url += "?" + query
        headers: dict[str, str] = orjson.loads(extensions.get("httpheaders", "{}"))
        headers["Idempotency-Key"] = envelope.id
        await self.bucket.take()
        try:
            async with session.request(
                method, url, data=envelope.data, headers=headers, allow_redirects=False
            ) as response:
                text = (await response.read())[:500].decode(errors="replace")
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"backend {self.backend} failed: {exc!r}") from exc
        if 200 <= status < 300:
            self.delivered += 1
            return
        reason = f"backend answered {status} to {method} {url}: {text}"
        if status in _RETRYABLE or status >= 500:
            raise RetryLater(reason, delay=retry_after)
        raise Reject(reason)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        return None  # an HTTP date: fall back to the retry policy's backoff
