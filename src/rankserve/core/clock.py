"""Injected time: core and predict never read the system clock themselves."""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class VirtualClock:
    """A clock that moves only when told to (simulator, tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        self._now += seconds

    def advance_to(self, t: float) -> None:
        if t > self._now:
            self._now = t
