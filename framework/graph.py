"""`msa graph`: the system drawn from the code's own declarations.

Nothing is hand-drawn: services are instantiated (not started) and asked what they consume
(`@handles` plus subscriptions made in their constructors, e.g. a saga's reply topics), what they
publish (`publishes`), and which databases they use (their resources); gateway configs add the
routes and the upstreams they reach. The result is Mermaid text (GitHub and most wikis render it)
or a self-contained SVG:

    msa graph example_shop.orders:Orders example_shop.inventory:Inventory --gateway web.yaml
    msa graph --format svg > system.svg

`rates` (topic -> messages per second) labels the edges with live traffic, as the shop's admin
view does with the services' `/metrics`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from framework.messages import type_name
from framework.service import Service

__all__ = ["SystemGraph", "describe", "render_mermaid", "render_svg"]


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


def _id(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)


def render_mermaid(graph: SystemGraph, rates: Mapping[str, float] | None = None) -> str:
    rates = rates or {}
    lines = ["flowchart LR"]
    for gateway, edges in graph.gateways.items():
        lines.append(f'  {_id("g_", gateway)}[["gateway: {gateway}"]]')
        targets = sorted({target for _, target in edges})
        for target in targets:
            routes = sorted(route for route, t in edges if t == target)
            label = ", ".join(routes[:4]) + (" …" if len(routes) > 4 else "")
            node = _id("t_", target[6:]) if target.startswith("topic:") else _id("s_", target)
            lines.append(f'  {_id("g_", gateway)} -->|"{label}"| {node}')
    for service in graph.services:
        database = graph.databases.get(service)
        lines.append(f'  {_id("s_", service)}("{service}")')
        if database:
            lines.append(f'  {_id("s_", service)} --- {_id("db_", service)}[("{database}")]')
    for topic in graph.topics:
        lines.append(f'  {_id("t_", topic)}{{{{"{topic}"}}}}')
    for service, topic in sorted(graph.publishes):
        rate = rates.get(topic)
        label = f'|"{rate:.1f}/s"|' if rate is not None else ""
        lines.append(f"  {_id('s_', service)} -->{label} {_id('t_', topic)}")
    for topic, service in sorted(graph.consumes):
        lines.append(f"  {_id('t_', topic)} -.-> {_id('s_', service)}")
    return "\n".join(lines) + "\n"


def render_svg(graph: SystemGraph, rates: Mapping[str, float] | None = None) -> str:
    """A plain three-column drawing: gateways, services (with their databases), topics."""
    rates = rates or {}
    columns: Sequence[list[str]] = (
        [f"gateway: {g}" for g in graph.gateways],
        [f"{s} ({graph.databases[s]})" if s in graph.databases else s for s in graph.services],
        graph.topics,
    )
    width, box_w, box_h, gap = 1100, 280, 34, 14
    xs = (20, 410, 800)
    positions: dict[str, tuple[int, int]] = {}
    keys = (
        [f"g:{g}" for g in graph.gateways],
        [f"s:{s}" for s in graph.services],
        [f"t:{t}" for t in graph.topics],
    )
    for x, names in zip(xs, keys, strict=True):
        for row, name in enumerate(names):
            positions[name] = (x, 40 + row * (box_h + gap))
    height = 60 + max((len(c) for c in columns), default=1) * (box_h + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">'
    ]

    def line(a: str, b: str, dashed: bool = False, label: str = "") -> None:
        if a not in positions or b not in positions:
            return
        (x1, y1), (x2, y2) = positions[a], positions[b]
        if x1 > x2:
            x1, y1, x2, y2 = x2, y2, x1, y1
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(
            f'<line x1="{x1 + box_w}" y1="{y1 + box_h // 2}" x2="{x2}" y2="{y2 + box_h // 2}" '
            f'stroke="#888"{dash}/>'
        )
        if label:
            out.append(
                f'<text x="{(x1 + box_w + x2) // 2}" y="{(y1 + y2) // 2 + box_h // 2 - 3}">'
                f"{html.escape(label)}</text>"
            )

    for gateway, edges in graph.gateways.items():
        for _, target in edges:
            line(
                f"g:{gateway}", f"t:{target[6:]}" if target.startswith("topic:") else f"s:{target}"
            )
    for service, topic in graph.publishes:
        rate = rates.get(topic)
        line(f"s:{service}", f"t:{topic}", label=f"{rate:.1f}/s" if rate is not None else "")
    for topic, service in graph.consumes:
        line(f"s:{service}", f"t:{topic}", dashed=True)
    for labels, names in zip(columns, keys, strict=True):
        for label, name in zip(labels, names, strict=True):
            x, y = positions[name]
            out.append(
                f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
                'fill="#f6f1ea" stroke="#3b2f2f"/>'
            )
            out.append(f'<text x="{x + 8}" y="{y + 21}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
