"""`msa graph`: the system drawn from the code's own declarations.

Nothing is hand-drawn: services are instantiated (not started) and asked what they consume
(`@handles` plus subscriptions made in their constructors, e.g. a saga's reply topics), what they
publish (`publishes`), and which databases they use (their resources); gateway configs add the
routes and the upstreams they reach. The result is Mermaid text (GitHub and most wikis render it)
or a self-contained SVG:

    msa graph example_shop.orders:Orders example_shop.inventory:Inventory --gateway web.yaml
    msa graph --format svg > system.svg

`rates` (topic -> messages per second) adds live traffic (to the publishing edges in Mermaid,
to the topics' boxes in SVG), as the shop's admin view does with the services' `/metrics`. The
SVG is laid out in layers from left to right, each box once and no edge through a box, and is
made to be inlined in a web page (see `render_svg`).
"""

from __future__ import annotations

from framework.graph.mermaid import render_mermaid
from framework.graph.model import SystemGraph, describe
from framework.graph.svg import render_svg

__all__ = ["SystemGraph", "describe", "render_mermaid", "render_svg"]
