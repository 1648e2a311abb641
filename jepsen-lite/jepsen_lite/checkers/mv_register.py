"""A sequential model of a multi-value register with causal contexts, for the
linearizability checker.

kvcluster has no compare-and-set: a write names, through the causal context of an
earlier read, the versions it replaces, and concurrent writes stay as siblings.
The sequential specification that fits is a register whose state is the *set* of
live values:

- ``read`` returns the state (the ``ok`` value is the list of sibling values;
  order and duplicates do not matter);
- ``write v`` with ``extra["seen"] = S`` (the values of the read whose context it
  passed) replaces the values of ``S`` by ``v``: ``state := (state - S) | {v}``. A write
  without ``seen`` replaces nothing (``state | {v}``).

A write whose context covered exactly the versions its read returned has exactly
this effect on the set of live values, whatever happened in between (values
written after that read are not in ``S`` and stay), so the model is faithful to the
store's semantics. Which histories of the store can be expected to be linearizable
with respect to it is a separate question: see :mod:`jepsen_lite.workloads.lin_register`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, cast

from jepsen_lite.checkers.linearizable import UNKNOWN, Model
from jepsen_lite.checkers.register import SEEN
from jepsen_lite.history import Op, freeze, sort_key, thaw

__all__ = ["MultiValueRegisterModel"]

State = frozenset[Hashable]


class MultiValueRegisterModel(Model[State]):
    name = "multi-value-register"

    def init(self) -> State:
        return frozenset()

    def input(self, invoke: Op) -> Hashable:
        if invoke.f in ("read", "get"):
            return ("read", None)
        if invoke.f in ("write", "put"):
            seen = invoke.extra.get(SEEN) or []
            if not isinstance(seen, list | tuple):
                raise ValueError(f"extra[{SEEN!r}] must be a list in {invoke}")
            return ("write", (freeze(invoke.value), frozenset(freeze(s) for s in seen)))
        raise ValueError(f"{self.name}: unsupported operation {invoke.f!r} in {invoke}")

    def output(self, completion: Op) -> Any:
        if completion.f not in ("read", "get"):
            return None
        value = completion.value
        if value is None:
            return frozenset()
        if not isinstance(value, list | tuple):
            raise ValueError(f"a read must return a list of siblings, got {completion}")
        return frozenset(freeze(v) for v in value)

    def is_read_only(self, inp: Hashable) -> bool:
        return cast("tuple[str, Any]", inp)[0] == "read"

    def step(self, state: State, inp: Hashable, output: Any) -> tuple[bool, State]:
        f, arg = cast("tuple[str, Any]", inp)
        if f == "read":
            return (output is UNKNOWN or output == state), state
        value, seen = arg
        return True, (state - seen) | {value}

    def state_to_json(self, state: State) -> Any:
        return sorted((thaw(v) for v in state), key=sort_key)
