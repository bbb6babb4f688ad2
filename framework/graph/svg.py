"""The system graph as a self-contained SVG, laid out in layers from left to right."""

from __future__ import annotations

import bisect
import hashlib
import html
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise
from operator import itemgetter

from framework.graph.model import SystemGraph

__all__ = ["render_svg"]


# --- the SVG drawing -----------------------------------------------------------------------------
#
# A layered drawing, left to right (the Sugiyama scheme): a few edges are turned round so the rest
# has no cycle (Eades-Lin-Smyth), every node gets the longest-path layer counted from the
# gateways, an edge spanning several layers passes through a reserved empty slot (a waypoint) in
# each layer between, barycentre sweeps order the layers to cut crossings, and least squares
# under each layer's order and spacing places the rows. So every stretch of an edge either
# crosses the empty gap between two adjacent columns (a cubic curve whose control points stay in
# that gap) or runs straight across a column at its waypoint's slot: no edge passes through a
# box. A service's database sits under it, joined by a short vertical edge. A topic's rate is
# printed in its box, which always has room for it, so live rates never move anything.

_SVG_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
_FONT_SIZE = 13
_CHAR_WIDTH = 8.0
"""A generous average advance at 13px (DejaVu Sans, a wide fallback for system-ui, needs 7.9),
so labels fit the boxes sized for them."""
_PAD_X = 12
_BASE_HEIGHT = {"gateway": 34, "service": 34, "topic": 42, "database": 26}
_PORT_GAP = 12
"""Vertical distance between the ends of edges sharing one side of a box."""
_DATABASE_GAP = 22
_COLUMN_GAP = 88
_ROW_GAP = 20
_WAYPOINT_GAP = 10
_MARGIN = 20
_WIDEST_RATE = "99999.9 msg/s"
"""Topic boxes leave room for this, so the layout does not depend on the rates."""


@dataclass(frozen=True, kw_only=True)
class _Paint:
    fill: str
    stroke: str
    text: str
    legend: str


_NODE_PAINT = {  # text on fill: contrast well above WCAG AA's 4.5:1
    "gateway": _Paint(fill="#ede9fe", stroke="#6d28d9", text="#2e1065", legend="gateway"),
    "service": _Paint(fill="#dbeafe", stroke="#1d4ed8", text="#172554", legend="service"),
    "topic": _Paint(fill="#fef3c7", stroke="#b45309", text="#451a03", legend="topic"),
    "database": _Paint(fill="#dcfce7", stroke="#15803d", text="#052e16", legend="database"),
}
_RATE_TEXT = "#7c2d12"
_LEGEND_TEXT = "#1f2937"
_BACKGROUND = "#ffffff"


@dataclass(frozen=True, kw_only=True)
class _Stroke:
    colour: str
    width: float
    dash: str | None
    legend: str


_EDGE_STROKE = {
    "route": _Stroke(colour="#6d28d9", width=1.4, dash=None, legend="HTTP route"),
    "publish": _Stroke(colour="#1d4ed8", width=1.8, dash=None, legend="publishes"),
    "consume": _Stroke(colour="#b45309", width=1.6, dash="6 4", legend="consumes"),
    "database": _Stroke(colour="#15803d", width=1.6, dash="2 3", legend="uses database"),
}


@dataclass(frozen=True)
class _Node:
    kind: str
    name: str
    label: str
    title: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class _Edge:
    kind: str
    source: str
    """The key of the node it leaves."""
    target: str
    """The key of the node its arrow points at."""
    title: str


@dataclass(frozen=True)
class _Box:
    x: float
    y: float
    width: float
    height: float

    @property
    def cx(self) -> float:
        return self.x + self.width / 2

    @property
    def cy(self) -> float:
        return self.y + self.height / 2


def _text_width(text: str) -> float:
    return len(text) * _CHAR_WIDTH


