"""The benchmarks' key choosers: YCSB's FNV hash, zipfian and scrambled zipfian, seeded."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from benchmarks.zipf import (
    ScrambledZipfian,
    Uniform,
    ZipfianGenerator,
    chooser,
    fnv1a64,
    fnvhash64,
    key_name,
    zeta,
)


def test_fnv1a64_matches_the_reference_vectors() -> None:
    # Test vectors of the FNV reference (Fowler/Noll/Vo), 64-bit FNV-1a.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("value", [0, 1, 255, 256, 123456789, 2**40 + 7, 10_000_000_000])
def test_fnvhash64_is_ycsb_hash_of_the_eight_low_bytes_made_non_negative(value: int) -> None:
    h = fnv1a64(value.to_bytes(8, "little"))
    signed = h - 2**64 if h >= 2**63 else h
    assert fnvhash64(value) == abs(signed)
    assert 0 <= fnvhash64(value) <= 2**63


def test_fnvhash64_rejects_negative_items() -> None:
    with pytest.raises(ValueError):
        fnvhash64(-1)


def test_key_names_are_ycsb_hashed_user_keys() -> None:
    assert key_name(0) == b"user%d" % fnvhash64(0)
    assert len({key_name(i) for i in range(10_000)}) == 10_000


def test_same_seed_same_sequence_and_different_seed_different_sequence() -> None:
    a = ScrambledZipfian(1000, random.Random(7))
    b = ScrambledZipfian(1000, random.Random(7))
    c = ScrambledZipfian(1000, random.Random(8))
    seq_a = [a.next() for _ in range(500)]
    assert seq_a == [b.next() for _ in range(500)]
    assert seq_a != [c.next() for _ in range(500)]


def test_scrambled_zipfian_stays_in_range_and_is_skewed() -> None:
    records = 1000
    gen = ScrambledZipfian(records, random.Random(1))
    draws = Counter(gen.next() for _ in range(50_000))
    assert min(draws) >= 0
    assert max(draws) < records
    # Rank 0 (the most popular zipfian item) lands on record fnvhash64(0) % records.
    assert draws.most_common(1)[0][0] == fnvhash64(0) % records
    # Skew: the hottest 1% of the records take many times their uniform share (1%).
    # (Scrambling folds 10^10 zipfian ranks onto the records, so it is flatter than
    # Zipf(0.99) over 1000 items; YCSB's own generator measures about 13% here.)
    top = sum(n for _, n in draws.most_common(records // 100))
    assert top / 50_000 > 0.08
    # ...but the requests still reach most of the key space.
    assert len(draws) > records * 0.6


def test_plain_zipfian_follows_the_zipf_law_at_the_head() -> None:
    n, theta, draws = 100, 0.99, 200_000
    gen = ZipfianGenerator(0, n - 1, random.Random(3), theta)
    counts = Counter(gen.next() for _ in range(draws))
    zn = zeta(n, theta)
    for rank in (0, 1):
        expected = draws / ((rank + 1) ** theta) / zn
        assert abs(counts[rank] - expected) < 0.05 * expected
    assert counts[0] > counts[1] > counts[5] > counts[50]
    assert max(counts) <= n - 1 and min(counts) >= 0


def test_uniform_and_chooser() -> None:
    u = chooser("uniform", 10, random.Random(1))
    assert isinstance(u, Uniform)
    assert set(u.next() for _ in range(1000)) == set(range(10))
    assert isinstance(chooser("zipfian", 10, random.Random(1)), ScrambledZipfian)
    with pytest.raises(ValueError):
        chooser("latest", 10, random.Random(1))
    with pytest.raises(ValueError):
        ScrambledZipfian(0, random.Random(1))
