from __future__ import annotations

from rankserve.core.policies.base import Policy
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
    per-step predictors. Preempted requests keep their KV cache while memory allows.
    """

    name = "srpt"
    needs_prediction = True
    preemptive = True
    needs_lengths = True

    def key(self, req: Request) -> tuple:
        return (remaining(req), req.arrival_time, req.seq)
