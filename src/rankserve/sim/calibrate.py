"""Fit the engine's linear cost model on the machine at hand (``rankserve calibrate``).

A CPU preset holds only on the CPU it was fitted on (docs/ENGINE.md), so each machine fits its
own: the real engine runs a sweep of batch shapes and a burst of replayed requests, every step is
timed end to end (schedule, forward, sampling, update) with its shape (or the steps a server
logged while serving: ``rankserve serve --step-log``), and non-negative least squares fits
:class:`LinearCostModel`'s coefficients to those steps. The result records the machine it was
fitted on (``fitted_on``), so the simulator can warn when it runs elsewhere.

The engine is built by the caller (``make_core(max_num_seqs)``): this layer drives an
``EngineCore`` and does not know how a model is loaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from rankserve.core.request import Request, SamplingParams
from rankserve.engine.core import EngineCore
from rankserve.sim.cost_model import LOCAL_PRESET, LinearCostModel
from rankserve.sim.machine import cpu_flags, cpu_model

# The coefficients fitted, in the order of a step's shape (base first: one per step).
FEATURES = ("base_s", "prefill_s_per_token", "decode_s_per_token", "kv_s_per_token", "attn_s_per_pair", "seq_s")
# Host swap speed is not timed (swaps are rare in calibration runs): a memcpy on a small VM.
SWAP_BYTES_PER_S = 10e9


@dataclass(frozen=True)
class TimedStep:
    """One engine step's shape (the arguments of ``CostModel.step_time``) and its wall time."""

    prefill_tokens: int
    decode_tokens: int
    kv_tokens: int
    attn_pairs: int
    num_seqs: int
    seconds: float

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.prefill_tokens, self.decode_tokens, self.kv_tokens, self.attn_pairs, self.num_seqs)


@dataclass(frozen=True)
class CalibrationPlan:
    """What to time: a sweep of (batch, context) shapes, then a burst of replayed requests."""

    batches: Sequence[int] = (1, 4, 16, 32, 64)
    contexts: Sequence[int] = (64, 256, 768)
    decode_steps: int = 7  # decode steps timed per sweep shape, after its prefill
    trace: np.ndarray | None = None  # (prompt, output) lengths replayed as a burst; None: no trace
    seed: int = 0


def timed_step(core: EngineCore, steps: list[TimedStep]) -> None:
    """Run one engine step and append its shape and wall time to ``steps`` (idle steps are not kept)."""
    t0 = time.perf_counter()
    out, _ = core.step()
    seconds = time.perf_counter() - t0
    if not out.is_empty:
        steps.append(TimedStep(*out.step_shape, seconds))


def _random_requests(core: EngineCore, lengths: Sequence[tuple[int, int]], rng: np.random.Generator) -> list[Request]:
    """Requests of random prompt tokens that decode exactly their output length (greedy, EOS ignored)."""
    vocab = core.executor.model.cfg.vocab_size
    return [Request(rng.integers(0, vocab, int(p)).tolist(),
                    SamplingParams(max_tokens=int(o), ignore_eos=True, temperature=0.0), oracle_output_len=int(o))
            for p, o in lengths]


def sweep_shapes(core: EngineCore, plan: CalibrationPlan) -> list[TimedStep]:
    """Timed steps over the plan's grid: ``batch`` prompts of ``context`` tokens each, prefilled in
    the core's chunks, then ``decode_steps`` decode steps."""
    rng = np.random.default_rng(plan.seed)
    steps: list[TimedStep] = []
    for batch in plan.batches:
        for context in plan.contexts:
            core.add_requests(_random_requests(core, [(context, plan.decode_steps + 1)] * batch, rng))
            while core.scheduler.has_work:
                timed_step(core, steps)
    return steps


def replay(core: EngineCore, lengths: np.ndarray, arrivals: np.ndarray, seed: int = 0
           ) -> tuple[list[Request], list[TimedStep]]:
    """Replay (prompt, output) lengths arriving at ``arrivals`` seconds, in real time, on the engine
    (random prompt tokens). Returns the requests, their times relative to the start, and the
    timed steps."""
    reqs = _random_requests(core, lengths, np.random.default_rng(seed))
    sched = core.scheduler
    start = sched.clock.now()
    for req, arrival in zip(reqs, arrivals):
        req.arrival_time = start + float(arrival)
    steps: list[TimedStep] = []
    added = 0
    while added < len(reqs) or sched.has_work:
        now = sched.clock.now()
        due = added
        while due < len(reqs) and reqs[due].arrival_time <= now:
            due += 1
        if due > added:
            core.add_requests(reqs[added:due])
            added = due
        if not sched.has_work:
            time.sleep(max(0.0, min(reqs[added].arrival_time - now, 0.05)))
            continue
        timed_step(core, steps)
    for req in reqs:
        for attr in ("arrival_time", "first_token_time", "finished_time", "first_scheduled_time", "last_token_time"):
            setattr(req, attr, getattr(req, attr) - start)
    return reqs, steps


