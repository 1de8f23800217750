"""The step loop shared by every executor: schedule -> execute -> apply -> refine.

The real engine (wall clock, a model executor) and the simulator (virtual clock, a cost-model
executor) both drive this class; only the executor and the clock differ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from rankserve.core.request import Request
from rankserve.core.scheduler import Scheduler, SchedulerOutput
from rankserve.predict.base import Predictor

log = logging.getLogger(__name__)

# The abort reason of a request whose computation raised (the server answers it with an error).
ENGINE_ERROR = "engine error"


class Executor(Protocol):
    def execute(self, out: SchedulerOutput) -> list[int] | None:
        """Run one step: perform ``out``'s swaps, compute its tokens, and return the sampled
        token of each request in ``out.requests`` (None: no real tokens, e.g. simulation)."""
        ...

    def hidden_states(self) -> Any:
        """Hidden states tapped during the last step, for a refining predictor (or None)."""
        ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, predictor: Predictor | None = None) -> None:
        if predictor is None and scheduler.policy.needs_prediction:
            raise ValueError(f"policy '{scheduler.policy.name}' needs a predictor")
        if predictor is not None and scheduler.policy.needs_lengths and not predictor.gives_lengths:
            raise ValueError(
                f"policy '{scheduler.policy.name}' needs predicted lengths; "
                f"predictor '{predictor.name}' only ranks"
            )
        self.scheduler = scheduler
        self.executor = executor
        self.predictor = predictor
        self.num_steps = 0
        self._predictor_failed = False

    def add_requests(self, requests: Sequence[Request]) -> int:
        """Score new requests in one batch, then queue them. Returns how many the predictor
        failed on: those queue in arrival order (``_queue_last``) instead of failing."""
        return self.queue_scored(requests, self.score(requests))

    def score(self, requests: Sequence[Request]) -> list[Request]:
        """Run the predictor on new requests; returns those it failed on. Touches no scheduler
        state, so it may run on a scoring thread beside ``step``."""
        if self.predictor is None or not requests:
            return []
        try:
            self.predictor.score(requests)
            return []
        except Exception:  # noqa: BLE001 - a predictor bug must not refuse requests
            if not self._predictor_failed:  # once: it may fail on every arrival from now on
                log.exception("predictor '%s' failed while scoring; its requests queue in arrival order",
                              self.predictor.name)
                self._predictor_failed = True
        failed = []
        for req in requests:  # find the ones it fails on
            try:
                self.predictor.score([req])
            except Exception:  # noqa: BLE001
                failed.append(req)
        return failed

    def queue_scored(self, requests: Sequence[Request], failed: Sequence[Request]) -> int:
        """Queue requests ``score`` has seen; ``failed`` (a subset) queue in arrival order."""
        if failed:
            self._queue_last(failed, self.scheduler.live_requests() + [r for r in requests if r not in failed])
        for req in requests:
            self.scheduler.add_request(req)
        return len(failed)

    @staticmethod
    def _queue_last(requests: Sequence[Request], others: Sequence[Request]) -> None:
        """Give unscored requests the largest score and length among ``others``: ties break by
        arrival, so they queue behind everything that arrived before them, as FCFS would."""
        score = max((r.score for r in others if r.score is not None), default=0.0)
        length = max((r.predicted_len for r in others if r.predicted_len is not None), default=0.0)
        for req in requests:
            req.set_prediction(score, length)

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        """Run one engine step; returns what was scheduled and the requests that finished
        (a request whose computation raised ends aborted, see ``_isolate``)."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return out, []
        try:
            sampled = self.executor.execute(out)
            isolated = False
        except Exception as exc:  # noqa: BLE001 - whatever one request triggers must not end the others
            if not out.requests:
                raise
            sampled = self._isolate(out, exc)
            isolated = True
        finished = self.scheduler.update(out, sampled, self.scheduler.clock.now())
        if self.predictor is not None and self.predictor.refines and not isolated:
            running = [r for r in out.requests if not r.status.is_done]
            self.predictor.refine(running, self.executor.hidden_states())
        self.num_steps += 1
        return out, finished

    def _isolate(self, out: SchedulerOutput, exc: Exception) -> list[int] | None:
        """Rerun a failed step one request at a time; abort those that fail again.

        The failed attempt changed nothing the scheduler counts: ``update`` has not run, and the
        K/V rows it may have written sit past each request's ``num_computed_tokens``, so a rerun
        overwrites them. Swaps run before the forward pass and are not repeated (a swap-out redone
        after a swap-in reused its block would copy the wrong data)."""
        log.warning("engine step %d failed (%s: %s); rerunning its %d requests one by one",
                    out.step, type(exc).__name__, exc, len(out.requests))
        sampled: list[int] = []
        for req, n in zip(out.requests, out.num_tokens):
            alone = SchedulerOutput(out.step, [req], [n])
            try:
                tokens = self.executor.execute(alone)
            except Exception as err:  # noqa: BLE001
                log.warning("request %s fails the step on its own: %s: %s", req.request_id, type(err).__name__, err)
                self.scheduler.abort(req, f"{ENGINE_ERROR}: {type(err).__name__}: {err}")
                sampled.append(-1)  # update skips aborted requests
                continue
            sampled.append(0 if tokens is None else tokens[0])
        return sampled
