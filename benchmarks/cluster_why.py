"""Why routers barely differ on a simulated cluster: what the replicas go through, and what p99 is.

    python benchmarks/cluster_why.py [--hardware a100-llama3-8b] [--replicas 8] [--capacity RPS]
        [--loads 0.7,0.85,0.95] [--routers pow2 sal] [--system fcfs+oracle] [--num-requests 20000]
        [--arrival poisson] [--workload sharegpt:test] [--max-num-seqs 256] [--out out/cluster_why]

For each load x router it prints

- queueing: mean TTFT, p99 of the time from arrival to first being scheduled (queue wait), the share
  of busy time during which some request waited in a replica's queue, the longest queue;
- the replicas: mean batch over busy time (and max/min across replicas), peak KV usage, preemptions;
- the p99 latency and what it consists of: the requests at or above it, their median output length,
  TTFT and time per output token (TPOT), and how much TPOT varies among them (coefficient of
  variation): a router can only move p99 by changing the TPOT of the longest requests;
- two reference TPOTs from the cost model: a replica decoding one sequence alone (the floor no
  router can beat) and one decoding the run's mean batch.

The loads are fractions of the FCFS capacity, measured as ``cluster_sim.py`` does unless ``--capacity``
gives it. The system is the engines' policy plus what the router reads (default ``fcfs+oracle``: FCFS engines,
the router reads the true lengths, the best case for ``sal``). Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cluster_sim import measure_capacity

from rankserve.bench.experiment import SimSpec, parse_params, parse_system, run_spec
from rankserve.core.metrics import request_table
from rankserve.sim.cluster import parse_hardware_list
from rankserve.sim.cost_model import StepShape, get_cost_model
from rankserve.sim.machine import cpu_model


def diagnose(spec: SimSpec) -> dict[str, Any]:
    record, result = run_spec(spec)
    table = request_table(result.requests)
    waits = np.array([r.first_scheduled_time - r.arrival_time for r in result.requests])
    replicas = record["cluster"]["replicas"]
    batches = np.array([r["mean_batch"] for r in replicas])
    e2e, n_out, ttft, tpot = table["e2e"], table["output_len"], table["ttft"], table["tpot"]
    p99 = float(np.percentile(e2e, 99))
    tail = e2e >= p99
    context = int(np.mean(n_out) / 2 + np.mean([r.prompt_len for r in result.requests]))
    costs = [get_cost_model(h) for h in parse_hardware_list(spec.hardware, spec.replicas)]
    alone = min(c.step_time(*StepShape.decode(1, context).astuple()) for c in costs)
    at_mean = float(np.mean([c.step_time(*StepShape.decode(max(1, round(b)), context).astuple())
                             for c, b in zip(costs, batches)]))
    return {
        "load_rate": spec.rate,
        "router": spec.router + (f":{spec.router_params}" if spec.router_params else ""),
        "summary": record["summary"],
        "imbalance": record["cluster"]["imbalance"],
        "queue": {"mean_ttft_s": float(ttft.mean()), "p99_wait_s": float(np.percentile(waits, 99)),
                  "max_wait_s": float(waits.max()),
                  "queued_time_fraction": float(np.mean([r["queued_time_fraction"] for r in replicas])),
                  "max_queued": int(max(r["max_queued"] for r in replicas))},
        "replicas": {"mean_batch": float(batches.mean()), "batch_max_over_min": float(batches.max() / batches.min()),
                     "max_batch": int(max(r["max_batch"] for r in replicas)),
                     "peak_kv_usage": float(max(r["peak_kv_usage"] for r in replicas)),
                     "preemptions": int(sum(r["preemptions"] for r in replicas))},
        "p99": {"latency_s": p99, "requests": int(tail.sum()), "median_output_len": float(np.median(n_out[tail])),
                "p99_output_len": float(np.percentile(n_out, 99)),
                "median_ttft_s": float(np.median(ttft[tail])), "median_tpot_ms": float(np.median(tpot[tail]) * 1e3),
                "tpot_cv": float(tpot[tail].std() / tpot[tail].mean()),
                "decode_share": float(np.median((e2e[tail] - ttft[tail]) / e2e[tail]))},
        "reference_tpot_ms": {"alone": alone * 1e3, "at_mean_batch": at_mean * 1e3, "context": context},
        "wall_s": record["sim"]["wall_time_s"],
    }


def line(d: dict[str, Any], load: float) -> str:
    s, q, r, p, ref = d["summary"], d["queue"], d["replicas"], d["p99"], d["reference_tpot_ms"]
    return (f"| {load:.0%} | {d['router']} | {s['p99_latency_s']:.2f} | {s['mean_latency_per_token_s'] * 1e3:.2f} | "
            f"{q['mean_ttft_s'] * 1e3:.0f} | {q['p99_wait_s'] * 1e3:.0f} | {q['queued_time_fraction']:.3f} | "
            f"{q['max_queued']} | {r['mean_batch']:.0f} ({r['batch_max_over_min']:.3f}) | {r['max_batch']} | "
            f"{r['peak_kv_usage']:.2f} | {r['preemptions']} | {p['median_output_len']:.0f} | "
            f"{p['median_tpot_ms']:.1f} ({p['tpot_cv']:.3f}) | {p['decode_share']:.3f} | "
            f"{ref['alone']:.1f} / {ref['at_mean_batch']:.1f} |")


HEADER = ("| load | router | p99 lat s | mean lat/tok ms | mean TTFT ms | p99 queue wait ms | time with a queue | "
          "max queue | mean batch (max/min) | max batch | peak KV | preemptions | p99 requests: median out len | "
          "their TPOT ms (CV) | their decode share | TPOT alone / at mean batch ms |\n" + "|---" * 16 + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="a100-llama3-8b")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--capacity", type=float, default=None, help="req/s the loads are fractions of (default: measure)")
    ap.add_argument("--loads", default="0.7,0.85,0.95")
    ap.add_argument("--routers", nargs="+", default=["pow2", "sal"], help="NAME or NAME:k=v,...")
    ap.add_argument("--system", default="fcfs+oracle")
    ap.add_argument("--num-requests", type=int, default=20_000)
    ap.add_argument("--workload", default="sharegpt:test")
    ap.add_argument("--arrival", default="poisson")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("out/cluster_why"))
    args = ap.parse_args()
    base = parse_system(args.system, SimSpec(workload=args.workload, num_requests=args.num_requests,
                                             hardware=args.hardware, replicas=args.replicas, arrival=args.arrival,
                                             max_num_seqs=args.max_num_seqs))
    if args.capacity is None:
        args.capacity = round(measure_capacity(base)["capacity_rps"], 1)
    print(f"{args.replicas} x {args.hardware}, {args.num_requests} {args.workload}, {args.arrival}, "
          f"{args.system}, max_num_seqs {args.max_num_seqs}, capacity {args.capacity} req/s; CPU: {cpu_model()}")
    print(HEADER, flush=True)
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        for text in args.routers:
            name, _, params = text.partition(":")
            d = diagnose(replace(base, rate=load * args.capacity, router=name, router_params=parse_params(params)))
            d["load"] = load
            rows.append(d)
            print(line(d, load), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_model(), "cores": os.cpu_count(), **{k: str(v) for k, v in vars(args).items()}}
    (args.out / "results.json").write_text(json.dumps({"args": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
