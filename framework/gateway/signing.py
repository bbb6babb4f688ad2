"""Short-lived signed URLs: let clients move large files straight to a file service.

The gateway answers a `files` route with a URL that names the object, when it expires, and an
HMAC-SHA256 of both under a key the gateway and the file service share; the file service checks
it with `verify_signed_path` and serves the bytes itself, so big transfers never pass through
the gateway:

    url = sign_url("http://files.internal/blobs", "/invoices/17.pdf", key, ttl=300, method="GET")
    # http://files.internal/blobs/invoices/17.pdf?expires=1764064800&method=GET&signature=...
    verify_signed_path("/blobs/invoices/17.pdf", query, key, prefix="/blobs")   # on the server
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from framework.errors import SignatureError

__all__ = ["SignatureError", "sign_url", "verify_signed_path"]


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
    """`base_url` + `path` with `expires`, `method` and `signature` query parameters."""
    if not key:
        raise ValueError("signing needs a non-empty key")
    path = "/" + "/".join(quote(part, safe="") for part in path.strip("/").split("/"))
    expires = int((time.time() if now is None else now) + ttl)
    signature = _mac(key, method, path, expires)
    query = urlencode({"expires": expires, "method": method.upper(), "signature": signature})
    return f"{base_url.rstrip('/')}{path}?{query}"


def verify_signed_path(
    path: str,
    query: Mapping[str, str],
    key: str,
    *,
    method: str = "GET",
    prefix: str = "",
    now: float | None = None,
) -> None:
    """Check a request for a signed URL; raises `SignatureError` saying what is wrong."""
    try:
        expires = int(query["expires"])
        signature = query["signature"]
        signed_method = query.get("method", "GET")
    except (KeyError, ValueError) as exc:
        raise SignatureError("the URL is not signed") from exc
    if signed_method.upper() != method.upper():
        raise SignatureError("the URL was signed for another method")
    if expires < (time.time() if now is None else now):
        raise SignatureError("the URL has expired")
    signed_path = path[len(prefix) :] if prefix and path.startswith(prefix) else path
    expected = _mac(key, signed_method, signed_path, expires)
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("the signature does not match")
