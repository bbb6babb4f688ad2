"""`msa graph`: the system drawn from the services' own declarations.

The SVG checks read the drawing's geometry back: boxes from the `<rect>` of each
`<g class="node …">`, edges from the `<path>` of each `<g class="edge …">`, whose stretches are
lines or cubic curves; a curve stays inside its control polygon, so "its control points' bounding
box misses every other box" proves it crosses none.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from example_shop.registry import backend_services, system_graph
from example_shop.shop import service_classes
from framework.cli import main
from framework.graph import SystemGraph, render_mermaid, render_svg

SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[2]
WIDE_FONT_ADVANCE = 7.9
"""DejaVu Sans's average advance at 13px: wider than most fonts system-ui resolves to."""

Point = tuple[float, float]


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float

    @classmethod
    def of(cls, element: ElementTree.Element) -> Rect:
        x, y, w, h = (float(element.attrib[a]) for a in ("x", "y", "width", "height"))
        return cls(x, y, w, h)

    def overlaps(self, other: Rect, slack: float = 0.1) -> bool:
        """Whether the interiors meet (sharing an edge is not overlapping)."""
        return (
            self.x < other.x + other.width - slack
            and other.x < self.x + self.width - slack
            and self.y < other.y + other.height - slack
            and other.y < self.y + self.height - slack
        )

    def on_border(self, point: Point, slack: float = 0.11) -> bool:
        x, y = point
        within_x = self.x - slack <= x <= self.x + self.width + slack
        within_y = self.y - slack <= y <= self.y + self.height + slack
        on_side = min(abs(x - self.x), abs(x - self.x - self.width)) <= slack
        on_end = min(abs(y - self.y), abs(y - self.y - self.height)) <= slack
        return (on_side and within_y) or (on_end and within_x)


