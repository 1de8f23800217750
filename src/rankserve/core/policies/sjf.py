from __future__ import annotations

from rankserve.core.policies.base import Policy
from rankserve.core.request import Request


def _score(req: Request) -> float:
    if req.score is None:
        raise ValueError(f"request {req.request_id} has no prediction; set a predictor")
    return req.score


class SJF(Policy):
    """Shortest (predicted) job first, non-preemptive. Works on rank scores alone."""

    name = "sjf"
    needs_prediction = True

    def key(self, req: Request) -> tuple:
        return (_score(req), req.arrival_time, req.seq)
