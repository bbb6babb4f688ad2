"""The storefront: the shop's web page, served as static files behind the web gateway."""

from example_shop.storefront.service import Storefront

__all__ = ["Storefront"]
