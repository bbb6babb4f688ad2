"""The framework's exceptions: one rooted tree, control-flow signals kept apart from errors.

    MsaError                               root of everything the framework raises
    ├── ConfigurationError(ValueError)     misuse: bad settings, a handler declared wrongly
    ├── NotStartedError                    used before start(), or after stop()
    ├── MessageError                       a message that cannot be taken as it is
    │   ├── DecodeError                    bytes/headers are not a valid envelope
    │   ├── UnknownMessageType             no schema registered for an incoming `type`
    │   ├── PayloadValidationError(ValueError)  the data does not match its schema
    │   └── TranslationError(ValueError)   a body a codec or field mapping cannot take (HTTP 400)
    │       ├── UnsupportedMediaType       no codec for the content type (HTTP 415)
    │       └── UnsafeInputError           an XML bomb, external entity or DTD; too deep/large
    ├── BusError                           the message bus failed
    │   ├── TransportError                 the broker could not be reached or refused a call
    │   │   ├── PublishError               a record was not acknowledged
    │   │   └── CommitError                consumed offsets could not be committed
    │   ├── TopicError                     a topic could not be declared or does not exist
    │   └── RequestTimeout(TimeoutError)   no reply to a request within its timeout
    ├── RemoteError                        a request's handler failed; carries its error type
    ├── PersistenceError                   the database failed (see framework.persistence)
    │   └── DatabaseUnavailable            unreachable, or the connection was lost; retry
    ├── UpstreamError                      an HTTP call to another service got no answer
    │   ├── UpstreamUnreachable            no instance could be reached (a gateway answers 502)
    │   ├── UpstreamUnavailable            circuit open, no instance, at capacity (503)
    │   └── UpstreamTimeout(TimeoutError)  no answer within the call's timeout (504)
    ├── FeedClosed                         an event feed closed a listener (slow client, stopping)
    └── SignatureError(ValueError)         a signed URL is expired, altered or not signed at all

    HandlerSignal                          not errors: raised BY a handler to steer delivery
    ├── RetryLater                         retry this message after a delay (counts an attempt)
    └── Reject                             never retry: dead-letter it now with the reason

Foreign exceptions (aiokafka, asyncpg, pymongo, aiohttp) are translated to these at one edge per
integration, with `raise ... from exc`, so callers never import a driver to catch its errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BusError",
    "CommitError",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DecodeError",
    "FeedClosed",
    "HandlerSignal",
    "MessageError",
    "MsaError",
    "NotStartedError",
    "PayloadValidationError",
    "PersistenceError",
    "PublishError",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "RetryLater",
    "SignatureError",
    "TopicError",
    "TranslationError",
    "TransportError",
    "UnknownMessageType",
    "UnsafeInputError",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
]


class MsaError(Exception):
    """Root of every exception the framework raises."""


class ConfigurationError(MsaError, ValueError):
    """The framework was set up wrongly (settings, handler declarations, topic specs)."""


class NotStartedError(MsaError, RuntimeError):
    """A component was used before `start()` or after `stop()`."""


class MessageError(MsaError):
    """A message cannot be taken as it is; retrying will not help. It is dead-lettered."""


class DecodeError(MessageError, ValueError):
    """The record's bytes or headers are not a valid CloudEvents envelope."""


class UnknownMessageType(MessageError, LookupError):
    """No schema is registered for the envelope's `type`."""


class PayloadValidationError(MessageError, ValueError):
    """The payload does not match the schema of its type; `errors` lists what is wrong."""

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class TranslationError(MessageError, ValueError):
    """Input a format codec or a field mapping cannot take; `status` is the HTTP answer.

    `path` points at the offending place when one is known (`"order.lines[2].sku"`).
    """

    status = 400

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsupportedMediaType(TranslationError):
    """No codec reads or writes the requested content type."""

    status = 415


class UnsafeInputError(TranslationError):
    """Input refused for safety: XML entities, DTDs, external references, or a document
    deeper or larger than the codec's limits."""


class BusError(MsaError):
    """The message bus failed."""


class TransportError(BusError):
    """The broker could not be reached, or refused the call."""


class PublishError(TransportError):
    """A record was not acknowledged by the broker."""


class CommitError(TransportError):
    """Consumed offsets could not be committed (for example after losing the partitions)."""


class TopicError(BusError):
    """A topic could not be declared, or does not exist where it must."""


class RequestTimeout(BusError, TimeoutError):
    """No reply arrived for a request within its timeout."""


class RemoteError(MsaError):
    """The handler of a request failed; the reply carried its error type and message."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.remote_message = message


class PersistenceError(MsaError):
    """The database failed."""


class DatabaseUnavailable(PersistenceError):
    """The database cannot be reached (or the connection was lost); retrying may help.

    Raised by the PostgreSQL and the MongoDB edges alike (`framework.persistence`)."""


class UpstreamError(MsaError):
    """An HTTP call to another service (`framework.resilience.UpstreamPool`, which
    `framework.client.ResilientClient` uses) got no answer. An answer, whatever its status, is
    never this error. `status` and `title` are what a gateway answers for it; `headers` what it
    adds (`Retry-After`)."""

    status = 502
    title = "Bad Gateway"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class UpstreamUnreachable(UpstreamError):
    """No instance of the upstream could be reached (after any retries)."""


class UpstreamUnavailable(UpstreamError):
    """Refused without trying an instance: the circuit is open, no instance is available, or
    the pool is at capacity."""

    status = 503
    title = "Service Unavailable"


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No answer within the call's timeout (retries included)."""

    status = 504
    title = "Gateway Timeout"


class FeedClosed(MsaError):
    """An event feed closed its listener; `reason` says why (a slow client, the feed stopping).
    Raised by `framework.translate.FeedListener`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignatureError(MsaError, ValueError):
    """A signed URL is expired, altered, or not signed at all (`framework.gateway.signing`)."""


class HandlerSignal(Exception):
    """Raised by a handler to steer delivery. Not an error: not logged as one."""


class RetryLater(HandlerSignal):
    """Try this message again after `delay` seconds (or the retry policy's backoff)."""

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(HandlerSignal):
    """Never retry this message: dead-letter it now, with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
