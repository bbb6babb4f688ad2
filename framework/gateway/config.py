"""The gateway's declarative configuration: a YAML file, validated in full at load.

A config that does not validate is refused with every problem listed as `file: path: reason`
(`gateway.yaml: routes[2].upstream: no upstream named 'catalgo'`), and a running gateway keeps
serving its previous config. A minimal file:

    gateway: {name: web, listen: {port: 8000}}
    upstreams:
      catalog: {targets: ["http://127.0.0.1:8101"]}
    routes:
      - name: products
        match: {methods: [GET], path: "/api/products/{id}"}
        upstream: catalog
        rewrite: "/products/{id}"

Sections: `gateway` (listen address, admin API, limits, CORS, gzip), `auth` (JWT via JWKS, API
keys, which claims are forwarded), `tiers` (QoS per client tier), `upstreams` (pools: targets or
a DNS name, balancing, health checks, ejection, retries, breaker, timeouts), `bus` (the Kafka or
in-memory bus the protocol-translating routes use) and `routes` (matched in order, first match
wins; each has exactly one target: `upstream`, `aggregate`, `publish`, `request`, `drain`,
`stream` or `files`). Values of the form `${NAME}` or `${NAME:-default}` are read from the
environment when the file is loaded, so secrets stay out of the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from framework.errors import ConfigurationError
from framework.resilience.adaptive import AdaptiveConfig
from framework.resilience.breaker import BreakerConfig
from framework.resilience.upstreams import (
    EjectionConfig,
    HealthCheckConfig,
    RetryConfig,
    UpstreamConfig,
)

__all__ = [
    "AdaptiveConfig",
    "AdminConfig",
    "AggregateBranch",
    "AggregateTarget",
    "ApiKeyConfig",
    "AuthConfig",
    "BreakerConfig",
    "BusConfig",
    "CacheConfig",
    "CorsConfig",
    "DrainTarget",
    "EjectionConfig",
    "FilesTarget",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewaySettings",
    "HealthCheckConfig",
    "JwtConfig",
    "LimitsConfig",
    "ListenConfig",
    "MatchConfig",
    "PublishTarget",
    "RequestTarget",
    "RetryConfig",
    "RouteConfig",
    "StreamAuthorization",
    "StreamTarget",
    "TierConfig",
    "TransformConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]


class GatewayConfigError(ConfigurationError):
    """A gateway config that cannot be used; `problems` lists `path: reason` strings."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(
            f"{source}: invalid gateway config:\n" + "\n".join(f"  {source}: {p}" for p in problems)
        )
        self.source = source
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- the gateway process -----------------------------------------------------------------------


class ListenConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)


