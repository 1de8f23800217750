"""Check a calibrated CPU preset against the engine in-process, on a replayed trace.

    rankserve calibrate                      # fits this machine's preset (cpu-local)
    python benchmarks/calibrate_cpu.py [--hardware cpu-local] [--requests 120] [--rate 1.5]
        [--json out/calibration.json]

A ShareGPT trace (prompt <= 512, output <= 256 tokens, replayed lengths, Poisson arrivals in real
time, FCFS, 16 sequences, 512 batched tokens) runs on the real engine (SmolLM2-135M-Instruct,
bf16, this machine) and in the simulator with the preset; the script prints both sides' mean
latency, TTFT and throughput and the simulator's error, with the CPU's model name. The trace's
seed (2) differs from the one `rankserve calibrate` replays, so the check is out of sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rankserve.bench.workloads import arrival_times, sample_lengths
from rankserve.core import SchedulerConfig, make_policy
from rankserve.core.metrics import summarize
from rankserve.engine.build import EngineSettings, build_core
from rankserve.sim.calibrate import replay
from rankserve.sim.cost_model import get_cost_model
from rankserve.sim.machine import cpu_model
from rankserve.sim.simulator import build_requests, simulate

SETTINGS = EngineSettings(dtype="bfloat16", policy="fcfs", max_num_seqs=16, max_num_batched_tokens=512)
KEYS = ("mean_latency_s", "p90_latency_s", "mean_ttft_s", "mean_latency_per_token_s", "throughput_rps")


def trace(n: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = sample_lengths("sharegpt", n, rng)
    lengths[:, 0] = np.minimum(lengths[:, 0], 512)
    lengths[:, 1] = np.minimum(lengths[:, 1], 256)
    return lengths, arrival_times("poisson", rate, n, rng)


def run_engine(lengths: np.ndarray, arrivals: np.ndarray, seed: int):
    """Replay the trace on the real engine (FCFS, SETTINGS' limits) in real time."""
    return replay(build_core(SETTINGS)[1], lengths, arrivals, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="cpu-local", help="the preset to check (rankserve calibrate's)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=Path("out/calibration.json"))
    args = parser.parse_args()
    try:
        model = get_cost_model(args.hardware)
    except ValueError as exc:
        parser.error(f"argument --hardware: {exc}")

    lengths, arrivals = trace(args.requests, args.rate, seed=2)
    engine_reqs, _ = run_engine(lengths, arrivals, seed=2)
    sim = simulate(build_requests(lengths, arrivals), make_policy("fcfs"), None, model,
                   SchedulerConfig(max_num_seqs=SETTINGS.max_num_seqs,
                                   max_num_batched_tokens=SETTINGS.max_num_batched_tokens),
                   block_size=SETTINGS.block_size)
    real = summarize(engine_reqs)
    print(f"CPU: {cpu_model()}; preset {args.hardware} fitted on {(model.fitted_on or {}).get('cpu_model')}")
    rows = []
    for key in KEYS:
        rows.append({"metric": key, "engine": real[key], "simulator": sim.summary[key],
                     "error": sim.summary[key] / real[key] - 1})
        print(f"{key:28s} engine {real[key]:9.4f}  simulator {sim.summary[key]:9.4f}  "
              f"error {sim.summary[key] / real[key] - 1:+.1%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"hardware": args.hardware, "cost_model": model.to_dict(), "cpu": cpu_model(),
                                     "fidelity": rows, "requests": args.requests, "rate": args.rate},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
