"""Merkle trees for anti-entropy: one per partition, updated incrementally.

Shape
-----
A partition's keys are spread over ``S`` *segments* (default 1024, a power of
two) by the low bits of their 64-bit ring hash (:func:`segment_of`; the ring
uses the top bits for the partition, so the two are independent). The tree's
leaves are the segment hashes; above them sit inner levels with fan-out ``F``
(default 32), computed on demand: 1024 segments -> 32 nodes -> 1 root.
``levels[0]`` is ``[root]`` and ``levels[-1]`` the segment hashes. Every hash
is a 128-bit unsigned int (16 bytes big-endian on disk and on the wire).

Segments: XOR of leaf hashes
----------------------------
A key's leaf hash is ``leaf_hash(key, value)``, a seeded 128-bit XXH3 of the
length-prefixed key followed by the value bytes (every write hashes two leaves
on every replica: XXH3 does a 1 KiB record in a sixth of BLAKE2b's time, and a
non-cryptographic hash is all the XOR below can use anyway). A segment's hash
is the XOR of the leaf hashes of the keys in it (0 when it is empty). XOR
makes a write O(1) without reading any other key: :func:`segment_after` XORs
out the old leaf and XORs in the new one. That is sound because a segment
holds each key at most once - it is a *set* of ``(key, value)`` pairs, not a
multiset - and XOR is commutative, associative and its own inverse: the
segment hash is a function of the current set only, whatever the order of the
inserts, overwrites and deletes that produced it, and equals a rebuild from
the data (:func:`rebuild_segments`).

Limits. (1) The caller must pass the *exact* old value: a wrong or missing
old value leaves a stale leaf XORed in forever (a write applied twice as an
insert cancels itself out), and only a rebuild repairs that - which is why a
store must update data and segment in one transaction, and why rebuilding a
tree from data is the recovery path. (2) XOR is linear: it detects accidental
divergence (two different sets collide with probability about 2**-128) but is
not collision resistant against someone who chooses keys and values to make
leaves cancel (Wagner's generalised birthday attack); anti-entropy guards
against lost messages and crashes, not against Byzantine replicas.

Inner nodes: hash of the children
---------------------------------
An inner node is a BLAKE2b of its children's 16-byte hashes in order (not
their XOR), so the root commits to every segment hash *at its position*, and
a difference shows up along exactly the path to the segment that differs.
Both sides of an exchange must use the same ``segments`` and ``fanout``.

Exchange
--------
:class:`Exchange` is a sans-I/O state machine (in the style of h11 and
etcd's raft): it holds the local segment hashes, asks for what it needs via
:attr:`Exchange.request` and is fed the answers by the caller. It compares
the roots, then asks only for the children of inner nodes that differ, level
by level, then for the ``(key, leaf hash)`` entries of the differing segments
on both sides, and ends with the exact keys that differ (:class:`Diff`). Two
identical trees cost exactly one request (the root) and no key is read.

Writes that land while an exchange runs can make its result stale (a key
reported that has since converged, or one missed); anti-entropy is periodic,
so the next round catches them. Merging is idempotent, so extra keys are
harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import xxhash

from kvcluster.core.hashing import key_hash as ring_key_hash

__all__ = [
    "DEFAULT_FANOUT",
    "DEFAULT_SEGMENTS",
    "HASH_BYTES",
    "Diff",
    "Exchange",
    "ExchangeError",
    "ExchangeStats",
    "KeyHash",
    "NeedLevel",
    "NeedLocalSegments",
    "NeedSegments",
    "Request",
    "Tree",
    "build_levels",
    "diff_trees_locally",
    "inner_hash",
    "leaf_hash",
    "level_hashes",
    "level_sizes",
    "rebuild_segments",
    "replace_leaf",
    "segment_after",
    "segment_of",
]

DEFAULT_SEGMENTS = 1024
DEFAULT_FANOUT = 32
HASH_BYTES = 16
_HASH_LIMIT = 1 << (8 * HASH_BYTES)
_KEY_HASH_LIMIT = 1 << 64
_LEAF_SEED = int.from_bytes(b"kvc.leaf", "big")  # apart from any unseeded XXH3 use
_NODE_PERSON = b"kvc.merkle.node"

#: A key's 64-bit ring hash (``kvcluster.core.hashing.key_hash``).
KeyHash: TypeAlias = Callable[[bytes], int]


# -- hashes ------------------------------------------------------------------------------


def _check_shape(segments: int, fanout: int) -> None:
    if segments < 1 or segments & (segments - 1):
        raise ValueError(f"segments: {segments} is not a power of two")
    if fanout < 2:
        raise ValueError(f"fanout: {fanout} must be at least 2")


def segment_of(key_hash_value: int, segments: int = DEFAULT_SEGMENTS) -> int:
    """The segment of a key, from the LOW bits of its 64-bit ring hash."""
    if segments < 1 or segments & (segments - 1):
        raise ValueError(f"segments: {segments} is not a power of two")
    if not 0 <= key_hash_value < _KEY_HASH_LIMIT:
        raise ValueError(f"key hash {key_hash_value} is not a 64-bit unsigned int")
    return key_hash_value & (segments - 1)


def leaf_hash(key: bytes, value: bytes) -> int:
    """128-bit hash of one ``(key, value)`` pair.

    The key is length-prefixed, so no two different pairs hash the same input
    (``(b"ab", b"c")`` vs ``(b"a", b"bc")``).
    """
    return xxhash.xxh3_128_intdigest(len(key).to_bytes(4, "big") + key + value, _LEAF_SEED)


def segment_after(
    old_segment_hash: int, key: bytes, old_value: bytes | None, new_value: bytes | None
) -> int:
    """A segment's hash after ``key`` changed from ``old_value`` to ``new_value``.

    ``None`` means absent: ``(None, v)`` inserts, ``(v, w)`` overwrites,
    ``(v, None)`` deletes. ``old_value`` must be exactly what the segment
    holds for ``key`` (see the module docstring).
    """
    if not 0 <= old_segment_hash < _HASH_LIMIT:
        raise ValueError(f"segment hash {old_segment_hash} is not a 128-bit unsigned int")
    if old_value == new_value:
        return old_segment_hash
    return replace_leaf(
        old_segment_hash,
        None if old_value is None else leaf_hash(key, old_value),
        None if new_value is None else leaf_hash(key, new_value),
    )


def replace_leaf(segment_hash: int, old_leaf: int | None, new_leaf: int | None) -> int:
    """:func:`segment_after` for a caller that already holds the leaf hashes
    (``None`` for absent), e.g. a store that compared one of them first."""
    if old_leaf is not None:
        segment_hash ^= old_leaf
    if new_leaf is not None:
        segment_hash ^= new_leaf
    return segment_hash


def rebuild_segments(
    entries: Iterable[tuple[int, bytes, bytes]], segments: int = DEFAULT_SEGMENTS
) -> list[int]:
    """Segment hashes from scratch, from ``(segment, key, value)`` of every key.

    The recovery path (and a check of the incremental one): for the same data
    it gives exactly what any sequence of :func:`segment_after` calls gives.
    Each key must occur once.
    """
    if segments < 1 or segments & (segments - 1):
        raise ValueError(f"segments: {segments} is not a power of two")
    hashes = [0] * segments
    for segment, key, value in entries:
        if not 0 <= segment < segments:
            raise ValueError(f"segment {segment} is outside 0..{segments - 1}")
        hashes[segment] ^= leaf_hash(key, value)
    return hashes


def inner_hash(children: Sequence[int]) -> int:
    """Hash of an inner node: BLAKE2b over its children's hashes, in order."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=_NODE_PERSON)
    for child in children:
        h.update(child.to_bytes(HASH_BYTES, "big"))
    return int.from_bytes(h.digest(), "big")


