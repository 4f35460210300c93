"""Customer.io's webhook signature: HMAC-SHA256 over ``v0:<timestamp>:<raw body>``.

Kept free of Flask so the same two functions serve the view, the testing helpers
and anyone verifying a stored request by hand.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Sequence

__all__ = ["SignatureError", "SignatureMismatch", "sign", "verify"]

_SIGNATURE_HEX_LENGTH = 64  # SHA-256 digest as hex


class SignatureError(Exception):
    """The request is not provably from Customer.io; the message says why (never a secret)."""


class SignatureMismatch(SignatureError):
    """A well-formed signature that no configured key makes: a forgery, or the wrong key configured."""


def sign(body: bytes, timestamp: str, key: str) -> str:
    """Return the ``X-CIO-Signature`` value Customer.io sends for this body and timestamp."""
    message = b"v0:" + timestamp.encode("latin-1") + b":" + body
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify(
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    keys: Sequence[str],
    *,
    max_age: float | None = None,
    now: float | None = None,
) -> None:
    """Raise :class:`SignatureError` unless one of ``keys`` signed ``body`` at ``timestamp``.

    ``timestamp`` and ``signature`` are the raw header values. The comparison is
    constant-time and tries every key, so keys can be rotated without downtime.
    ``max_age`` (seconds), when given, also bounds how far ``timestamp`` may be from now.
    """
    if timestamp is not None:  # some servers keep a header's surrounding spaces, others do not
        timestamp = timestamp.strip(" \t")
    signature = signature.strip(" \t") if signature else signature
    if not signature:
        raise SignatureError("missing X-CIO-Signature header")
    if timestamp is None:
        raise SignatureError("missing X-CIO-Timestamp header")
    if len(signature) != _SIGNATURE_HEX_LENGTH:
        raise SignatureError("malformed X-CIO-Signature header: expected 64 hex characters")
    try:
        expected = bytes.fromhex(signature)
    except ValueError:
        raise SignatureError("malformed X-CIO-Signature header: not hexadecimal") from None
    try:
        timestamp_bytes = timestamp.encode("latin-1")
    except UnicodeEncodeError:
        raise SignatureError("malformed X-CIO-Timestamp header") from None
    prefix = b"v0:" + timestamp_bytes + b":"
    matched = False
    for key in keys:
        mac = _keyed(key).copy()
        mac.update(prefix)
        mac.update(body)
        matched |= hmac.compare_digest(mac.digest(), expected)
    if not matched:
        raise SignatureMismatch("X-CIO-Signature does not match the body for any configured signing key")
    if max_age is not None:
        _check_age(timestamp, max_age, time.time() if now is None else now)


@functools.lru_cache(maxsize=16)
def _keyed(key: str) -> hmac.HMAC:
    """An HMAC-SHA256 already keyed with ``key``: copying it costs less than keying a new one."""
    return hmac.new(key.encode("utf-8"), digestmod=hashlib.sha256)


def _check_age(timestamp: str, max_age: float, now: float) -> None:
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise SignatureError("malformed X-CIO-Timestamp header: not Unix seconds") from None
    if abs(now - sent_at) > max_age:
        raise SignatureError("X-CIO-Timestamp is further from now than CIO_RUDDER_MAX_TIMESTAMP_AGE allows")