def _parts(graph: SystemGraph) -> tuple[list[_Node], list[_Edge]]:
    """The boxes and arrows of `graph`, each once, in a fixed order."""
    routes: dict[tuple[str, str], list[str]] = {}
    for gateway, gateway_routes in graph.gateways.items():
        for route, target in gateway_routes:
            node = f"topic:{target[6:]}" if target.startswith("topic:") else f"service:{target}"
            routes.setdefault((gateway, node), []).append(route)
    services = list(dict.fromkeys(graph.services))
    mentioned = (
        {s for s, _ in graph.publishes}
        | {s for _, s in graph.consumes}
        | set(graph.databases)
        | {node[8:] for _, node in routes if node.startswith("service:")}
    )
    services += sorted(mentioned - set(services))
    topics = sorted(
        set(graph.topics) | {node[6:] for _, node in routes if node.startswith("topic:")}
    )
    databases = [(s, graph.databases[s]) for s in services if s in graph.databases]
    nodes = [_Node("gateway", g, g, f"gateway {g}") for g in graph.gateways]
    nodes += [_Node("service", s, s, f"service {s}") for s in services]
    for topic in topics:
        events = ", ".join(sorted(graph.events.get(topic, ())))
        nodes.append(
            _Node("topic", topic, topic, f"topic {topic}" + (f": {events}" if events else ""))
        )
    nodes += [_Node("database", f"{s} ({db})", db, f"{s}'s database: {db}") for s, db in databases]
    edges = [
        _Edge(
            "route", f"gateway:{g}", node, f"{g} gateway → {node.split(':', 1)[1]}: {', '.join(r)}"
        )
        for (g, node), r in routes.items()
    ]
    edges += [
        _Edge("publish", f"service:{s}", f"topic:{t}", f"{s} publishes to {t}")
        for s, t in sorted(graph.publishes)
    ]
    edges += [
        _Edge("consume", f"topic:{t}", f"service:{s}", f"{s} consumes {t}")
        for t, s in sorted(graph.consumes)
    ]
    edges += [
        _Edge("database", f"service:{s}", f"database:{s} ({db})", f"{s} uses {db}")
        for s, db in databases
    ]
    return nodes, edges


def _turned_round(keys: Sequence[str], links: Sequence[tuple[str, str]]) -> set[int]:
    """Indices of the links to turn round so that the others make no cycle: the Eades-Lin-Smyth
    order (sinks to the back, sources to the front, otherwise the node with the most outgoing
    minus incoming links to the front), ties broken by the order of `keys`."""
    remaining = dict.fromkeys(keys)
    others: dict[tuple[str, int], list[str]] = {}
    """(node, 0) -> the far ends of its outgoing links; (node, 1) -> of its incoming ones."""
    for a, b in links:
        others.setdefault((a, 0), []).append(b)
        others.setdefault((b, 1), []).append(a)

    def degree(key: str, end: int) -> int:
        return sum(1 for other in others.get((key, end), ()) if other in remaining)

    front: list[str] = []
    back: list[str] = []
    while remaining:
        moved = True
        while moved:
            moved = False
            for key in list(remaining):
                if degree(key, 0) == 0:
                    back.append(key)
                elif degree(key, 1) == 0:
                    front.append(key)
                else:
                    continue
                del remaining[key]
                moved = True
        if remaining:
            chosen = max(remaining, key=lambda k: degree(k, 0) - degree(k, 1))
            front.append(chosen)
            del remaining[chosen]
    position = {key: i for i, key in enumerate(front + back[::-1])}
    return {i for i, (a, b) in enumerate(links) if position[a] > position[b]}


def _layers(
    keys: Sequence[str], links: Sequence[tuple[str, str]], first: set[str]
) -> dict[str, int]:
    """Longest-path layers of an acyclic graph, `first` (the gateways) alone in layer 0; sources
    that are not gateways move right next to their nearest successor; empty layers go."""
    preds: dict[str, list[str]] = {key: [] for key in keys}
    succs: dict[str, list[str]] = {key: [] for key in keys}
    for a, b in links:
        succs[a].append(b)
        preds[b].append(a)
    waiting = {key: len(preds[key]) for key in keys}
    ready = deque(key for key in keys if not waiting[key])
    ordered: list[str] = []
    while ready:
        key = ready.popleft()
        ordered.append(key)
        for succ in succs[key]:
            waiting[succ] -= 1
            if not waiting[succ]:
                ready.append(succ)
    layer: dict[str, int] = {}
    for key in ordered:
        layer[key] = 0 if key in first else max([1] + [layer[p] + 1 for p in preds[key]])
    for key in reversed(ordered):
        if key not in first and not preds[key] and succs[key]:
            layer[key] = max(layer[key], min(layer[s] for s in succs[key]) - 1)
    renumbered = {n: i for i, n in enumerate(sorted(set(layer.values())))}
    return {key: renumbered[n] for key, n in layer.items()}


