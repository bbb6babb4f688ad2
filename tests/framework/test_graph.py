"""`msa graph`: the system drawn from the services' own declarations."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import pytest

from framework.cli import main


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
    svg = ElementTree.fromstring(capsys.readouterr().out)
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "orders (PostgreSQL)" in texts
    assert "shop.orders.events" in texts