class AdminConfig(_Strict):
    """The admin API: its own port, its own keys (sha256 hex digests of the tokens)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    token_hashes: tuple[str, ...] = ()
    """`sha256:<hex>` of each admin bearer token; empty: the admin API refuses every call."""


class CorsConfig(_Strict):
    origins: tuple[str, ...] = ()
    """Allowed origins; `*` allows any (never together with credentials)."""
    methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE")
    headers: tuple[str, ...] = ("authorization", "content-type", "x-api-key")
    expose: tuple[str, ...] = ("x-gtxid", "x-request-id", "location")
    credentials: bool = False
    max_age: int = 600

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsConfig:
        if self.credentials and "*" in self.origins:
            raise ValueError("origins '*' cannot be combined with credentials: true")
        return self


DEVELOPMENT_SECRET_PREFIX = "dev-only"
"""Secrets in shipped profiles that start with this are public, for development only."""


class LimitsConfig(_Strict):
    """What one client connection may cost the gateway, checked on every read (like nginx's
    `client_header_timeout`, `client_body_timeout`, `large_client_header_buffers` and
    `keepalive_timeout`). A client over a limit gets a 4xx and its connection is closed; a slow
    one never holds a concurrency slot, since bodies are read before the slot is taken."""

    header_timeout: float = Field(default=10.0, gt=0)
    """Seconds from a request's first byte (or the connection's start) to the end of its
    headers; then 408 and the connection is closed."""
    body_timeout: float = Field(default=10.0, gt=0)
    """Seconds the body may pause between two reads; then 408."""
    body_min_rate: int = Field(default=1024, ge=0)
    """Bytes per second a body must average once `body_timeout` has passed (0: no minimum), so
    a client trickling one byte just inside every pause is cut off too; then 408."""
    keepalive_timeout: float = Field(default=30.0, gt=0)
    """Seconds an idle keep-alive connection is kept open."""
    max_header_bytes: int = Field(default=32_768, ge=1024)
    """The request line and headers together; 431 above it."""
    max_headers: int = Field(default=100, ge=8)
    """Header lines in one request; 431 above it."""
    max_connections: int = Field(default=10_000, ge=1)
    """Open client connections; more are answered 503 and closed at once."""


class GatewaySettings(_Strict):
    name: str = "gateway"
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    max_body: int = Field(default=1 << 20, ge=0)
    """Largest request body in bytes (413 above it)."""
    max_concurrency: int = Field(default=1000, ge=1)
    """Requests handled at once; more are shed with 503 and Retry-After."""
    timeout: float = Field(default=30.0, gt=0)
    """Default per-route timeout in seconds."""
    cors: CorsConfig | None = None
    gzip_min_size: int | None = Field(default=1024, ge=0)
    """Compress responses at least this large when the client accepts gzip (None: never)."""
    trusted_proxies: tuple[str, ...] = ()
    """Peers whose X-Forwarded-For is believed when naming the client."""
    signing_key: str | None = None
    """Secret for short-lived signed URLs (`files` routes); use `${ENV}`."""
    internal_paths: tuple[str, ...] = ("/metrics", "/alive", "/ready", "/docs")
    """Upstream paths (and everything under them) a prefix route never forwards: a catch-all
    must not publish an upstream's metrics, probes or API docs. A route that names such a path
    exactly (not as a prefix) still reaches it."""
    development: bool = False
    """Accept the built-in development secrets (values starting with `dev-only`). Off: such a
    secret is refused at load, so a profile that falls back to one cannot reach production."""

    @field_validator("internal_paths")
    @classmethod
    def _internal_absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must start with '/'")
        return tuple(path.rstrip("/") or "/" for path in value)


# -- identity and QoS ----------------------------------------------------------------------------


class JwtConfig(_Strict):
    jwks_url: str | None = None
    """Where the issuer publishes its keys (RS256/ES256)."""
    jwks_refresh: float = Field(default=300.0, gt=0)
    """Seconds a fetched key set is trusted; an unknown `kid` triggers an early refetch."""
    issuer: str
    audience: str | tuple[str, ...]
    algorithms: tuple[Literal["RS256", "ES256", "HS256"], ...] = ("RS256", "ES256")
    hs256_secret: str | None = None
    """Only when `algorithms` has HS256; use `${ENV}`."""
    leeway: float = Field(default=30.0, ge=0)
    cookie: str | None = None
    """Also take the token from this cookie (browsers), not only `Authorization: Bearer`."""
    cache_size: int = Field(default=10_000, ge=0)
    """Verified tokens remembered until their `exp` (or a key rotation); 0: check every time."""

    @model_validator(mode="after")
    def _keys_for_algorithms(self) -> JwtConfig:
        asymmetric = {"RS256", "ES256"} & set(self.algorithms)
        if asymmetric and not self.jwks_url:
            raise ValueError(f"{sorted(asymmetric)} need jwks_url")
        if "HS256" in self.algorithms and not self.hs256_secret:
            raise ValueError("HS256 needs hs256_secret")
        if self.hs256_secret and "HS256" not in self.algorithms:
            raise ValueError("hs256_secret is set but HS256 is not in algorithms")
        if "HS256" in self.algorithms and asymmetric:
            raise ValueError(
                "HS256 cannot be mixed with RS256/ES256 (it invites key confusion): "
                "use separate gateways or routes"
            )
        return self


class ApiKeyConfig(_Strict):
    id: str
    hash: str
    """`sha256:<hex digest of the key>`: keys are never stored in the clear."""
    tier: str | None = None
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()

    @field_validator("hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits")
        return value


class AuthConfig(_Strict):
    jwt: JwtConfig | None = None
    api_keys: tuple[ApiKeyConfig, ...] = ()
    api_key_header: str = "x-api-key"
    forward_claims: Mapping[str, str] = Field(
        default_factory=lambda: {
            "sub": "x-user-id",
            "roles": "x-user-roles",
            "scope": "x-user-scopes",
            "tier": "x-client-tier",
        }
    )
    """Claim -> header sent upstream; the same headers coming from clients are removed."""
    tier_claim: str = "tier"


class TierConfig(_Strict):
    rate: float = Field(gt=0)
    """Requests per second, sustained."""
    burst: int = Field(ge=1)
    daily_quota: int | None = Field(default=None, ge=1)


# The `upstreams` section's models (UpstreamConfig, RetryConfig, BreakerConfig, EjectionConfig,
# HealthCheckConfig, AdaptiveConfig) live with the pools in framework.resilience, shared with the
# HTTP client.


# -- the bus (protocol translation) -------------------------------------------------------------


class BusConfig(_Strict):
    transport: Literal["memory", "kafka"] = "memory"
    bootstrap_servers: str | None = None
    source: str = "gateway"


# -- routes --------------------------------------------------------------------------------------


class MatchConfig(_Strict):
    path: str
    """`/api/orders/{id}`; with `prefix: true` any path under it matches (`{tail}` holds the
    rest)."""
    prefix: bool = False
    methods: tuple[str, ...] = ()
    """Empty: any method."""
    host: str | None = None
    """Exact host, or `*.example.com`."""
    headers: Mapping[str, str] = Field(default_factory=dict)
    """Header name -> exact value (e.g. `x-region: eu`)."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in value)