def _crossings(position: Mapping[str, int], segments: Iterable[tuple[str, str]]) -> int:
    """How many pairs of these segments between two adjacent layers cross."""
    seen: list[int] = []
    """Where the segments from items above the current one arrive, in order."""
    crossings = 0
    ends = sorted((position[a], position[b]) for a, b in segments)
    for _, leaving in groupby(ends, key=itemgetter(0)):  # those leaving one item never cross
        arrivals = [b for _, b in leaving]
        crossings += sum(len(seen) - bisect.bisect_right(seen, b) for b in arrivals)
        for b in arrivals:
            bisect.insort(seen, b)
    return crossings


def _order(
    layers: list[list[str]], segments: Sequence[tuple[str, str]], layer_of: Mapping[str, int]
) -> list[list[str]]:
    """Layers reordered by barycentre sweeps and adjacent swaps; the fewest crossings found."""
    gaps: list[list[tuple[str, str]]] = [[] for _ in layers]
    left: dict[str, list[str]] = {}
    right: dict[str, list[str]] = {}
    for a, b in segments:
        gaps[layer_of[a]].append((a, b))
        right.setdefault(a, []).append(b)
        left.setdefault(b, []).append(a)
    where: dict[str, int] = {}

    def renumber(layer: list[str]) -> None:
        where.update((item, i) for i, item in enumerate(layer))

    def by_barycentre(layer: list[str], neighbours: dict[str, list[str]]) -> list[str]:
        def barycentre(item: str) -> tuple[float, int]:
            near = neighbours.get(item, [])
            here = where[item]
            return (sum(where[n] for n in near) / len(near) if near else float(here), here)

        return sorted(layer, key=barycentre)

    def cost(upper: str, lower: str) -> int:
        """Crossings between the edges of two neighbours in a layer, `upper` above `lower`."""
        return sum(
            1
            for side in (left, right)
            for a in side.get(upper, ())
            for b in side.get(lower, ())
            if where[a] > where[b]
        )

    current = [list(layer) for layer in layers]
    for layer in current:
        renumber(layer)
    best = [list(layer) for layer in current]
    fewest = sum(_crossings(where, gap) for gap in gaps)
    for _ in range(12):
        for i in range(1, len(current)):
            current[i] = by_barycentre(current[i], left)
            renumber(current[i])
        for i in range(len(current) - 2, -1, -1):
            current[i] = by_barycentre(current[i], right)
            renumber(current[i])
        swapped = True
        while swapped:
            swapped = False
            for layer in current:
                for j in range(len(layer) - 1):
                    upper, lower = layer[j], layer[j + 1]
                    if cost(lower, upper) < cost(upper, lower):
                        layer[j], layer[j + 1] = lower, upper
                        where[upper], where[lower] = j + 1, j
                        swapped = True
        crossings = sum(_crossings(where, gap) for gap in gaps)
        if crossings < fewest:
            best, fewest = [list(layer) for layer in current], crossings
    return best


