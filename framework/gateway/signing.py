"""Short-lived signed URLs: let clients move large files straight to a file service.

The gateway answers a `files` route with a URL that names the object, when it expires, and an
HMAC-SHA256 of the method, the URL's whole path and the expiry under a key the gateway and the
file service share; the file service checks it with `verify_signed_path` and serves the bytes
itself, so big transfers never pass through the gateway:

    url = sign_url("http://files.internal/blobs", "/invoices/17.pdf", key, ttl=300, method="GET")
    # http://files.internal/blobs/invoices/17.pdf?expires=1764064800&method=GET&signature=...
    verify_signed_path(request.raw_path, request.query, key, method=request.method,
                       prefix="/blobs")                                   # on the file service

What a signature binds: the method (a GET URL cannot be used to PUT), the exact path including
the base URL's path (`/blobs/invoices/17.pdf`: the same signature names no other object and no
other prefix), and the expiry. The path is compared in its normalised, decoded form
(`framework.gateway.router.normalise_path`), and a path that normalising refuses - `..`,
`..;`, encoded or doubled separators - is refused, so no spelling of a signed path reaches
another file. `prefix` is where the verifying service keeps its objects: a path outside it is
refused before its signature is looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote, urlencode, urlsplit

from framework.errors import SignatureError
from framework.gateway.router import normalise_path
from framework.gateway.types import GatewayError

__all__ = ["SignatureError", "sign_url", "verify_signed_path"]


def _canonical(path: str) -> str:
    """The decoded, normalised form of `path` that signatures cover."""
    try:
        return "/" + "/".join(normalise_path(path))
    except GatewayError as exc:
        raise SignatureError(f"the path is not acceptable: {exc.detail}") from None


def _mac(key: str, method: str, path: str, expires: int) -> str:
    message = f"{method.upper()}\n{path}\n{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign_url(
    base_url: str,
    path: str,
    key: str,
    *,
    ttl: float,
    method: str = "GET",
    now: float | None = None,
) -> str:
    """`base_url` + `path` with `expires`, `method` and `signature` query parameters.

    `path` is the object's name under `base_url` (its segments are percent-encoded here);
    raises `SignatureError` for a path with `.`/`..` segments or separators in a name.
    """
    if not key:
        raise ValueError("signing needs a non-empty key")
    encoded = "/" + "/".join(quote(part, safe="") for part in path.strip("/").split("/"))
    base = base_url.rstrip("/")
    full = _canonical(urlsplit(base).path + encoded)
    expires = int((time.time() if now is None else now) + ttl)
    signature = _mac(key, method, full, expires)
    query = urlencode({"expires": expires, "method": method.upper(), "signature": signature})
    return f"{base}{encoded}?{query}"


def verify_signed_path(
    path: str,
    query: Mapping[str, str],
    key: str,
    *,
    method: str = "GET",
    prefix: str = "",
    now: float | None = None,
) -> None:
    """Check a request for a signed URL (`path` as received, percent-encoded, without its
    query); raises `SignatureError` saying what is wrong."""
    try:
        expires = int(query["expires"])
        signature = query["signature"]
        signed_method = query.get("method", "GET")
    except (KeyError, ValueError) as exc:
        raise SignatureError("the URL is not signed") from exc
    full = _canonical(path)
    if prefix:
        root = _canonical(prefix).rstrip("/")
        if not full.startswith(root + "/"):
            raise SignatureError("the path is outside the signed prefix")
    if signed_method.upper() != method.upper():
        raise SignatureError("the URL was signed for another method")
    if expires < (time.time() if now is None else now):
        raise SignatureError("the URL has expired")
    expected = _mac(key, signed_method, full, expires)
    if not signature.isascii() or not hmac.compare_digest(expected, signature):
        raise SignatureError("the signature does not match")
