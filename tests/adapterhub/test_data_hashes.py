"""`HashIndex`, the compact hash -> row number map behind exact dedup and inspect's duplicate count."""

from __future__ import annotations

import random

import pytest

from adapterhub.data.hashes import HashIndex, hash64


def test_agrees_with_a_dict_through_growth_and_probe_chains() -> None:
    rng = random.Random(3)
    keys = [rng.getrandbits(64) for _ in range(30_000)]
    # Keys equal in their low 20 bits land on one slot and must chain past each other.
    keys += [(rng.getrandbits(44) << 20) | 0xABCDE for _ in range(300)]
    keys += [0, 2**64 - 1, 1]
    keys += rng.sample(keys, 5_000)  # repeats: the first number stays
    index, reference = HashIndex(), {}
    for number, key in enumerate(keys):
        assert index.setdefault(key, number) == reference.setdefault(key, number)
    assert len(index) == len(reference)
    assert all(index.get(key) == number for key, number in reference.items())
    assert all(key in index for key in reference)
    absent = [rng.getrandbits(64) for _ in range(2_000)]
    assert all(index.get(key) is None and key not in index for key in absent if key not in reference)


def test_row_numbers_must_fit() -> None:
    index = HashIndex()
    with pytest.raises(ValueError, match="does not fit"):
        index.setdefault(5, 2**32)
    assert index.setdefault(5, 2**32 - 2) == 2**32 - 2 and index.get(5) == 2**32 - 2


def test_hash64_is_the_normalized_texts_identity() -> None:
    assert hash64("a b") == hash64("a b") != hash64("a  b")
    assert 0 <= hash64("x") < 2**64
