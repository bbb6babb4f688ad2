"""Where the shop's parts are: its backend services, its gateway profiles, and the system graph
drawn from their declarations.

Both the composition root (`example_shop.shop`, which adds the storefront and starts everything)
and the storefront's admin view (which draws the services behind it) read this module, so
neither imports the other. It imports no storefront code: the storefront depends on it, not the
other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from framework.graph import SystemGraph
from framework.service import Service, ServiceSettings

__all__ = ["GATEWAY_CONFIGS", "GATEWAY_PROFILES", "backend_services", "system_graph"]

GATEWAY_CONFIGS = Path(__file__).with_name("gateway")
GATEWAY_PROFILES = ("web", "mobile", "internal")
"""The gateway's backends for frontends: `GATEWAY_CONFIGS / f"{profile}.yaml"`."""


def backend_services() -> dict[str, type[Service]]:
    """Name -> class of every shop service behind the storefront (imported here, on demand, so
    importing this module or one service never imports them all)."""
    from example_shop.analytics import Analytics
    from example_shop.catalog import Catalog
    from example_shop.identity import Identity
    from example_shop.inventory import Inventory
    from example_shop.orders import Orders
    from example_shop.payments import Payments
    from example_shop.shipping import Shipping

    return {
        "identity": Identity,
        "catalog": Catalog,
        "inventory": Inventory,
        "orders": Orders,
        "payments": Payments,
        "shipping": Shipping,
        "analytics": Analytics,
    }


def system_graph(classes: Iterable[type[Service]]) -> SystemGraph:
    """The services (instantiated, never started: their declarations suffice) and the three
    gateway profiles, as `msa graph` and the admin view draw them."""
    from framework.gateway.config import load_config
    from framework.graph import describe

    settings = ServiceSettings(
        http_port=-1,
        env={"POSTGRES_URL": "postgresql://graph/graph", "MONGO_URL": "mongodb://graph:27017"},
    )
    services = [cls(settings) for cls in classes]
    gateways = {  # drawn, never served: the profiles' development secrets may stand
        name: load_config(GATEWAY_CONFIGS / f"{name}.yaml", env={}, allow_development_secrets=True)
        for name in GATEWAY_PROFILES
    }
    return describe(services, gateways)