def _isotonic(targets: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest `targets` in weighted least squares (pool adjacent
    violators)."""
    blocks: list[tuple[float, float, int]] = []
    for target, weight in zip(targets, weights, strict=True):
        block = (target, weight, 1)
        while blocks and blocks[-1][0] > block[0]:
            value, total, count = blocks.pop()
            block = (
                (value * total + block[0] * block[1]) / (total + block[1]),
                total + block[1],
                count + block[2],
            )
        blocks.append(block)
    return [value for value, _, count in blocks for _ in range(count)]


@dataclass(frozen=True)
class _Drawing:
    width: float
    height: float
    boxes: dict[str, _Box]
    """Node key -> its box."""
    paths: list[list[tuple[float, float]]]
    """Per edge, the points its path joins, from its source to its target: alternately a curve
    across a gap between columns and a straight stretch (across a column, or down to a
    database)."""


def _layout(nodes: Sequence[_Node], edges: Sequence[_Edge]) -> _Drawing:
    kind_of = {node.key: node.kind for node in nodes}
    keys = [node.key for node in nodes if node.kind != "database"]
    flow = [j for j, edge in enumerate(edges) if edge.kind != "database"]
    links = [(edges[j].source, edges[j].target) for j in flow]
    turned = _turned_round(keys, links)
    dag = [(b, a) if n in turned else (a, b) for n, (a, b) in enumerate(links)]
    layer_of = _layers(keys, dag, {key for key in keys if kind_of[key] == "gateway"})
    layers: list[list[str]] = [[] for _ in range(max(layer_of.values(), default=-1) + 1)]
    for key in keys:
        layers[layer_of[key]].append(key)
    chains: dict[int, list[str]] = {}
    """Per flow edge, the boxes and waypoints it passes, left to right."""
    for n, (a, b) in enumerate(dag):
        chain = [a]
        for passed in range(layer_of[a] + 1, layer_of[b]):
            waypoint = f"~{n}:{passed}"
            layer_of[waypoint] = passed
            layers[passed].append(waypoint)
            chain.append(waypoint)
        chains[flow[n]] = [*chain, b]
    layers = _order(layers, [s for chain in chains.values() for s in pairwise(chain)], layer_of)

    left: dict[str, list[tuple[str, int]]] = {}
    right: dict[str, list[tuple[str, int]]] = {}
    for j, chain in chains.items():
        for a, b in pairwise(chain):
            right.setdefault(a, []).append((b, j))
            left.setdefault(b, []).append((a, j))
    database_of = {edge.source: edge.target for edge in edges if edge.kind == "database"}
    label_of = {node.key: node.label for node in nodes}

    def box_width(key: str) -> float:
        widest = max(label_of[key], _WIDEST_RATE if kind_of[key] == "topic" else "", key=len)
        return _text_width(widest) + 2 * _PAD_X

    height: dict[str, float] = {}
    extent: dict[str, float] = {}
    """How much of its column an item takes: its box, and its database under it."""
    for key in keys:
        most = max(len(left.get(key, ())), len(right.get(key, ())))
        height[key] = max(_BASE_HEIGHT[kind_of[key]], _PORT_GAP * most + 10)
        extent[key] = height[key]
        if key in database_of:
            extent[key] += _DATABASE_GAP + _BASE_HEIGHT["database"]
    column_width = [
        max(
            [box_width(k) for k in layer if k in kind_of]
            + [box_width(database_of[k]) for k in layer if k in database_of]
            + [0.0]
        )
        for layer in layers
    ]
    column_x = [float(_MARGIN)]
    for width in column_width[:-1]:
        column_x.append(column_x[-1] + width + _COLUMN_GAP)

    def row_gap(a: str, b: str) -> float:
        return _ROW_GAP if a in kind_of and b in kind_of else _WAYPOINT_GAP

    def middle(item: str) -> float:
        """Where an item's edges attach, about: the middle of its box, or its waypoint."""
        return top[item] + height.get(item, 0.0) / 2

    top: dict[str, float] = {}
    for layer in layers:
        y = 0.0
        for k, item in enumerate(layer):
            y += row_gap(layer[k - 1], item) if k else 0.0
            top[item] = y
            y += extent.get(item, 0.0)
    toward_left = {item: [other for other, _ in ports] for item, ports in left.items()}
    toward_right = {item: [other for other, _ in ports] for item, ports in right.items()}

    def place(layer: list[str], *neighbours: dict[str, list[str]]) -> None:
        """Rows as near their neighbours' as the layer's order and spacing allow."""
        offsets: list[float] = []
        for k, item in enumerate(layer):
            previous = layer[k - 1]
            offsets.append(
                offsets[-1] + extent.get(previous, 0.0) + row_gap(previous, item) if k else 0.0
            )
        targets: list[float | None] = []
        for item, offset in zip(layer, offsets, strict=True):
            near = [other for side in neighbours for other in side.get(item, ())] or [
                other for side in (toward_left, toward_right) for other in side.get(item, ())
            ]
            wanted = sum(map(middle, near)) / len(near) if near else None
            targets.append(None if wanted is None else wanted - height.get(item, 0.0) / 2 - offset)
        # A box without edges packs up against the one before it (or, first, the one after).
        packed = [t for t in targets if t is not None][:1] or [0.0]
        for target in targets:
            packed.append(packed[-1] if target is None else target)
        weights = [  # waypoints weigh more, keeping long edges straight
            0.001 if t is None else 1.0 if item in kind_of else 2.0
            for item, t in zip(layer, targets, strict=True)
        ]
        for item, offset, z in zip(layer, offsets, _isotonic(packed[1:], weights), strict=True):
            top[item] = z + offset

    for _ in range(8):
        for layer in layers[1:]:
            place(layer, toward_left)
        for layer in layers[-2::-1]:
            place(layer, toward_right)
    for _ in range(4):
        for layer in layers:
            place(layer, toward_left, toward_right)
    shift = _MARGIN - min(top.values(), default=0.0)

    boxes: dict[str, _Box] = {}
    for n, layer in enumerate(layers):
        for item in layer:
            top[item] += shift
            if item not in kind_of:
                continue
            box = boxes[item] = _Box(column_x[n], top[item], column_width[n], height[item])
            if item in database_of:
                width = box_width(database_of[item])
                y = box.y + box.height + _DATABASE_GAP
                boxes[database_of[item]] = _Box(
                    box.cx - width / 2, y, width, _BASE_HEIGHT["database"]
                )

    port: dict[tuple[str, int], float] = {}
    """(box, edge) -> the height where the edge meets the box."""
    for item, ends in [*left.items(), *right.items()]:
        if item in kind_of:
            ends = sorted(ends, key=lambda end: (middle(end[0]), end[1]))
            for k, (_, j) in enumerate(ends):
                port[item, j] = boxes[item].cy + (k - (len(ends) - 1) / 2) * _PORT_GAP

    paths: list[list[tuple[float, float]]] = []
    for j, edge in enumerate(edges):
        if edge.kind == "database":
            service, database = boxes[edge.source], boxes[edge.target]
            paths.append([(service.cx, service.y + service.height), (database.cx, database.y)])
            continue
        points: list[tuple[float, float]] = []
        chain = chains[j]
        for k, item in enumerate(chain):
            x = column_x[layer_of[item]]
            width = column_width[layer_of[item]]
            if item not in kind_of:
                points += [(x, top[item]), (x + width, top[item])]
            else:
                points.append((x + width, port[item, j]) if k == 0 else (x, port[item, j]))
        paths.append(points if chain[0] == edge.source else points[::-1])
    return _Drawing(
        width=column_x[-1] + column_width[-1] + _MARGIN if layers else 2.0 * _MARGIN,
        height=max([b.y + b.height for b in boxes.values()], default=0.0) + _MARGIN,
        boxes=boxes,
        paths=paths,
    )


def _number(value: float) -> str:
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


def _path_data(points: Sequence[tuple[float, float]]) -> str:
    """`M`, then alternately a hop across a gap (a cubic curve leaving and arriving horizontally,
    its control points halfway across, or a line when it need not bend) and a line."""
    (x, y), *rest = points
    data = [f"M{_number(x)},{_number(y)}"]
    for k, (x2, y2) in enumerate(rest):
        if k % 2 == 0 and x != x2 and y != y2:
            half = _number((x + x2) / 2)
            data.append(f"C{half},{_number(y)} {half},{_number(y2)} {_number(x2)},{_number(y2)}")
        else:
            data.append(f"L{_number(x2)},{_number(y2)}")
        x, y = x2, y2
    return " ".join(data)


def render_svg(
    graph: SystemGraph, rates: Mapping[str, float] | None = None, *, id_prefix: str | None = None
) -> str:
    """The system as a self-contained SVG, laid out in layers from left to right: gateways, then
    services and topics as their edges lead, every box once, no edge through a box.

    It is meant to be inlined in an HTML page as well as saved as a file, so it is styled with
    attributes only (a `<style>` element would leak into the page) and its ids (the arrowhead
    markers, `<prefix>-arrow-<edge kind>`) start with `id_prefix`, by default one derived from
    the drawing's content. Tests and pages can find its parts by their classes:

        <g class="node service" data-name="orders">
          <title>…</title><rect …/><text …>orders</text></g>
        <g class="edge publish" data-from="orders" data-to="shop.orders.events">
          <title>…</title><path d="M… C… L…" marker-end="url(#…-arrow-publish)" …/></g>

    Node kinds are `gateway`, `service`, `topic` and `database`; edge kinds `route` (gateway to
    service or topic), `publish` (service to topic), `consume` (topic to service) and
    `database` (service to its database, whose `data-name` is e.g. "orders (PostgreSQL)").
    `rates` (topic -> messages per second) adds a `<text class="rate">3.2 msg/s</text>` to each
    topic it names; the layout does not depend on it.
    """
    nodes, edges = _parts(graph)
    drawing = _layout(nodes, edges)
    by_key = {node.key: node for node in nodes}
    out = ["<defs>"]
    out += [
        f'<marker id="{_PREFIX}-arrow-{kind}" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="8" markerHeight="8" markerUnits="userSpaceOnUse" orient="auto">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{stroke.colour}"/></marker>'
        for kind, stroke in _EDGE_STROKE.items()
    ]
    out.append("</defs>")
    out.append(f'<rect class="background" width="100%" height="100%" fill="{_BACKGROUND}"/>')
    out.append('<g class="edges">')
    for edge, points in zip(edges, drawing.paths, strict=True):
        out.append(
            f'<g class="edge {edge.kind}" data-from="{html.escape(by_key[edge.source].name)}" '
            f'data-to="{html.escape(by_key[edge.target].name)}">'
            f"<title>{html.escape(edge.title)}</title>"
            f'<path d="{_path_data(points)}" {_stroke(edge.kind)}/></g>'
        )
    out.append("</g>")
    out.append('<g class="nodes">')
    for node in nodes:
        rate = (rates or {}).get(node.name) if node.kind == "topic" else None
        out.append(_node_svg(node, drawing.boxes[node.key], rate))
    out.append("</g>")
    legend, width, height = _legend(drawing.height)
    out += legend
    width = max(width, drawing.width)
    counts = {kind: sum(1 for node in nodes if node.kind == kind) for kind in _NODE_PAINT}
    summary = ", ".join(f"{n} {kind}s" if n != 1 else f"1 {kind}" for kind, n in counts.items())
    content = "\n".join(out)
    prefix = id_prefix or "msa-graph-" + hashlib.sha256(content.encode()).hexdigest()[:10]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="msa-graph" '
        f'viewBox="0 0 {_number(width)} {_number(height)}" width="{_number(width)}" '
        f'height="{_number(height)}" role="img" aria-label="System graph: {summary}" '
        f'font-family="{_SVG_FONT}" font-size="{_FONT_SIZE}">\n'
        f"{content.replace(_PREFIX, html.escape(prefix))}\n</svg>\n"
    )


