"""Engine construction: load the model, size the KV cache, and build scheduler, executor and step
loop from one ``EngineSettings``. The server, the labelling and the benchmarks all build it here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rankserve.core.block_manager import BlockManager
from rankserve.core.policies import make_policy
from rankserve.core.scheduler import Scheduler, SchedulerConfig
from rankserve.engine.core import EngineCore
from rankserve.engine.loop import AsyncEngine, WallClock
from rankserve.model.loader import load_model, load_tokenizer
from rankserve.model.shape import ModelShape
from rankserve.model.tokenizer import HFTextTokenizer
from rankserve.predict import make_predictor

log = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass
class EngineSettings:
    """How to build an engine; the defaults are ``rankserve serve``'s (its flags read them here)."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "bfloat16"  # or "float32"
    policy: str = "ltr"
    policy_params: dict = field(default_factory=dict)  # e.g. {"starvation_prevention": False}
    predictor: str | None = "ranker"  # built only for a policy that needs predictions
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    kv_cache_gb: float = 2.0
    swap_space_gb: float = 4.0
    preemption_mode: str = "swap"
    max_model_len: int | None = None
    seed: int = 0
    predictor_weights: str | None = None  # None: the shipped weights of --predictor
    scoring_thread: bool = False  # score arrivals beside the steps (EngineLoop), not between them
    step_log: Path | None = None  # append each step's shape and seconds here (EngineLoop)


@dataclass
class LoadedEngine:
    engine: AsyncEngine
    tokenizer: HFTextTokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    kernels: dict[str, str]  # the kernel paths the model runs (KernelChoice.labels)


def kv_pool_blocks(settings: EngineSettings, shape: ModelShape, dtype_bytes: int) -> tuple[int, int]:
    """(device, host) KV blocks that the settings' KV cache and swap space hold for this model.
    Raises ValueError when the cache holds no block."""
    per_block = shape.kv_bytes_per_token(dtype_bytes) * settings.block_size
    device_blocks = int(settings.kv_cache_gb * GiB // per_block)
    if device_blocks < 1:
        raise ValueError(f"--kv-cache-gb {settings.kv_cache_gb} holds no KV block")
    return device_blocks, int(settings.swap_space_gb * GiB // per_block)


def build_core(settings: EngineSettings):
    """Load the model and build scheduler, executor and the step loop on a wall clock.
    Returns (ModelFiles, EngineCore, max_model_len). Raises on a bad setting. A learned
    ``predictor`` name is known once ``rankserve.learn`` is imported (it registers them)."""
    import torch  # torch loads with the model, not with this module

    from rankserve.model.kernels import choose_kernels  # imports torch
    from rankserve.model.runner import ModelExecutor  # imports torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[settings.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files, model = load_model(settings.model, dtype=dtype, device=device)
    choose_kernels(model)  # timed on first use on this machine, then cached; logged
    device_blocks, host_blocks = kv_pool_blocks(settings, model.cfg, dtype.itemsize)
    max_len = min(model.cfg.max_position_embeddings, device_blocks * settings.block_size)
    if settings.max_model_len is not None:
        max_len = min(max_len, settings.max_model_len)
    clock = WallClock()
    config = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        preemption_mode=settings.preemption_mode,
        max_model_len=max_len,
    )
    blocks = BlockManager(device_blocks, host_blocks, settings.block_size)
    policy = make_policy(settings.policy, **settings.policy_params)
    scheduler = Scheduler(config, policy, blocks, clock)
    wanted = settings.predictor if policy.needs_prediction else None
    predictor = make_predictor(wanted, weights=settings.predictor_weights) if wanted else None
    # A refining predictor reads the layer it was trained on from the engine's taps.
    layers = (predictor.layer,) if predictor is not None and predictor.refines else ()
    executor = ModelExecutor(model, device_blocks, host_blocks, settings.block_size, layers, seed=settings.seed)
    log.info("%s: %d KV blocks of %d tokens on %s, %d host blocks, context %d",
             files.name, device_blocks, settings.block_size, device, host_blocks, max_len)
    return files, EngineCore(scheduler, executor, predictor), max_len


def load_engine(settings: EngineSettings) -> LoadedEngine:
    """The core of ``build_core`` running in its own thread, with the model's tokenizer."""
    files, core, max_len = build_core(settings)
    model = core.executor.model
    engine = AsyncEngine(core, scoring_thread=settings.scoring_thread, step_log=settings.step_log)
    return LoadedEngine(engine, HFTextTokenizer(load_tokenizer(files)), files.name, max_len,
                        model.cfg.vocab_size, model.kernels.labels())
