"""Discrete-event simulation: the real scheduler and step loop, with a cost model for time.

Requests arrive on a virtual clock; each engine step takes as long as the cost model says for
the batch the scheduler picked (plus PCIe time for swaps), and arrivals during a step join the
queue when it ends, as in a real continuous-batching engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from rankserve.core.block_manager import BlockManager
from rankserve.core.clock import VirtualClock
from rankserve.core.metrics import summarize
from rankserve.core.policies import POLICIES, Policy, make_policy
from rankserve.core.request import Request, SamplingParams
from rankserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from rankserve.engine.core import EngineCore
from rankserve.predict.base import Predictor
from rankserve.sim.cost_model import CostModel


class CostModelExecutor:
    """An executor whose steps only advance the virtual clock by the cost model's time."""

    def __init__(self, cost_model: CostModel, clock: VirtualClock, block_size: int) -> None:
        self.cost_model = cost_model
        self.clock = clock
        self.block_size = block_size
        self.busy_s = 0.0

    def execute(self, out: SchedulerOutput) -> None:
        dt = self.cost_model.step_time(*out.step_shape)
        swapped = len(out.swap_out) + len(out.swap_in)
        if swapped:
            dt += self.cost_model.swap_time(swapped, self.block_size)
        self.busy_s += dt
        self.clock.advance(dt)
        return None

    def hidden_states(self) -> None:
        return None


def build_requests(
    lengths: np.ndarray, arrivals: np.ndarray, record_token_times: bool = False,
    texts: Sequence[str] | None = None,
) -> list[Request]:
    """Requests that replay known lengths: ``max_tokens`` = output length, EOS ignored. ``texts``
    (optional) are the prompts' texts, for predictors that read them."""
    if len(lengths) != len(arrivals) or (texts is not None and len(texts) != len(lengths)):
        raise ValueError("need one arrival time (and text, if any) per (prompt, output) length pair")
    return [
        Request(
            prompt_token_ids=range(int(p)),
            sampling=SamplingParams(max_tokens=int(o), ignore_eos=True),
            arrival_time=float(a),
            oracle_output_len=int(o),
            record_token_times=record_token_times,
            prompt_text=None if texts is None else texts[i],
        )
        for i, ((p, o), a) in enumerate(zip(lengths, arrivals))
    ]


def make_sim_policy(name: str, cost_model: CostModel, max_num_seqs: int = 256, **params: Any) -> Policy:
    """A policy for simulation; MLFQ's skip-join gets its prefill-time estimate from the cost model,
    and policies that order by predicted work the cost of a prefill token in decode steps."""
    if name == "mlfq" and "prefill_time_estimate" not in params:
        params["prefill_time_estimate"] = lambda p: cost_model.step_time(p, 0, p, p * (p + 1) // 2, 1)
    if POLICIES[name].prefill_aware and "prefill_weight" not in params:
        params["prefill_weight"] = cost_model.prefill_weight(max_num_seqs)
    return make_policy(name, **params)


@dataclass
class SimResult:
    requests: list[Request]
    summary: dict[str, float]
    num_steps: int
    wall_time_s: float
    busy_s: float
    predictor_report: dict[str, Any] = field(default_factory=dict)


def simulate(
    requests: Sequence[Request],
    policy: Policy,
    predictor: Predictor | None,
    cost_model: CostModel,
    config: SchedulerConfig,
    block_size: int = 16,
    progress: bool = False,
    check_invariants_every: int = 0,
) -> SimResult:
    """Run ``requests`` (sorted by arrival) to completion and summarise their metrics."""
    requests = sorted(requests, key=lambda r: r.arrival_time)
    clock = VirtualClock()
    # Memory-unbounded cost models would ask for absurd pools: never more than the workload uses.
    workload_blocks = sum(-(-(r.prompt_len + r.sampling.max_tokens) // block_size) for r in requests)
    device_blocks = max(1, min(cost_model.kv_capacity_tokens() // block_size, workload_blocks))
    host_blocks = min(cost_model.host_capacity_tokens() // block_size, workload_blocks)
    blocks = BlockManager(device_blocks, host_blocks, block_size)
    scheduler = Scheduler(config, policy, blocks, clock)
    executor = CostModelExecutor(cost_model, clock, block_size)
    engine = EngineCore(scheduler, executor, predictor)

    wall = time.perf_counter()
    n, i = len(requests), 0
    bar = tqdm(total=n, disable=not progress, unit="req", desc=f"sim {policy.name}")
    while i < n or scheduler.has_work:
        now = clock.now()
        j = i
        while j < n and requests[j].arrival_time <= now:
            j += 1
        if j > i:
            engine.add_requests(requests[i:j])
            i = j
        if not scheduler.has_work:
            clock.advance_to(requests[i].arrival_time)
            continue
        out, finished = engine.step()
        if out.is_empty:
            raise RuntimeError(
                f"scheduler made no progress at t={now:.3f}s with {scheduler.num_queued} queued "
                f"and {len(scheduler.running)} running requests"
            )
        if finished:
            bar.update(len(finished))
        if check_invariants_every and engine.num_steps % check_invariants_every == 0:
            blocks.check_invariants(scheduler.live_requests())
    bar.close()
    wall = time.perf_counter() - wall
    report = predictor.report() if predictor is not None else {"predictor": None}
    return SimResult(list(requests), summarize(requests), engine.num_steps, wall, executor.busy_s, report)
