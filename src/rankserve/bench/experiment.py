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
from rankserve.predict import LEARNED_NAMES, make_predictor
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

    @property
    def label(self) -> str:
        """A short name of the system: policy (+ params) + predictor."""
        name = self.policy
        if self.policy_params:
            name += "(" + ",".join(f"{k}={v}" for k, v in self.policy_params.items()) + ")"
        if self.predictor and POLICIES[self.policy].needs_prediction:
            name += f"+{self.predictor}"
            if self.predictor == "noisy":
                name += f"@{self.target_tau:g}"
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


def run_spec(spec: SimSpec, progress: bool = False) -> tuple[dict[str, Any], SimResult]:
    """Run one simulation; returns the JSON-ready record (spec, summary, predictor report)."""
    rng = np.random.default_rng(spec.seed)
    lengths, rows = sample_workload(spec.workload, spec.num_requests, rng, prompt_len=spec.prompt_len)
    arrivals = arrival_times(spec.arrival, spec.rate, spec.num_requests, rng)
    texts = None
    if spec.predictor in LEARNED_NAMES and POLICIES[spec.policy].needs_prediction:
        if rows is None:
            raise ValueError(f"predictor '{spec.predictor}' reads prompt text: use a sharegpt workload")
        from rankserve.learn.sharegpt import load_prompts

        prompts = load_prompts()
        texts = [prompts[r].text for r in rows]
    # Simulations replay ShareGPT reference lengths: learned predictors use the weights trained on those labels.
    result, policy = simulate_trace(spec, lengths, arrivals, texts, labels="reference", progress=progress)
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
    return record, result


def simulate_trace(spec: SimSpec, lengths: np.ndarray, arrivals: np.ndarray, texts: Sequence[str] | None = None,
                   labels: str = "reference", progress: bool = False) -> tuple[SimResult, Policy]:
    """Simulate ``spec``'s system (policy, predictor, hardware, batch limits) on given requests:
    ``lengths`` rows of (prompt, output) tokens, arrival times in seconds, and the prompts' texts
    for predictors that read them (trained on ``labels``, served or reference)."""
    cost = get_cost_model(spec.hardware)
    policy = make_sim_policy(spec.policy, cost, spec.max_num_seqs, **spec.policy_params)
    predictor = None
    if spec.predictor is not None and policy.needs_prediction:
        predictor = make_predictor(
            spec.predictor, spec.target_tau, spec.seed, calibration_lengths=lengths[:, 1], labels=labels
        )
    config = SchedulerConfig(
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        preemption_mode=spec.preemption_mode,
    )
    requests = build_requests(lengths, arrivals, texts=texts)
    return simulate(requests, policy, predictor, cost, config, spec.block_size, progress), policy


def _run_record(spec: SimSpec) -> dict[str, Any]:
    return run_spec(spec)[0]


def run_grid(specs: list[SimSpec], workers: int = 2) -> list[dict[str, Any]]:
    """Run many specs, in parallel processes; records come back in the order of ``specs``."""
    if workers <= 1 or len(specs) <= 1:
        return [_run_record(s) for s in specs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run_record, specs))


def sweep_specs(systems: list[SimSpec], rates: list[float]) -> list[SimSpec]:
    """Every system at every rate (same seed, so the same requests per rate)."""
    return [replace(system, rate=rate) for system in systems for rate in rates]
