"""The catalog service: products, categories and prices, on MongoDB."""

from example_shop.catalog.service import Catalog

__all__ = ["Catalog"]
