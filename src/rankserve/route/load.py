"""The load of one replica as a router sees it: one tracker per replica, told each request's life.

The cluster simulator and the live router drive the same tracker; it reads no clock (``now`` is
passed in) and knows nothing of HTTP. Interface::

    load = ReplicaLoad(name="r0", prefill_weight=0.5, speed=1.0, kv_capacity_tokens=None,
                       overrun_factor=0.5, default_output_tokens=256.0)
    load.on_send(request_id, prompt_tokens, predicted_output_tokens, max_tokens, now)
    load.on_prefill_done(request_id, now)   # optional: the first on_tokens implies it
    load.on_tokens(request_id, n, now)      # n more output tokens came back
    load.on_finish(request_id, now)         # finished, aborted or failed; unknown ids are ignored
    load.set_kv(used_tokens, capacity_tokens)   # when the backend reports its KV cache
    load.healthy = False                    # health checks set it; routers skip unhealthy replicas
    load.last_event_time                    # ``now`` of the latest event (None before any)

    load.num_in_flight       requests sent and not finished
    load.outstanding_work    predicted work left, in decode-token equivalents (see below), >= 0
    load.kv_demand_tokens    predicted KV footprint of the in-flight requests at their end
    load.kv_held_tokens      KV the replica holds now: reported if set_kv was called, else estimated
    load.kv_capacity_tokens  None when unknown
    load.kv_usage            held / capacity (None when the capacity is unknown)
    load.can_fit(tokens)     whether the predicted demand plus ``tokens`` stays within the capacity
    load.expected_latency(prompt_tokens, predicted_output_tokens)
                             seconds a new request would take here, from ``decode_step_s`` (None without it)

Outstanding work of one in-flight request, in tokens (decode tokens are the unit):
``prefill_weight x prompt tokens`` until its first token comes back, plus its predicted remaining
output tokens. The remaining output is ``predicted - generated`` while the request is inside its
prediction. A request that outlives its prediction is evidence of a long one, so it is not counted
as done: its remaining estimate becomes ``overrun_factor x generated`` (for heavy-tailed lengths the
expected remaining life grows with age; 0 restores the naive clamp at zero). Both are capped by
``max_tokens - generated`` when the client's max_tokens is known, and never go below 0. Without a
prediction the request counts ``default_output_tokens``.

Sums are kept incrementally, so each event costs O(1).

Expected latency of a new request (when the replica's step time is known, ``decode_step_s(batch,
kv_tokens)``: the cost model in simulation): its work ``w`` (prefill-weighted prompt + predicted
output, as above) runs one token per step, beside the requests in flight; one with ``r`` tokens of
work left shares ``min(r, w)`` of those steps, so the batch over the new request's life averages
``1 + min(n, W / w)`` for ``n`` requests holding ``W`` of work (an upper bound on ``sum min(r_i, w)
/ w`` that needs only the sums). The latency is ``w`` steps at that batch. It reads the replica's
own speed curve, so a faster replica or one whose requests end sooner looks better.

A ranker gives a score, not a length. :class:`ScoreLengths` turns scores into expected output
lengths from what the router itself sees finish::

    lengths = ScoreLengths(bins=16, refit_every=256)
    lengths.observe(score, output_tokens)     # a request with this score finished after this many
    lengths.predict(score)                    # mean length of finished requests in its score bin
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def remaining_output(predicted: float, generated: int, max_tokens: int | None, overrun_factor: float) -> float:
    """Predicted output tokens still to come for a request that has ``generated`` so far."""
    left = predicted - generated
    overrun = overrun_factor * generated
    if overrun > left:
        left = overrun
    if max_tokens is not None and max_tokens - generated < left:
        left = max_tokens - generated
    return left if left > 0.0 else 0.0


class _InFlight:
    __slots__ = ("prompt", "predicted", "max_tokens", "prefilled", "generated", "work", "demand")

    def __init__(self, prompt: int, predicted: float, max_tokens: int | None) -> None:
        self.prompt = prompt
        self.predicted = predicted
        self.max_tokens = max_tokens
        self.prefilled = False
        self.generated = 0
        self.work = 0.0
        self.demand = 0.0


@dataclass
class LoadSnapshot:
    """A replica's load at one moment, for reports and metrics."""

    name: str
    healthy: bool
    num_in_flight: int
    outstanding_work: float
    kv_held_tokens: float
    kv_capacity_tokens: int | None
    num_sent: int
    num_finished: int


