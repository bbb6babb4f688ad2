"""The inventory service: stock levels and the reservations the order saga makes."""

from example_shop.inventory.service import Inventory, RestockProduct

__all__ = ["Inventory", "RestockProduct"]