def read_step_logs(paths: Sequence[str | Path]) -> list[TimedStep]:
    """The steps of ``rankserve serve --step-log`` files (one JSON object per line). A last line
    without its newline (a server killed while writing it) is skipped; any other bad line raises
    ValueError naming the file and line."""
    names = [f.name for f in fields(TimedStep)]
    steps = []
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    values = {name: record[name] for name in names}
                    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                               for v in values.values()):
                        raise ValueError(f"{names} must be numbers >= 0")
                except (ValueError, KeyError, TypeError) as exc:
                    if not line.endswith("\n"):
                        break  # cut short by the server's end
                    raise ValueError(f"{path}:{number} is not a step log line ({exc})") from exc
                steps.append(TimedStep(**values))
    return steps


def fit_coefficients(steps: Sequence[TimedStep]) -> dict[str, float]:
    """Non-negative least squares of step time on step shape: one coefficient per FEATURES entry."""
    if not steps:
        raise ValueError("no timed steps to fit")
    rows = np.array([[1.0, *s.shape] for s in steps])
    times = np.array([s.seconds for s in steps])
    scale = np.maximum(rows.max(axis=0), 1.0)  # columns on comparable scales for the solver
    coef, _ = nnls(rows / scale, times)
    return dict(zip(FEATURES, (coef / scale).tolist()))


def mean_abs_error(model: LinearCostModel, steps: Sequence[TimedStep]) -> float:
    """Mean absolute error of the model's step times, relative to the mean measured step."""
    measured = np.array([s.seconds for s in steps])
    predicted = np.array([model.step_time(*s.shape) for s in steps])
    return float(np.abs(predicted - measured).mean() / measured.mean())


def machine_record(dtype: str) -> dict[str, Any]:
    """What a preset was fitted on: CPU model and flags, cores, torch threads and version, dtype, date."""
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def calibrate(make_core: Callable[[int], EngineCore], plan: CalibrationPlan, *, dtype: str, model_name: str,
              name: str = LOCAL_PRESET, trace_max_num_seqs: int = 16,
              log: Callable[[str], None] = lambda _: None) -> LinearCostModel:
    """Time the plan's steps on engines from ``make_core(max_num_seqs)`` and fit a preset.

    The sweep runs on a core admitting ``max(plan.batches)`` sequences, the trace on one admitting
    ``trace_max_num_seqs`` (the serving limit). KV capacity and host swap space are the sweep
    core's pools; ``fitted_on`` records the machine, the model and the fit (steps, error, seconds).
    """
    start = time.perf_counter()
    steps: list[TimedStep] = []
    if plan.trace is not None and len(plan.trace):
        core = make_core(trace_max_num_seqs)
        _, trace_steps = replay(core, plan.trace, np.zeros(len(plan.trace)), seed=plan.seed)
        steps += trace_steps
        log(f"trace: {len(plan.trace)} requests, {len(trace_steps)} steps, "
            f"{time.perf_counter() - start:.0f} s so far")
        del core
    core = make_core(max(plan.batches))
    steps += sweep_shapes(core, plan)
    log(f"sweep: {len(plan.batches)} batch sizes x {len(plan.contexts)} contexts, {len(steps)} steps in all, "
        f"{time.perf_counter() - start:.0f} s so far")
    blocks = core.scheduler.blocks
    return fit_preset(steps, kv_capacity_tokens=blocks.device.num_blocks * blocks.block_size,
                      host_capacity_tokens=blocks.host.num_blocks * blocks.block_size,
                      kv_bytes_per_token=core.executor.model.cfg.kv_bytes_per_token(getattr(torch, dtype).itemsize),
                      dtype=dtype, model_name=model_name, name=name, fit={
                          "seconds": round(time.perf_counter() - start, 1), "batches": list(plan.batches),
                          "contexts": list(plan.contexts),
                          "trace_requests": 0 if plan.trace is None else len(plan.trace),
                          "trace_max_num_seqs": trace_max_num_seqs})


def fit_preset(steps: Sequence[TimedStep], *, kv_capacity_tokens: int, host_capacity_tokens: int,
               kv_bytes_per_token: int, dtype: str, model_name: str, name: str = LOCAL_PRESET,
               fit: dict[str, Any] | None = None) -> LinearCostModel:
    """A preset fitted on ``steps``, for an engine with these KV pools; ``fitted_on`` records the
    machine, the model and the fit (steps, error, and ``fit``'s entries: where the steps came from)."""
    model = LinearCostModel(**fit_coefficients(steps), name=name, kv_capacity_tokens=kv_capacity_tokens,
                            host_capacity_tokens=host_capacity_tokens, kv_bytes_per_token=kv_bytes_per_token,
                            swap_bytes_per_s=SWAP_BYTES_PER_S)
    model.fitted_on = machine_record(dtype) | {"model": model_name, "fit": {
        "steps": len(steps), "step_mean_abs_error": round(mean_abs_error(model, steps), 4), **(fit or {})}}
    return model
