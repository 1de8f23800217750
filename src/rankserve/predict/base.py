"""The Predictor interface: a prompt-side score at admission, optionally refined every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from rankserve.core.request import Request


class Predictor:
    name: ClassVar[str] = ""
    # Whether ``score`` also sets ``predicted_len`` (SRPT and TRAIL need lengths; SJF/LTR need a rank).
    gives_lengths: ClassVar[bool] = True
    # Whether ``refine`` does anything (the engine then hands it hidden states every step).
    refines: ClassVar[bool] = False

    def score(self, requests: Sequence[Request]) -> None:
        """Set ``score`` (lower = shorter) and, if it can, ``predicted_len`` for new requests.
        Called once per batch of arrivals, outside the step loop."""
        raise NotImplementedError

    def refine(self, requests: Sequence[Request], hidden_states: Any = None) -> None:
        """Update ``predicted_len`` of running requests after a step (optional)."""

    def report(self) -> dict[str, Any]:
        """Facts to record next to a run's results (e.g. the tau a noisy oracle reached)."""
        return {"predictor": self.name}
