from __future__ import annotations

import math
from collections.abc import Callable

from rankserve.core.policies.base import Policy
from rankserve.core.request import Request


class MLFQ(Policy):
    """FastServe's skip-join multi-level feedback queue, with no length predictor.

    Level i has quantum ``base_quantum_s * ratio**i`` of attained service (time in the batch).
    A new request skips the levels whose quantum is shorter than its estimated prefill time
    (skip-join), so long prompts do not start at the top only to be demoted at once. A request
    moves down a level when its attained service passes the level's quantum; higher levels run
    first, FCFS within a level, and a request of a higher level displaces a lower one.
    """

    name = "mlfq"
    preemptive = True

    def __init__(
        self,
        base_quantum_s: float = 0.02,
        ratio: float = 2.0,
        num_levels: int = 16,
        prefill_time_estimate: Callable[[int], float] | None = None,
    ) -> None:
        if base_quantum_s <= 0 or ratio <= 1 or num_levels < 1:
            raise ValueError("mlfq needs base_quantum_s > 0, ratio > 1, num_levels >= 1")
        self.base_quantum_s = base_quantum_s
        self.ratio = ratio
        self.num_levels = num_levels
        self.prefill_time_estimate = prefill_time_estimate
        self._level: dict[int, int] = {}
        self._attained: dict[int, float] = {}
        self._step_start = 0.0

    def level_for(self, service_s: float) -> int:
        """The level whose quantum covers ``service_s`` of service (skip-join uses the same rule)."""
        if service_s < self.base_quantum_s:
            return 0
        level = int(math.log(service_s / self.base_quantum_s, self.ratio)) + 1
        return min(level, self.num_levels - 1)

    def key(self, req: Request) -> tuple:
        level = self._level.get(req.seq)
        if level is None:
            estimate = self.prefill_time_estimate(req.prompt_len) if self.prefill_time_estimate else 0.0
            level = self._level[req.seq] = self.level_for(estimate)
        return (level, req.arrival_time, req.seq)

    def begin_step(self, step: int, now: float) -> tuple:
        self._step_start = now
        return ()

    def end_step(self, scheduled: list[Request], step: int, now: float) -> None:
        elapsed = now - self._step_start
        for req in scheduled:
            attained = self._attained.get(req.seq, 0.0) + elapsed
            self._attained[req.seq] = attained
            level = self.level_for(attained)
            if level > self._level.get(req.seq, 0):
                self._level[req.seq] = level

    def on_finish(self, req: Request) -> None:
        self._level.pop(req.seq, None)
        self._attained.pop(req.seq, None)

    def describe(self) -> str:
        return f"mlfq (quantum {self.base_quantum_s * 1000:g} ms x{self.ratio:g})"
