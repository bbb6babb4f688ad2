"""What `msa graph` draws: the system as the code declares it (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from framework.messages import type_name
from framework.service import Service

__all__ = ["SystemGraph", "describe"]


@dataclass
class SystemGraph:
    services: list[str] = field(default_factory=list)
    consumes: set[tuple[str, str]] = field(default_factory=set)
    """(topic, service)"""
    publishes: set[tuple[str, str]] = field(default_factory=set)
    """(service, topic)"""
    events: dict[str, set[str]] = field(default_factory=dict)
    """topic -> event types seen in declarations"""
    databases: dict[str, str] = field(default_factory=dict)
    """service -> "PostgreSQL" / "MongoDB" / ..."""
    gateways: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """gateway name -> [(route, target service or topic)]"""

    @property
    def topics(self) -> list[str]:
        return sorted({t for t, _ in self.consumes} | {t for _, t in self.publishes})


def _database_of(resource: Any) -> str | None:
    name = type(resource).__name__
    if "Postgres" in name and hasattr(resource, "url"):
        return "PostgreSQL"
    if "Mongo" in name and hasattr(resource, "database"):
        return "MongoDB"
    if "Streams" in name:
        return "Kafka Streams (faust)"
    return None


def describe(services: Iterable[Service], gateways: Mapping[str, Any] = ()) -> SystemGraph:  # type: ignore[assignment]
    """The graph of these service instances and gateway configs (`GatewayConfig` by name)."""
    graph = SystemGraph()
    for service in services:
        name = service.name
        graph.services.append(name)
        for info in type(service).__msa_handlers__:
            event = info.type or type_name(info.payload_type)
            for topic in info.topics:
                graph.consumes.add((topic, name))
                graph.events.setdefault(topic, set()).add(event)
        for subscription in service.bus.subscriptions:
            for topic in subscription.topics:
                graph.consumes.add((topic, name))
                graph.events.setdefault(topic, set()).update(
                    t for t in subscription.handlers if t != "*"
                )
        for topic, types in type(service).publishes.items():
            graph.publishes.add((name, topic))
            graph.events.setdefault(topic, set()).update(type_name(t) for t in types)
        for resource in service.resources:
            database = _database_of(resource)
            if database is not None and name not in graph.databases:
                graph.databases[name] = database
    for gateway_name, config in dict(gateways).items():
        edges: list[tuple[str, str]] = []
        for route in config.routes:
            if route.upstream:
                edges.append((route.name, route.upstream))
            elif route.aggregate:
                edges += [(route.name, b.upstream) for b in route.aggregate.branches]
            elif route.publish:
                edges.append((route.name, f"topic:{route.publish.topic}"))
            elif route.request:
                edges.append((route.name, f"topic:{route.request.topic}"))
            elif route.stream:
                edges += [(route.name, f"topic:{t}") for t in route.stream.topics]
            elif route.drain:
                edges.append((route.name, route.drain.upstream))
        graph.gateways[gateway_name] = edges
    return graph
