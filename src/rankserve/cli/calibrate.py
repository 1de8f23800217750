"""``rankserve calibrate``: fit the engine's cost model on this machine and write a preset that
``--hardware`` accepts (its path, or ``cpu-local`` for the default location)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rankserve.bench.workloads import sample_lengths
from rankserve.cli.flags import checked, non_negative_int, positive, positive_int
from rankserve.sim.cost_model import LOCAL_PRESET, LinearCostModel, local_preset_path

if TYPE_CHECKING:  # imported where used: they load torch
    from rankserve.engine.build import EngineSettings
    from rankserve.model.loader import ModelFiles
    from rankserve.sim.calibrate import TimedStep


def _int_list(text: str) -> list[int]:
    values = [positive_int(part) for part in text.split(",") if part]
    if not values:
        raise ValueError("give at least one integer")
    return values


def add_calibrate_command(sub) -> None:
    c = sub.add_parser("calibrate", help="fit the engine's cost model on this machine (a few minutes) and "
                                         "write a --hardware preset")
    c.add_argument("--out", type=Path, default=None,
                   help=f"preset file to write (default: {local_preset_path()}, which --hardware "
                        f"{LOCAL_PRESET} reads; $RANKSERVE_PRESETS moves it)")
    c.add_argument("--name", default=None, help=f"the preset's name in reports (default: {LOCAL_PRESET}, or "
                                               "the --out file's stem)")
    c.add_argument("--model", default=None,
                   help="a local Hugging Face directory; default: the embedded SmolLM2-135M-Instruct")
    c.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    c.add_argument("--batches", type=checked(_int_list), default=[1, 4, 16, 32, 64],
                   help="sweep: comma-separated batch sizes")
    c.add_argument("--contexts", type=checked(_int_list), default=[64, 256, 768],
                   help="sweep: comma-separated prompt lengths (tokens)")
    c.add_argument("--decode-steps", type=checked(positive_int), default=7, help="sweep: decode steps per shape")
    c.add_argument("--trace-requests", type=checked(non_negative_int), default=32,
                   help="ShareGPT requests replayed as a burst before the sweep (0: none)")
    c.add_argument("--max-prompt", type=checked(positive_int), default=512, help="trace: prompt length cap")
    c.add_argument("--max-output", type=checked(positive_int), default=256, help="trace: output length cap")
    c.add_argument("--max-num-seqs", type=checked(positive_int), default=16,
                   help="trace: the serving limit to calibrate for (rankserve serve --max-num-seqs)")
    c.add_argument("--max-num-batched-tokens", type=checked(positive_int), default=512,
                   help="prefill chunk budget (rankserve serve --max-num-batched-tokens)")
    c.add_argument("--kv-cache-gb", type=checked(positive), default=2.0, help="KV cache the preset models (GiB)")
    c.add_argument("--swap-space-gb", type=checked(positive), default=4.0, help="host swap the preset models (GiB)")
    c.add_argument("--from-steps", type=Path, nargs="+", default=None, metavar="PATH",
                   help="fit on the steps `rankserve serve --step-log PATH` logged while serving (on this "
                        "machine, with the same --dtype and --kv-cache-gb) instead of timing a sweep")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=cmd_calibrate, parser=c)


def _trace(args: argparse.Namespace, max_len: int) -> np.ndarray:
    """ShareGPT (prompt, output) lengths, capped by the flags and by the model's context."""
    lengths = sample_lengths("sharegpt", args.trace_requests, np.random.default_rng(args.seed))
    prompts = np.minimum(lengths[:, 0], min(args.max_prompt, max_len // 2))
    outputs = np.minimum(lengths[:, 1], np.minimum(args.max_output, max_len - prompts))
    return np.column_stack([prompts, outputs])


def cmd_calibrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rankserve.engine.build import EngineSettings, build_core
    from rankserve.model.loader import ModelNotFoundError, load_model_dir
    from rankserve.sim.calibrate import CalibrationPlan, calibrate, read_step_logs

    try:
        files = load_model_dir(args.model)
    except (ModelNotFoundError, ValueError, OSError) as exc:
        parser.error(f"argument --model: {exc}")
    out = args.out or local_preset_path()
    name = args.name or (out.stem if args.out else LOCAL_PRESET)
    # FCFS, no predictor: the cost model times the engine's steps (scoring is not part of a step),
    # and the sweep's token-id prompts have no text for a ranker to read.
    settings = EngineSettings(model=args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                              kv_cache_gb=args.kv_cache_gb, swap_space_gb=args.swap_space_gb, seed=args.seed,
                              policy="fcfs")
    if args.from_steps:
        try:
            steps = read_step_logs(args.from_steps)
        except (OSError, ValueError) as exc:
            parser.error(f"argument --from-steps: {exc}")
        if not steps:
            parser.error("argument --from-steps: the logs hold no steps")
        return _fit_served_steps(args, parser, files, settings, steps, out, name)
    max_len = int(files.config.get("max_position_embeddings", 2048))
    too_long = [c for c in args.contexts if c + args.decode_steps + 1 > max_len]
    if too_long:
        parser.error(f"argument --contexts: {too_long} + {args.decode_steps + 1} decoded tokens exceed the "
                     f"model's context of {max_len} tokens")
    plan = CalibrationPlan(batches=args.batches, contexts=args.contexts, decode_steps=args.decode_steps,
                           trace=_trace(args, max_len) if args.trace_requests else None, seed=args.seed)
    start = time.perf_counter()
    try:
        model = calibrate(lambda seqs: build_core(replace(settings, max_num_seqs=seqs))[1], plan, dtype=args.dtype,
                          model_name=files.name, name=name, trace_max_num_seqs=args.max_num_seqs,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:  # a setting the engine refuses (its message names the flag)
        parser.error(str(exc))
    return _write(model, out, f"in {time.perf_counter() - start:.0f} s")


def _fit_served_steps(args: argparse.Namespace, parser: argparse.ArgumentParser, files: ModelFiles,
                      settings: EngineSettings, steps: list[TimedStep], out: Path, name: str) -> int:
    """``--from-steps``: the preset's KV pools from the model's config and the flags (no weights
    loaded, no cache allocated: nothing is timed)."""
    import torch

    from rankserve.engine.build import kv_pool_blocks
    from rankserve.model.llama import LlamaConfig
    from rankserve.sim.calibrate import fit_preset

    try:
        shape = LlamaConfig.from_hf(files.config)
    except (ValueError, KeyError) as exc:
        parser.error(f"argument --model: {exc}")
    dtype_bytes = getattr(torch, args.dtype).itemsize
    try:
        device_blocks, host_blocks = kv_pool_blocks(settings, shape, dtype_bytes)
    except ValueError as exc:  # the message names the flag
        parser.error(str(exc))
    model = fit_preset(steps, kv_capacity_tokens=device_blocks * settings.block_size,
                       host_capacity_tokens=host_blocks * settings.block_size,
                       kv_bytes_per_token=shape.kv_bytes_per_token(dtype_bytes), dtype=args.dtype,
                       model_name=files.name, name=name, fit={"step_logs": [str(p) for p in args.from_steps]})
    return _write(model, out, f"from {len(args.from_steps)} step log(s)")


def _write(model: LinearCostModel, out: Path, how: str) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(model.to_dict(), indent=2) + "\n")
    fit, fitted = model.fitted_on["fit"], model.fitted_on
    print(f"calibrated {fitted['model']} ({fitted['dtype']}) on {fitted['cpu_model']} {how}: {fit['steps']} steps, "
          f"mean abs error per step {fit['step_mean_abs_error']:.1%}")
    print("  base {:.2f} ms, per seq {:.3f} ms, per prefill token {:.3f} ms, per decode token {:.3f} ms, "
          "per context token {:.2f} us, per query-key pair {:.3f} us".format(
              model.base_s * 1e3, model.seq_s * 1e3, model.prefill_s_per_token * 1e3,
              model.decode_s_per_token * 1e3, model.kv_s_per_token * 1e6, model.attn_s_per_pair * 1e6))
    print(f"wrote {out} (--hardware {LOCAL_PRESET if out == local_preset_path() else out})")
    return 0
