"""The step loop shared by every executor: schedule -> execute -> apply -> refine.

The real engine (wall clock, a model executor) and the simulator (virtual clock, a cost-model
executor) both drive this class; only the executor and the clock differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rankserve.core.request import Request
from rankserve.core.scheduler import Scheduler, SchedulerOutput
from rankserve.predict.base import Predictor


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

    def add_requests(self, requests: Sequence[Request]) -> None:
        """Score new requests in one batch, then queue them."""
        if self.predictor is not None and requests:
            self.predictor.score(requests)
        for req in requests:
            self.scheduler.add_request(req)

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        """Run one engine step; returns what was scheduled and the requests that finished."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return out, []
        sampled = self.executor.execute(out)
        finished = self.scheduler.update(out, sampled, self.scheduler.clock.now())
        if self.predictor is not None and self.predictor.refines:
            running = [r for r in out.requests if not r.status.is_done]
            self.predictor.refine(running, self.executor.hidden_states())
        self.num_steps += 1
        return out, finished