class ReplicaLoad:
    """What one replica has in flight, fed by events (see the module docstring)."""

    def __init__(
        self,
        name: str = "",
        *,
        prefill_weight: float = 0.5,
        speed: float = 1.0,
        kv_capacity_tokens: int | None = None,
        overrun_factor: float = 0.5,
        default_output_tokens: float = 256.0,
        decode_step_s: Callable[[int, float], float] | None = None,
    ) -> None:
        if prefill_weight < 0 or overrun_factor < 0 or default_output_tokens < 0:
            raise ValueError("prefill_weight, overrun_factor and default_output_tokens must be >= 0")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if kv_capacity_tokens is not None and kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {kv_capacity_tokens}")
        self.name = name
        self.prefill_weight = prefill_weight
        self.speed = speed  # relative tokens per second: sal divides work by it
        self.overrun_factor = overrun_factor
        self.default_output_tokens = default_output_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self.decode_step_s = decode_step_s  # seconds of a decode step at (batch, KV tokens); None: unknown
        self.healthy = True
        self.last_event_time: float | None = None  # of the latest event: a live router can spot a silent backend
        self.num_sent = 0
        self.num_finished = 0
        self._requests: dict[str, _InFlight] = {}
        self._work = 0.0
        self._demand = 0.0
        self._held_estimate = 0
        self._kv_reported: float | None = None

    # ---- events --------------------------------------------------------------------------
    def on_send(self, request_id: str, prompt_tokens: int, predicted_output_tokens: float | None,
                max_tokens: int | None, now: float) -> None:
        """A request was sent to this replica. Raises ValueError for an id already in flight."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in flight on replica {self.name!r}")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        predicted = self.default_output_tokens if predicted_output_tokens is None else float(predicted_output_tokens)
        entry = _InFlight(prompt_tokens, predicted, max_tokens)
        self._requests[request_id] = entry
        self.last_event_time = now
        self.num_sent += 1
        self._reprice(entry)

    def on_prefill_done(self, request_id: str, now: float) -> None:
        entry = self._requests.get(request_id)
        if entry is None or entry.prefilled:
            return
        self.last_event_time = now
        entry.prefilled = True
        self._held_estimate += entry.prompt
        self._reprice(entry)

    def on_tokens(self, request_id: str, n: int, now: float) -> None:
        """``n`` more output tokens of ``request_id`` came back (the first implies its prefill)."""
        entry = self._requests.get(request_id)
        if entry is None or n <= 0:
            return
        self.last_event_time = now
        if not entry.prefilled:
            entry.prefilled = True
            self._held_estimate += entry.prompt
        entry.generated += n
        self._held_estimate += n
        self._reprice(entry)

    def on_finish(self, request_id: str, now: float) -> None:
        """The request ended (any way). Idempotent: a second call or an unknown id does nothing."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        self.last_event_time = now
        self.num_finished += 1
        self._work -= entry.work
        self._demand -= entry.demand
        self._held_estimate -= entry.generated + (entry.prompt if entry.prefilled else 0)
        if not self._requests:  # wipe float drift while it is free to do so
            self._work = self._demand = 0.0

    def set_kv(self, used_tokens: float, capacity_tokens: int | None = None) -> None:
        """The backend's own report of its KV cache (e.g. from its metrics)."""
        self._kv_reported = max(float(used_tokens), 0.0)
        if capacity_tokens is not None:
            if capacity_tokens < 1:
                raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
            self.kv_capacity_tokens = capacity_tokens

    # ---- views ---------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    @property
    def outstanding_work(self) -> float:
        return self._work if self._work > 0.0 else 0.0

    @property
    def kv_demand_tokens(self) -> float:
        return self._demand if self._demand > 0.0 else 0.0

    @property
    def kv_held_tokens(self) -> float:
        return self._kv_reported if self._kv_reported is not None else float(self._held_estimate)

    @property
    def kv_usage(self) -> float | None:
        if self.kv_capacity_tokens is None:
            return None
        return self.kv_held_tokens / self.kv_capacity_tokens

    def can_fit(self, tokens: float) -> bool:
        """Whether ``tokens`` more of predicted KV demand fit (always True when the capacity is unknown)."""
        return self.kv_capacity_tokens is None or self.kv_demand_tokens + tokens <= self.kv_capacity_tokens

    def request_work(self, prompt_tokens: int, predicted_output_tokens: float | None) -> float:
        """The work a new request would add here (same pricing as an in-flight one)."""
        predicted = self.default_output_tokens if predicted_output_tokens is None else predicted_output_tokens
        return self.prefill_weight * prompt_tokens + max(predicted, 0.0)

    def expected_latency(self, prompt_tokens: int, predicted_output_tokens: float | None) -> float | None:
        """Seconds a new request would take here (see the module docstring); None when the
        replica's step time is unknown."""
        if self.decode_step_s is None:
            return None
        work = max(self.request_work(prompt_tokens, predicted_output_tokens), 1.0)
        n = len(self._requests)
        batch = 1.0 + min(n, self.outstanding_work / work)
        context = self.kv_held_tokens / n if n else 0.0
        return work * self.decode_step_s(round(batch), batch * context + prompt_tokens)

    def in_flight_ids(self) -> list[str]:
        return list(self._requests)

    def snapshot(self) -> LoadSnapshot:
        return LoadSnapshot(self.name, self.healthy, self.num_in_flight, self.outstanding_work,
                            self.kv_held_tokens, self.kv_capacity_tokens, self.num_sent, self.num_finished)

    # ---- internals -----------------------------------------------------------------------
    def _reprice(self, entry: _InFlight) -> None:
        """Recompute one request's work and KV demand and move the sums by the difference."""
        rest = remaining_output(entry.predicted, entry.generated, entry.max_tokens, self.overrun_factor)
        work = rest + (0.0 if entry.prefilled else self.prefill_weight * entry.prompt)
        demand = entry.prompt + entry.generated + rest
        self._work += work - entry.work
        self._demand += demand - entry.demand
        entry.work = work
        entry.demand = demand


