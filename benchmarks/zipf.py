"""YCSB's key choosers: zipfian, scrambled zipfian and uniform, seeded.

These are ports of YCSB's ``ZipfianGenerator`` (Gray et al., "Quickly
Generating Billion-Record Synthetic Databases", SIGMOD 1994) and
``ScrambledZipfianGenerator``, the default request distribution of the core
workloads. The scrambled variant draws a zipfian rank over 10^10 items with
the precomputed zeta constant and hashes it (FNV-1a 64) onto the record
space, so the popular keys are scattered over the key space rather than being
the first few records. Every generator takes an explicit ``random.Random``:
the same seed gives the same key sequence.
"""

from __future__ import annotations

import random
from typing import Protocol

FNV_OFFSET_BASIS_64 = 0xCBF29CE484222325
FNV_PRIME_64 = 1099511628211
_MASK64 = (1 << 64) - 1

#: YCSB's constants for ScrambledZipfianGenerator.
ZIPFIAN_CONSTANT = 0.99
SCRAMBLED_ITEM_COUNT = 10_000_000_000
SCRAMBLED_ZETAN = 26.46902820178302


def fnv1a64(data: bytes) -> int:
    """Plain 64-bit FNV-1a of ``data`` (unsigned)."""
    h = FNV_OFFSET_BASIS_64
    for octet in data:
        h = ((h ^ octet) * FNV_PRIME_64) & _MASK64
    return h


def fnvhash64(value: int) -> int:
    """YCSB's ``Utils.fnvhash64``: FNV-1a over the 8 low-order bytes, then Java's ``Math.abs``.

    ``value`` must be non-negative (YCSB only hashes item numbers).
    """
    if value < 0:
        raise ValueError("fnvhash64 hashes non-negative item numbers")
    h = fnv1a64((value & _MASK64).to_bytes(8, "little"))
    # Java's Math.abs on the signed long (Long.MIN_VALUE stays 2**63 here, not negative).
    return h if h < 1 << 63 else (1 << 64) - h


def zeta(n: int, theta: float) -> float:
    """sum_{i=1..n} 1 / i**theta (O(n); only for modest n)."""
    return float(sum(1.0 / (i**theta) for i in range(1, n + 1)))


def key_name(record: int) -> bytes:
    """YCSB's key for record number ``record`` (``insertorder=hashed``): ``user<fnvhash64>``."""
    return b"user%d" % fnvhash64(record)


class KeyChooser(Protocol):
    """Chooses record numbers in ``0 .. records-1``."""

    records: int

    def next(self) -> int: ...


class ZipfianGenerator:
    """Zipfian over ``lo..hi`` inclusive: ``lo`` is the most popular item."""

    def __init__(
        self,
        lo: int,
        hi: int,
        rng: random.Random,
        theta: float = ZIPFIAN_CONSTANT,
        zetan: float | None = None,
    ) -> None:
        if hi < lo:
            raise ValueError(f"empty range {lo}..{hi}")
        if not 0 < theta < 1:
            raise ValueError(f"theta must be in (0, 1), got {theta}")
        self.base = lo
        self.items = hi - lo + 1
        self.theta = theta
        self.rng = rng
        self.alpha = 1.0 / (1.0 - theta)
        self.zetan = zetan if zetan is not None else zeta(self.items, theta)
        zeta2theta = zeta(2, theta)
        self.eta = (1 - (2.0 / self.items) ** (1 - theta)) / (1 - zeta2theta / self.zetan)
        self._second = 1.0 + 0.5**theta

    def next(self) -> int:
        u = self.rng.random()
        uz = u * self.zetan
        if uz < 1.0:
            return self.base
        if uz < self._second:
            return self.base + 1
        return self.base + int(self.items * (self.eta * u - self.eta + 1) ** self.alpha)


class ScrambledZipfian:
    """YCSB's default chooser: a zipfian rank over 10^10 items hashed onto ``records``."""

    def __init__(self, records: int, rng: random.Random) -> None:
        if records < 1:
            raise ValueError("records must be positive")
        self.records = records
        self._gen = ZipfianGenerator(
            0, SCRAMBLED_ITEM_COUNT, rng, ZIPFIAN_CONSTANT, zetan=SCRAMBLED_ZETAN
        )

    def next(self) -> int:
        return fnvhash64(self._gen.next()) % self.records


class Uniform:
    """Every record equally likely."""

    def __init__(self, records: int, rng: random.Random) -> None:
        if records < 1:
            raise ValueError("records must be positive")
        self.records = records
        self.rng = rng

    def next(self) -> int:
        return self.rng.randrange(self.records)


DISTRIBUTIONS = ("zipfian", "uniform")


def chooser(distribution: str, records: int, rng: random.Random) -> KeyChooser:
    if distribution == "zipfian":
        return ScrambledZipfian(records, rng)
    if distribution == "uniform":
        return Uniform(records, rng)
    raise ValueError(f"unknown distribution {distribution!r} (choose from {DISTRIBUTIONS})")
