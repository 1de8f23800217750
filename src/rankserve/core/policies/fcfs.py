from __future__ import annotations

from rankserve.core.policies.base import Policy
from rankserve.core.request import Request


class FCFS(Policy):
    """First come, first served; never preempts by rank (vLLM's default)."""

    name = "fcfs"

    def key(self, req: Request) -> tuple:
        return (req.arrival_time, req.seq)
