"""Unit tests of kvcluster.core.hashing: the routing and storage-key contract.

The pinned values below are the contract shared by servers, clients and the
files on disk. If one of these tests fails, the change breaks compatibility
with every existing cluster and client (see the module docstring).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core.hashing import (
    MAX_PARTITIONS,
    check_partition_count,
    key_hash,
    partition_bits,
    partition_of,
    pkey,
    split_pkey,
)

POWERS_OF_TWO = [1 << b for b in range(17)]


# -- pinned values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"", 0xE4A6A0577479B2B4),
        (b"a", 0x40F89E395B66422F),
        (b"hello", 0xA7B6EDA801E5347D),
        (b"user:42", 0xD9279B7CB3A5B282),
        (bytes(range(256)), 0x2B2CEDFED655AD3F),
    ],
)
def test_key_hash_pinned_values(key: bytes, expected: int) -> None:
    assert key_hash(key) == expected


@pytest.mark.parametrize(
    ("key", "q", "expected"),
    [
        (b"hello", 1, 0),
        (b"hello", 2, 1),
        (b"hello", 64, 41),
        (b"hello", 65536, 42934),
        (b"a", 64, 16),
        (b"user:42", 64, 54),
        (b"", 64, 57),
    ],
)
def test_partition_of_pinned_values(key: bytes, q: int, expected: int) -> None:
    assert partition_of(key, q) == expected


def test_pkey_layout_is_two_byte_big_endian_partition_then_key() -> None:
    assert pkey(0x0102, b"key") == b"\x01\x02key"
    assert pkey(0, b"k") == b"\x00\x00k"
    assert pkey(MAX_PARTITIONS - 1, b"") == b"\xff\xff"


# -- key_hash --------------------------------------------------------------------------


@given(st.binary(max_size=2048))
def test_key_hash_is_blake2b_64_read_big_endian(key: bytes) -> None:
    digest = hashlib.blake2b(key, digest_size=8).digest()
    assert key_hash(key) == int.from_bytes(digest, "big")
    assert 0 <= key_hash(key) < 2**64


def test_key_hash_differs_for_nearby_keys() -> None:
    hashes = {key_hash(f"key-{i}".encode()) for i in range(1000)}
    assert len(hashes) == 1000


# -- partition_of ----------------------------------------------------------------------


@given(st.binary(max_size=64), st.sampled_from(POWERS_OF_TWO))
def test_partition_is_the_top_bits_of_the_hash(key: bytes, q: int) -> None:
    p = partition_of(key, q)
    assert 0 <= p < q
    assert p == key_hash(key) * q // 2**64


@given(st.binary(max_size=64), st.sampled_from(POWERS_OF_TWO[:-1]))
def test_doubling_q_splits_each_partition_in_two(key: bytes, q: int) -> None:
    assert partition_of(key, 2 * q) // 2 == partition_of(key, q)


def test_keys_spread_evenly_over_partitions() -> None:
    counts = Counter(partition_of(f"user:{i}".encode(), 16) for i in range(4096))
    assert sorted(counts) == list(range(16))
    # 256 expected per partition; the binomial standard deviation is about 15.5.
    assert all(200 <= c <= 312 for c in counts.values()), counts


@pytest.mark.parametrize("q", [0, -8, 3, 6, 100, 2 * MAX_PARTITIONS, True])
def test_bad_partition_counts_are_rejected(q: int) -> None:
    with pytest.raises(ValueError, match="partition count"):
        check_partition_count(q)
    with pytest.raises(ValueError, match="partition count"):
        partition_of(b"k", q)


def test_partition_count_must_be_an_int() -> None:
    with pytest.raises(ValueError, match="must be an int"):
        check_partition_count(64.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("q", "bits"), [(1, 0), (2, 1), (64, 6), (MAX_PARTITIONS, 16)])
def test_partition_bits(q: int, bits: int) -> None:
    assert partition_bits(q) == bits


# -- pkey ------------------------------------------------------------------------------


@given(st.integers(0, MAX_PARTITIONS - 1), st.binary(max_size=64))
def test_split_pkey_inverts_pkey(partition: int, key: bytes) -> None:
    assert split_pkey(pkey(partition, key)) == (partition, key)


@given(
    st.integers(0, MAX_PARTITIONS - 2),
    st.integers(1, 100),
    st.binary(max_size=32),
    st.binary(max_size=32),
)
def test_a_partition_keys_sort_before_the_next_partitions(
    p: int, gap: int, k1: bytes, k2: bytes
) -> None:
    later = min(p + gap, MAX_PARTITIONS - 1)
    assert pkey(p, k1) < pkey(later, k2)


@given(st.integers(0, MAX_PARTITIONS - 1), st.binary(max_size=32), st.binary(max_size=32))
def test_keys_within_a_partition_keep_their_order(p: int, k1: bytes, k2: bytes) -> None:
    assert (pkey(p, k1) < pkey(p, k2)) == (k1 < k2)


@pytest.mark.parametrize("partition", [-1, MAX_PARTITIONS, 1 << 20])
def test_pkey_rejects_partitions_that_do_not_fit_two_bytes(partition: int) -> None:
    with pytest.raises(ValueError, match="partition must be between 0 and 65535"):
        pkey(partition, b"k")


def test_pkey_rejects_a_non_int_partition() -> None:
    with pytest.raises(ValueError, match="must be an int"):
        pkey(True, b"k")


def test_split_pkey_of_a_bare_prefix_is_an_empty_key() -> None:
    assert split_pkey(b"\x00\x05") == (5, b"")


@pytest.mark.parametrize("pk", [b"", b"\x01"])
def test_split_pkey_rejects_keys_without_a_prefix(pk: bytes) -> None:
    with pytest.raises(ValueError, match="too short"):
        split_pkey(pk)


def test_a_bad_count_is_rejected_even_after_good_ones_were_used() -> None:
    assert partition_of(b"k", 1) == 0  # 1 == True: a cache keyed by count must not say yes
    with pytest.raises(ValueError, match="partition count"):
        partition_of(b"k", True)
    with pytest.raises(ValueError, match="partition count"):
        partition_of(b"k", 1.0)  # type: ignore[arg-type]
