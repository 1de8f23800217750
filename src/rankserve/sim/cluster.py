"""Cluster simulation: K simulated engines on one virtual clock, behind a router.

Each replica is the single-engine simulation's machinery (the Scheduler, a cost-model executor,
the step loop of ``EngineCore``) with its own cost model, so clusters may be heterogeneous. A
router from ``rankserve.route`` picks the replica of each arrival, reading ``ReplicaLoad``
trackers that are told what a live router would see: the request sent, each token streamed back
(the first one marks the prefill done), the finish, and the backend's KV usage.

Events run in time order. A replica's step is computed when it starts (as in the single-engine
simulation, where ``execute`` advances the clock), but the router hears of its tokens only when
the step ends. Arrivals that land during a step join that replica's queue when the step ends; at
equal times step ends come first, then arrivals, then new steps -- so a cluster of one replica
replays the single-engine simulation exactly.

Prompts are scored once, at the router, before routing (a score travels with its request); the
engines keep those scores. The router sees the client's ``max_tokens`` as unknown: in simulation
it is the true output length.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankserve.core.block_manager import BlockManager
from rankserve.core.clock import VirtualClock
from rankserve.core.metrics import request_table, summarize
from rankserve.core.policies import Policy
from rankserve.core.request import Request
from rankserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from rankserve.engine.core import EngineCore
from rankserve.predict.base import Predictor
from rankserve.route.load import ReplicaLoad, ScoreLengths
from rankserve.route.policies import Router, RouteRequest
from rankserve.sim.cost_model import CostModel, StepShape, get_cost_model
from rankserve.sim.simulator import CostModelExecutor, SimResult

#: Load-tracker parameters a ``--router-arg`` may set (the rest go to the router).
TRACKER_PARAMS = ("prefill_weight", "overrun_factor", "default_output_tokens")

_ENTRY = re.compile(r"^\s*(\S+)(?:\s+x\s*(\d+))?\s*$")


def parse_hardware_list(text: str, replicas: int | None = None) -> list[str]:
    """``"a100-llama3-8b x2,constant:5 x2"`` -> one cost-model name per replica.

    A single name without a count is repeated ``replicas`` times. With counts, ``replicas`` (if
    given) must equal their sum. Raises ValueError naming the bad part."""
    names: list[str] = []
    counted = False
    for part in text.split(","):
        match = _ENTRY.match(part)
        if not match:
            raise ValueError(f"bad hardware entry {part!r}: expected NAME or 'NAME xN'")
        name, count = match.group(1), match.group(2)
        get_cost_model(name)
        if count is not None:
            counted = True
            if int(count) < 1:
                raise ValueError(f"bad hardware entry {part!r}: the count must be >= 1")
        names.extend([name] * int(count or 1))
    if len(names) == 1 and not counted:
        return names * (replicas or 1)
    if replicas is not None and replicas != len(names):
        raise ValueError(f"{text!r} lists {len(names)} replicas but --replicas is {replicas}")
    return names


def relative_speeds(cost_models: Sequence[CostModel]) -> list[float]:
    """Each replica's decode throughput relative to the fastest (1.0), at a mid-size batch
    (64 sequences, 512 tokens of context): what ``sal`` divides work by."""
    shape = StepShape.decode(64, 512).astuple()
    rates = [1.0 / m.step_time(*shape) for m in cost_models]
    return [r / max(rates) for r in rates]


def _decode_step(cost: CostModel) -> Callable[[int, float], float]:
    """The cost model's seconds per decode step of ``batch`` sequences holding ``kv`` tokens."""

    def step(batch: int, kv: float) -> float:
        return cost.step_time(0, batch, int(kv), int(kv), batch)

    return step


