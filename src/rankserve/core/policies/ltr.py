from __future__ import annotations

import heapq
from collections.abc import Iterable

from rankserve.core.policies.base import Policy
from rankserve.core.policies.sjf import _score
from rankserve.core.request import Request


class LearningToRank(Policy):
    """Algorithm 1 of "Efficient LLM Scheduling by Learning to Rank" (NeurIPS 2024).

    Every step, queued and running requests compete by rank score (lower = predicted shorter);
    a queued request displaces a lower-ranked running one (which pauses, keeping its KV cache).
    Starvation prevention: a request not run for ``starvation_threshold`` steps is boosted to the
    front until it has run ``boost_quantum`` steps that produced a token, then drops back to its score.
    """

    name = "ltr"
    needs_prediction = True
    preemptive = True

    def __init__(
        self,
        starvation_threshold: int = 200,
        boost_quantum: int = 10,
        starvation_prevention: bool = True,
    ) -> None:
        if starvation_threshold < 1 or boost_quantum < 1:
            raise ValueError("starvation_threshold and boost_quantum must be >= 1")
        self.starvation_threshold = starvation_threshold
        self.boost_quantum = boost_quantum
        self.starvation_prevention = starvation_prevention
        self._boosted: dict[int, list] = {}  # seq -> [request, boost steps left]
        # Queued requests by the step they last ran: the oldest reach the threshold first, so
        # finding the starving ones costs O(log n) per request, not a scan of the queue per step.
        self._idle_since: list[tuple[int, int, Request]] = []

    def key(self, req: Request) -> tuple:
        return (0 if req.seq in self._boosted else 1, _score(req), req.seq)

    def is_boosted(self, req: Request) -> bool:
        return req.seq in self._boosted

    def on_enqueue(self, req: Request, step: int) -> None:
        if self.starvation_prevention and req.seq not in self._boosted:
            heapq.heappush(self._idle_since, (req.last_run_step, req.seq, req))

    def begin_step(self, step: int, now: float) -> Iterable[Request]:
        starving = []
        limit = step - self.starvation_threshold - 1  # idle = steps strictly since it last ran
        heap = self._idle_since
        while heap and heap[0][0] <= limit:
            last_run, _, req = heapq.heappop(heap)
            # Entries of requests that have run since (or finished, or are boosted) are stale.
            if req.status.is_queued and req.last_run_step == last_run and req.seq not in self._boosted:
                self._boosted[req.seq] = [req, self.boost_quantum]
                starving.append(req)
        return starving

    def end_step(self, scheduled: list[Request], step: int, now: float) -> None:
        if not self._boosted:
            return
        for req in scheduled:  # the batch, not every boosted request: O(batch) per step
            entry = self._boosted.get(req.seq)
            # The quantum counts steps that produced a token, not prefill chunks: a request
            # evicted for recompute must get past its prefill, or boosts could livelock.
            if entry is not None and req.last_token_time == now:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._boosted[req.seq]

    def on_finish(self, req: Request) -> None:
        self._boosted.pop(req.seq, None)

    def describe(self) -> str:
        if not self.starvation_prevention:
            return "ltr (no starvation prevention)"
        return f"ltr (starvation {self.starvation_threshold}/{self.boost_quantum})"
