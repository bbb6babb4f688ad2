"""The system graph as Mermaid text (GitHub and most wikis render it)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from framework.graph.model import SystemGraph

__all__ = ["render_mermaid"]


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
