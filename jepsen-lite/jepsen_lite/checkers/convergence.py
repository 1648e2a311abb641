"""Convergence checker: after healing and anti-entropy, all replicas hold the same data.

Input: the final state of every replica, ``{replica: {key: [values...]}}``, where the
values of a key are its live sibling values (order does not matter). A key a replica
does not list is taken as holding no values (absent, or only tombstones).

A key *diverges* if two replicas hold different multisets of values for it. With
``expected_keys`` (e.g. every key the workload wrote), a key no replica holds still
counts as agreeing (all empty), but the result lists the keys missing everywhere.
With N replicas per key on a larger cluster, pass ``owners`` (key -> the replicas
that should hold it, e.g. its preference list): only those replicas are compared for
that key, and an owner missing from ``states`` is reported in ``unreported``. Without
``owners`` every replica is compared on every key.

``valid`` is ``False`` if any key diverges, ``"unknown"`` if nothing could be compared
(fewer than two replicas for every key, or an owner did not report), else ``True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_lite.history import Validity, sort_key

__all__ = ["ConvergenceResult", "Divergence", "check_convergence"]


@dataclass(frozen=True)
class Divergence:
    """A key whose replicas disagree: every replica's (sorted) values for it."""

    key: str
    values: dict[str, list[Any]]

    @property
    def groups(self) -> list[list[str]]:
        """Replicas grouped by identical contents."""
        by: dict[str, list[str]] = {}
        for replica, vals in self.values.items():
            by.setdefault(sort_key(vals), []).append(replica)
        return sorted(by.values())

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "values": self.values, "groups": self.groups}


@dataclass(frozen=True)
class ConvergenceResult:
    valid: Validity
    replica_count: int
    key_count: int
    divergent: list[Divergence] = field(default_factory=list)
    missing_everywhere: list[str] = field(default_factory=list)
    unreported: dict[str, list[str]] = field(default_factory=dict)  # key -> owners missing

    @property
    def divergent_keys(self) -> list[str]:
        return [d.key for d in self.divergent]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": "convergence",
            "valid": self.valid,
            "replica_count": self.replica_count,
            "key_count": self.key_count,
            "divergent_count": len(self.divergent),
            "divergent_keys": self.divergent_keys,
            "divergent": [d.to_dict() for d in self.divergent],
            "missing_everywhere": self.missing_everywhere,
            "unreported": self.unreported,
        }


def check_convergence(
    states: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    expected_keys: Iterable[str] | None = None,
    owners: Mapping[str, Sequence[str]] | None = None,
) -> ConvergenceResult:
    """Report the keys whose replicas disagree (see the module docstring)."""
    replicas = sorted(states)
    present: set[str] = set()
    for replica in replicas:
        present.update(states[replica])
    expected = set(expected_keys) if expected_keys is not None else set()
    if owners is not None:
        expected.update(owners)
    keys = sorted(present | expected)
    divergent: list[Divergence] = []
    unreported: dict[str, list[str]] = {}
    compared = owners is None and len(replicas) >= 2
    for key in keys:
        group = replicas
        if owners is not None and key in owners:
            group = sorted(r for r in set(owners[key]) if r in states)
            missing = sorted(set(owners[key]) - set(states))
            if missing:
                unreported[key] = missing
        values = {replica: sorted(states[replica].get(key, ()), key=sort_key) for replica in group}
        compared = compared or len(values) >= 2
        if len({sort_key(v) for v in values.values()}) > 1:
            divergent.append(Divergence(key, values))
    valid: Validity
    if divergent:
        valid = False
    elif unreported or not compared:
        valid = "unknown"
    else:
        valid = True
    return ConvergenceResult(
        valid=valid,
        replica_count=len(replicas),
        key_count=len(keys),
        divergent=divergent,
        missing_everywhere=sorted(expected - present),
        unreported=unreported,
    )
