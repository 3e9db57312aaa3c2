"""API keys: their format, their checksum, and what is stored of them.

A key reads ``tg_`` + 30 random characters + a 6-character checksum, all in base62
(``0-9A-Za-z``), 39 characters in all, as GitHub formats its tokens::

    tg_     QuiGZstd4p1ACDmfoYytAxq2O8UnYU     4ZhCp3
    prefix  30 random characters (~178 bits)   base62(CRC32(random characters)), zero-padded

The prefix makes keys easy to find for secret scanners and easy to tell apart by eye; the
checksum lets the gateway turn away a typo or a made-up token without a database lookup (it
is no protection against forgery: anyone can compute a CRC). Only an HMAC-SHA256 of the whole
key under the deployment's secret is stored, plus a hint (``tg_`` + the first 4 random
characters, and the last 4 characters) so that people can tell their keys apart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib

__all__ = [
    "KEY_LENGTH",
    "KEY_PREFIX",
    "generate_key",
    "is_well_formed",
    "key_digest",
    "key_hint",
    "random_base62",
]

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_PREFIX = "tg_"
_RANDOM_LENGTH = 30
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_LENGTH + _CHECKSUM_LENGTH
_HINT_RANDOM_CHARS = 4
_ALPHABET_SET = frozenset(ALPHABET)
_PREFIX_BYTES = KEY_PREFIX.encode()


def random_base62(length: int) -> str:
    """``length`` characters drawn uniformly from ``0-9A-Za-z`` by the ``secrets`` module."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def _checksum(random_part: str) -> str:
    value = zlib.crc32(random_part.encode("utf-8", "surrogatepass"))
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        value, rest = divmod(value, len(ALPHABET))
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def generate_key() -> str:
    """A new random API key, checksum included."""
    random_part = random_base62(_RANDOM_LENGTH)
    return KEY_PREFIX + random_part + _checksum(random_part)


def is_well_formed(key: str) -> bool:
    """Whether ``key`` has a key's prefix, length, alphabet and a matching checksum.

    The work done does not depend on the input (it looks at a fixed-size window of it), and
    it never raises, whatever it is given.
    """
    if not isinstance(key, str):
        return False
    window = key[:KEY_LENGTH].ljust(KEY_LENGTH, "\0")
    prefix, body = window[: len(KEY_PREFIX)], window[len(KEY_PREFIX) :]
    random_part, checksum = body[:_RANDOM_LENGTH], body[_RANDOM_LENGTH:]
    valid = len(key) == KEY_LENGTH
    valid &= hmac.compare_digest(prefix.encode("utf-8", "replace"), _PREFIX_BYTES)
    valid &= sum(char in _ALPHABET_SET for char in body) == len(body)
    expected = _checksum(random_part).encode()
    valid &= hmac.compare_digest(checksum.encode("utf-8", "replace"), expected)
    return valid


def key_digest(key: str, secret: bytes) -> str:
    """The HMAC-SHA256 of ``key`` under ``secret``, in hex: what the database stores."""
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def key_hint(key: str) -> tuple[str, str]:
    """The parts of ``key`` that are safe to show: (``tg_`` + 4 characters, the last 4).

    Raises:
        ValueError: ``key`` is not a well-formed key.
    """
    if not is_well_formed(key):
        raise ValueError("not a well-formed API key")
    return key[: len(KEY_PREFIX) + _HINT_RANDOM_CHARS], key[-4:]
