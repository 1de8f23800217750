"""Scheduling policies by name."""

from __future__ import annotations

from typing import Any

from rankserve.core.policies.base import Policy
from rankserve.core.policies.fcfs import FCFS
from rankserve.core.policies.ltr import LearningToRank
from rankserve.core.policies.mlfq import MLFQ
from rankserve.core.policies.priority import Priority
from rankserve.core.policies.sjf import SJF
from rankserve.core.policies.srpt import SRPT
from rankserve.core.policies.trail import TRAIL

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FCFS, Priority, SJF, SRPT, LearningToRank, TRAIL, MLFQ)
}
POLICY_NAMES = tuple(POLICIES)


def make_policy(name: str, **params: Any) -> Policy:
    """Build a policy by name; ``params`` go to its constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy '{name}' (choose from {', '.join(POLICY_NAMES)})") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for policy '{name}': {exc}") from None


__all__ = ["POLICIES", "POLICY_NAMES", "Policy", "make_policy"] + [c.__name__ for c in POLICIES.values()]
