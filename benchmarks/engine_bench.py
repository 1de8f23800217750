"""Chatbot serving on the real engine: each system is a `rankserve serve` process (or vLLM's
OpenAI server) loaded by `rankserve bench` with the same trace at the same rates.

    python benchmarks/engine_bench.py [--systems fcfs mlfq sjf+ranker ltr+ranker trail+probe ltr+oracle]
        [--rates 0.5,1,1.5] [--num-requests 100] [--max-tokens 128] [--max-num-seqs 16]
        [--vllm-python /work/vllm-venv/bin/python] [--out out/engine_bench]

A system is POLICY[+PREDICTOR]; every server gets the same --max-num-seqs (queues form when it
binds). The trace replays the served model's own labelled lengths of ShareGPT test prompts
(max_tokens = min(label, --max-tokens), ignore_eos), so every system does identical work. Writes
one JSON per system and report.md / latency_vs_rate.png / latency_cdf.png (via bench-report).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

RANKSERVE = [sys.executable, "-m", "rankserve.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def start_rankserve(system: str, port: int, args) -> subprocess.Popen:
    policy, _, predictor = system.partition("+")
    cmd = RANKSERVE + ["serve", "--port", str(port), "--policy", policy, "--max-num-seqs", str(args.max_num_seqs)]
    if predictor:
        cmd += ["--predictor", predictor]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.out / f"{system}.log", "w"))


def start_vllm(port: int, args) -> subprocess.Popen:
    from rankserve.model.loader import load_model_dir

    model_dir = load_model_dir(None).path
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
               OMP_NUM_THREADS=str(os.cpu_count() or 2))
    env.pop("PYTHONPATH", None)
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "smollm2-135m-instruct", "--dtype", "bfloat16", "--enforce-eager",
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "2048", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, cwd="/tmp", stdout=subprocess.DEVNULL,
                            stderr=open(args.out / "vllm-fcfs.log", "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=["fcfs", "mlfq", "sjf+ranker", "ltr+ranker", "trail+probe",
                                                     "ltr+oracle"])
    ap.add_argument("--rates", default="0.5,1,1.5")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--arrival", default="poisson")
    ap.add_argument("--vllm-python", default=None, help="also run vLLM-CPU (FCFS) from this venv")
    ap.add_argument("--out", type=Path, default=Path("out/engine_bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(s, lambda port, s=s: start_rankserve(s, port, args)) for s in args.systems]
    if args.vllm_python:
        runs.append(("vllm-fcfs", lambda port: start_vllm(port, args)))
    for label, start in runs:
        port = free_port()
        proc = start(port)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            subprocess.run(RANKSERVE + ["bench", "--url", f"http://127.0.0.1:{port}/v1", "--rates", args.rates,
                                        "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
                                        "--replay", "served", "--arrival", args.arrival, "--label", label,
                                        "--out", str(args.out), "--no-progress"], check=True)
        finally:
            proc.terminate()
            proc.wait(60)
    subprocess.run(RANKSERVE + ["bench-report", *[str(args.out / f"{label}.json") for label, _ in runs],
                                "--baseline", "fcfs", "--out", str(args.out)], check=True)


if __name__ == "__main__":
    main()
