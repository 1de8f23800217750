"""A request's predicted remaining work, in decode steps, for policies that order by length.

Work = tokens still to prefill x ``prefill_weight`` + predicted decode steps still to come.
``prefill_weight`` is what one prefill token costs against one request's share of a decode step
(the simulator reads it off its cost model; on this project's CPU engine it is about 0.2, so a
400-token prompt weighs as much as 80 tokens of output). With 0 the work is the output length alone.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from rankserve.core.request import Request


def prefill_left(req: Request) -> int:
    """Tokens ``req`` still has to prefill (0 once it is decoding: one token per step left)."""
    left = req.num_tokens - req.num_computed_tokens
    return left if left > 1 else 0


def remaining_work(req: Request, predicted_total: float, prefill_weight: float) -> float:
    """Decode steps still to come (at least one) plus the weighted prefill still to do."""
    decode = max(predicted_total - req.num_output_tokens, 1.0)
    return decode + prefill_weight * prefill_left(req)


def rank_value(work: float, predicted_total: float, length_exponent: float) -> float:
    """Work x predicted output length ** ``length_exponent``: the order of policies that rank by
    work. 0 puts the least work first (mean latency); 1 is Smith's rule for mean latency per token,
    each request weighted by 1 / its length, so a long prompt with a short answer is not last."""
    return work * max(predicted_total, 1.0) ** length_exponent


def check_prefill_weight(prefill_weight: float) -> float:
    if not (math.isfinite(prefill_weight) and prefill_weight >= 0):
        raise ValueError(f"prefill_weight must be a finite number >= 0, got {prefill_weight}")
    return float(prefill_weight)


def check_length_exponent(length_exponent: float) -> float:
    if not (math.isfinite(length_exponent) and length_exponent >= 0):
        raise ValueError(f"length_exponent must be a finite number >= 0, got {length_exponent}")
    return float(length_exponent)


class _RecentSorted:
    """The last ``capacity`` values added, kept sorted (a server runs for ever: bounded memory)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: list[float] = []
        self._order: deque[float] = deque()

    def add(self, value: float) -> None:
        bisect.insort(self.values, value)
        self._order.append(value)
        if len(self._order) > self.capacity:
            del self.values[bisect.bisect_left(self.values, self._order.popleft())]


class ScoreCalibration:
    """Rank scores turned into output lengths by matching quantiles: a score at the q-quantile of
    the recent scores maps to the q-quantile of the recent finished requests' output lengths.
    Monotone, so it keeps the predictor's order; it gives the lengths a rank-only predictor lacks."""

    def __init__(self, min_samples: int = 32, window: int = 4096) -> None:
        if not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples} and {window}")
        self.min_samples = min_samples
        self._scores = _RecentSorted(window)
        self._lengths = _RecentSorted(window)

    @property
    def ready(self) -> bool:
        return len(self._lengths.values) >= self.min_samples

    def add_score(self, score: float) -> None:
        self._scores.add(score)

    def add_length(self, length: int) -> None:
        self._lengths.add(length)

    def length_for(self, score: float) -> float:
        scores, lengths = self._scores.values, self._lengths.values
        quantile = bisect.bisect_left(scores, score) / max(len(scores), 1)
        return float(lengths[min(int(quantile * len(lengths)), len(lengths) - 1)])


class ErrorSpread:
    """Running standard deviation of log(true length / predicted length) over finished requests:
    how far the predictor is to be trusted (0 for the oracle, ~1 for one that guesses)."""

    def __init__(self, prior: float = 1.0, min_samples: int = 16) -> None:
        self.prior = prior
        self.min_samples = min_samples
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0

    def add(self, true_len: int, predicted: float) -> None:
        x = math.log(max(true_len, 1) / max(predicted, 1.0))
        self._n += 1
        delta = x - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (x - self._mean)

    @property
    def sigma(self) -> float:
        if self._n < self.min_samples:
            return self.prior
        return math.sqrt(self._m2 / (self._n - 1))
