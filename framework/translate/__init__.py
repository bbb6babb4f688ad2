"""Protocol and format translation: small pieces a service or the gateway composes.

Formats (`codecs`, `mapping`): JSON, XML (safe parsing), form and text codecs chosen by
`Content-Type`/`Accept`, and declarative field mappings that run in both directions.

Protocols: `http_bus` (HTTP -> bus with 202 and a status URL; HTTP <-> bus request/reply with
504 on timeout), `drain` (queue-and-drain to an HTTP backend at its pace), `feed` + `push`
(bus -> Server-Sent Events and WebSocket, filtered, resumable, with backpressure).

Every piece refuses bad input with `TranslationError` (400), `UnsupportedMediaType` (415),
`NotAcceptable` (406) or `PayloadValidationError` (422), and a bridge answers those as RFC 9457
problem documents without publishing anything.
"""

from framework.translate.codecs import (
    CodecRegistry,
    FormCodec,
    JsonCodec,
    NotAcceptable,
    TextCodec,
    XmlCodec,
    convert,
    default_registry,
)
from framework.translate.drain import HTTP_REQUEST_TYPE, QueueAndDrain, TokenBucket
from framework.translate.feed import EventFeed, EventFilter, FeedClosed, FeedEvent, FeedListener
from framework.translate.http_bus import AcceptedPublish, RequestReply, StatusTracker
from framework.translate.mapping import (
    Constant,
    Drop,
    FieldMapping,
    FieldOperation,
    Flatten,
    Nest,
    Pick,
    Rename,
    Template,
)
from framework.translate.push import RequestFilter, SseBridge, WebSocketBridge

__all__ = [
    "HTTP_REQUEST_TYPE",
    "AcceptedPublish",
    "CodecRegistry",
    "Constant",
    "Drop",
    "EventFeed",
    "EventFilter",
    "FeedClosed",
    "FeedEvent",
    "FeedListener",
    "FieldMapping",
    "FieldOperation",
    "Flatten",
    "FormCodec",
    "JsonCodec",
    "Nest",
    "NotAcceptable",
    "Pick",
    "QueueAndDrain",
    "Rename",
    "RequestFilter",
    "RequestReply",
    "SseBridge",
    "StatusTracker",
    "Template",
    "TextCodec",
    "TokenBucket",
    "WebSocketBridge",
    "XmlCodec",
    "convert",
    "default_registry",
]
