"""Scoring arrivals beside the model step: the predictor on its own thread.

torch releases the GIL, so a batch of arrivals is scored on a spare core while the step runs; the
step loop collects the scored batches between steps and waits for them only when it has nothing
else to run. Used by rankserve's engine loop and by the vLLM scheduler class.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class ScoringThread:
    """Runs ``score(batch)`` for each submitted batch, in order, on one background thread.

    ``results`` hands back ``(tag, batch, outcome)``: the tag given to ``submit`` and what ``score``
    returned, or the exception it raised (logged; the batch is still handed back, so no request
    is lost to a predictor bug)."""

    def __init__(self, score: Callable[[list], Any], name: str = "rankserve-scoring") -> None:
        self._score = score
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0  # items submitted and not yet collected (the caller's thread counts them)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            tag, batch = job
            try:
                outcome = self._score(batch)
            except Exception as exc:  # noqa: BLE001 - the caller decides; the thread must live on
                log.exception("scoring a batch of %d failed", len(batch))
                outcome = exc
            self._done.put((tag, batch, outcome))

    def submit(self, batch: list, tag: Any = None) -> None:
        self.in_flight += len(batch)
        self._jobs.put((tag, batch))

    def results(self, wait: bool, timeout: float = 30.0) -> list[tuple[Any, list, Any]]:
        """Scored batches so far; with ``wait``, block (up to ``timeout``) for the next one if
        none is ready and some are in flight."""
        out = []
        if wait and self.in_flight and self._done.empty():
            try:
                out.append(self._done.get(timeout=timeout))
            except queue.Empty:
                pass
        while not self._done.empty():
            out.append(self._done.get_nowait())
        self.in_flight -= sum(len(batch) for _, batch, _ in out)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches already submitted, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
