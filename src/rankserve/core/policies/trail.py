from __future__ import annotations

from rankserve.core.policies.srpt import SRPT
from rankserve.core.request import Request


class TRAIL(SRPT):
    """SRPT with limited preemption (TRAIL, ICLR 2025).

    A running request may be displaced only while it has generated at most ``c`` times its initial
    predicted length: early its KV cache is small and preempting it is cheap; later it runs to the
    end. The displaced request is the preemptible one with the largest predicted remaining length,
    and only if that exceeds the newcomer's by more than ``margin`` tokens (remaining work, with
    ``prefill_weight``, as in SRPT).
    """

    name = "trail"

    def __init__(self, c: float = 0.8, margin: float = 0.0, prefill_weight: float = 0.0,
                 length_exponent: float = 0.5, patient: bool = False) -> None:
        if c < 0 or margin < 0:
            raise ValueError("trail needs c >= 0 and margin >= 0")
        super().__init__(prefill_weight, length_exponent, patient)
        self.c = c
        self.margin = margin

    def may_be_preempted(self, req: Request) -> bool:
        initial = req.initial_predicted_len
        return initial is not None and req.num_output_tokens <= self.c * initial

    def should_preempt(self, victim: Request, candidate: Request) -> bool:
        return self.work(victim) > self.work(candidate) + self.margin

    def describe(self) -> str:
        return f"trail (c={self.c:g}, margin={self.margin:g})"
