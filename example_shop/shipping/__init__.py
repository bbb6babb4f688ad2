"""The shipping service: shipments, their tracking and cancellation, on MongoDB."""

from example_shop.shipping.service import Shipping

__all__ = ["Shipping"]
