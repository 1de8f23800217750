"""Routers on a simulated cluster: every router x {fcfs, ltr + ranker} at 70 / 85 / 95% of capacity.

    python benchmarks/cluster_sim.py [--replicas 8] [--hardware a100-llama3-8b] [--num-requests 20000]
        [--loads 0.7,0.85,0.95] [--systems fcfs ltr+ranker] [--routers ...] [--router-arg K=V ...]
        [--workload sharegpt:test] [--prompt-len 32] [--arrival poisson] [--max-num-seqs 256]
        [--capacity RPS] [--workers 2] [--out out/cluster_sim] [--scores FILE | --write-scores FILE]

1. Capacity: FCFS behind round-robin, Poisson arrivals at twice the cluster's nominal rate
   (overload), ShareGPT test-split prompts. The capacity is the completion rate while the cluster
   is saturated: 80% of the requests over the time between the 10% and the 90% finishing (the
   start, when batches fill, and the drain at the end are left out). ``--capacity`` skips it.
2. Every router x system at each load (a fraction of that capacity), the same requests for all
   (same seed). The ranker is loaded once per worker and keeps its scores across runs.
A router may carry parameters: ``sal:prefill_weight=0,overrun_factor=1`` (see route/load.py).
Writes ``table.md``, ``results.json`` and ``plot.png`` under ``--out``, with the CPU model.

``--write-scores FILE`` scores the ShareGPT test-split prompts with the reference ranker once and
writes the scores per row; ``--scores FILE`` then replays them (exactly the scores the ranker gives)
on a machine without the ranker's model and the prompts' dataset packages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rankserve.bench.experiment import SimSpec, parse_params, parse_system, run_spec  # noqa: E402
from rankserve.core.request import Request, SamplingParams  # noqa: E402
from rankserve.learn import LEARNED_NAMES  # noqa: E402
from rankserve.learn.sharegpt import sharegpt_rows  # noqa: E402
from rankserve.predict import Predictor, make_predictor  # noqa: E402
from rankserve.route.policies import ROUTER_NAMES  # noqa: E402
from rankserve.sim.cluster import parse_hardware_list  # noqa: E402
from rankserve.sim.cost_model import StepShape, get_cost_model  # noqa: E402
from rankserve.sim.machine import cpu_model  # noqa: E402

_predictors: dict[str, Any] = {}
_score_table: dict[str, float] = {}  # ShareGPT row (as text) -> the ranker's score, with --scores


class ScoreTable(Predictor):
    """The reference ranker's scores, precomputed per ShareGPT row (``prompt_text`` holds the row)."""

    name = "ranker"
    gives_lengths = False

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def score(self, requests) -> None:
        for req in requests:
            req.set_prediction(self.scores[req.prompt_text])

    def report(self) -> dict[str, Any]:
        return {"predictor": self.name, "precomputed_scores": len(self.scores)}


def write_scores(path: Path) -> None:
    from rankserve.learn.sharegpt import load_prompts  # noqa: PLC0415 (needs the dataset package)

    prompts = load_prompts()
    rows = sharegpt_rows("test")
    requests = [Request(range(1), SamplingParams(max_tokens=1), prompt_text=prompts[r].text) for r in rows]
    make_predictor("ranker", labels="reference").score(requests)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(int(r)): req.score for r, req in zip(rows, requests)}) + "\n")
    print(f"wrote the ranker's scores of {len(rows)} test-split prompts to {path}")


def measure_capacity(base: SimSpec) -> dict[str, float]:
    """FCFS's saturated completion rate (requests/s) on ``base``'s cluster (see the docstring)."""
    spec = replace(base, policy="fcfs", predictor=None, router="round-robin", rate=_nominal_overload(base))
    record, result = run_spec(spec)
    finish = np.sort([r.finished_time for r in result.requests])
    n = len(finish)
    lo, hi = finish[int(0.1 * n)], finish[int(0.9 * n) - 1]
    return {"capacity_rps": 0.8 * n / (hi - lo), "overload_rate": spec.rate,
            "overall_throughput_rps": record["summary"]["throughput_rps"], "wall_s": record["sim"]["wall_time_s"]}


