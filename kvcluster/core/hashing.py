"""Key hashing and partition-prefixed storage keys: the routing contract.

A key is placed by hashing it to 64 bits and taking the top ``log2(Q)`` bits
as its partition (Q, the number of partitions, is a power of two fixed at
cluster creation). The hash ring is thus cut into Q equal arcs and partition
``p`` holds the hashes ``[p * 2**64 / Q, (p + 1) * 2**64 / Q)``, as in
riak_core's ``chash``. Taking the *top* bits means that doubling Q splits
every partition into two neighbouring ones.

On disk every key is stored under :func:`pkey`: its partition as two
big-endian bytes followed by the key. LMDB sorts keys bytewise, so all keys of
a partition are contiguous and ordered, which makes handoff and per-partition
Merkle trees a range scan.

Compatibility
-------------
The servers, the Python client (which routes each request to a replica of the
key) and the files on disk all depend on exactly these functions. Changing
:func:`key_hash`, :func:`partition_of` or the :func:`pkey` layout is a
breaking change of the wire and storage format: it needs a new major version
and a data migration, never a silent edit. The unit tests pin concrete
values so that such a change cannot slip through.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "HASH_BITS",
    "MAX_PARTITIONS",
    "check_partition_count",
    "key_hash",
    "partition_bits",
    "partition_of",
    "pkey",
    "split_pkey",
]

HASH_BITS = 64
"""Width of :func:`key_hash` in bits."""

MAX_PARTITIONS = 1 << 16
"""The largest partition count: a partition id must fit the two-byte pkey prefix."""

_PREFIX_BYTES = 2


def key_hash(key: bytes) -> int:
    """The 64-bit hash of ``key``: BLAKE2b with an 8-byte digest, read big-endian."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def check_partition_count(q: int) -> None:
    """Raise ValueError unless ``q`` is a power of two between 1 and :data:`MAX_PARTITIONS`."""
    if isinstance(q, bool) or not isinstance(q, int):
        raise ValueError(f"partition count must be an int, got {q!r}")
    if not 1 <= q <= MAX_PARTITIONS or q & (q - 1):
        raise ValueError(
            f"partition count must be a power of two between 1 and {MAX_PARTITIONS}, got {q}"
        )


def partition_bits(q: int) -> int:
    """``log2(q)``: how many top bits of the hash name a partition (ValueError if q is bad)."""
    check_partition_count(q)
    return q.bit_length() - 1


def partition_of(key: bytes, q: int) -> int:
    """The partition of ``key`` among ``q`` partitions: the top ``log2(q)`` bits of its hash."""
    shift = _SHIFTS.get(q) if type(q) is int else None  # True == 1 must not hit the cache
    if shift is None:  # a count is checked once, not per key
        shift = HASH_BITS - partition_bits(q)
        _SHIFTS[q] = shift
    return key_hash(key) >> shift


_SHIFTS: dict[int, int] = {}


def pkey(partition: int, key: bytes) -> bytes:
    """The storage key of ``key`` in ``partition``: 2-byte big-endian partition, then the key."""
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise ValueError(f"partition must be an int, got {partition!r}")
    if not 0 <= partition < MAX_PARTITIONS:
        raise ValueError(f"partition must be between 0 and {MAX_PARTITIONS - 1}, got {partition}")
    return partition.to_bytes(_PREFIX_BYTES, "big") + key


def split_pkey(pk: bytes) -> tuple[int, bytes]:
    """Inverse of :func:`pkey`: ``(partition, key)``. ValueError if ``pk`` has no prefix."""
    if len(pk) < _PREFIX_BYTES:
        raise ValueError(f"storage key too short for a partition prefix: {bytes(pk)!r}")
    return int.from_bytes(pk[:_PREFIX_BYTES], "big"), bytes(pk[_PREFIX_BYTES:])
