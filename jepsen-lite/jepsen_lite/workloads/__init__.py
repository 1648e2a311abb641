"""Workloads: what the client workers do and how their history is checked.

- ``set``: read-modify-write adds to a few shared sets (:mod:`.set_workload`);
- ``register``: multi-writer registers with siblings (:mod:`.register`);
- ``lin-register``: single-writer registers checked for linearizability
  (:mod:`.lin_register`).
"""

from __future__ import annotations

from jepsen_lite.errors import HarnessError
from jepsen_lite.workloads.base import CheckOutcome, Workload, WorkloadOptions
from jepsen_lite.workloads.lin_register import LinRegisterWorkload
from jepsen_lite.workloads.register import RegisterWorkload
from jepsen_lite.workloads.set_workload import SetWorkload

__all__ = ["WORKLOADS", "CheckOutcome", "Workload", "WorkloadOptions", "workload_class"]

WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (SetWorkload, RegisterWorkload, LinRegisterWorkload)
}


def workload_class(name: str) -> type[Workload]:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise HarnessError(
            f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})"
        ) from None