class _RouterScored(Predictor):
    """The engine's view of a predictor whose scores the router already set on each request."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.name = inner.name
        self.gives_lengths = inner.gives_lengths

    def score(self, requests: Sequence[Request]) -> None:
        """Nothing to do: the router scored these requests before routing them."""

    def report(self) -> dict[str, Any]:
        return self.inner.report()


class _Replica:
    def __init__(self, name: str, cost: CostModel, policy: Policy, predictor: Predictor | None,
                 config: SchedulerConfig, device_blocks: int, host_blocks: int, block_size: int,
                 load: ReplicaLoad) -> None:
        self.name = name
        self.clock = VirtualClock()
        self.block_size = block_size
        self.blocks = BlockManager(device_blocks, host_blocks, block_size)
        self.scheduler = Scheduler(config, policy, self.blocks, self.clock)
        self.executor = CostModelExecutor(cost, self.clock, block_size)
        self.engine = EngineCore(self.scheduler, self.executor, predictor)
        self.load = load
        self.requests: list[Request] = []
        self.stepping = False
        self._last: tuple[SchedulerOutput, list[Request]] | None = None
        self.max_in_flight = 0
        # What the replica went through, weighted by step time: the batch it ran, whether requests
        # waited in its queue meanwhile, and its peak KV usage (for the report: why routing pays or not).
        self.batch_seconds = 0.0
        self.queued_seconds = 0.0
        self.max_batch = 0
        self.max_queued = 0
        self.peak_kv_usage = 0.0

    def add(self, req: Request) -> None:
        self.requests.append(req)
        self.scheduler.add_request(req)

    def start_step(self, now: float) -> float:
        """Run the next step from ``now``; returns when it ends."""
        self.clock.advance_to(now)
        out, finished = self.engine.step()
        if out.is_empty:
            raise RuntimeError(f"replica {self.name} made no progress at t={now:.3f}s with "
                               f"{self.scheduler.num_queued} queued and {len(self.scheduler.running)} running")
        self._last = (out, finished)
        self.stepping = True
        end = self.clock.now()
        queued = self.scheduler.num_queued
        self.batch_seconds += len(out.requests) * (end - now)
        self.queued_seconds += (end - now) if queued else 0.0
        self.max_batch = max(self.max_batch, len(out.requests))
        self.max_queued = max(self.max_queued, queued)
        return end

    def end_step(self, lengths: ScoreLengths) -> None:
        """Tell the tracker (and the router's length calibration) what the step streamed back."""
        out, finished = self._last
        now = self.clock.now()
        load = self.load
        for req in out.requests:
            if req.last_token_time == now:
                load.on_tokens(req.request_id, 1, now)
        for req in finished:
            load.on_finish(req.request_id, now)
            if req.score is not None:
                lengths.observe(req.score, req.num_output_tokens)
        used = (self.blocks.device.num_blocks - self.blocks.num_free_device_blocks) * self.block_size
        load.set_kv(used)
        self.peak_kv_usage = max(self.peak_kv_usage, used / (self.blocks.device.num_blocks * self.block_size))
        self._last = None
        self.stepping = False


@dataclass
class ClusterResult(SimResult):
    replicas: list[dict[str, Any]] = field(default_factory=list)
    imbalance: dict[str, float] = field(default_factory=dict)
    loads: list[ReplicaLoad] = field(default_factory=list)  # the router's trackers, as the run left them


def simulate_cluster(
    requests: Sequence[Request],
    make_policy: Callable[[CostModel], Policy],
    predictor: Predictor | None,
    cost_models: Sequence[CostModel],
    config: SchedulerConfig,
    router: Router,
    block_size: int = 16,
    tracker_params: dict[str, float] | None = None,
) -> ClusterResult:
    """Run ``requests`` through ``router`` onto one replica per cost model, to completion."""
    if not cost_models:
        raise ValueError("a cluster needs at least one replica")
    requests = sorted(requests, key=lambda r: r.arrival_time)
    # As in the single-engine simulation: memory-unbounded models get no more blocks than the workload uses.
    workload_blocks = sum(-(-(r.prompt_len + r.sampling.max_tokens) // block_size) for r in requests)
    speeds = relative_speeds(cost_models)
    replicas = []
    for k, (cost, speed) in enumerate(zip(cost_models, speeds)):
        device_blocks = max(1, min(cost.kv_capacity_tokens() // block_size, workload_blocks))
        host_blocks = min(cost.host_capacity_tokens() // block_size, workload_blocks)
        load = ReplicaLoad(f"r{k}", speed=speed, kv_capacity_tokens=device_blocks * block_size,
                           decode_step_s=_decode_step(cost), **(tracker_params or {}))
        policy = make_policy(cost)
        engine_predictor = _RouterScored(predictor) if predictor is not None and policy.needs_prediction else None
        replicas.append(_Replica(f"r{k}:{cost.name}", cost, policy, engine_predictor, config,
                                 device_blocks, host_blocks, block_size, load))
    loads = [r.load for r in replicas]
    lengths = ScoreLengths()

    wall = time.perf_counter()
    if predictor is not None:
        predictor.score(requests)  # at the router: once, before any routing
    ends: list[tuple[float, int]] = []  # (end of the running step, replica)
    n, i = len(requests), 0
    inf = float("inf")
    while i < n or ends:
        t_arrival = requests[i].arrival_time if i < n else inf
        touched: list[int] = []
        if ends and ends[0][0] <= t_arrival:
            now = ends[0][0]
            while ends and ends[0][0] == now:
                k = heapq.heappop(ends)[1]
                replicas[k].end_step(lengths)
                touched.append(k)
        else:
            now = t_arrival
        while i < n and requests[i].arrival_time <= now:
            req = requests[i]
            i += 1
            predicted = req.predicted_len
            if predicted is None and req.score is not None:
                predicted = lengths.predict(req.score)
            info = RouteRequest(req.prompt_len, predicted)
            k = router.choose(info, loads)
            loads[k].on_send(req.request_id, info.prompt_tokens, predicted, None, now)
            replicas[k].add(req)
            if loads[k].num_in_flight > replicas[k].max_in_flight:
                replicas[k].max_in_flight = loads[k].num_in_flight
            touched.append(k)
        for k in dict.fromkeys(touched):
            replica = replicas[k]
            if not replica.stepping and replica.scheduler.has_work:
                heapq.heappush(ends, (replica.start_step(now), k))
    wall = time.perf_counter() - wall

    summary = summarize(requests)
    per_replica = [_replica_report(r, summary["duration_s"]) for r in replicas]
    report = predictor.report() if predictor is not None else {"predictor": None}
    return ClusterResult(
        list(requests), summary, sum(r.engine.num_steps for r in replicas), wall,
        sum(r.executor.busy_s for r in replicas), report, per_replica, imbalance(per_replica), loads,
    )


def _replica_report(replica: _Replica, duration_s: float) -> dict[str, Any]:
    table = request_table(replica.requests)
    out = {
        "name": replica.name,
        "speed": replica.load.speed,
        "requests": len(replica.requests),
        "output_tokens": int(table["output_len"].sum()),
        "busy_s": replica.executor.busy_s,
        "utilization": replica.executor.busy_s / duration_s if duration_s > 0 else 0.0,
        "steps": replica.engine.num_steps,
        "max_in_flight": replica.max_in_flight,
        "preemptions": replica.scheduler.num_preemptions,
        # batch and queue averaged over busy time; peak KV usage as a fraction of the device cache
        "mean_batch": replica.batch_seconds / busy if (busy := replica.executor.busy_s) > 0 else 0.0,
        "max_batch": replica.max_batch,
        "queued_time_fraction": replica.queued_seconds / busy if busy > 0 else 0.0,
        "max_queued": replica.max_queued,
        "peak_kv_usage": replica.peak_kv_usage,
    }
    for key, values in (("mean_latency_s", table["e2e"]), ("mean_latency_per_token_s", table["latency_per_token"])):
        out[key] = float(values.mean()) if len(values) else float("nan")
    out["p99_latency_s"] = float(np.percentile(table["e2e"], 99)) if len(table["e2e"]) else float("nan")
    return out


def imbalance(per_replica: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How unevenly the work fell: max / mean of each replica's busy time (1.0 = perfectly even),
    the same for output tokens and requests, and the spread of mean latency across replicas."""

    def max_over_mean(key: str) -> float:
        values = np.array([r[key] for r in per_replica], float)
        return float(values.max() / values.mean()) if values.mean() > 0 else 1.0

    latency = np.array([r["mean_latency_s"] for r in per_replica], float)
    latency = latency[np.isfinite(latency)]
    return {
        "busy_max_over_mean": max_over_mean("busy_s"),
        "output_tokens_max_over_mean": max_over_mean("output_tokens"),
        "requests_max_over_mean": max_over_mean("requests"),
        "mean_latency_max_over_min": float(latency.max() / latency.min()) if len(latency) and latency.min() > 0 else 1.0,
    }
