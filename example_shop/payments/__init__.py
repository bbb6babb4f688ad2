"""The payments service: a simulated card processor answering the order saga's commands."""

from example_shop.payments.service import Payments

__all__ = ["Payments"]
