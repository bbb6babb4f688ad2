"""Header hygiene: what a client's headers may be, and what of them an upstream receives.

One place, one order, for every route kind (DESIGN: "strip what the client's `Connection` names
and client copies of gateway-owned headers before adding ours"):

1. `check_client_headers` refuses (400) a request that repeats a header that must be single
   (`Host`, `Authorization`, the API-key header, `Cookie`) - a gateway that verifies one copy
   while an upstream reads another is the confusion attackers look for - and a header whose
   name or value is not UTF-8 (aiohttp keeps such bytes as surrogates, which no upstream
   client can send on).
2. `forwardable_headers` copies the rest, minus hop-by-hop headers, every header the client's
   `Connection` names, `Proxy-*`, the framing headers the gateway sets itself (`Host`,
   `Content-Length`, `Expect`), and every header the gateway owns (`owned`: forwarding,
   ids, the identity headers).
3. The caller then adds the gateway's own values; nothing after this step removes any.

    check_client_headers(request.headers, singletons=("authorization", "x-api-key"))
    headers = forwardable_headers(request.headers, owned=GATEWAY_OWNED | identity_headers)
    headers["X-Forwarded-For"] = ...
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from multidict import CIMultiDict

from framework.gateway.types import GatewayError
from framework.resilience.upstreams import HOP_BY_HOP, connection_named

__all__ = ["FRAMING", "GATEWAY_OWNED", "check_client_headers", "forwardable_headers"]

GATEWAY_OWNED = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-proto",
        "x-real-ip",
        "x-gtxid",
        "x-request-id",
        "traceparent",
    }
)
"""Headers only the gateway sets towards an upstream; a client's copies are dropped (the
identity headers of `AuthConfig.forward_claims` are added to these by the gateway)."""

FRAMING = frozenset({"host", "content-length", "expect"})
"""Headers about this hop's message framing: the upstream request gets its own."""

_SINGLE = ("host", "authorization", "cookie")


def check_client_headers(headers: Mapping[str, str], *, singletons: Iterable[str] = ()) -> None:
    """Raise `GatewayError` 400 for a repeated single header or one that is not UTF-8.

    The values of credential headers (`Authorization`, `Cookie` and the `singletons`, e.g. the
    API-key header) are left to authentication, which answers a credential it cannot read with
    a 401 and its challenge; `forwardable_headers` never passes such a value on.
    """
    seen: set[str] = set()
    single = {*_SINGLE, *(name.lower() for name in singletons)}
    for name, value in headers.items():
        lower = name.lower()
        if lower in single:
            if lower in seen:
                raise GatewayError(400, "Bad Request", f"the {name} header is sent more than once")
            seen.add(lower)
        if not (name.isascii() or _utf8(name)):
            raise GatewayError(400, "Bad Request", "a header name is not UTF-8")
        if lower not in single and not (value.isascii() or _utf8(value)):
            raise GatewayError(400, "Bad Request", f"the value of {lower} is not UTF-8")


def forwardable_headers(headers: Mapping[str, str], *, owned: Collection[str]) -> CIMultiDict[str]:
    """The client's headers an upstream may see (repeated ones kept): see the module docstring.

    >>> sorted(forwardable_headers({"Connection": "x-trace, x-user-id", "X-Trace": "1",
    ...     "X-User-Id": "admin", "X-Forwarded-For": "1.2.3.4", "Accept": "*/*"},
    ...     owned={"x-user-id", "x-forwarded-for"}).items())
    [('Accept', '*/*')]
    """
    named = connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower in HOP_BY_HOP
            or lower in FRAMING
            or lower in owned
            or lower in named
            or lower.startswith("proxy-")
            # A value that is not UTF-8 can only be a credential no route checked: never sent on.
            or not (value.isascii() or _utf8(value))
        ):
            continue
        out.add(name, value)
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
