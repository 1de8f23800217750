from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

from rankserve.core.policies.base import Policy
from rankserve.core.policies.sjf import _score
from rankserve.core.policies.work import (
    ErrorSpread,
    ScoreCalibration,
    check_length_exponent,
    check_prefill_weight,
    rank_value,
    remaining_work,
)
from rankserve.core.request import FinishReason, Request


class LearningToRank(Policy):
    """Algorithm 1 of "Efficient LLM Scheduling by Learning to Rank" (NeurIPS 2024), made robust
    to predictor error so that it does not lose to FCFS with a weak predictor.

    Order: predicted remaining work (``core/policies/work.py``: prefill still to do weighted by
    ``prefill_weight``, plus predicted decode steps left) times the predicted output length to the
    ``length_exponent``: 0 is least work first (best mean latency), 1 Smith's rule for mean latency
    per token (a request weighs 1 / its length); 0.5, the default, does well on both. Lengths come
    from the predictor or, for a rank-only one, from its scores mapped onto the lengths of finished
    requests (until ``min_calibration`` have finished: plain score order, no preemption by rank).

    Preemption pays for itself or does not happen: a queued request displaces a running one only if
    the victim's rank exceeds the newcomer's by ``exp(confidence_z * sqrt(2) * sigma * (1 +
    length_exponent))``, sigma being the measured spread of log(true / predicted length) over
    finished requests (the oracle: 0, i.e. SRPT; a guessing predictor: several times), plus
    ``margin_steps``; and only while the victim has generated at most ``preempt_limit`` times its
    predicted length (TRAIL's limited preemption: later its KV cache is large; it runs to the end).
    With ``patient``, not while a running request is predicted to finish within the newcomer's own
    predicted work (``Policy.waits_for_a_slot``): worth it where preemption is dear (recompute).

    Starvation prevention, bounded: a request idle for more than ``starvation_threshold`` steps and
    more than ``backlog_factor`` x the steps the queue's predicted work takes to drain is boosted to
    the front until it has produced ``boost_quantum`` tokens (0: until it finishes); at most
    ``boost_share`` of the batch is boosted at once, so a deep backlog stays shortest-first rather
    than turning into round robin.
    """

    name = "ltr"
    prefill_aware = True
    needs_prediction = True
    preemptive = True

    def __init__(
        self,
        starvation_threshold: int = 200,
        boost_quantum: int = 10,
        starvation_prevention: bool = True,
        backlog_factor: float = 1.0,
        boost_share: float = 0.25,
        confidence_z: float = 1.0,
        margin_steps: float = 0.0,
        preempt_limit: float = 1.0,
        prefill_weight: float = 0.0,
        length_exponent: float = 0.5,
        min_calibration: int = 32,
        patient: bool = False,
    ) -> None:
        if starvation_threshold < 1 or boost_quantum < 0:
            raise ValueError("starvation_threshold must be >= 1 and boost_quantum >= 0")
        if backlog_factor < 0 or not 0 < boost_share <= 1:
            raise ValueError("backlog_factor must be >= 0 and boost_share in (0, 1]")
        if min(confidence_z, margin_steps, preempt_limit) < 0:
            raise ValueError("confidence_z, margin_steps and preempt_limit must be >= 0")
        self.starvation_threshold = starvation_threshold
        self.boost_quantum = boost_quantum
        self.starvation_prevention = starvation_prevention
        self.backlog_factor = backlog_factor
        self.boost_share = boost_share
        self.confidence_z = confidence_z
        self.margin_steps = margin_steps
        self.preempt_limit = preempt_limit
        self.patient = patient
        self.prefill_weight = check_prefill_weight(prefill_weight)
        self.length_exponent = check_length_exponent(length_exponent)
        self.calibration = ScoreCalibration(min_calibration)
        self.errors = ErrorSpread()
        self._boosted: dict[int, list] = {}  # seq -> [request, tokens left in the boost (None: to the end)]
        # Queued requests by the step they last ran: the oldest reach the threshold first, so
        # finding the starving ones costs O(log n) per request, not a scan of the queue per step.
        self._idle_since: list[tuple[int, int, Request]] = []
        # Queued requests and their work (frozen while queued: the heap's keys must not move).
        self._queued: dict[int, tuple[Request, tuple[float, float] | None]] = {}
        self._queued_work = 0.0
        self._first_prediction: dict[int, float | None] = {}  # seq -> predicted length when first queued
        self._batch = 1  # the largest batch seen: what the boost share is a share of
        self._rekey_all = False  # the score calibration just became ready: every queued key changes

    # ---- predicted lengths and work ------------------------------------------------------
    def predicted_total(self, req: Request) -> float | None:
        """Predicted output length: the predictor's, or the calibrated score's; None while a
        rank-only predictor's calibration is not ready."""
        if req.predicted_len is not None:
            return req.predicted_len
        if self.calibration.ready:
            return self.calibration.length_for(_score(req))
        return None

    def _estimate(self, req: Request) -> tuple[float, float] | None:
        """(predicted remaining work, rank) from the current predictions; None without lengths."""
        total = self.predicted_total(req)
        if total is None:
            return None
        work = remaining_work(req, total, self.prefill_weight)
        return work, rank_value(work, total, self.length_exponent)

    def _current(self, req: Request) -> tuple[float, float] | None:
        if req.status.is_queued and req.seq in self._queued:
            return self._queued[req.seq][1]  # frozen while queued
        return self._estimate(req)

    def work(self, req: Request) -> float | None:
        """Predicted remaining work in decode steps."""
        estimate = self._current(req)
        return None if estimate is None else estimate[0]

    def rank(self, req: Request) -> float | None:
        """What the order compares: remaining work x predicted length ** ``length_exponent``."""
        estimate = self._current(req)
        return None if estimate is None else estimate[1]

    def key(self, req: Request) -> tuple:
        boost = 0 if req.seq in self._boosted else 1
        rank = self.rank(req)
        if rank is None:
            return (boost, _score(req), req.seq)
        return (boost, rank, req.seq)

    def is_boosted(self, req: Request) -> bool:
        return req.seq in self._boosted

    # ---- preemption ----------------------------------------------------------------------
    def preemption_factor(self) -> float:
        """How many times the newcomer's rank a victim's must be for it to be displaced: the
        spread of two predictions' log ratio, in rank units (rank ~ length ** (1 + exponent))."""
        spread = math.sqrt(2.0) * self.errors.sigma * (1.0 + self.length_exponent)
        return math.exp(self.confidence_z * spread)

    def may_be_preempted(self, req: Request) -> bool:
        if req.seq in self._boosted:
            return False
        total = self.predicted_total(req)
        return total is not None and req.num_output_tokens <= self.preempt_limit * total

    def should_preempt(self, victim: Request, candidate: Request) -> bool:
        if candidate.seq in self._boosted:
            return victim.seq not in self._boosted
        victim_rank, candidate_rank = self.rank(victim), self.rank(candidate)
        if victim_rank is None or candidate_rank is None:
            return False  # cannot cost it: do not pay for it
        return victim_rank > candidate_rank * self.preemption_factor() + self.margin_steps

    # ---- bookkeeping ---------------------------------------------------------------------
    def on_enqueue(self, req: Request, step: int) -> None:
        if req.seq not in self._first_prediction:  # first sight
            if req.predicted_len is None:
                self.calibration.add_score(_score(req))
            self._first_prediction[req.seq] = self.predicted_total(req)
        self._freeze_work(req)
        if self.starvation_prevention and req.seq not in self._boosted:
            heapq.heappush(self._idle_since, (req.last_run_step, req.seq, req))

    def _freeze_work(self, req: Request) -> None:
        self._forget_queued(req)
        estimate = self._estimate(req)
        if estimate is not None:
            self._queued_work += estimate[0]
        self._queued[req.seq] = (req, estimate)

    def _forget_queued(self, req: Request) -> None:
        entry = self._queued.pop(req.seq, None)
        if entry is not None and entry[1] is not None:
            self._queued_work -= entry[1][0]

    def starvation_limit(self) -> float:
        """Idle steps after which a queued request counts as starving."""
        drain_steps = max(self._queued_work, 0.0) / self._batch
        return max(self.starvation_threshold, self.backlog_factor * drain_steps)

    def begin_step(self, step: int, now: float) -> Iterable[Request]:
        changed: list[Request] = []
        if self._rekey_all:
            self._rekey_all = False
            queued = [req for req, _ in self._queued.values()]
            for req in queued:
                self._freeze_work(req)  # now in length units
            changed = queued
        if not self.starvation_prevention:
            return changed
        cap = max(1, int(self.boost_share * self._batch))
        limit = step - self.starvation_limit() - 1  # idle = steps strictly since it last ran
        heap = self._idle_since
        while heap and heap[0][0] <= limit and len(self._boosted) < cap:
            last_run, _, req = heapq.heappop(heap)
            # Entries of requests that have run since (or finished, or are boosted) are stale.
            if req.status.is_queued and req.last_run_step == last_run and req.seq not in self._boosted:
                self._boosted[req.seq] = [req, self.boost_quantum or None]
                changed.append(req)
        return changed

    def end_step(self, scheduled: list[Request], step: int, now: float) -> None:
        if len(scheduled) > self._batch:
            self._batch = len(scheduled)
        for req in scheduled:  # O(batch) per step
            if req.seq in self._queued:
                self._forget_queued(req)  # admitted
            entry = self._boosted.get(req.seq)
            # The quantum counts steps that produced a token, not prefill chunks: a request
            # evicted for recompute must get past its prefill, or boosts could livelock.
            if entry is not None and entry[1] is not None and req.last_token_time == now:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._boosted[req.seq]

    def on_finish(self, req: Request) -> None:
        self._boosted.pop(req.seq, None)
        self._forget_queued(req)
        predicted = self._first_prediction.pop(req.seq, None)
        if req.finish_reason is FinishReason.ABORT or not req.num_output_tokens:
            return
        if predicted is not None:
            self.errors.add(req.num_output_tokens, predicted)
        if req.predicted_len is None:
            was_ready = self.calibration.ready
            self.calibration.add_length(req.num_output_tokens)
            self._rekey_all = self._rekey_all or (self.calibration.ready and not was_ready)

    def describe(self) -> str:
        if not self.starvation_prevention:
            return "ltr (no starvation prevention)"
        quantum = self.boost_quantum or "to the end"
        return (f"ltr (starvation {self.starvation_threshold} steps or {self.backlog_factor:g}x the backlog, "
                f"boost {quantum}, at most {self.boost_share:g} of the batch; preempt at "
                f"z={self.confidence_z:g}{', patient' if self.patient else ''})")
