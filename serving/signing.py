"""Signed calls between gateways and workers: HMAC-SHA256 under the shared secret.

A call carries ``x-tollgate-timestamp`` (Unix seconds), ``x-tollgate-nonce`` (random) and
``x-tollgate-signature``: the HMAC of ``method``, ``path``, the SHA-256 of the body, the
timestamp and the nonce, one per line, under a key derived from ``TOLLGATE_SECRET`` for this
purpose alone (the same secret also hashes API keys; the derived key keeps the two uses
apart). A worker refuses a call whose signature does not match, whose timestamp is more than
``skew_s`` away from its clock, or whose nonce it has already seen within that window.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

__all__ = ["SignatureError", "Signer", "Verifier"]

TIMESTAMP = "x-tollgate-timestamp"
NONCE = "x-tollgate-nonce"
SIGNATURE = "x-tollgate-signature"


class SignatureError(Exception):
    """The call is unsigned, badly signed, stale or replayed (the message says which)."""


def _key(secret: bytes) -> bytes:
    return hmac.new(secret, b"tollgate internal calls v1", hashlib.sha256).digest()


def _mac(key: bytes, method: str, path: str, body: bytes, timestamp: str, nonce: str) -> str:
    message = "\n".join(
        (method.upper(), path, hashlib.sha256(body).hexdigest(), timestamp, nonce)
    ).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Signer:
    """Signs the calls a gateway makes."""

    def __init__(self, secret: bytes) -> None:
        self._key = _key(secret)

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        nonce = secrets.token_hex(16)
        return {
            TIMESTAMP: timestamp,
            NONCE: nonce,
            SIGNATURE: _mac(self._key, method, path, body, timestamp, nonce),
        }


class Verifier:
    """Checks the calls a worker receives; remembers nonces for the accepted window."""

    def __init__(self, secret: bytes, *, skew_s: float = 30.0, max_nonces: int = 200_000) -> None:
        self._key = _key(secret)
        self.skew_s = skew_s
        self._max = max_nonces
        #: Nonce to when it stops mattering (its timestamp is out of the window by then).
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        """Raises:
        SignatureError: the call must be refused."""
        timestamp, nonce, signature = (headers.get(h) for h in (TIMESTAMP, NONCE, SIGNATURE))
        if not timestamp or not nonce or not signature:
            raise SignatureError("unsigned call")
        try:
            sent = int(timestamp)
        except ValueError:
            raise SignatureError("malformed timestamp") from None
        now = time.time()
        if abs(now - sent) > self.skew_s:
            raise SignatureError("stale call")
        expected = _mac(self._key, method, path, body, timestamp, nonce)
        if not hmac.compare_digest(expected, signature):
            raise SignatureError("bad signature")
        self._forget(now)
        if nonce in self._seen:
            raise SignatureError("replayed call")
        if len(self._seen) >= self._max:  # a flood of valid calls: the oldest go first
            self._seen.popitem(last=False)
        self._seen[nonce] = sent + self.skew_s

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:
            nonce, until = next(iter(seen.items()))
            if until >= now:
                break
            del seen[nonce]