def bounding_rect(points: list[Point]) -> Rect:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return Rect(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def stretches(d: str) -> list[list[Point]]:
    """The path's stretches as control polygons: [start, end] for `L`, four points for `C`."""
    tokens = re.findall(r"[MLC]|-?\d+(?:\.\d+)?", d)
    assert tokens[:1] == ["M"], d
    numbers: list[float] = []
    commands: list[tuple[str, list[float]]] = []
    for token in tokens:
        if token in "MLC":
            numbers = []
            commands.append((token, numbers))
        else:
            numbers.append(float(token))
    (_, start), *rest = commands
    assert len(start) == 2, d
    here: Point = (start[0], start[1])
    out: list[list[Point]] = []
    for command, values in rest:
        assert len(values) == {"L": 2, "C": 6}[command], d
        points = [here] + [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
        out.append(points)
        here = points[-1]
    return out


@dataclass(frozen=True)
class DrawnNode:
    rect: Rect
    fill: str
    texts: list[ElementTree.Element]


@dataclass(frozen=True)
class DrawnEdge:
    kind: str
    source: str
    target: str
    d: str
    marker_end: str

    @property
    def start(self) -> Point:
        return stretches(self.d)[0][0]

    @property
    def end(self) -> Point:
        return stretches(self.d)[-1][-1]


@dataclass(frozen=True)
class Drawn:
    root: ElementTree.Element
    nodes: dict[tuple[str, str], DrawnNode]
    """(kind, data-name) -> the node."""
    edges: list[DrawnEdge]

    def rect(self, kind: str, name: str) -> Rect:
        return self.nodes[kind, name].rect


def drawn(svg: str) -> Drawn:
    root = ElementTree.fromstring(svg)
    nodes: dict[tuple[str, str], DrawnNode] = {}
    edges = []
    for group in root.iter(f"{SVG}g"):
        classes = group.get("class", "").split()
        if classes[:1] == ["node"]:
            key = (classes[1], group.attrib["data-name"])
            assert key not in nodes, f"{key} drawn twice"
            [rect] = group.findall(f"{SVG}rect")
            texts = group.findall(f"{SVG}text")
            nodes[key] = DrawnNode(Rect.of(rect), rect.attrib["fill"], texts)
        elif classes[:1] == ["edge"]:
            [path] = group.findall(f"{SVG}path")
            edges.append(
                DrawnEdge(
                    classes[1],
                    group.attrib["data-from"],
                    group.attrib["data-to"],
                    path.attrib["d"],
                    path.attrib["marker-end"],
                )
            )
    return Drawn(root, nodes, edges)


def expected_edges(graph: SystemGraph) -> Counter[tuple[str, str, str]]:
    routes = {
        (gateway, target.removeprefix("topic:"))
        for gateway, edges in graph.gateways.items()
        for _, target in edges
    }
    return Counter(
        [("route", g, t) for g, t in routes]
        + [("publish", s, t) for s, t in graph.publishes]
        + [("consume", t, s) for t, s in graph.consumes]
        + [("database", s, f"{s} ({db})") for s, db in graph.databases.items()]
    )


def endpoint_kinds(kind: str) -> tuple[str, str]:
    return {
        "route": ("gateway", "service"),
        "publish": ("service", "topic"),
        "consume": ("topic", "service"),
        "database": ("service", "database"),
    }[kind]


def luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def check_drawing(svg: str, graph: SystemGraph) -> Drawn:
    """Everything a person needs from the picture, checked on its geometry."""
    picture = drawn(svg)
    root = picture.root

    # It scales in a page, in the page's own font, on its own white ground.
    width, height = float(root.attrib["width"]), float(root.attrib["height"])
    assert root.attrib["viewBox"] == f"0 0 {root.attrib['width']} {root.attrib['height']}"
    assert root.attrib["font-family"].startswith("system-ui")
    assert root.find(f"{SVG}style") is None  # inlined in HTML, a <style> would restyle the page
    background = root.find(f"{SVG}rect[@class='background']")
    assert background is not None
    assert background.attrib["fill"] == "#ffffff"

    # Every edge of the graph exactly once, arrow at its end, from box border to box border.
    assert Counter((e.kind, e.source, e.target) for e in picture.edges) == expected_edges(graph)
    ids = [e.attrib["id"] for e in root.iter() if "id" in e.attrib]
    assert len(ids) == len(set(ids))
    markers = {m.attrib["id"] for m in root.iter(f"{SVG}marker")}
    assert len({i.partition("-arrow-")[0] for i in ids}) == 1  # one prefix, one per picture
    for edge in picture.edges:
        marker = re.fullmatch(r"url\(#(.+)\)", edge.marker_end)
        assert marker is not None
        assert marker.group(1) in markers
        assert marker.group(1).endswith(f"-arrow-{edge.kind}")
        source_kind, target_kind = endpoint_kinds(edge.kind)
        if edge.kind == "route" and ("topic", edge.target) in picture.nodes:
            target_kind = "topic"
        own = {(source_kind, edge.source), (target_kind, edge.target)}
        assert picture.rect(source_kind, edge.source).on_border(edge.start)
        assert picture.rect(target_kind, edge.target).on_border(edge.end)
        for polygon in stretches(edge.d):
            hull = bounding_rect(polygon)
            for key in picture.nodes:
                if key not in own:
                    assert not picture.rect(*key).overlaps(hull, slack=0.15), (
                        f"{edge.kind} {edge.source} -> {edge.target} crosses {key}"
                    )

    # Boxes never overlap, lie inside the picture and hold their labels (in a wide font too),
    # in colours of WCAG AA contrast; the legend lies below them all.
    rects = {key: picture.rect(*key) for key in picture.nodes}
    keys = sorted(rects)
    for i, a in enumerate(keys):
        box = rects[a]
        assert box.x >= 0
        assert box.y >= 0
        assert box.x + box.width <= width
        assert box.y + box.height <= height
        for b in keys[i + 1 :]:
            assert not box.overlaps(rects[b], slack=0), f"{a} overlaps {b}"
        for text in picture.nodes[a].texts:
            assert text.text
            assert len(text.text) * WIDE_FONT_ADVANCE <= box.width
            assert box.x < float(text.attrib["x"]) < box.x + box.width
            assert box.y + 6 < float(text.attrib["y"]) < box.y + box.height - 6
            assert contrast(text.attrib["fill"], picture.nodes[a].fill) >= 4.5
    legend = root.find(f"{SVG}g[@class='legend']")
    assert legend is not None
    lowest = max((r.y + r.height for r in rects.values()), default=0.0)
    for text in legend.iter(f"{SVG}text"):
        assert float(text.attrib["y"]) > lowest
        assert contrast(text.attrib["fill"], "#ffffff") >= 4.5
    for rect in legend.iter(f"{SVG}rect"):
        assert float(rect.attrib["y"]) > lowest
    return picture


def shop_graph() -> SystemGraph:
    """The admin page's: the services behind the storefront."""
    return system_graph(backend_services().values())


def small_graph() -> SystemGraph:
    """A cycle (a -> t1 -> b -> t2 -> a), a service reading its own topic, a gateway routing to
    a topic and to an upstream that is no service here, a lone service, awkward names."""
    return SystemGraph(
        services=["a", "b", "echo", "lone"],
        publishes={("a", "t1"), ("b", "t2"), ("echo", "loop"), ("a", "x&<y>")},
        consumes={("t1", "b"), ("t2", "a"), ("loop", "echo"), ("x&<y>", "echo")},
        events={"t1": {"Asked"}, "t2": {"Answered"}},
        databases={"a": "PostgreSQL", "echo": "Kafka Streams (faust)"},
        gateways={"edge": [("ask", "a"), ("again", "a"), ("feed", "topic:t2"), ("old", "legacy")]},
    )


def random_graph(seed: int) -> SystemGraph:
    rng = random.Random(seed)
    services = [f"service-{i}" for i in range(rng.randint(1, 9))]
    topics = [f"topic.{i}" for i in range(rng.randint(1, 10))]
    return SystemGraph(
        services=services,
        publishes={(rng.choice(services), rng.choice(topics)) for _ in range(rng.randint(0, 14))},
        consumes={(rng.choice(topics), rng.choice(services)) for _ in range(rng.randint(0, 14))},
        databases={
            s: rng.choice(["PostgreSQL", "MongoDB"]) for s in services if rng.random() < 0.5
        },
        gateways={
            f"gw-{g}": [
                (f"r{r}", rng.choice([*services, *(f"topic:{t}" for t in topics)]))
                for r in range(rng.randint(0, 6))
            ]
            for g in range(rng.randint(0, 3))
        },
    )


def test_the_shop_graph_has_its_services_topics_databases_and_routes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["graph"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart LR")
    for expected in (
        "s_orders --> t_shop_payments_commands",  # the saga's command
        "t_shop_payments_commands -.-> s_payments",  # consumed by payments
        "s_payments --> t_shop_payments_events",
        "t_shop_payments_events -.-> s_orders",  # the reply comes back
        's_inventory --- db_inventory[("PostgreSQL")]',
        's_catalog --- db_catalog[("MongoDB")]',
        'g_web -->|"order-status"| t_shop_orders_events',  # the SSE route reads the topic
    ):
        assert expected in mermaid, expected


def test_the_graph_renders_as_svg(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--format", "svg"]) == 0
    picture = check_drawing(capsys.readouterr().out, system_graph(service_classes().values()))
    assert ("database", "orders (PostgreSQL)") in picture.nodes
    assert ("topic", "shop.orders.events") in picture.nodes
    assert ("service", "storefront") in picture.nodes


@pytest.mark.parametrize("graph", [shop_graph(), small_graph()], ids=["shop", "small"])
def test_every_edge_is_drawn_once_with_an_arrow_and_through_no_box(graph: SystemGraph) -> None:
    picture = check_drawing(render_svg(graph), graph)
    for service in graph.services:
        assert ("service", service) in picture.nodes
    for topic in graph.topics:
        assert ("topic", topic) in picture.nodes
    for gateway in graph.gateways:
        assert ("gateway", gateway) in picture.nodes


@pytest.mark.parametrize("seed", range(30))
def test_any_graph_is_drawn_as_cleanly(seed: int) -> None:
    graph = random_graph(seed)
    check_drawing(render_svg(graph), graph)


def test_a_graph_with_nothing_in_it_is_an_empty_picture_with_its_legend() -> None:
    picture = check_drawing(render_svg(SystemGraph()), SystemGraph())
    assert not picture.nodes
    assert not picture.edges


def test_the_shop_reads_left_to_right_from_its_gateways() -> None:
    graph = shop_graph()
    picture = drawn(render_svg(graph))
    gateways = [picture.rect("gateway", g) for g in graph.gateways]
    others = [
        r for (kind, _), r in ((k, picture.rect(*k)) for k in picture.nodes) if kind != "gateway"
    ]
    assert max(g.x + g.width for g in gateways) < min(r.x for r in others)
    # Each command topic lies right of the saga that sends it and left of the service it reaches.
    for command, worker in [
        ("shop.payments.commands", "payments"),
        ("shop.shipping.commands", "shipping"),
    ]:
        topic = picture.rect("topic", command)
        assert picture.rect("service", "orders").x < topic.x < picture.rect("service", worker).x
    # Few edges are drawn against the flow: only replies into a cycle.
    backward = [e for e in picture.edges if e.end[0] < e.start[0]]
    assert all(e.kind == "consume" for e in backward)
    assert len(backward) * 6 < len(picture.edges)


def test_rates_label_the_topics_they_name_and_move_nothing() -> None:
    graph = shop_graph()
    rates = {"shop.orders.events": 3.21, "shop.payments.commands": 0.04, "unknown.topic": 9.0}
    plain, live = render_svg(graph), render_svg(graph, rates)
    assert "msg/s" not in plain
    picture = check_drawing(live, graph)
    labels = {
        name: [t.text for t in node.texts if t.get("class") == "rate"]
        for (kind, name), node in picture.nodes.items()
        if kind == "topic"
    }
    assert labels.pop("shop.orders.events") == ["3.2 msg/s"]
    assert labels.pop("shop.payments.commands") == ["0.0 msg/s"]
    assert all(not texts for texts in labels.values())
    assert "9.0 msg/s" not in live
    before, after = drawn(plain), picture
    assert {k: before.rect(*k) for k in before.nodes} == {k: after.rect(*k) for k in after.nodes}


def test_the_drawing_is_deterministic_whatever_the_hash_seed() -> None:
    """Sets iterate in another order under another hash seed; the drawing must not change."""
    graph, rates = shop_graph(), {"shop.orders.events": 1.5}
    script = (
        "from framework.graph import SystemGraph, render_svg\n"
        f"print(render_svg({graph!r}, {rates!r}), end='')"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2", "3")
    ]
    outputs = {process.communicate(timeout=60)[0] for process in processes}
    assert all(process.returncode == 0 for process in processes)
    assert outputs == {render_svg(graph, rates)}


def test_two_pictures_inlined_in_one_page_share_no_id() -> None:
    def ids(svg: str) -> set[str]:
        return {e.attrib["id"] for e in ElementTree.fromstring(svg).iter() if "id" in e.attrib}

    shop, small = ids(render_svg(shop_graph())), ids(render_svg(small_graph()))
    assert shop
    assert not shop & small
    named = render_svg(small_graph(), id_prefix="page-graph")
    assert all(i.startswith("page-graph-arrow-") for i in ids(named))
    check_drawing(named, small_graph())


def test_mermaid_and_svg_draw_the_same_parts() -> None:
    graph = small_graph()
    mermaid = render_mermaid(graph)
    picture = drawn(render_svg(graph))
    arrows = [line for line in mermaid.splitlines() if re.search(r" (-->|-\.->|---)", line)]
    assert len(arrows) == len(picture.edges)
