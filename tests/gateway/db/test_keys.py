from __future__ import annotations

import hashlib
import hmac
import string
from collections.abc import Callable

import pytest

from gateway.keys import (
    KEY_LENGTH,
    generate_key,
    is_well_formed,
    key_digest,
    key_hint,
    random_base62,
)

BASE62 = frozenset(string.digits + string.ascii_letters)


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = [generate_key() for _ in range(1000)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert is_well_formed(key)
        assert len(key) == KEY_LENGTH == 39
        assert key.startswith("tg_")
        assert set(key[3:]) <= BASE62


def test_checksum_rejects_any_one_character_change() -> None:
    key = generate_key()
    for position in range(3, KEY_LENGTH):
        replacement = "a" if key[position] != "a" else "b"
        changed = key[:position] + replacement + key[position + 1 :]
        assert not is_well_formed(changed), (position, changed)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda key: "tx_" + key[3:], id="wrong-prefix"),
        pytest.param(lambda key: "TG_" + key[3:], id="upper-prefix"),
        pytest.param(lambda key: key[:-1], id="short"),
        pytest.param(lambda key: key + "0", id="long"),
        pytest.param(lambda key: key[:10] + "-" + key[11:], id="outside-alphabet"),
        pytest.param(lambda key: key[:10] + "é" + key[11:], id="non-ascii"),
        pytest.param(lambda key: key[:10] + "\udc80" + key[11:], id="lone-surrogate"),
        pytest.param(lambda key: key + key, id="doubled"),
        pytest.param(lambda key: "", id="empty"),
        pytest.param(lambda key: "tg_", id="prefix-only"),
        pytest.param(lambda key: key[:-6] + "000000", id="zero-checksum"),
    ],
)
def test_malformed_keys_are_rejected(mangle: Callable[[str], str]) -> None:
    assert not is_well_formed(mangle(generate_key()))


def test_is_well_formed_never_raises() -> None:
    for value in (None, 42, b"tg_", "x" * 1_000_000, "\x00" * KEY_LENGTH):
        assert is_well_formed(value) is False  # type: ignore[arg-type]  # wrong types on purpose


def test_digest_is_hmac_sha256_under_the_secret() -> None:
    key = generate_key()
    digest = key_digest(key, b"secret")
    assert digest == hmac.new(b"secret", key.encode(), hashlib.sha256).hexdigest()
    assert len(digest) == 64
    assert key_digest(key, b"other secret") != digest
    assert key not in digest


def test_hint_is_prefix_and_last_four() -> None:
    key = generate_key()
    assert key_hint(key) == (key[:7], key[-4:])
    assert key_hint(key)[0].startswith("tg_")
    with pytest.raises(ValueError, match="well-formed"):
        key_hint("tg_nope")


def test_random_base62() -> None:
    drawn = random_base62(10_000)
    assert len(drawn) == 10_000
    assert set(drawn) == BASE62
