"""Soak the server: many requests mixing streaming, non-streaming, client aborts, stop strings and
bad bodies against a real `rankserve serve` process (the embedded model, small max_tokens).

    python benchmarks/soak.py [--requests 10000] [--concurrency 16] [--json out/soak.json]

Checks (exit 1 if one fails): no 5xx; every 4xx carries the OpenAI error body; every request the
server accepted and the client waited for ended with a finish reason (stop, length or abort);
afterwards the engine holds no request and no KV block (from /metrics); the server's RSS grew
less than 5% from the end of the warm-up (the first 10% of requests) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from engine_bench import RANKSERVE

from rankserve.integrations.vllm_server import free_port, wait_ready
from rankserve.sim.machine import cpu_model

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = ["Tell me about the sea.", "List three fruits.", "What is 2 + 2?", "Write a haiku about rain.",
           "Name a colour.", "Say hello in French."]
# Bodies the server must refuse with a 4xx and an OpenAI error body (never a 5xx).
BAD_BODIES = [
    {"prompt": "x", "temperature": -1}, {"prompt": [1, 10**9]}, {"prompt": [-1]}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "logit_bias": {"999999": 1}}, {"prompt": "x", "stop_token_ids": [-3]}, {"prompt": ""},
    {"prompt": "x", "max_tokens": 10**7}, {"prompt": "x", "n": 3}, {"messages": []}, {"prompt": "x", "model": "nope"},
    {"prompt": {"not": "a prompt"}}, {"prompt": "x", "top_p": 0},
]


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    finish: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)  # what broke a check, first few kept

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def start_server(port: int, flags: list[str], log: Path) -> subprocess.Popen:
    """`rankserve serve` on loopback, its output in ``log``; returns once /health answers 200."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:  # a file, not a pipe nobody reads (a full pipe blocks the server)
        proc = subprocess.Popen([*RANKSERVE, "serve", "--port", str(port), *flags], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise SystemExit(f"{exc}; its log: {log}") from None
    return proc


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def engine_gauges(metrics_text: str) -> dict[str, float]:
    """Running and waiting requests and KV usage, from the text of /metrics."""
    out = {}
    for line in metrics_text.splitlines():
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            if line.startswith(name + "{"):
                out[name.split(":")[1]] = float(line.split()[-1])
    return out


def check_error_body(tally: Tally, r: httpx.Response, kind: str) -> None:
    try:
        error = r.json()["error"]
        assert error["message"] and error["type"]
    except Exception:  # noqa: BLE001 - any shape but the OpenAI one is a finding
        tally.problem(f"{kind}: {r.status_code} without an OpenAI error body: {r.text[:200]}")


async def one(client: httpx.AsyncClient, i: int, rng: random.Random, max_tokens: int, tally: Tally) -> None:
    roll = rng.random()
    chat = rng.random() < 0.4
    prompt = rng.choice(PROMPTS)
    body: dict = ({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    body |= {"max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]), "seed": i}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if roll < 0.15:
        kind = "bad body"
        bad = rng.choice(BAD_BODIES)
        path = "/v1/chat/completions" if "messages" in bad else "/v1/completions"
        r = await client.post(path, json=bad)
        tally.statuses[r.status_code] += 1
        if r.status_code < 400 or r.status_code >= 500:
            tally.problem(f"bad body {bad} -> {r.status_code}")
        check_error_body(tally, r, kind)
    elif roll < 0.25:
        kind = "client abort"
        try:
            if rng.random() < 0.5:
                async with client.stream("POST", path, json={**body, "stream": True, "max_tokens": 200,
                                                             "ignore_eos": True}) as r:
                    tally.statuses[r.status_code] += 1
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # leave after the first event
            else:
                await client.post(path, json={**body, "max_tokens": 200, "ignore_eos": True}, timeout=0.05)
                tally.statuses[200] += 1  # answered within 50 ms: not an abort after all
        except httpx.TimeoutException:
            tally.statuses["client timeout"] += 1
    else:
        stream = roll < 0.6
        kind = "stream" if stream else "plain"
        if rng.random() < 0.3:
            body["stop"] = rng.choice([[" "], ["e", "."], ["\n"]])
            kind += " + stop"
        if stream:
            reason = None
            async with client.stream("POST", path, json={**body, "stream": True}) as r:
                tally.statuses[r.status_code] += 1
                if r.status_code != 200:
                    await r.aread()
                    check_error_body(tally, r, kind)
                else:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            choices = json.loads(line[6:]).get("choices") or [{}]
                            reason = choices[0].get("finish_reason") or reason
        else:
            r = await client.post(path, json=body)
            tally.statuses[r.status_code] += 1
            reason = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else None
            if r.status_code != 200:
                check_error_body(tally, r, kind)
        if r.status_code == 200:
            tally.finish[reason] += 1
            if reason not in ("stop", "length", "abort"):
                tally.problem(f"{kind}: accepted but ended without a finish reason ({reason!r})")
        elif r.status_code != 429:
            tally.problem(f"{kind}: {r.status_code}")
    tally.kinds[kind] += 1


async def drive(url: str, n: int, concurrency: int, max_tokens: int, seed: int, tally: Tally,
                on_progress) -> None:
    rng = random.Random(seed)
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker() -> None:
            for i in todo:
                try:
                    await one(client, i, rng, max_tokens, tally)
                except httpx.TransportError as exc:  # e.g. a keep-alive connection closed as it was reused
                    tally.statuses[f"transport error ({type(exc).__name__})"] += 1
                on_progress(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def server_flags(args: argparse.Namespace) -> list[str]:
    return ["--policy", args.policy, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
            "--kv-cache-gb", "0.1", "--swap-space-gb", "0.1", "--max-model-len", "512",
            *(["--model", args.model] if args.model else [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None,
                    help="model directory for the server (default: the embedded SmolLM2); a tiny random model "
                         "with SmolLM2's tokenizer soaks the server's own machinery in minutes")
    ap.add_argument("--json", type=Path, default=Path("out/soak.json"))
    args = ap.parse_args()

    port = free_port()
    proc = start_server(port, server_flags(args), args.json.with_suffix(".server.log"))
    url = f"http://127.0.0.1:{port}"
    tally = Tally()
    warm_at = max(args.requests // 10, 1)
    rss = {"start": rss_mb(proc.pid)}
    started = time.monotonic()

    def progress(i: int) -> None:
        if i + 1 == warm_at:
            rss["warm"] = rss_mb(proc.pid)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} requests, {time.monotonic() - started:.0f} s, RSS {rss_mb(proc.pid):.0f} MiB",
                  flush=True)

    try:
        asyncio.run(drive(url, args.requests, args.concurrency, args.max_tokens, args.seed, tally, progress))
        elapsed = time.monotonic() - started
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 10  # aborts by departed clients land within a second
            gauges = engine_gauges(client.get("/metrics").text)
            while any(gauges.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
                gauges = engine_gauges(client.get("/metrics").text)
        rss["end"] = rss_mb(proc.pid)
    finally:
        exit_code = stop_server(proc)

    growth = rss["end"] / rss.get("warm", rss["start"]) - 1
    five_xx = sum(v for k, v in tally.statuses.items() if isinstance(k, int) and k >= 500)
    checks = {
        "no 5xx": five_xx == 0,
        "4xx bodies and finish reasons": not tally.problems,
        "engine idle, KV usage 0": not any(gauges.values()),
        "RSS growth < 5%": growth < 0.05,
        "exit 0 on SIGTERM": exit_code == 0,
    }
    print(f"\nsoak: {args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"{args.dtype}, {args.policy}; {elapsed:.0f} s ({args.requests / elapsed:.1f} req/s); {cpu_model()}, "
          f"{os.cpu_count()} cores\n")
    print("| kind | requests |\n|---|---|")
    for kind, n in sorted(tally.kinds.items()):
        print(f"| {kind} | {n} |")
    print("\n| status | count |\n|---|---|")
    for status, n in sorted(tally.statuses.items(), key=str):
        print(f"| {status} | {n} |")
    print(f"\nfinish reasons of accepted requests: {dict(tally.finish)}")
    print(f"after: {gauges}; RSS MiB start {rss['start']:.0f}, after warm-up {rss.get('warm', float('nan')):.0f}, "
          f"end {rss['end']:.0f} ({growth:+.1%}); server exit {exit_code}")
    for text in tally.problems:
        print("  problem:", text)
    report(args, checks, {
        "elapsed_s": elapsed, "statuses": {str(k): v for k, v in tally.statuses.items()}, "kinds": dict(tally.kinds),
        "finish_reasons": {str(k): v for k, v in tally.finish.items()}, "after": gauges, "rss_mib": rss,
        "rss_growth": growth, "server_exit": exit_code, "problems": tally.problems,
    })


def report(args: argparse.Namespace, checks: dict[str, bool], record: dict) -> None:
    """Print the checks, write ``record`` with them and the machine to ``args.json``, exit 1 if one failed."""
    print("\n| check | result |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'pass' if ok else 'FAIL'} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "args": vars(args) | {"json": str(args.json)}, **record, "checks": checks,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
    }, indent=2) + "\n")
    print(f"wrote {args.json}")
    sys.exit(0 if all(checks.values()) else 1)

if __name__ == "__main__":
    main()