class TransformConfig(_Strict):
    request: tuple[Mapping[str, Any], ...] = ()
    """Field mapping (see `framework.translate.mapping`) applied to JSON request bodies."""
    response: tuple[Mapping[str, Any], ...] = ()
    """Field mapping applied to JSON response bodies."""
    request_format: str | None = None
    """Convert the request body to this media type before sending it on (e.g. the upstream
    speaks XML)."""
    response_format: Literal["negotiate"] | str | None = None
    """Convert the response body: a media type, or `negotiate` to follow the client's Accept."""


class CacheConfig(_Strict):
    ttl: float = Field(gt=0)
    vary: tuple[str, ...] = ()
    max_entries: int = Field(default=10_000, ge=1)


class AggregateBranch(_Strict):
    name: str
    upstream: str
    path: str
    """Path template; `{param}` from the route's path parameters."""
    timeout: float = Field(default=2.0, gt=0)
    required: bool = False
    """A required branch failing fails the whole response (502); others mark it partial."""


class AggregateTarget(_Strict):
    branches: tuple[AggregateBranch, ...] = Field(min_length=1)


class PublishTarget(_Strict):
    """HTTP -> bus: 202 with the event id and a status URL."""

    topic: str
    event_type: str
    key: str | None = None
    """`{param}` or a dotted path into the body."""
    status_topics: tuple[str, ...] = ()
    """Topics whose correlated events the status URL reports."""
    states: Mapping[str, str] = Field(default_factory=dict)


class RequestTarget(_Strict):
    """HTTP <-> bus request/reply; 504 when no reply comes in `timeout`."""

    topic: str
    event_type: str
    key: str | None = None
    timeout: float = Field(default=5.0, gt=0)
    errors: Mapping[str, int] = Field(default_factory=dict)


class DrainTarget(_Strict):
    """Queue-and-drain: accept at once, deliver to an upstream at `rate` per second."""

    topic: str
    upstream: str
    rate: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)


class StreamAuthorization(_Strict):
    """Who may follow a stream is the upstream's call: before streaming, the gateway sends
    `GET path` (path parameters filled in) to `upstream` with the caller's verified identity
    headers; a 2xx lets the stream open, a 4xx is the client's answer (e.g. 404 for another
    customer's order), anything else a 502."""

    upstream: str
    path: str
    """Path template, e.g. `/orders/{order_id}`."""
    timeout: float = Field(default=2.0, gt=0)


class StreamTarget(_Strict):
    """Topics -> Server-Sent Events or WebSocket, filtered per client."""

    topics: tuple[str, ...] = Field(min_length=1)
    protocol: Literal["sse", "websocket"] = "sse"
    key: str | None = None
    """Template of the events' partition key, e.g. `{order_id}`."""
    types: tuple[str, ...] = ()
    query_filters: tuple[str, ...] = ()
    authorize: StreamAuthorization | None = None
    """Ask an upstream whether this caller may follow this stream (see `StreamAuthorization`);
    without it any caller the route admits may follow any key."""


class FilesTarget(_Strict):
    """Large files bypass the gateway: answers with a short-lived signed URL to `base_url`."""

    base_url: str
    ttl: float = Field(default=300.0, gt=0)


