"""The identity service: accounts, sign-in, JWTs and the JWKS that verifies them."""

from example_shop.identity.service import Identity

__all__ = ["Identity"]
