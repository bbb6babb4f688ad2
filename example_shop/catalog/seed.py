"""The demo products the catalog starts with when its collection is empty.

Their ids (`p-001` ... `p-024`) are stable: other services' demo data (stock, orders) refer to them.
Each one's image is a picture the storefront serves, `/static/products/<product_id>.svg`
(`image_path`); catalogs seeded by earlier versions held an emoji instead, which the catalog
replaces when it starts (`Catalog.upgrade_demo_images`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["CATEGORIES", "DEMO_PRODUCTS", "demo_documents", "image_path"]

# category -> (name, price in cents, description)
_DEMO: dict[str, tuple[tuple[str, int, str], ...]] = {
    "mugs": (
        ("Classic White Mug", 1290, "A 330 ml stoneware mug for every day."),
        ("Enamel Camp Mug", 1490, "Light enamel mug with a rolled rim."),
        ("Double-Wall Glass Mug", 1890, "Keeps tea hot and hands cool; 250 ml."),
        ("Speckled Ceramic Mug", 2190, "Hand-glazed, each one a little different."),
        ("Travel Tumbler", 2790, "Vacuum-insulated 450 ml, leak-proof lid."),
        ("Espresso Cup Set", 2490, "Four 80 ml porcelain cups with saucers."),
    ),
    "tea": (
        ("Earl Grey Supreme", 890, "Black tea with bergamot and cornflower, 100 g."),
        ("Sencha Green Tea", 1090, "Steamed Japanese green tea, grassy, 100 g."),
        ("Masala Chai Blend", 950, "Assam with cardamom, ginger and clove, 120 g."),
        ("Chamomile Blossoms", 790, "Whole flowers for a calm evening, 50 g."),
        ("Jasmine Pearls", 1690, "Green tea rolled with jasmine blossoms, 50 g."),
        ("Rooibos Vanilla", 850, "Caffeine-free rooibos with vanilla, 100 g."),
    ),
    "coffee": (
        ("House Espresso Beans", 1490, "Chocolatey medium-dark roast, 500 g."),
        ("Ethiopia Yirgacheffe", 1390, "Floral single origin, lemon and tea, 250 g."),
        ("Colombia Huila", 1190, "Caramel sweetness and red apple, 250 g."),
        ("Decaf Swiss Water", 1290, "Decaffeinated without chemicals, 250 g."),
        ("Cold Brew Coarse Grind", 1590, "A coarse blend made for cold brew, 500 g."),
        ("Instant Coffee Sticks", 690, "Twenty single-serve sticks."),
    ),
    "accessories": (
        ("Pour-Over Dripper", 2290, "Ceramic cone dripper for size 02 filters."),
        ("Paper Filters (100)", 490, "Unbleached paper filters, size 02."),
        ("Burr Hand Grinder", 4990, "Adjustable conical burrs, steel body."),
        ("Gooseneck Kettle", 3990, "1 l stovetop kettle with a precise spout."),
        ("Tea Infuser Ball", 590, "Stainless mesh infuser for loose-leaf tea."),
        ("Digital Coffee Scale", 2990, "Scale with a timer, 0.1 g precision."),
    ),
}
CATEGORIES = tuple(_DEMO)


def image_path(product_id: str) -> str:
    """Where the storefront serves a demo product's picture."""
    return f"/static/products/{product_id}.svg"


DEMO_PRODUCTS: tuple[dict[str, Any], ...] = tuple(
    {
        "product_id": f"p-{n:03d}",
        "name": name,
        "description": description,
        "category": category,
        "price_cents": price,
        "image": image_path(f"p-{n:03d}"),
    }
    for n, (category, (name, price, description)) in enumerate(
        ((c, p) for c, products in _DEMO.items() for p in products), start=1
    )
)


def demo_documents(now: datetime) -> list[dict[str, Any]]:
    """The demo products as documents (keyed by their product id), created at `now`."""
    return [{"_id": p["product_id"], **p, "created_at": now} for p in DEMO_PRODUCTS]