_PREFIX = "<prefix>"
"""Stands for the ids' prefix until the content, which it cannot occur in escaped, is hashed."""


def _stroke(kind: str) -> str:
    stroke = _EDGE_STROKE[kind]
    dash = f' stroke-dasharray="{stroke.dash}"' if stroke.dash else ""
    return (
        f'fill="none" stroke="{stroke.colour}" stroke-width="{stroke.width}"{dash} '
        f'marker-end="url(#{_PREFIX}-arrow-{kind})"'
    )


def _node_svg(node: _Node, box: _Box, rate: float | None) -> str:
    paint = _NODE_PAINT[node.kind]
    round_ends = node.kind == "database"
    label_y = box.cy - 8 if rate is not None else box.cy
    rate_text = (
        f'<text class="rate" x="{_number(box.cx)}" y="{_number(box.cy + 9)}" '
        f'text-anchor="middle" dominant-baseline="central" font-size="12" '
        f'fill="{_RATE_TEXT}">{rate:.1f} msg/s</text>'
        if rate is not None
        else ""
    )
    return (
        f'<g class="node {node.kind}" data-name="{html.escape(node.name)}">'
        f"<title>{html.escape(node.title)}</title>"
        f'<rect x="{_number(box.x)}" y="{_number(box.y)}" width="{_number(box.width)}" '
        f'height="{_number(box.height)}" rx="{_number(box.height / 2 if round_ends else 6)}" '
        f'fill="{paint.fill}" stroke="{paint.stroke}" stroke-width="1.4"/>'
        f'<text class="label" x="{_number(box.cx)}" y="{_number(label_y)}" '
        f'text-anchor="middle" dominant-baseline="central" fill="{paint.text}">'
        f"{html.escape(node.label)}</text>{rate_text}</g>"
    )