def _nominal_overload(base: SimSpec) -> float:
    """Twice a rough capacity (ShareGPT's ~300 output tokens at the replicas' decode rate at a full batch)."""
    batch = min(base.max_num_seqs, 256)
    shape = StepShape.decode(batch, 600).astuple()
    tokens_per_s = sum(batch / get_cost_model(h).step_time(*shape) for h in parse_hardware_list(base.hardware, base.replicas))
    return 2.0 * tokens_per_s / 300.0


def _run(spec: SimSpec) -> dict[str, Any]:
    predictor = None
    row_texts = None
    if _score_table and spec.predictor == "ranker" and spec.uses_predictor:
        predictor = ScoreTable(_score_table)
        row_texts = _RowNames()
    elif spec.predictor in LEARNED_NAMES and spec.uses_predictor:
        if spec.predictor not in _predictors:
            _predictors[spec.predictor] = make_predictor(spec.predictor, labels="reference")
        predictor = _predictors[spec.predictor]
    started = time.perf_counter()
    record, _ = run_spec(spec, predictor=predictor, row_texts=row_texts)
    record["wall_s_including_scoring"] = time.perf_counter() - started
    return record


class _RowNames:
    """Row ``i``'s "text" is ``str(i)``: what ScoreTable looks up."""

    def __getitem__(self, row: int) -> str:
        return str(int(row))


def run_all(specs: list[SimSpec], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [_run(s) for s in specs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, specs))