class RouteConfig(_Strict):
    name: str
    match: MatchConfig
    auth: tuple[Literal["jwt", "api_key", "none"], ...] = ("none",)
    """Accepted credentials, tried in order; `none` means the route is open."""
    roles: tuple[str, ...] = ()
    """The client needs at least one of these roles (if any are given)."""
    scopes: tuple[str, ...] = ()
    """The client needs every one of these scopes."""
    timeout: float | None = Field(default=None, gt=0)
    rewrite: str | None = None
    """Upstream path template (`/products/{id}`); default: the request path."""
    strip_prefix: str | None = None
    transform: TransformConfig | None = None
    cache: CacheConfig | None = None
    max_body: int | None = Field(default=None, ge=0)
    upstream: str | None = None
    aggregate: AggregateTarget | None = None
    publish: PublishTarget | None = None
    request: RequestTarget | None = None
    drain: DrainTarget | None = None
    stream: StreamTarget | None = None
    files: FilesTarget | None = None

    @field_validator("auth", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_target(self) -> RouteConfig:
        targets = [name for name in _TARGETS if getattr(self, name) is not None]
        if len(targets) != 1:
            raise ValueError(
                f"a route needs exactly one target of {', '.join(_TARGETS)}; it has "
                + (", ".join(targets) or "none")
            )
        if "none" in self.auth and len(self.auth) > 1:
            raise ValueError("auth 'none' cannot be combined with other credentials")
        if (self.roles or self.scopes) and self.auth == ("none",):
            raise ValueError("roles/scopes need an auth method (jwt or api_key)")
        return self

    @property
    def target(self) -> str:
        return next(name for name in _TARGETS if getattr(self, name) is not None)


_TARGETS = ("upstream", "aggregate", "publish", "request", "drain", "stream", "files")


class GatewayConfig(_Strict):
    gateway: GatewaySettings = GatewaySettings()
    auth: AuthConfig = AuthConfig()
    tiers: Mapping[str, TierConfig] = Field(default_factory=dict)
    default_tier: str | None = None
    anonymous_tier: str | None = None
    """Tier of clients without credentials on open routes (by client address)."""
    upstreams: Mapping[str, UpstreamConfig] = Field(default_factory=dict)
    bus: BusConfig = BusConfig()
    routes: tuple[RouteConfig, ...] = ()

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> GatewayConfig:
        problems: list[str] = []
        names: set[str] = set()
        for index, route in enumerate(self.routes):
            where = f"routes[{index}]"
            if route.name in names:
                problems.append(f"{where}.name: duplicate route name {route.name!r}")
            names.add(route.name)
            upstreams = [route.upstream] if route.upstream else []
            if route.aggregate:
                upstreams += [b.upstream for b in route.aggregate.branches]
            if route.drain:
                upstreams.append(route.drain.upstream)
            if route.stream and route.stream.authorize:
                upstreams.append(route.stream.authorize.upstream)
                if route.auth == ("none",):
                    problems.append(f"{where}.stream.authorize: needs an authenticated route")
            for name in upstreams:
                if name not in self.upstreams:
                    problems.append(f"{where}: no upstream named {name!r}")
            if "jwt" in route.auth and self.auth.jwt is None:
                problems.append(f"{where}.auth: jwt needs an auth.jwt section")
            if "api_key" in route.auth and not self.auth.api_keys:
                problems.append(f"{where}.auth: api_key needs auth.api_keys")
            if route.files and not self.gateway.signing_key:
                problems.append(f"{where}.files: needs gateway.signing_key")
        for tier in (self.default_tier, self.anonymous_tier):
            if tier is not None and tier not in self.tiers:
                problems.append(f"no tier named {tier!r} in tiers")
        for key in self.auth.api_keys:
            if key.tier is not None and key.tier not in self.tiers:
                problems.append(f"auth.api_keys[{key.id}].tier: no tier named {key.tier!r}")
        allowed = bool(info.context and info.context.get("allow_development_secrets"))
        if not (self.gateway.development or allowed):
            secrets = {
                "gateway.signing_key": self.gateway.signing_key,
                "auth.jwt.hs256_secret": self.auth.jwt.hs256_secret if self.auth.jwt else None,
            }
            for where, secret in secrets.items():
                if secret is not None and secret.startswith(DEVELOPMENT_SECRET_PREFIX):
                    problems.append(
                        f"{where}: a built-in development secret; give a real one (from the "
                        "environment) or set gateway.development: true"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# -- loading -------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], missing: list[str]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing.append(name)
            return ""

        return _ENV.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, missing) for v in value]
    return value


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "function-wrap")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    allow_development_secrets: bool = False,
) -> GatewayConfig:
    """Parse and validate YAML text; raises `GatewayConfigError` listing every problem.

    `allow_development_secrets` is for configs that are read, never served (drawing the
    system graph): their `dev-only` fallbacks are then not refused.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GatewayConfigError(source, [f"not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GatewayConfigError(source, ["the document must be a mapping"])
    missing: list[str] = []
    raw = _expand(raw, os.environ if env is None else env, missing)
    if missing:
        raise GatewayConfigError(
            source, [f"environment variable {name} is not set" for name in sorted(set(missing))]
        )
    try:
        return GatewayConfig.model_validate(
            raw, context={"allow_development_secrets": allow_development_secrets}
        )
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{_location(error['loc'])}: {message}")
        raise GatewayConfigError(source, problems) from None


def load_config(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    allow_development_secrets: bool = False,
) -> GatewayConfig:
    """Read and validate a config file; raises `GatewayConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
    return parse_config(
        text, source=str(path), env=env, allow_development_secrets=allow_development_secrets
    )
