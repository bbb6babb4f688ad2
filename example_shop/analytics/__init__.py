"""The analytics service: windowed sales per product, trending products and totals."""

from example_shop.analytics.service import Analytics, StreamingAnalytics

__all__ = ["Analytics", "StreamingAnalytics"]
