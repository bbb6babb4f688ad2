"""The orders service: carts, orders and the saga that places them."""

from example_shop.orders.saga import OrderStatusChanged, PlaceOrderSaga
from example_shop.orders.service import Orders

__all__ = ["OrderStatusChanged", "Orders", "PlaceOrderSaga"]
