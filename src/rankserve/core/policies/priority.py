from __future__ import annotations

from rankserve.core.policies.base import Policy
from rankserve.core.request import Request


class Priority(Policy):
    """Client-given priority, lower first, ties by arrival (vLLM's convention).

    Unlike vLLM, a higher-priority arrival also displaces a lower-priority running request when
    ``max_num_seqs`` binds, not only under KV-cache pressure.
    """

    name = "priority"
    preemptive = True

    def key(self, req: Request) -> tuple:
        return (req.priority, req.arrival_time, req.seq)
