"""Passwords: a strength rule for new ones, and scrypt hashes for storing and checking them.

    stored = hash_password("correct horse battery 9")
    # 'scrypt$16384$8$1$<16-byte salt, base64>$<32-byte key, base64>'
    verify_password("correct horse battery 9", stored)   # True, compared in constant time

scrypt is memory-hard (n=2**14, r=8 takes 16 MiB and tens of milliseconds per guess), so a
stolen table is slow to attack; the parameters are stored with each hash, so raising them later
leaves old hashes verifiable. Both functions are CPU-bound: call them through
`asyncio.to_thread` from a coroutine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

__all__ = ["hash_password", "password_weakness", "verify_password"]

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
_MAX_MEMORY = 64 * 1024 * 1024  # room for 128 * n * r = 16 MiB, and for larger stored n
MIN_LENGTH = 10
MAX_LENGTH = 128  # scrypt takes any length, but there is no reason to accept megabytes


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt_b64$hash_b64` of `password` with a fresh random salt."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored`; False (never an error) for a malformed hash."""
    try:
        scheme, n, r, p, salt_b64, key_b64 = stored.split("$")
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        if scheme != "scrypt" or not expected:
            return False
        actual = _scrypt(password, salt, int(n), int(r), int(p), len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def password_weakness(password: str, email: str = "") -> str | None:
    """Why `password` is too weak for a new account, or None when it is acceptable."""
    if len(password) < MIN_LENGTH:
        return f"use at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"use at most {MAX_LENGTH} characters"
    kinds = (str.isalpha, str.isdigit, lambda c: not c.isalnum())
    if sum(any(kind(c) for c in password) for kind in kinds) < 2:
        return "mix letters with digits or symbols"
    local_part = email.partition("@")[0].lower()
    if len(local_part) >= 4 and local_part in password.lower():
        return "do not use your email address in the password"
    return None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_MAX_MEMORY
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
