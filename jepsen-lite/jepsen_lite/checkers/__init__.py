"""The checkers of jepsen-lite. Each returns a result dataclass with ``valid``
(``True`` / ``False`` / ``"unknown"``), counts and anomalies, and ``to_dict()``."""

from __future__ import annotations

from jepsen_lite.checkers.convergence import ConvergenceResult, Divergence, check_convergence
from jepsen_lite.checkers.linearizable import (
    UNKNOWN,
    CASRegisterModel,
    Counterexample,
    KeyResult,
    KVRegisterModel,
    LinearizabilityResult,
    LinearizedOp,
    Model,
    check_linearizable,
    check_pairs,
)
from jepsen_lite.checkers.mv_register import MultiValueRegisterModel
from jepsen_lite.checkers.register import (
    FINAL,
    SEEN,
    CausalGraph,
    RegisterAnomaly,
    RegisterResult,
    check_register,
)
from jepsen_lite.checkers.session import SessionResult, SessionViolation, check_session
from jepsen_lite.checkers.set_checker import SetAnomaly, SetResult, check_set

__all__ = [
    "FINAL",
    "SEEN",
    "UNKNOWN",
    "CASRegisterModel",
    "CausalGraph",
    "ConvergenceResult",
    "Counterexample",
    "Divergence",
    "KVRegisterModel",
    "KeyResult",
    "LinearizabilityResult",
    "LinearizedOp",
    "Model",
    "MultiValueRegisterModel",
    "RegisterAnomaly",
    "RegisterResult",
    "SessionResult",
    "SessionViolation",
    "SetAnomaly",
    "SetResult",
    "check_convergence",
    "check_linearizable",
    "check_pairs",
    "check_register",
    "check_session",
    "check_set",
]
