"""Requests, KV-block accounting, the scheduler and its policies. Imports nothing else of ours."""

from rankserve.core.block_manager import BlockManager, BlockManagerError
from rankserve.core.clock import Clock, VirtualClock
from rankserve.core.policies import POLICY_NAMES, Policy, make_policy
from rankserve.core.request import FinishReason, Request, RequestStatus, SamplingParams
from rankserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

__all__ = [
    "BlockManager",
    "BlockManagerError",
    "Clock",
    "FinishReason",
    "POLICY_NAMES",
    "Policy",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "VirtualClock",
    "make_policy",
]
