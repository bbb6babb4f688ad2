"""What every shop service shares: where its database is, who is calling, its HTTP port.

Configuration comes from the environment (one place per service, through `ServiceSettings.env`):

    POSTGRES_URL        a PostgreSQL server; each PostgreSQL service uses its own database on it,
                        `shop_<service>`, unless <SERVICE>_DATABASE_URL names one outright
                        (production: a server per service). The service creates its database
                        at start when it is missing (`PostgresResource`) if its role has CREATEDB
    MONGO_URL           a MongoDB server; each MongoDB service uses database `shop_<service>`,
                        unless <SERVICE>_MONGO_URL / <SERVICE>_MONGO_DB say otherwise
    MSA_TRANSPORT       memory | kafka (KAFKA_BOOTSTRAP); see framework.service.ServiceSettings

Callers: services sit behind the gateway, which verifies the JWT and forwards the verified
claims as `x-user-id` / `x-user-roles` (and strips client copies); NetworkPolicies let only the
gateway reach the services. `caller(request)` reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from framework.service import ServiceSettings

__all__ = [
    "PORTS",
    "Caller",
    "caller",
    "default_settings",
    "mongo_target",
    "postgres_url",
    "require_admin",
]

PORTS = {
    "identity": 8101,
    "catalog": 8102,
    "inventory": 8103,
    "orders": 8104,
    "payments": 8105,
    "shipping": 8106,
    "analytics": 8107,
    "storefront": 8108,
}


def default_settings(service: str, settings: ServiceSettings | None = None) -> ServiceSettings:
    """`settings` (the environment's when not given) with the service's own port (`PORTS`)
    unless MSA_HTTP_PORT or the settings chose another: what every shop service starts from.

    `msa run` gives the class `ServiceSettings.from_env()`, whose port is the framework's 8080
    when MSA_HTTP_PORT is unset; that, too, becomes the service's own port, so the README's
    separate-process commands start eight services on eight ports (they all tried 8080).
    """
    if settings is None:
        settings = ServiceSettings.from_env()
    framework_default = ServiceSettings.__dataclass_fields__["http_port"].default
    if "MSA_HTTP_PORT" not in settings.env and settings.http_port == framework_default:
        settings = dataclasses.replace(settings, http_port=PORTS[service])
    return settings


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def postgres_url(env: Mapping[str, str], service: str) -> str:
    """The service's own database: `<SERVICE>_DATABASE_URL`, else `shop_<service>` on
    POSTGRES_URL's server."""
    own = env.get(f"{service.upper()}_DATABASE_URL")
    if own:
        return own
    server = env.get("POSTGRES_URL", "")
    if not server:
        raise web.HTTPInternalServerError(text="POSTGRES_URL is not set")  # pragma: no cover
    return _with_database(server, f"shop_{service}")


def mongo_target(env: Mapping[str, str], service: str) -> tuple[str, str]:
    """(url, database) of the service's MongoDB."""
    url = env.get(f"{service.upper()}_MONGO_URL") or env.get("MONGO_URL", "")
    database = env.get(f"{service.upper()}_MONGO_DB") or f"shop_{service}"
    return url, database


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def caller(request: web.Request) -> Caller:
    """The signed-in user the gateway vouched for; 401 when there is none."""
    user_id = request.headers.get("x-user-id", "")
    if not user_id:
        raise web.HTTPUnauthorized(text="sign in first")
    roles = frozenset(request.headers.get("x-user-roles", "").split())
    return Caller(user_id, roles)


def require_admin(request: web.Request) -> Caller:
    who = caller(request)
    if not who.is_admin:
        raise web.HTTPForbidden(text="admins only")
    return who