def table(records: list[dict[str, Any]], capacity: float) -> str:
    loads = sorted({r["load"] for r in records})
    systems = list(dict.fromkeys(r["engine_system"] for r in records))
    routers = list(dict.fromkeys(r["router"] for r in records))
    by = {(r["load"], r["engine_system"], r["router"]): r["summary"] for r in records}
    by_imbalance = {(r["load"], r["engine_system"], r["router"]): r["cluster"]["imbalance"]["busy_max_over_mean"]
                    for r in records}
    lines = [f"FCFS capacity {capacity:.1f} req/s. Cells: p99 latency (s) / mean latency per token (ms) / "
             "imbalance (busy time, max over mean of the replicas).", "",
             "| load | system | " + " | ".join(routers) + " |", "|---|---|" + "---|" * len(routers)]
    best_lpt = {load: min(by[k]["mean_latency_per_token_s"] for k in by if k[0] == load) for load in loads}
    for load in loads:
        for system in systems:
            cells = []
            for router in routers:
                s = by.get((load, system, router))
                if s is None:
                    cells.append("-")
                    continue
                busy = by_imbalance[(load, system, router)]
                cell = f"{s['p99_latency_s']:.2f} / {s['mean_latency_per_token_s'] * 1e3:.2f} / {busy:.3f}"
                if s["mean_latency_per_token_s"] == best_lpt[load]:
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {load:.0%} | {system} | " + " | ".join(cells) + " |")
    lines += ["", "p99 latency of pow2 / sal (target >= 1.3 at 85%):", ""]
    for load in loads:
        for system in systems:
            for router in (r for r in routers if r.startswith("sal")):
                a, b = by.get((load, system, "pow2")), by.get((load, system, router))
                if a and b:
                    lines.append(f"- {load:.0%}, {system}, {router}: {a['p99_latency_s'] / b['p99_latency_s']:.3f}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    systems = list(dict.fromkeys(r["engine_system"] for r in records))
    fig, axes = plt.subplots(2, len(systems), figsize=(5 * len(systems), 7), squeeze=False)
    for col, system in enumerate(systems):
        for router in dict.fromkeys(r["router"] for r in records):
            rows = sorted(((r["load"], r["summary"]) for r in records
                           if r["engine_system"] == system and r["router"] == router), key=lambda x: x[0])
            x = [100 * load for load, _ in rows]
            axes[0][col].plot(x, [s["p99_latency_s"] for _, s in rows], marker="o", label=router)
            axes[1][col].plot(x, [s["mean_latency_per_token_s"] * 1e3 for _, s in rows], marker="o", label=router)
        axes[0][col].set_title(system)
        axes[0][col].set_ylabel("p99 latency (s)")
        axes[1][col].set_ylabel("mean latency per token (ms)")
        axes[1][col].set_xlabel("load (% of FCFS capacity)")
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--hardware", default="a100-llama3-8b")
    parser.add_argument("--num-requests", type=int, default=20_000)
    parser.add_argument("--workload", default="sharegpt:test")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of a synthetic workload")
    parser.add_argument("--arrival", default="poisson", help="poisson, gamma:CV, ... (as rankserve simulate)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--loads", default="0.7,0.85,0.95")
    parser.add_argument("--systems", nargs="+", default=["fcfs", "ltr+ranker"])
    parser.add_argument("--routers", nargs="+", default=list(ROUTER_NAMES),
                        help=f"{', '.join(ROUTER_NAMES)}, each optionally NAME:k=v,...")
    parser.add_argument("--router-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--predictor", default="ranker", help="what the router scores with, for systems without one")
    parser.add_argument("--capacity", type=float, default=None, help="skip measuring it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/cluster_sim"))
    parser.add_argument("--scores", type=Path, default=None, help="precomputed ranker scores (see the docstring)")
    parser.add_argument("--write-scores", type=Path, default=None, help="write them, then stop")
    args = parser.parse_args()
    if args.write_scores:
        write_scores(args.write_scores)
        return
    if args.scores:
        _score_table.update(json.loads(args.scores.read_text()))

    base = SimSpec(workload=args.workload, num_requests=args.num_requests, hardware=args.hardware,
                   replicas=args.replicas, predictor=args.predictor, seed=args.seed, arrival=args.arrival,
                   prompt_len=args.prompt_len,
                   max_num_seqs=args.max_num_seqs,
                   router_params=parse_params(",".join(args.router_arg)))
    result: dict[str, Any] = {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
                              "python": platform.python_version(), "hardware": args.hardware,
                              "replicas": args.replicas, "num_requests": args.num_requests, "workload": args.workload,
                              "arrival": args.arrival, "max_num_seqs": args.max_num_seqs,
                              "prompt_len": args.prompt_len}
    if args.capacity is None:
        result["capacity"] = measure_capacity(base)
        capacity = result["capacity"]["capacity_rps"]
        print(f"FCFS capacity: {capacity:.1f} req/s (Poisson overload at {result['capacity']['overload_rate']:.0f} "
              f"req/s, {result['capacity']['wall_s']:.1f} s wall)", flush=True)
    else:
        capacity = args.capacity
        result["capacity"] = {"capacity_rps": capacity, "given": True}

    loads = [float(x) for x in args.loads.split(",")]
    specs, meta = [], []
    for load in loads:
        for system_text in args.systems:
            system = parse_system(system_text, base)
            for router_text in args.routers:
                router, _, params = router_text.partition(":")
                if router not in ROUTER_NAMES:
                    parser.error(f"argument --routers: unknown router {router!r}")
                specs.append(replace(system, router=router, rate=load * capacity,
                                     router_params={**base.router_params, **parse_params(params)}))
                meta.append((load, system_text, router_text))
    print(f"{len(specs)} runs of {args.num_requests} requests on {args.replicas} x {args.hardware}, "
          f"{args.workers} workers", flush=True)
    records = run_all(specs, args.workers)
    for record, (load, system_text, router_text) in zip(records, meta):
        record["load"] = load
        record["engine_system"] = system_text
        record["router"] = router_text
    result["runs"] = records
    text = table(records, capacity)
    print(text)
    print(f"\nsimulation wall time per run: {min(r['sim']['wall_time_s'] for r in records):.1f}-"
          f"{max(r['sim']['wall_time_s'] for r in records):.1f} s; CPU: {result['cpu']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(f"{date.today()}, {result['cpu']}\n\n{text}\n")
    (args.out / "results.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    plot(records, args.out / "plot.png", f"{args.replicas} x {args.hardware}, {args.num_requests} {args.workload}")
    print(f"wrote {args.out}/table.md, results.json, plot.png")


if __name__ == "__main__":
    main()
