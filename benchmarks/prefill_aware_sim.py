"""Ranking by predicted work (prefill + decode) against ranking by output length, in the simulator.

    python benchmarks/prefill_aware_sim.py [--out out/prefill_aware]

Workloads: issue 17's burst (120 requests, log-normal outputs of mean 68 and sigma 0.9, every
prompt 1, 100 or 400 tokens, cpu-smollm2-135m, 16 sequences); ShareGPT (its own prompt lengths)
on a100-llama3-8b, a burst of 2,000 and Poisson at 28 req/s; and a RAG-like workload of long
prompts (log-normal, sigma 0.5, clipped) and short answers, as a burst and as Poisson arrivals at
1.2x FCFS's capacity on both presets. Each system runs on the same requests; ``prefill_weight=0``
is the length-only order, the default weight comes from the cost model. Prints tables (mean
latency per token and mean latency, x vs FCFS) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from rankserve.bench.experiment import SimSpec, parse_system, run_spec, simulate_trace
from rankserve.bench.workloads import arrival_times
from rankserve.core.metrics import time_to_k_finished
from rankserve.sim.machine import cpu_model

SYSTEMS = (
    "fcfs",
    "sjf:prefill_weight=0+oracle",
    "sjf+oracle",
    "ltr:prefill_weight=0,length_exponent=0+oracle",
    "ltr+oracle",
    "ltr:prefill_weight=0,length_exponent=0+noisy@0.45",
    "ltr+noisy@0.45",
)
CPU = {"hardware": "cpu-smollm2-135m", "max_num_seqs": 16, "max_num_batched_tokens": 512}
A100 = {"hardware": "a100-llama3-8b", "max_num_seqs": 256, "max_num_batched_tokens": 2048}
# RAG-like: (prompt mean, prompt clip, output mean, requests) per preset.
RAG = {"cpu-smollm2-135m": (1500, (200, 4000), 68, 120), "a100-llama3-8b": (3000, (500, 6000), 250, 2000)}


def rag_lengths(hardware: str, seed: int) -> np.ndarray:
    """(prompt, output) rows: long log-normal prompts (sigma 0.5), log-normal answers (sigma 0.9)."""
    prompt_mean, (lo, hi), out_mean, n = RAG[hardware]
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.rint(rng.lognormal(np.log(prompt_mean) - 0.125, 0.5, n)), lo, hi)
    outputs = np.maximum(np.rint(rng.lognormal(np.log(out_mean) - 0.405, 0.9, n)), 1)
    return np.stack([prompts, outputs], axis=1).astype(int)


def run_rag(spec: SimSpec, arrival: str, rate: float, seed: int) -> dict:
    lengths = rag_lengths(spec.hardware, seed)
    arrivals = arrival_times(arrival, rate, len(lengths), np.random.default_rng(seed + 1))
    result, _ = simulate_trace(spec, lengths, arrivals)
    return {"summary": result.summary, "predictor": result.predictor_report, "requests": result.requests}


def rag_capacity(base: SimSpec, seed: int) -> float:
    """FCFS's completion rate on a RAG burst while the batch is full."""
    out = run_rag(base, "burst", float("inf"), seed)
    k = len(out["requests"]) - base.max_num_seqs
    return k / time_to_k_finished(out["requests"], k)


def experiments(seed: int) -> list[tuple[str, SimSpec, tuple | None]]:
    """(name, base spec, RAG arrival (kind, rate) or None for a spec workload)."""
    runs = []
    for prompt in (1, 100, 400):
        runs.append((f"issue burst, prompt {prompt}", SimSpec(workload="lognormal:68:0.9", prompt_len=prompt,
                     arrival="burst", rate=float("inf"), num_requests=120, seed=seed, **CPU), None))
    runs.append(("ShareGPT burst 2000 (a100)", SimSpec(workload="sharegpt", arrival="burst", rate=float("inf"),
                 num_requests=2000, seed=seed, **A100), None))
    runs.append(("ShareGPT Poisson 28/s (a100)", SimSpec(workload="sharegpt", rate=28.0, num_requests=2000,
                 seed=seed, **A100), None))
    for preset in (CPU, A100):
        base = SimSpec(seed=seed, **preset)
        runs.append((f"RAG burst ({preset['hardware']})", base, ("burst", float("inf"))))
        runs.append((f"RAG Poisson 1.2x capacity ({preset['hardware']})", base, ("poisson", rag_capacity(
            replace(base, policy="fcfs", predictor=None), seed) * 1.2)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/prefill_aware"))
    args = parser.parse_args()
    results = []
    print(f"CPU: {cpu_model()}")
    for name, base, rag in experiments(args.seed):
        rows = []
        for text in args.systems:
            spec = parse_system(text, base)
            if rag is None:
                summary = run_spec(spec)[0]["summary"]
            else:
                summary = run_rag(spec, rag[0], rag[1], args.seed)["summary"]
            rows.append({"system": text, "summary": summary})
        fcfs = rows[0]["summary"]
        print(f"\n{name}" + (f" (rate {rag[1]:.3g} req/s)" if rag and rag[0] == "poisson" else ""))
        print("| system | mean lat/tok ms | x vs fcfs | mean latency s | x vs fcfs |")
        print("|---|---|---|---|---|")
        for row in rows:
            s = row["summary"]
            print(f"| {row['system']} | {s['mean_latency_per_token_s'] * 1e3:.1f} | "
                  f"{fcfs['mean_latency_per_token_s'] / s['mean_latency_per_token_s']:.2f} | "
                  f"{s['mean_latency_s']:.2f} | {fcfs['mean_latency_s'] / s['mean_latency_s']:.2f} |")
        results.append({"experiment": name, "rag_arrival": rag, "rows": rows})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_aware.json").write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out / 'prefill_aware.json'}")


if __name__ == "__main__":
    main()
