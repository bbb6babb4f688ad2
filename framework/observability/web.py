"""Trace context on aiohttp servers: `trace_middleware`.

Kept apart from `framework.observability.tracing`, which does not import aiohttp (a process that
only consumes never needs it); this module is imported where an aiohttp application is built.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from framework.observability.tracing import TRACEPARENT, continue_from, current_trace

__all__ = ["trace_middleware"]


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp middleware: continue the caller's trace around the handler.

    The request's `traceparent` is continued with a child span (a new trace when it is missing or
    invalid), which is current while the handler runs and is returned to the caller in the
    response's `traceparent` header, also on `web.HTTPException` responses:

        app = web.Application(middlewares=[trace_middleware])
    """
    span = continue_from(request.headers.get(TRACEPARENT))
    header = span.to_header()
    token = current_trace.set(span)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers[TRACEPARENT] = header
        raise
    finally:
        current_trace.reset(token)
    if not response.prepared:  # a streamed response or websocket already sent its headers
        response.headers[TRACEPARENT] = header
    return response
