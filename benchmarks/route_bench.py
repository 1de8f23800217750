"""Routers compared live: K `rankserve serve` replicas (each on its own threads) behind
`rankserve route --router R`, one replayed trace per dataset and rate, the same for every router.

    python benchmarks/route_bench.py [--routers round-robin least-requests pow2 sal] [--rates 0.2,0.35]
        [--datasets sharegpt synthetic:uniform:20:40] [--num-requests 30] [--repeats 1] [--replicas 2] [--threads 1]
        [--replay served] [--length-scale 0.1] [--max-tokens 256] [--max-num-seqs 8]
        [--policy fcfs] [--ignore-max-tokens] [--out out/route_bench]

Replayed lengths are sent as max_tokens with ignore_eos, so every router's run does identical work;
max_tokens then *is* the true length, and the router bounds its predictions by it unless
--ignore-max-tokens (then `sal` sees only the predictor's lengths). The replicas and one router
process per router name run for the whole bench; routers take turns, in an order that alternates
from one (dataset, rate) point to the next. Writes one `rankserve bench` JSON per (dataset, router, rate) and
report.md (every run, with ratios to least-requests at the same point).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from engine_bench import RANKSERVE

from rankserve.integrations.vllm_server import free_port, started_server, wait_ready
from rankserve.route.policies import ROUTER_NAMES
from rankserve.sim.machine import cpu_model


def report_table(runs: list[tuple[str, str, int, dict]]) -> str:
    """One row per (dataset, rate, repeat, router), in the order they ran, with each metric's ratio
    to least-requests in the same repeat at the same point."""
    base = {(d, r["spec"]["rate"], rep): r["summary"] for d, router, rep, r in runs if router == "least-requests"}
    rows = ["| dataset | rate | repeat | router | mean lat/tok ms | p99 latency s | mean TTFT s | req/s | failed | "
            "lat/tok vs least-requests | p99 vs least-requests |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, router, rep, r in runs:
        s, b = r["summary"], base.get((dataset, r["spec"]["rate"], rep))
        vs = (f"{s['mean_latency_per_token_s'] / b['mean_latency_per_token_s']:.2f}x | "
              f"{s['p99_latency_s'] / b['p99_latency_s']:.2f}x") if b else "- | -"
        rows.append(f"| {dataset} | {r['spec']['rate']:g} | {rep + 1} | {router} "
                    f"| {s['mean_latency_per_token_s'] * 1e3:.1f} "
                    f"| {s['p99_latency_s']:.2f} | {s['mean_ttft_s']:.2f} | {s['throughput_rps']:.2f} "
                    f"| {s['num_aborted']} | {vs} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", nargs="+", default=["round-robin", "least-requests", "pow2", "sal"])
    ap.add_argument("--rates", default="0.2,0.35", help="comma-separated req/s (each router at each rate)")
    ap.add_argument("--datasets", nargs="+", default=["sharegpt", "synthetic:uniform:20:40"],
                    help="`rankserve bench --dataset` values: lengths that vary (sharegpt) and that do not")
    ap.add_argument("--num-requests", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every point this many times (the order alternates, so 2 gives A B B A)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica (OMP_NUM_THREADS)")
    # served: the served model's own lengths, which the shipped classifier (sal's lengths) predicts
    ap.add_argument("--replay", choices=("reference", "served"), default="served")
    ap.add_argument("--length-scale", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--policy", default="fcfs", help="each replica's scheduling policy (rankserve serve --policy)")
    ap.add_argument("--ignore-max-tokens", action="store_true", help="pass --ignore-max-tokens to the router")
    ap.add_argument("--ray-python", default=None,
                    help="also serve the same replicas through Ray Serve (a python with rankserve[ray]) and "
                         "bench it as router 'ray-sal' next to the others")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/route_bench"))
    args = ap.parse_args()
    if args.ray_python and os.sep in args.ray_python:
        args.ray_python = os.path.abspath(args.ray_python)  # the servers start in /tmp
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    bad = [r for r in args.routers if r not in ROUTER_NAMES]
    if bad:
        ap.error(f"--routers: unknown {', '.join(bad)} (choose from {', '.join(ROUTER_NAMES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs = []
    with ExitStack() as stack:
        backends = []
        for i in range(args.replicas):
            port = free_port()
            proc = stack.enter_context(started_server(
                RANKSERVE + ["serve", "--port", str(port), "--policy", args.policy, "--max-num-seqs",
                             str(args.max_num_seqs), "--kv-cache-gb", "0.5", "--swap-space-gb", "0.5"],
                args.out / f"replica{i}.log", env))
            backends.append((f"http://127.0.0.1:{port}", proc))
        routers = {}  # every router runs for the whole bench, in front of the same replicas
        for router in args.routers:
            port = free_port()
            cmd = RANKSERVE + ["route", "--router", router, "--port", str(port)]
            for url, _ in backends:
                cmd += ["--backend", url]
            if args.ignore_max_tokens:
                cmd.append("--ignore-max-tokens")
            proc = stack.enter_context(started_server(cmd, args.out / f"router-{router}.log"))
            routers[router] = (f"http://127.0.0.1:{port}", proc)
        if args.ray_python:
            port = free_port()
            cmd = [args.ray_python, "-m", "rankserve.server.ray_serve", "--port", str(port), "--num-cpus",
                   str(2 * args.replicas), f"replicas={args.replicas}", "router=sal", "num_cpus=1",
                   f"policy={args.policy}", f"max_num_seqs={args.max_num_seqs}", "kv_cache_gb=0.5",
                   "swap_space_gb=0.5"]
            proc = stack.enter_context(started_server(cmd, args.out / "ray.log", env))
            routers["ray-sal"] = (f"http://127.0.0.1:{port}", proc)
        for url, proc in [*backends, *routers.values()]:
            wait_ready(url, proc)
        points = [(dataset, rate, rep) for rep in range(args.repeats) for dataset in args.datasets
                  for rate in args.rates.split(",")]
        for k, (dataset, rate, rep) in enumerate(points):
            tag = dataset.replace(":", "-")
            # alternate the order from one point to the next, so a drift in the machine's load
            # (shared with other work) does not always fall on the same router
            names = list(routers)
            for router in (names if k % 2 == 0 else names[::-1]):
                label = f"{tag}-{router}-{rate}" + (f"-run{rep + 1}" if args.repeats > 1 else "")
                subprocess.run(RANKSERVE + [
                    "bench", "--url", routers[router][0] + "/v1", "--label", label, "--out", str(args.out),
                    "--no-progress", "--dataset", dataset, "--rates", rate,
                    "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
                    "--replay", args.replay, "--length-scale", str(args.length_scale), "--seed", str(args.seed),
                ], check=True, stdout=subprocess.DEVNULL)
                runs.append((dataset, router, rep, args.out / f"{label}.json"))
    table = report_table([(dataset, router, rep, record) for dataset, router, rep, path in runs
                          for record in json.loads(path.read_text())])
    header = (f"{args.replicas} x rankserve serve (--policy {args.policy}, --max-num-seqs {args.max_num_seqs}, "
              f"{args.threads} thread(s) each) behind rankserve route; {args.num_requests} requests per run, "
              f"replay {args.replay} x {args.length_scale}, cap {args.max_tokens}"
              f"{', router blind to max_tokens' if args.ignore_max_tokens else ''}; CPU: {cpu_model()}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    (args.out / "report.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
