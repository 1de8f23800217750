"""Overload: bursts of 10x the server's capacity against a real `rankserve serve` (embedded model).

    python benchmarks/overload.py [--max-num-seqs 4] [--max-queued 16] [--factor 10] [--bursts 3]

Capacity = --max-num-seqs running + --max-queued waiting. Each burst sends factor x capacity
completions at once. Checks (exit 1 if one fails): beyond the capacity the server answers 429 with
Retry-After and the OpenAI error body, never a 5xx; every accepted request finishes with a finish
reason; the waiting queue never exceeds --max-queued (sampled from /metrics); the server's RSS after
the last burst is within 5% of its RSS after the first (memory stays bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx
from soak import engine_gauges, free_port, report, rss_mb, start_server, stop_server

from rankserve.sim.machine import cpu_model


async def burst(url: str, n: int, max_tokens: int, pid: int) -> dict:
    statuses: Counter = Counter()
    finish: Counter = Counter()
    problems: list[str] = []
    peak = {"waiting": 0.0, "rss": 0.0}
    done = asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            gauges = engine_gauges((await client.get("/metrics")).text)
            peak["waiting"] = max(peak["waiting"], gauges.get("num_requests_waiting", 0.0))
            peak["rss"] = max(peak["rss"], rss_mb(pid))
            await asyncio.sleep(0.5)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        r = await client.post("/v1/completions", json={"prompt": f"Count to {i}:", "max_tokens": max_tokens,
                                                       "ignore_eos": True})
        statuses[r.status_code] += 1
        if r.status_code == 200:
            finish[r.json()["choices"][0]["finish_reason"]] += 1
        elif r.status_code == 429:
            if "retry-after" not in r.headers or r.json().get("error", {}).get("type") != "rate_limit_error":
                problems.append(f"429 without Retry-After or error body: {r.headers} {r.text[:200]}")
        else:
            problems.append(f"{r.status_code}: {r.text[:200]}")

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        watcher = asyncio.ensure_future(watch(client))
        started = time.monotonic()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        elapsed = time.monotonic() - started
        done.set()
        await watcher
    return {"sent": n, "statuses": dict(statuses), "finish_reasons": dict(finish), "problems": problems[:10],
            "peak_waiting": peak["waiting"], "peak_rss_mib": peak["rss"], "elapsed_s": elapsed,
            "rss_after_mib": rss_mb(pid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--max-queued", type=int, default=16)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("out/overload.json"))
    args = ap.parse_args()

    capacity = args.max_num_seqs + args.max_queued
    port = free_port()
    proc = start_server(port, ["--policy", "fcfs", "--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs),
                               "--max-queued", str(args.max_queued), "--kv-cache-gb", "0.1", "--swap-space-gb", "0.1",
                               "--max-model-len", "256"], args.json.with_suffix(".server.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        rss_start = rss_mb(proc.pid)
        results = [asyncio.run(burst(url, args.factor * capacity, args.max_tokens, proc.pid))
                   for _ in range(args.bursts)]
        with httpx.Client(base_url=url, timeout=10) as client:
            after = engine_gauges(client.get("/metrics").text)
    finally:
        exit_code = stop_server(proc)

    accepted_ok = all(sum(r["finish_reasons"].values()) == r["statuses"].get(200, 0)
                      and set(r["finish_reasons"]) <= {"length", "stop"} for r in results)
    growth = results[-1]["rss_after_mib"] / results[0]["rss_after_mib"] - 1
    checks = {
        "429 with Retry-After and error body beyond capacity, no 5xx": all(not r["problems"] for r in results)
        and all(r["statuses"].get(429, 0) > 0 for r in results),
        "every accepted request finished": accepted_ok,
        "waiting <= --max-queued": all(r["peak_waiting"] <= args.max_queued for r in results),
        "RSS after the last burst within 5% of the first": growth < 0.05,
        "engine idle after": not any(after.values()),
    }
    print(f"\noverload: capacity {capacity} ({args.max_num_seqs} running + {args.max_queued} queued), bursts of "
          f"{args.factor}x = {args.factor * capacity} completions of {args.max_tokens} tokens; {cpu_model()}, "
          f"{os.cpu_count()} cores; server RSS at start {rss_start:.0f} MiB\n")
    print("| burst | 200 | 429 | other | peak waiting | peak RSS MiB | RSS after MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        other = sum(v for k, v in r["statuses"].items() if k not in (200, 429))
        print(f"| {i} | {r['statuses'].get(200, 0)} | {r['statuses'].get(429, 0)} | {other} | {r['peak_waiting']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r['rss_after_mib']:.0f} | {r['elapsed_s']:.1f} |")
    report(args, checks, {"capacity": capacity, "bursts": results, "after": after, "rss_start_mib": rss_start,
                          "rss_growth": growth, "server_exit": exit_code})


if __name__ == "__main__":
    main()