def _legend(top: float) -> tuple[list[str], float, float]:
    """The legend under the drawing (a row of box kinds, a row of edge kinds), how wide it
    needs the picture to be and where the picture ends."""
    out = ['<g class="legend">']
    x, y = float(_MARGIN), top + 11
    for paint in _NODE_PAINT.values():
        out.append(
            f'<rect x="{_number(x)}" y="{_number(y - 7)}" width="22" height="14" rx="3" '
            f'fill="{paint.fill}" stroke="{paint.stroke}" stroke-width="1.4"/>'
            f'<text x="{_number(x + 28)}" y="{_number(y)}" dominant-baseline="central" '
            f'fill="{_LEGEND_TEXT}">{paint.legend}</text>'
        )
        x += 28 + _text_width(paint.legend) + 18
    width = x
    x, y = float(_MARGIN), y + 24
    for kind, stroke in _EDGE_STROKE.items():
        out.append(
            f'<path d="M{_number(x)},{_number(y)} L{_number(x + 34)},{_number(y)}" '
            f'{_stroke(kind)}/><text x="{_number(x + 40)}" y="{_number(y)}" '
            f'dominant-baseline="central" fill="{_LEGEND_TEXT}">{stroke.legend}</text>'
        )
        x += 40 + _text_width(stroke.legend) + 18
    out.append("</g>")
    return out, max(width, x), y + 11 + _MARGIN
