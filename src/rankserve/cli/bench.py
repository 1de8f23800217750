"""``rankserve bench`` (load a running server) and ``rankserve bench-report`` (compare runs)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from rankserve.bench.client import SEND_GAP_S
from rankserve.bench.workloads import ARRIVAL_FORMS, arrival_times, sample_lengths
from rankserve.cli.flags import checked, non_negative, positive, positive_int, rates


def add_bench_commands(sub) -> None:
    b = sub.add_parser("bench", help="load an OpenAI-compatible server (rankserve, vLLM) and measure it")
    b.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    b.add_argument("--model", default=None, help="model name (default: the server's first /v1/models entry)")
    b.add_argument("--dataset", default="sharegpt",
                   help="sharegpt (test-split prompts) or synthetic:LENGTH_SPEC (e.g. synthetic:lognormal:200:1)")
    b.add_argument("--replay", choices=("reference", "served", "none"), default="served",
                   help="max_tokens = a recorded length with ignore_eos (ShareGPT reply or the served model's "
                        "own label), or none: sample freely up to --max-tokens")
    b.add_argument("--num-requests", type=checked(positive_int), default=200)
    b.add_argument("--rates", type=checked(rates), default=[2.0], help="comma-separated req/s (inf = burst)")
    b.add_argument("--arrival", default="poisson", help=f"arrival process: {ARRIVAL_FORMS}")
    b.add_argument("--send-gap-ms", type=checked(non_negative), default=SEND_GAP_S * 1e3,
                   help="send no two requests closer than this (a burst goes out this far apart, so the server "
                        "sees the trace's order; 0: all at once, in whatever order the connections race)")
    b.add_argument("--max-tokens", type=checked(positive_int), default=384, help="output cap")
    b.add_argument("--length-scale", type=checked(positive), default=1.0,
                   help="multiply replayed lengths by this before the cap (e.g. 0.25 keeps ShareGPT's spread "
                        "at a quarter of the work, for slow hardware); the order of lengths is unchanged")
    b.add_argument("--first-k", type=checked(positive_int), default=None,
                   help="synthetic data generation: report the time until any K requests finished")
    b.add_argument("--time-limit", type=checked(positive), default=None,
                   help="synthetic data generation: report how many finished within this many seconds")
    b.add_argument("--prompt-len", type=checked(positive_int), default=32, help="synthetic prompts' length")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--label", default="run", help="system name in tables and plots (e.g. the server's policy)")
    b.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for LABEL.json and plots")
    b.add_argument("--slo-ttft", type=checked(positive), default=None, help="goodput SLO on TTFT (s)")
    b.add_argument("--slo-tpot", type=checked(positive), default=None, help="goodput SLO on TPOT (s)")
    b.add_argument("--api-key", default=None)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(run=cmd_bench, parser=b)

    r = sub.add_parser("bench-report", help="table and plots comparing rankserve bench runs")
    r.add_argument("runs", nargs="+", type=Path, help="LABEL.json files written by rankserve bench")
    r.add_argument("--baseline", default=None, help="label the table compares against")
    r.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for report.md and plots")
    r.set_defaults(run=cmd_bench_report, parser=r)


def bench_workload(args, n: int, rng: np.random.Generator):
    """(prompts, max_tokens, ignore_eos, prompt_lens) for the bench's dataset and replay mode;
    ``args`` needs dataset, replay, max_tokens, length_scale and prompt_len. Raises ValueError
    on a bad dataset."""
    if args.dataset.startswith("synthetic:"):
        lengths = sample_lengths(args.dataset[len("synthetic:"):], n, rng, prompt_len=args.prompt_len)
        prompts = [" ".join(["hello"] * int(p)) for p in lengths[:, 0]]
        return prompts, _replayed(lengths[:, 1], args), True, lengths[:, 0]
    if args.dataset != "sharegpt":
        raise ValueError(f"expected sharegpt or synthetic:SPEC, got {args.dataset!r}")
    from rankserve.learn.sharegpt import load_prompts

    pool = [p for p in load_prompts() if p.split == "test"]
    if args.replay == "served":
        from rankserve.learn.datasets import SERVED_LABELS
        from rankserve.learn.labels import read_labels

        served = read_labels(SERVED_LABELS).lengths("test")
        pool = [p for p in pool if p.conv_id in served]
    picked = [pool[i] for i in np.resize(rng.permutation(len(pool)), n)]
    if args.replay == "none":
        return [p.text for p in picked], np.full(n, args.max_tokens), False, None
    recorded = [served[p.conv_id] if args.replay == "served" else p.reference_len for p in picked]
    return [p.text for p in picked], _replayed(recorded, args), True, None


def _replayed(lengths, args) -> np.ndarray:
    """Recorded output lengths scaled by --length-scale, at least 1 and at most --max-tokens."""
    scaled = np.rint(np.asarray(lengths, dtype=float) * args.length_scale)
    return np.clip(scaled, 1, args.max_tokens).astype(int)


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import httpx

    from rankserve.bench.client import (SLO, bench_summary, build_items, per_request_rows, run_bench,
                                        server_preemptions)
    from rankserve.bench.report import markdown_table, plot_latency_vs_rate
    from rankserve.core.metrics import data_generation_summary

    model = args.model
    if model is None:
        try:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = httpx.get(args.url.rstrip("/") + "/models", headers=headers, timeout=10).json()["data"][0]["id"]
        except Exception as exc:
            parser.error(f"argument --url: cannot list models at {args.url} ({exc})")
    if not math.isfinite(args.length_scale):
        parser.error("argument --length-scale: must be finite")
    if not math.isfinite(args.send_gap_ms):
        parser.error("argument --send-gap-ms: must be finite")
    if args.first_k is not None and args.first_k > args.num_requests:
        parser.error(f"argument --first-k: {args.first_k} is more than --num-requests {args.num_requests}")
    slo = SLO(args.slo_ttft, args.slo_tpot) if args.slo_ttft or args.slo_tpot else None
    records = []
    for rate in args.rates:
        rng = np.random.default_rng(args.seed)
        try:
            prompts, max_tokens, ignore_eos, prompt_lens = bench_workload(args, args.num_requests, rng)
        except ValueError as exc:
            parser.error(f"argument --dataset: {exc}")
        try:
            arrivals = arrival_times(args.arrival, rate, args.num_requests, rng)
        except ValueError as exc:
            parser.error(f"argument --arrival: {exc}")
        items = build_items(prompts, max_tokens, arrivals, ignore_eos, prompt_lens, args.send_gap_ms / 1e3)
        preempted_before = server_preemptions(args.url, args.api_key)
        results = run_bench(args.url, model, items, api_key=args.api_key, progress=not args.no_progress)
        summary = bench_summary(results, slo)
        preempted_after = server_preemptions(args.url, args.api_key)
        # The client sees no preemptions: take them from the server's counter when it has one.
        summary["preemptions"] = (preempted_after - preempted_before
                                  if preempted_before is not None and preempted_after is not None else None)
        start = float(min(arrivals))
        summary.update(data_generation_summary(results, start, time_limit_s=args.time_limit))
        try:
            summary.update(data_generation_summary(results, start, first_k=args.first_k))
        except ValueError as exc:  # too many requests failed: report it, keep the run
            print(f"warning: --first-k: {exc}")
        records.append({
            "system": args.label,
            "spec": {"rate": None if math.isinf(rate) else rate, "dataset": args.dataset, "replay": args.replay,
                     "arrival": args.arrival, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
                     "length_scale": args.length_scale, "first_k": args.first_k, "time_limit_s": args.time_limit,
                     "seed": args.seed, "send_gap_ms": args.send_gap_ms, "url": args.url, "model": model},
            "summary": summary,
            "requests": per_request_rows(results),
        })
        if summary["num_aborted"]:
            print(f"warning: {summary['num_aborted']} of {args.num_requests} requests failed "
                  f"(first: {next(r['error'] for r in records[-1]['requests'] if r['status'] != 'finished')})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.label}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(markdown_table(records))
    if len(records) > 1 and all(r["spec"]["rate"] is not None for r in records):
        plot_latency_vs_rate(records, args.out / f"{args.label}.png", f"{args.label}: {args.dataset}")
    print(f"wrote {path}")
    return 0


def cmd_bench_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rankserve.bench.report import markdown_table, plot_latency_cdf, plot_latency_vs_rate

    records = []
    for path in args.runs:
        try:
            records.extend(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            parser.error(f"argument runs: cannot read {path}: {exc}")
    table = markdown_table(records, baseline=args.baseline)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(table + "\n")
    if all(r["spec"]["rate"] is not None for r in records) and len({r["spec"]["rate"] for r in records}) > 1:
        plot_latency_vs_rate(records, args.out / "latency_vs_rate.png")
    plot_latency_cdf(records, args.out / "latency_cdf.png")
    print(f"wrote {args.out / 'report.md'} and plots")
    return 0
