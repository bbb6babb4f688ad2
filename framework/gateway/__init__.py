"""The API gateway: an aiohttp application driven by a declarative, hot-reloaded YAML config.

    from framework.gateway import Gateway
    gateway = Gateway.from_file("gateway.yaml")
    await gateway.start()

Needs the `gateway` extra (`pip install "msa-framework[gateway]"`). The names below resolve
from here on first use: what runs a gateway (`framework.gateway.app`), its config
(`framework.gateway.config`), what a middleware is written against (`framework.gateway.types`)
and signed file URLs (`framework.gateway.signing`). The upstream pools are the framework's own
(`framework.resilience.upstreams`), shared with `framework.client.ResilientClient`.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.gateway.app import Gateway
    from framework.gateway.config import (
        GatewayConfig,
        GatewayConfigError,
        RouteConfig,
        UpstreamConfig,
        load_config,
        parse_config,
    )
    from framework.gateway.signing import SignatureError, sign_url, verify_signed_path
    from framework.gateway.types import (
        ClientIdentity,
        Exchange,
        GatewayError,
        GatewayHandler,
        GatewayMiddleware,
    )

_MODULES = {
    "framework.gateway.app": ("Gateway",),
    "framework.gateway.config": (
        "GatewayConfig",
        "GatewayConfigError",
        "RouteConfig",
        "UpstreamConfig",
        "load_config",
        "parse_config",
    ),
    "framework.gateway.signing": ("SignatureError", "sign_url", "verify_signed_path"),
    "framework.gateway.types": (
        "ClientIdentity",
        "Exchange",
        "GatewayError",
        "GatewayHandler",
        "GatewayMiddleware",
    ),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "ClientIdentity",
    "Exchange",
    "Gateway",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayError",
    "GatewayHandler",
    "GatewayMiddleware",
    "RouteConfig",
    "SignatureError",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "sign_url",
    "verify_signed_path",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'framework.gateway' has no attribute {name!r}")
    try:
        imported = import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"framework.gateway.{name} needs the gateway extra: "
            'pip install "msa-framework[gateway]"'
        ) from exc
    return getattr(imported, name)
