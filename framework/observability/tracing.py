"""W3C Trace Context: parse and write `traceparent`, and carry the current trace in a contextvar.

A trace is a tree of spans that crosses services. Each hop receives a `traceparent` header
(`00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>`), continues the trace with a span
of its own (`continue_from`), makes it current for the work it does (`use_trace`), and passes a
child on to the next hop (`inject` for HTTP; the bus writes `Envelope.traceparent`). Log lines
carry the current trace id (see `framework.observability.logging`), so one id finds every line
of one request across all services.

    >>> parent = TraceContext.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    >>> span = parent.child()
    >>> span.trace_id == parent.trace_id and span.span_id != parent.span_id
    True
    >>> with use_trace(span):
    ...     get_trace() is span
    True

Parsing follows the specification (https://www.w3.org/TR/trace-context/) strictly: lowercase hex
only, ids that are not all zeros, version `ff` refused, version `00` exactly 55 characters. A
*later* version is read by its version-00 prefix when what follows is `-` or nothing, as the
specification asks of parsers, so a newer peer does not restart our traces. Anything invalid
parses to None, and the receiver starts a new trace. `tracestate` is not propagated: the framework
keeps no vendor state.

The module also holds the contextvars of the correlation id of the message or request being
handled (`use_correlation_id`), which the bus and the HTTP side set, and of the service whose work
is running (`use_service`), which the bus sets for its consumers' tasks (several services can
share one process: `msa shop`, tests); the log formatter reads all three.

This module does not import aiohttp: `inject` takes any mutable mapping of headers, and the
aiohttp middleware that continues a caller's trace is `framework.observability.web`'s
`trace_middleware`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "TRACEPARENT",
    "TraceContext",
    "continue_from",
    "current_correlation_id",
    "current_service",
    "current_trace",
    "get_correlation_id",
    "get_trace",
    "inject",
    "use_correlation_id",
    "use_service",
    "use_trace",
]

TRACEPARENT = "traceparent"
"""The header (HTTP) and CloudEvents extension attribute that carries the trace context."""

_VERSION_00_LENGTH = 55
_FIELDS = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
"""What every sender here writes: one `fullmatch` instead of the general rules."""
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
_SAMPLED = 0x01
_SAMPLED_LAST_DIGIT = frozenset("13579bdf")
"""The flags' last hex digit when the `sampled` bit (0x01) is set."""


def _new_span_id() -> str:
    # Non-cryptographic randomness is enough for ids (the spec asks for uniqueness, not secrecy);
    # the `random` module reseeds itself in forked children, so workers do not repeat ids.
    while True:
        bits = random.getrandbits(64)
        if bits:
            return f"{bits:016x}"


def _new_trace_id() -> str:
    while True:
        bits = random.getrandbits(128)
        if bits:
            return f"{bits:032x}"


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's position in a trace: which trace, which span, and whether it is sampled."""

    trace_id: str
    """32 lowercase hex digits, not all zero; the same on every span of the trace."""
    span_id: str
    """16 lowercase hex digits, not all zero; this span (the `parent-id` of its children)."""
    sampled: bool = True
    """The caller records this trace (the `sampled` trace flag)."""

    @classmethod
    def parse(cls, header: str | None) -> TraceContext | None:
        """The context a `traceparent` header value describes, or None when it is invalid."""
        if not header or len(header) < _VERSION_00_LENGTH:
            return None
        common = _VERSION_00.fullmatch(header)
        if common is not None:
            trace_id, span_id, flags = common.groups()
            if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
                return None
            return cls(trace_id, span_id, flags[1] in _SAMPLED_LAST_DIGIT)
        match = _FIELDS.match(header)
        if match is None:
            return None
        version, trace_id, span_id, flags = match.groups()
        if version == "ff":
            return None
        if len(header) > _VERSION_00_LENGTH and (
            version == "00" or header[_VERSION_00_LENGTH] != "-"
        ):
            return None
        if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
            return None
        return cls(trace_id, span_id, bool(int(flags, 16) & _SAMPLED))

    @classmethod
    def continue_from(cls, header: str | None) -> TraceContext:
        """The span for work that received `header`: its child, or a new root if it is invalid."""
        parent = cls.parse(header)
        return parent.child() if parent is not None else cls.new_root()

    @classmethod
    def new_root(cls, *, sampled: bool = True) -> TraceContext:
        """The first span of a new trace."""
        return cls(_new_trace_id(), _new_span_id(), sampled)

    def child(self) -> TraceContext:
        """A new span in the same trace, whose parent is this span."""
        return TraceContext(self.trace_id, _new_span_id(), self.sampled)

    def child_header(self) -> str:
        """The `traceparent` of a new child span, without building the child."""
        return f"00-{self.trace_id}-{_new_span_id()}-{'01' if self.sampled else '00'}"

    def to_header(self) -> str:
        """This span as a version-00 `traceparent` value."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def new_root_header() -> str:
    """The `traceparent` of a new sampled root span (what `new_root().to_header()` gives, for
    the publish path, which needs only the header)."""
    return f"00-{_new_trace_id()}-{_new_span_id()}-01"


current_trace: ContextVar[TraceContext | None] = ContextVar("msa_current_trace", default=None)
"""The span of the work running now (None outside any traced work)."""

current_correlation_id: ContextVar[str | None] = ContextVar(
    "msa_current_correlation_id", default=None
)
"""The correlation id of the message or request being handled (None outside one)."""

current_service: ContextVar[str | None] = ContextVar("msa_current_service", default=None)
"""The name of the service whose work is running (None outside a service's tasks)."""


def get_trace() -> TraceContext | None:
    return current_trace.get()


def get_correlation_id() -> str | None:
    return current_correlation_id.get()


@contextmanager
def use_trace(context: TraceContext | None) -> Iterator[TraceContext | None]:
    """Make `context` the current trace inside the block; the previous one comes back after."""
    token = current_trace.set(context)
    try:
        yield context
    finally:
        current_trace.reset(token)


@contextmanager
def use_correlation_id(correlation_id: str | None) -> Iterator[str | None]:
    """Make `correlation_id` current inside the block; the previous one comes back after."""
    token = current_correlation_id.set(correlation_id)
    try:
        yield correlation_id
    finally:
        current_correlation_id.reset(token)


@contextmanager
def use_service(name: str | None) -> Iterator[str | None]:
    """Make `name` the current service inside the block; tasks created inside keep it."""
    token = current_service.set(name)
    try:
        yield name
    finally:
        current_service.reset(token)


def continue_from(header: str | None) -> TraceContext:
    """The span for work that received `header`: a child of it, or a new root if it is invalid.

    The same as `TraceContext.continue_from`.
    """
    return TraceContext.continue_from(header)


def inject(headers: MutableMapping[str, str]) -> TraceContext:
    """Write a `traceparent` for an outgoing call into `headers`; return the span written.

    The span is a child of the current trace, or the root of a new trace outside one:

        headers: dict[str, str] = {}
        inject(headers)
        async with session.get(url, headers=headers) as response: ...
    """
    current = current_trace.get()
    span = current.child() if current is not None else TraceContext.new_root()
    headers[TRACEPARENT] = span.to_header()
    return span
