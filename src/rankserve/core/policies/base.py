"""What a scheduling policy is: an order, a preemption rule, and what it learns from a step.

Budgets, chunked prefill, KV blocks and swap/recompute belong to the Scheduler; a policy never
touches them. Keys are compared as tuples, lower runs first, and must end with ``req.seq`` so that
no two requests tie. A queued request's key must not change unless the policy says so by returning
it from ``begin_step`` (the scheduler keeps queued requests in a heap and does not re-sort it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rankserve.core.request import Request


class Policy:
    name: ClassVar[str] = ""
    # May a queued request displace a running one that ranks lower?
    preemptive: ClassVar[bool] = False
    # Does the policy order by predictions at all, and does it need lengths (``predicted_len``)
    # or only a rank (``score``)?
    needs_prediction: ClassVar[bool] = False
    needs_lengths: ClassVar[bool] = False
    # Does it take ``prefill_weight`` (decode steps per prefill token) to order by predicted work?
    prefill_aware: ClassVar[bool] = False
    # Patient rank preemption: a queued request waits for a slot instead of displacing a running
    # one while some running request is predicted to finish within the work the newcomer needs
    # itself (a ``patient`` parameter of the policies that estimate work; the vLLM class sets it).
    patient: bool = False

    def key(self, req: Request) -> tuple:
        raise NotImplementedError

    def may_be_preempted(self, req: Request) -> bool:
        """Whether the running request ``req`` may be displaced by rank at all now."""
        return self.preemptive

    def should_preempt(self, victim: Request, candidate: Request) -> bool:
        """Whether queued ``candidate`` should take the place of running ``victim``."""
        return self.key(candidate) < self.key(victim)

    def work(self, req: Request) -> float | None:
        """Predicted remaining work in decode steps; None where the policy does not estimate it."""
        return None

    def waits_for_a_slot(self, candidate: Request, running: Iterable[Request]) -> bool:
        """Whether ``candidate`` should wait rather than displace anyone (``patient``): a slot frees
        within the decode steps it needs itself, so waiting for it costs at most what it saves."""
        if not self.patient:
            return False
        needed = self.work(candidate)
        if needed is None:
            return False
        return any(w is not None and w <= needed for w in map(self.work, running))

    def on_enqueue(self, req: Request, step: int) -> None:
        """``req`` (new or preempted) joined the queue at ``step``."""

    def begin_step(self, step: int, now: float) -> Iterable[Request]:
        """Called before each step; returns queued requests whose key has changed."""
        return ()

    def end_step(self, scheduled: list[Request], step: int, now: float) -> None:
        """Called after a step ran ``scheduled`` (in its order) and it ended at ``now``."""

    def on_finish(self, req: Request) -> None:
        """``req`` finished or was aborted: drop any state kept for it."""

    def describe(self) -> str:
        return self.name