class ScoreLengths:
    """Expected output length of a rank score, learned online from finished requests.

    Scores are binned at the quantiles of the scores seen (``bins`` bins, refitted every
    ``refit_every`` observations over the last ``window``); a score predicts the mean length of its
    bin, i.e. E[length | score bin]: with a ranker of modest accuracy that regresses towards the
    mean, which is what a sum of work wants. Before ``min_samples`` observations it predicts
    ``None`` (the tracker then counts its default)."""

    def __init__(self, bins: int = 16, refit_every: int = 256, window: int = 8192, min_samples: int = 64) -> None:
        if bins < 1 or refit_every < 1 or window < min_samples or min_samples < 1:
            raise ValueError("need bins >= 1, refit_every >= 1 and window >= min_samples >= 1")
        self.bins = bins
        self.refit_every = refit_every
        self.min_samples = min_samples
        self._scores = np.zeros(window)
        self._lengths = np.zeros(window)
        self._count = 0
        self._edges: np.ndarray | None = None
        self._means: np.ndarray | None = None

    def observe(self, score: float, output_tokens: int) -> None:
        slot = self._count % len(self._scores)
        self._scores[slot] = score
        self._lengths[slot] = output_tokens
        self._count += 1
        if self._count >= self.min_samples and (self._edges is None or self._count % self.refit_every == 0):
            self._fit()

    def predict(self, score: float) -> float | None:
        if self._edges is None:
            return None
        return float(self._means[np.searchsorted(self._edges, score)])

    def _fit(self) -> None:
        n = min(self._count, len(self._scores))
        scores, lengths = self._scores[:n], self._lengths[:n]
        edges = np.unique(np.quantile(scores, np.linspace(0, 1, self.bins + 1)[1:-1]))
        which = np.searchsorted(edges, scores)
        sums = np.bincount(which, lengths, minlength=len(edges) + 1)
        counts = np.bincount(which, minlength=len(edges) + 1)
        overall = lengths.mean()
        self._means = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
        self._edges = edges