def level_sizes(segments: int = DEFAULT_SEGMENTS, fanout: int = DEFAULT_FANOUT) -> list[int]:
    """Number of nodes per level, root first: ``[1, 32, 1024]`` for the defaults."""
    _check_shape(segments, fanout)
    sizes = [segments]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // fanout))
    return sizes[::-1]


def build_levels(segment_hashes: Sequence[int], fanout: int = DEFAULT_FANOUT) -> list[list[int]]:
    """Every level of the tree, root first; the last level is ``segment_hashes``.

    Node ``i`` of level ``l`` has the children ``i*F .. i*F+F-1`` of level
    ``l + 1`` (fewer at the end of a level). One segment is its own root.
    """
    _check_shape(len(segment_hashes), fanout)
    for h in segment_hashes:
        if not 0 <= h < _HASH_LIMIT:
            raise ValueError(f"segment hash {h} is not a 128-bit unsigned int")
    levels = [list(segment_hashes)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([inner_hash(below[i : i + fanout]) for i in range(0, len(below), fanout)])
    return levels[::-1]


def level_hashes(levels: Sequence[Sequence[int]], level: int, indices: Sequence[int]) -> list[int]:
    """The hashes a tree answers to ``NeedLevel(level, indices)``, in that order."""
    if not 0 <= level < len(levels):
        raise ValueError(f"level {level} is outside 0..{len(levels) - 1}")
    row = levels[level]
    out = []
    for i in indices:
        if not 0 <= i < len(row):
            raise ValueError(f"index {i} is outside level {level} (size {len(row)})")
        out.append(row[i])
    return out


# -- exchange ------------------------------------------------------------------------------


class ExchangeError(ValueError):
    """An answer that does not fit the pending request; the exchange is unchanged."""


@dataclass(frozen=True, slots=True)
class NeedLevel:
    """Send the remote's hashes of nodes ``indices`` of ``level`` (0 = root), in order."""

    level: int
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NeedSegments:
    """Send the remote's ``(key, leaf hash)`` of every key in these segments."""

    segment_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NeedLocalSegments:
    """Read the local ``(key, leaf hash)`` of every key in these segments."""

    segment_ids: tuple[int, ...]


Request: TypeAlias = NeedLevel | NeedSegments | NeedLocalSegments


@dataclass(frozen=True, slots=True)
class ExchangeStats:
    """What an exchange cost.

    ``remote_requests`` are round trips to the peer; ``hashes_received`` and
    ``keys_received`` what came back; ``bytes_received`` estimates the payload
    independently of any wire format (16 bytes per hash, key length + 16 per
    key entry). ``local_keys_read`` counts entries read from the local side.
    """

    remote_requests: int = 0
    hashes_received: int = 0
    keys_received: int = 0
    bytes_received: int = 0
    local_requests: int = 0
    local_keys_read: int = 0


@dataclass(frozen=True, slots=True)
class Diff:
    """The keys on which two trees differ, each tuple sorted."""

    missing_locally: tuple[bytes, ...]  # only the remote has them
    missing_remotely: tuple[bytes, ...]  # only the local side has them
    different: tuple[bytes, ...]  # both have them, with different values
    segments: tuple[int, ...]  # the segments whose hashes differed
    stats: ExchangeStats

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every differing key, sorted."""
        return tuple(sorted((*self.missing_locally, *self.missing_remotely, *self.different)))

    def __bool__(self) -> bool:
        return bool(self.missing_locally or self.missing_remotely or self.different)


def _entries(raw: Iterable[tuple[bytes, int]], what: str) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for key, h in raw:
        if not isinstance(key, bytes):
            raise ExchangeError(f"{what}: key {key!r} is not bytes")
        if not (isinstance(h, int) and 0 <= h < _HASH_LIMIT):
            raise ExchangeError(f"{what}: leaf hash of {key!r} is not a 128-bit unsigned int")
        if key in out:
            raise ExchangeError(f"{what}: key {key!r} appears twice")
        out[key] = h
    return out


class Exchange:
    """Finds the keys on which a local tree and a remote one differ.

    Drive it like this (``peer`` and ``store`` are the caller's I/O)::

        ex = Exchange(local_segment_hashes)
        while (req := ex.request) is not None:
            if isinstance(req, NeedLevel):
                ex.answer_level(await peer.level(req.level, req.indices))
            elif isinstance(req, NeedSegments):
                ex.answer_segments(await peer.segment_entries(req.segment_ids))
            else:
                ex.answer_local_segments(await store.segment_entries(req.segment_ids))
        diff = ex.result()

    A wrong answer (wrong length, a hash out of range, a duplicated key, the
    answer to another request) raises :class:`ExchangeError` and changes
    nothing, so the caller can retry or abort.
    """

    __slots__ = (
        "_depth",
        "_diff",
        "_fanout",
        "_levels",
        "_remote_entries",
        "_request",
        "_stats",
    )

    def __init__(self, local_segments: Sequence[int], *, fanout: int = DEFAULT_FANOUT) -> None:
        self._levels = build_levels(local_segments, fanout)
        self._fanout = fanout
        self._depth = len(self._levels) - 1
        self._stats = ExchangeStats()
        self._remote_entries: dict[bytes, int] = {}
        self._diff: Diff | None = None
        self._request: Request | None = NeedLevel(0, (0,))

    @property
    def request(self) -> Request | None:
        """What the exchange needs next; ``None`` once it is done."""
        return self._request

    @property
    def done(self) -> bool:
        return self._request is None

    @property
    def stats(self) -> ExchangeStats:
        return self._stats

    @property
    def segments(self) -> int:
        return len(self._levels[-1])

    @property
    def fanout(self) -> int:
        return self._fanout

    def result(self) -> Diff:
        if self._diff is None:
            raise ExchangeError(f"the exchange is not done: it waits for {self._request}")
        return self._diff

    def _expect(self, kind: type[NeedLevel] | type[NeedSegments] | type[NeedLocalSegments]) -> None:
        if not isinstance(self._request, kind):
            raise ExchangeError(f"got an answer to {kind.__name__}, but pending is {self._request}")

    def answer_level(self, hashes: Sequence[int]) -> None:
        """The remote's hashes for the pending :class:`NeedLevel`, in its order."""
        self._expect(NeedLevel)
        req = cast(NeedLevel, self._request)
        if len(hashes) != len(req.indices):
            raise ExchangeError(f"expected {len(req.indices)} hashes, got {len(hashes)}")
        for h in hashes:
            if not (isinstance(h, int) and 0 <= h < _HASH_LIMIT):
                raise ExchangeError(f"hash {h!r} is not a 128-bit unsigned int")
        s = self._stats
        self._stats = ExchangeStats(
            s.remote_requests + 1,
            s.hashes_received + len(hashes),
            s.keys_received,
            s.bytes_received + HASH_BYTES * len(hashes),
            s.local_requests,
            s.local_keys_read,
        )
        mine = self._levels[req.level]
        differing = [i for i, h in zip(req.indices, hashes, strict=True) if mine[i] != h]
        if not differing:
            self._finish(())
        elif req.level == self._depth:
            self._request = NeedSegments(tuple(differing))
        else:
            below = len(self._levels[req.level + 1])
            f = self._fanout
            children = tuple(c for i in differing for c in range(i * f, min(i * f + f, below)))
            self._request = NeedLevel(req.level + 1, children)

    def answer_segments(self, entries: Iterable[tuple[bytes, int]]) -> None:
        """The remote's ``(key, leaf hash)`` pairs for the pending :class:`NeedSegments`."""
        self._expect(NeedSegments)
        req = cast(NeedSegments, self._request)
        remote = _entries(entries, "remote segments")
        s = self._stats
        self._stats = ExchangeStats(
            s.remote_requests + 1,
            s.hashes_received,
            s.keys_received + len(remote),
            s.bytes_received + sum(len(k) + HASH_BYTES for k in remote),
            s.local_requests,
            s.local_keys_read,
        )
        self._remote_entries = remote
        self._request = NeedLocalSegments(req.segment_ids)

    def answer_local_segments(self, entries: Iterable[tuple[bytes, int]]) -> None:
        """The local ``(key, leaf hash)`` pairs for the pending :class:`NeedLocalSegments`."""
        self._expect(NeedLocalSegments)
        req = cast(NeedLocalSegments, self._request)
        local = _entries(entries, "local segments")
        s = self._stats
        self._stats = ExchangeStats(
            s.remote_requests,
            s.hashes_received,
            s.keys_received,
            s.bytes_received,
            s.local_requests + 1,
            s.local_keys_read + len(local),
        )
        remote = self._remote_entries
        self._remote_entries = {}
        self._diff = Diff(
            missing_locally=tuple(sorted(remote.keys() - local.keys())),
            missing_remotely=tuple(sorted(local.keys() - remote.keys())),
            different=tuple(
                sorted(k for k in local.keys() & remote.keys() if local[k] != remote[k])
            ),
            segments=req.segment_ids,
            stats=self._stats,
        )
        self._request = None

    def _finish(self, segments: tuple[int, ...]) -> None:
        self._diff = Diff((), (), (), segments, self._stats)
        self._request = None


# -- an in-memory tree (tests, reference, simulator) ------------------------------------------


class Tree:
    """An in-memory key -> value map with its Merkle tree kept up to date.

    ``key_hash`` maps a key to its 64-bit ring hash (default:
    ``kvcluster.core.hashing.key_hash``); tests may pass their own to force
    keys into chosen segments.
    """

    __slots__ = ("_buckets", "_data", "_fanout", "_hashes", "_key_hash", "_levels", "_segments")

    def __init__(
        self,
        data: Mapping[bytes, bytes] | None = None,
        *,
        segments: int = DEFAULT_SEGMENTS,
        fanout: int = DEFAULT_FANOUT,
        key_hash: KeyHash = ring_key_hash,
    ) -> None:
        _check_shape(segments, fanout)
        self._segments = segments
        self._fanout = fanout
        self._key_hash = key_hash
        self._data: dict[bytes, bytes] = dict(data or {})
        self._hashes: list[int] = [0] * segments
        self._buckets: list[dict[bytes, int]] = [{} for _ in range(segments)]
        self._levels: list[list[int]] | None = None
        self.rebuild()

    # -- data --

    def segment_for(self, key: bytes) -> int:
        return segment_of(self._key_hash(key), self._segments)

    def put(self, key: bytes, value: bytes) -> None:
        self._update(key, value)

    def delete(self, key: bytes) -> None:
        """Remove ``key``; absent keys are ignored."""
        self._update(key, None)

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def data(self) -> dict[bytes, bytes]:
        return dict(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def _update(self, key: bytes, value: bytes | None) -> None:
        old = self._data.get(key)
        if old == value:
            return
        seg = self.segment_for(key)
        self._hashes[seg] = segment_after(self._hashes[seg], key, old, value)
        if value is None:
            del self._data[key]
            del self._buckets[seg][key]
        else:
            self._data[key] = value
            self._buckets[seg][key] = leaf_hash(key, value)
        self._levels = None

    def rebuild(self) -> None:
        """Recompute every segment hash from the data (the recovery path)."""
        buckets: list[dict[bytes, int]] = [{} for _ in range(self._segments)]
        entries = []
        for key, value in self._data.items():
            seg = self.segment_for(key)
            buckets[seg][key] = leaf_hash(key, value)
            entries.append((seg, key, value))
        self._hashes = rebuild_segments(entries, self._segments)
        self._buckets = buckets
        self._levels = None

    # -- tree --

    @property
    def segments(self) -> int:
        return self._segments

    @property
    def fanout(self) -> int:
        return self._fanout

    def segment_hashes(self) -> list[int]:
        return list(self._hashes)

    def levels(self) -> list[list[int]]:
        if self._levels is None:
            self._levels = build_levels(self._hashes, self._fanout)
        return self._levels

    def root(self) -> int:
        return self.levels()[0][0]

    def level(self, level: int, indices: Sequence[int]) -> list[int]:
        """Answer a :class:`NeedLevel`."""
        return level_hashes(self.levels(), level, indices)

    def segment_entries(self, segment_ids: Iterable[int]) -> list[tuple[bytes, int]]:
        """Answer a :class:`NeedSegments`: ``(key, leaf hash)`` sorted by key."""
        out: list[tuple[bytes, int]] = []
        for seg in segment_ids:
            if not 0 <= seg < self._segments:
                raise ValueError(f"segment {seg} is outside 0..{self._segments - 1}")
            out.extend(self._buckets[seg].items())
        return sorted(out)


def diff_trees_locally(local: Tree, remote: Tree) -> Diff:
    """Run an :class:`Exchange` between two in-memory trees (tests, reference)."""
    if (local.segments, local.fanout) != (remote.segments, remote.fanout):
        raise ValueError("the trees have different shapes (segments, fanout)")
    ex = Exchange(local.segment_hashes(), fanout=local.fanout)
    while (req := ex.request) is not None:
        if isinstance(req, NeedLevel):
            ex.answer_level(remote.level(req.level, req.indices))
        elif isinstance(req, NeedSegments):
            ex.answer_segments(remote.segment_entries(req.segment_ids))
        else:
            ex.answer_local_segments(local.segment_entries(req.segment_ids))
    return ex.result()
