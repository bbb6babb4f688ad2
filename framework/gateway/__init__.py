"""The API gateway: an aiohttp application driven by a declarative, hot-reloaded YAML config.

Filled in by the modules of this package; see `framework.gateway.app`.
"""
