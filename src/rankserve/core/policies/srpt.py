from __future__ import annotations

from rankserve.core.policies.base import Policy
from rankserve.core.policies.work import check_length_exponent, check_prefill_weight, prefill_left, rank_value
from rankserve.core.request import Request


def remaining(req: Request) -> float:
    """Predicted output tokens still to come; needs a predictor that gives lengths."""
    if req.predicted_len is None:
        raise ValueError(
            f"request {req.request_id} has no predicted length; this policy needs a length predictor"
        )
    return req.predicted_remaining


class SRPT(Policy):
    """Shortest (predicted) remaining processing time first, preemptive.

    The remaining estimate counts down as tokens are generated and follows refinements from
    per-step predictors. Preempted requests keep their KV cache while memory allows. With
    ``prefill_weight`` > 0 the prompt tokens still to prefill count too, each as that many decode
    steps, and the order is that work times the predicted length to the ``length_exponent``
    (``core/policies/work.py``); with 0 it is plain SRPT. ``patient``: see ``Policy.waits_for_a_slot``.
    """

    name = "srpt"
    prefill_aware = True
    needs_prediction = True
    preemptive = True
    needs_lengths = True

    def __init__(self, prefill_weight: float = 0.0, length_exponent: float = 0.5, patient: bool = False) -> None:
        self.prefill_weight = check_prefill_weight(prefill_weight)
        self.length_exponent = check_length_exponent(length_exponent)
        self.patient = patient

    def work(self, req: Request) -> float:
        """Predicted remaining work in decode steps."""
        return remaining(req) + self.prefill_weight * prefill_left(req)

    def key(self, req: Request) -> tuple:
        work = self.work(req)
        if self.prefill_weight:
            work = rank_value(work, req.predicted_len, self.length_exponent)
        return (work, req.arrival_time, req.seq)

    def describe(self) -> str:
        return f"srpt (prefill weight {self.prefill_weight:g})" if self.prefill_weight else self.name
