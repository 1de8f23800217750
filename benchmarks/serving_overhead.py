"""What the HTTP server costs: replay a trace measured by `rankserve bench` (through `rankserve serve`)
on the engine driven in-process, and in the simulator, and compare the three.

    python benchmarks/serving_overhead.py out/engine_bench/fcfs.json [--rate 1.5|inf] [--json out/serving_overhead.json]

The in-process replay uses the run's send times, the server's prompt token counts (random token
ids of that length) and output lengths, with FCFS and the bench's batch limits (16 sequences, 512
batched tokens). If the in-process engine matches the simulator and the HTTP run does not, the
simulator's error on HTTP runs is the serving path (uvicorn, detokenisation, SSE, the client), not
the cost model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from calibrate_cpu import SETTINGS, run_engine

from rankserve.bench.experiment import SimSpec, simulate_trace
from rankserve.core.metrics import summarize
from rankserve.sim.machine import cpu_model

KEYS = ("mean_latency_per_token_s", "mean_ttft_s", "mean_latency_s", "throughput_rps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a LABEL.json written by rankserve bench against an fcfs server")
    ap.add_argument("--rate", type=float, default=1.5, help="which of the run's rates to replay (inf: its burst)")
    ap.add_argument("--json", type=Path, default=Path("out/serving_overhead.json"))
    args = ap.parse_args()
    wanted = None if math.isinf(args.rate) else args.rate  # a burst's spec has no rate
    record = next((r for r in json.loads(args.run.read_text()) if r["spec"]["rate"] == wanted), None)
    if record is None:
        ap.error(f"argument --rate: {args.run} has no run at {args.rate} req/s")
    rows = [r for r in record["requests"] if r["status"] == "finished"]
    lengths = np.array([[r["prompt_tokens"], r["output_tokens"]] for r in rows])
    arrivals = np.array([r["arrival_s"] for r in rows])
    engine_reqs, _ = run_engine(lengths, arrivals, seed=0)
    sim, _ = simulate_trace(SimSpec(policy="fcfs", predictor=None, hardware="cpu-smollm2-135m",
                                    max_num_seqs=SETTINGS.max_num_seqs,
                                    max_num_batched_tokens=SETTINGS.max_num_batched_tokens,
                                    block_size=SETTINGS.block_size), lengths, arrivals)
    print(f"CPU: {cpu_model()}")
    sides = {"http": record["summary"], "in-process": summarize(engine_reqs), "simulator": sim.summary}
    print(f"| metric | {' | '.join(sides)} | http / in-process | simulator / in-process |")
    print("|---" * (len(sides) + 3) + "|")
    for key in KEYS:
        values = [s[key] for s in sides.values()]
        print(f"| {key} | " + " | ".join(f"{v:.4g}" for v in values)
              + f" | {values[0] / values[1]:.2f} | {values[2] / values[1]:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu_model": cpu_model(), "run": str(args.run), "rate": args.rate,
                                     "summaries": {k: {m: v[m] for m in KEYS} for k, v in sides.items()}},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
