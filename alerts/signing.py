"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign what the dispatcher sends, verify what the
receiver gets.

Three headers travel with every signed request:

- ``webhook-id``: the message id, the same on every retry of one delivery (receivers deduplicate on it);
- ``webhook-timestamp``: integer seconds since the epoch, fresh on every attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per secret, space-separated,
  so a sender can sign with the new and the old key while a receiver rotates (it accepts any one that matches).

Secrets are ``whsec_<base64 key>``. Keys written with the URL-safe base64 alphabet are accepted too.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
import time
from typing import Iterable, Mapping

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


class WebhookVerificationError(ValueError):
    """A request that must not be trusted. ``reason`` is machine-readable; the message never contains a secret."""

    reason = "invalid"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class MissingHeaders(WebhookVerificationError):
    reason = "missing_headers"


class BadTimestamp(WebhookVerificationError):
    reason = "bad_timestamp"


class StaleTimestamp(WebhookVerificationError):
    reason = "stale_timestamp"


class FutureTimestamp(WebhookVerificationError):
    reason = "future_timestamp"


class BadSignature(WebhookVerificationError):
    reason = "bad_signature"


def generate_secret(nbytes: int = 24) -> str:
    """A fresh ``whsec_`` secret (standard base64, as the spec's reference libraries expect)."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(nbytes)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_<base64>`` secret. Raises ValueError (without echoing the secret) if malformed."""
    encoded = secret.strip()
    if encoded.startswith(SECRET_PREFIX):
        encoded = encoded[len(SECRET_PREFIX):]
    encoded += "=" * (-len(encoded) % 4)
    try:
        if "-" in encoded or "_" in encoded:
            key = base64.urlsafe_b64decode(encoded)
        else:
            key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValueError(f"a webhook secret must hold at least 16 bytes of key (this one holds {len(key)})")
    return key


def split_secrets(value: str) -> list[str]:
    """Several secrets in one environment variable, separated by spaces or commas (key rotation)."""
    return [part for part in value.replace(",", " ").split() if part]


def sign(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """One ``v1,<base64>`` signature of ``{id}.{timestamp}.{body}``."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(msg_id: str, body: bytes, secrets: Iterable[str], timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every given secret."""
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    signatures = [sign(msg_id, timestamp, body, s) for s in secrets]
    if not signatures:
        raise ValueError("at least one secret is needed to sign a webhook")
    return {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(timestamp), HEADER_SIGNATURE: " ".join(signatures)}


def verify(headers: Mapping[str, str], body: bytes, secrets: Iterable[str],
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> str:
    """Check a request's Standard Webhooks headers against ``body``; return its ``webhook-id``.

    Raises a ``WebhookVerificationError`` subclass: missing headers, a timestamp outside ``tolerance_s`` either way
    (stale ones are how replays of captured requests are refused), or no signature made with any of ``secrets``.
    ``headers`` lookups must be case-insensitive (aiohttp's and requests' are).
    """
    msg_id = headers.get(HEADER_ID)
    raw_timestamp = headers.get(HEADER_TIMESTAMP)
    raw_signatures = headers.get(HEADER_SIGNATURE)
    missing = [name for name, value in ((HEADER_ID, msg_id), (HEADER_TIMESTAMP, raw_timestamp),
                                         (HEADER_SIGNATURE, raw_signatures)) if not value]
    if missing:
        raise MissingHeaders(f"missing header(s): {', '.join(missing)}")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise BadTimestamp(f"{HEADER_TIMESTAMP} is not an integer number of seconds") from None
    now = time.time() if now is None else now
    if timestamp < now - tolerance_s:
        raise StaleTimestamp(f"timestamp is {now - timestamp:.0f}s old (tolerance {tolerance_s:.0f}s)")
    if timestamp > now + tolerance_s:
        raise FutureTimestamp(f"timestamp is {timestamp - now:.0f}s in the future (tolerance {tolerance_s:.0f}s)")
    offered = [sig for sig in raw_signatures.split() if sig.startswith(SIGNATURE_VERSION + ",")]
    for secret in secrets:
        expected = sign(msg_id, timestamp, body, secret)
        if any(hmac.compare_digest(expected.encode(), sig.encode()) for sig in offered):
            return msg_id
    raise BadSignature("no signature matches any configured secret (tampered body or wrong key)")
