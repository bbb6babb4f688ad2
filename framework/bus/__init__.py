"""The message bus: one contract, an in-memory transport and a Kafka transport.

- `Bus` (framework.bus.bus): typed publish, subscriptions, request/reply, middleware.
- `Subscription`, `ConsumerOptions`, `RetryPolicy`, `Message`, `HandlerSpec`
  (framework.bus.consumer): ordered concurrency, at-least-once commits, retries, dead letters.
- `MemoryTransport` (framework.bus.memory): Kafka-like, in process.
- `KafkaTransport`, `KafkaSettings` (framework.bus.kafka, extra `kafka`): Apache Kafka via aiokafka.
- `ConfluentTransport`, `ConfluentSettings` (framework.bus.confluent, extra `kafka-confluent`):
  Apache Kafka via librdkafka (confluent-kafka), for throughput; `KAFKA_CLIENT=confluent`.
- `transport_from_env` (framework.bus.transports): the transport `MSA_TRANSPORT` and the
  `KAFKA_*` variables describe; services, the gateway and the CLI build theirs with it.
"""

from framework.bus.bus import Bus, BusMetrics, Outgoing, current_message
from framework.bus.consumer import ConsumerOptions, HandlerSpec, Message, RetryPolicy, Subscription
from framework.bus.memory import MemoryTransport
from framework.bus.transports import transport_from_env

__all__ = [
    "Bus",
    "BusMetrics",
    "ConsumerOptions",
    "HandlerSpec",
    "MemoryTransport",
    "Message",
    "Outgoing",
    "RetryPolicy",
    "Subscription",
    "current_message",
    "transport_from_env",
]
