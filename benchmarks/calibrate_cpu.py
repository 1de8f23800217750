"""Calibrate the ``cpu-smollm2-135m`` cost model on the real engine, then check the simulator
against the engine on a replayed trace.

    python benchmarks/calibrate_cpu.py [--requests 120] [--rate 1.5] [--json out/calibration.json]

1. A sweep of batch shapes (1-64 sequences, contexts 64-768, chunked prefills) and a ShareGPT
   trace (prompt <= 512, output <= 256 tokens, replayed lengths, Poisson arrivals in real time)
   run through the real engine (SmolLM2-135M-Instruct, bf16, this machine); every step's wall
   time is recorded with its shape.
2. The linear cost model's coefficients are fitted to those steps by non-negative least squares.
3. A second trace (another seed) runs on the engine and in the simulator with the fitted model;
   the script prints both sides' mean latency and TTFT and the simulator's error.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from rankserve.bench.workloads import arrival_times, sample_lengths
from rankserve.core import SchedulerConfig, make_policy
from rankserve.core.metrics import summarize
from rankserve.core.request import Request, SamplingParams
from rankserve.engine.build import EngineSettings, build_core
from rankserve.sim.cost_model import LinearCostModel, cpu_smollm2_135m
from rankserve.sim.simulator import build_requests, simulate

FEATURES = ("base_s", "prefill_s_per_token", "decode_s_per_token", "kv_s_per_token", "attn_s_per_pair", "seq_s")
SETTINGS = EngineSettings(dtype="bfloat16", policy="fcfs", max_num_seqs=16, max_num_batched_tokens=512)


def trace(n: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = sample_lengths("sharegpt", n, rng)
    lengths[:, 0] = np.minimum(lengths[:, 0], 512)
    lengths[:, 1] = np.minimum(lengths[:, 1], 256)
    return lengths, arrival_times("poisson", rate, n, rng)


def _core(settings: EngineSettings):
    return build_core(settings)[1]  # driven directly, on this thread


def _timed_step(core, steps: list[tuple]) -> None:
    t0 = time.perf_counter()
    out, _ = core.step()
    dt = time.perf_counter() - t0
    steps.append((out.num_prefill_tokens, out.num_decode_tokens, out.kv_tokens, out.attn_pairs,
                  len(out.requests), dt))


def sweep_shapes(seed: int = 0) -> list[tuple]:
    """Timed steps over a grid of batch sizes and contexts (prefill chunks, then 7 decode steps)."""
    core = _core(replace(SETTINGS, max_num_seqs=64))
    rng = np.random.default_rng(seed)
    vocab = core.executor.model.cfg.vocab_size
    steps: list[tuple] = []
    for batch in (1, 4, 16, 32, 64):
        for context in (64, 256, 768):
            core.add_requests([Request(rng.integers(0, vocab, context).tolist(),
                                       SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
                               for _ in range(batch)])
            while core.scheduler.has_work:
                _timed_step(core, steps)
    return steps


def run_engine(lengths: np.ndarray, arrivals: np.ndarray, seed: int) -> tuple[list[Request], list[tuple]]:
    """Replay the trace on the real engine in real time; returns the requests and the timed steps."""
    core = _core(SETTINGS)
    sched = core.scheduler
    rng = np.random.default_rng(seed)
    vocab = core.executor.model.cfg.vocab_size
    reqs = [Request(rng.integers(0, vocab, int(p)).tolist(), SamplingParams(max_tokens=int(o), ignore_eos=True,
                                                                           temperature=0.0),
                    oracle_output_len=int(o)) for p, o in lengths]
    steps = []
    start = sched.clock.now()
    for req, a in zip(reqs, arrivals):
        req.arrival_time = start + float(a)
    i = 0
    while i < len(reqs) or sched.has_work:
        now = sched.clock.now()
        j = i
        while j < len(reqs) and reqs[j].arrival_time <= now:
            j += 1
        if j > i:
            core.add_requests(reqs[i:j])
            i = j
        if not sched.has_work:
            time.sleep(max(0.0, min(reqs[i].arrival_time - now, 0.05)))
            continue
        _timed_step(core, steps)
    for req in reqs:
        req.arrival_time -= start
        for attr in ("first_token_time", "finished_time", "first_scheduled_time", "last_token_time"):
            setattr(req, attr, getattr(req, attr) - start)
    return reqs, steps


def fit(steps: list[tuple]) -> LinearCostModel:
    rows = np.array([[1.0, *s[:5]] for s in steps])
    times = np.array([s[5] for s in steps])
    scale = rows.max(axis=0)  # columns on comparable scales for the solver
    coef, _ = nnls(rows / scale, times)
    coef = coef / scale
    reference = cpu_smollm2_135m()
    return LinearCostModel(**dict(zip(FEATURES, coef.tolist())), name="cpu-smollm2-135m",
                           kv_capacity_tokens=reference.kv_capacity_tokens(),
                           host_capacity_tokens=reference.host_capacity_tokens(),
                           kv_bytes_per_token=reference.kv_bytes_per_token,
                           swap_bytes_per_s=reference.swap_bytes_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=Path("out/calibration.json"))
    args = parser.parse_args()

    lengths, arrivals = trace(args.requests, args.rate, seed=1)
    _, steps = run_engine(lengths, arrivals, seed=1)
    steps += sweep_shapes()
    model = fit(steps)
    predicted = np.array([model.step_time(*s[:5]) for s in steps])
    measured = np.array([s[5] for s in steps])
    step_error = float(np.abs(predicted - measured).mean() / measured.mean())
    print(f"calibration: {len(steps)} steps, mean {measured.mean() * 1e3:.1f} ms; fit mean abs error "
          f"{step_error:.1%}; coefficients " + ", ".join(f"{k}={getattr(model, k):.3g}" for k in FEATURES))

    lengths, arrivals = trace(args.requests, args.rate, seed=2)
    engine_reqs, _ = run_engine(lengths, arrivals, seed=2)
    sim = simulate(build_requests(lengths, arrivals), make_policy("fcfs"), None, model,
                   SchedulerConfig(max_num_seqs=SETTINGS.max_num_seqs,
                                   max_num_batched_tokens=SETTINGS.max_num_batched_tokens),
                   block_size=SETTINGS.block_size)
    real = summarize(engine_reqs)
    rows = []
    for key in ("mean_latency_s", "p90_latency_s", "mean_ttft_s", "mean_latency_per_token_s", "throughput_rps"):
        rows.append({"metric": key, "engine": real[key], "simulator": sim.summary[key],
                     "error": sim.summary[key] / real[key] - 1})
        print(f"{key:28s} engine {real[key]:9.4f}  simulator {sim.summary[key]:9.4f}  "
              f"error {sim.summary[key] / real[key] - 1:+.1%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"coefficients": model.to_dict(), "steps": len(steps),
                                     "step_fit_error": step_error, "fidelity": rows,
                                     "requests": args.requests, "rate": args.rate}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
