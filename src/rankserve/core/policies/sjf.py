from __future__ import annotations

from rankserve.core.policies.base import Policy
from rankserve.core.policies.work import check_length_exponent, check_prefill_weight, rank_value, remaining_work
from rankserve.core.request import Request


def _score(req: Request) -> float:
    if req.score is None:
        raise ValueError(f"request {req.request_id} has no prediction; set a predictor")
    return req.score


class SJF(Policy):
    """Shortest (predicted) job first, non-preemptive. Works on rank scores alone; with
    ``prefill_weight`` > 0 and a predictor that gives lengths, orders by predicted work instead
    (prefill tokens x ``prefill_weight`` + predicted output tokens) times the predicted length to
    the ``length_exponent`` (``core/policies/work.py``)."""

    name = "sjf"
    prefill_aware = True
    needs_prediction = True

    def __init__(self, prefill_weight: float = 0.0, length_exponent: float = 0.5) -> None:
        self.prefill_weight = check_prefill_weight(prefill_weight)
        self.length_exponent = check_length_exponent(length_exponent)

    def key(self, req: Request) -> tuple:
        score = _score(req)
        if self.prefill_weight and req.predicted_len is not None:
            work = remaining_work(req, req.predicted_len, self.prefill_weight)
            return (rank_value(work, req.predicted_len, self.length_exponent), req.arrival_time, req.seq)
        return (score, req.arrival_time, req.seq)

    def describe(self) -> str:
        return f"sjf (prefill weight {self.prefill_weight:g})" if self.prefill_weight else self.name
