"""``rankserve serve``: load a model, build the engine around the one scheduler, run the app.

The app answers 503 while the model loads in the background, then serves; a model that fails to
load ends the process (non-zero). SIGTERM or SIGINT drains it (see ``_DrainingServer``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rankserve.core.block_manager import BlockManager
from rankserve.core.policies import make_policy
from rankserve.core.scheduler import Scheduler, SchedulerConfig
from rankserve.engine.core import EngineCore
from rankserve.engine.loop import AsyncEngine, WallClock
from rankserve.predict import make_predictor

if TYPE_CHECKING:  # needs torch, like the model (imported where an engine is built)
    from rankserve.learn.records import LengthRecorder

log = logging.getLogger(__name__)
GiB = 1 << 30


class HFTextTokenizer:
    """transformers' tokenizer behind the server's TextTokenizer protocol."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclass
class EngineSettings:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "bfloat16"  # or "float32"
    policy: str = "fcfs"
    policy_params: dict = field(default_factory=dict)  # e.g. {"starvation_prevention": False}
    predictor: str | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    kv_cache_gb: float = 2.0
    swap_space_gb: float = 4.0
    preemption_mode: str = "swap"
    max_model_len: int | None = None
    seed: int = 0
    predictor_weights: str | None = None  # None: the shipped weights of --predictor


@dataclass
class LoadedEngine:
    engine: AsyncEngine
    tokenizer: HFTextTokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    recorder: LengthRecorder | None = None


def build_core(settings: EngineSettings):
    """Load the model and build scheduler, executor and the step loop on a wall clock.
    Returns (ModelFiles, EngineCore, max_model_len). Raises on a bad setting."""
    import torch

    from rankserve.model.loader import load_model
    from rankserve.model.runner import ModelExecutor

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[settings.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files, model = load_model(settings.model, dtype=dtype, device=device)
    per_block = model.cfg.kv_bytes_per_token(dtype) * settings.block_size
    device_blocks = int(settings.kv_cache_gb * GiB // per_block)
    host_blocks = int(settings.swap_space_gb * GiB // per_block)
    if device_blocks < 1:
        raise ValueError(f"--kv-cache-gb {settings.kv_cache_gb} holds no KV block")
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
    scheduler = Scheduler(config, make_policy(settings.policy, **settings.policy_params), blocks, clock)
    predictor = make_predictor(settings.predictor, weights=settings.predictor_weights) if settings.predictor else None
    # A refining predictor reads the layer it was trained on from the engine's taps.
    layers = (predictor.layer,) if predictor is not None and predictor.refines else ()
    executor = ModelExecutor(model, device_blocks, host_blocks, settings.block_size, layers, seed=settings.seed)
    log.info("%s: %d KV blocks of %d tokens on %s, %d host blocks, context %d",
             files.name, device_blocks, settings.block_size, device, host_blocks, max_len)
    return files, EngineCore(scheduler, executor, predictor), max_len


def load_engine(settings: EngineSettings, record_lengths: str | None = None,
                record_prompts: bool = False) -> LoadedEngine:
    """The core of ``build_core`` running in its own thread, with the model's tokenizer; with
    ``record_lengths``, every finished request is recorded there for fine-tuning the ranker."""
    from rankserve.learn.records import LengthRecorder
    from rankserve.model.loader import load_tokenizer

    files, core, max_len = build_core(settings)
    recorder = LengthRecorder.for_predictor(record_lengths, core.predictor, record_prompts) if record_lengths else None
    return LoadedEngine(AsyncEngine(core, on_ended=recorder.record if recorder else None),
                        HFTextTokenizer(load_tokenizer(files)), files.name, max_len,
                        core.executor.model.cfg.vocab_size, recorder)


_LAST_EVENTS_S = 10.0  # after the abort, for the aborted answers to go out (ms unless the host is swamped)


class ModelLoadError(RuntimeError):
    """The model failed to load after the server started (it exits instead of answering 503)."""


class _DrainingServer:
    """uvicorn, with a graceful shutdown on SIGTERM or SIGINT: stop admitting (503, /health too),
    let in-flight requests finish for up to ``shutdown_timeout`` seconds, abort the rest (their
    streams end with a finish reason), then exit. A second signal exits at once."""

    def __init__(self, app, host: str, port: int, shutdown_timeout: float) -> None:
        import uvicorn

        self.app = app
        self.shutdown_timeout = shutdown_timeout
        # The backstop for connections that outlive the drain (the aborted answers take ms).
        config = uvicorn.Config(app, host=host, port=port, log_level="info",
                                timeout_graceful_shutdown=_LAST_EVENTS_S)
        self.server = uvicorn.Server(config)
        self.server.handle_exit = self._on_signal  # not re-raised after the shutdown: the exit status stays 0

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        """End without draining (e.g. the model failed to load)."""
        self.server.should_exit = True

    def _on_signal(self, sig: int, _frame) -> None:
        if self.app.state.draining:
            self.server.force_exit = self.server.should_exit = True
            return
        log.info("signal %d: refusing new requests; draining for up to %g s", sig, self.shutdown_timeout)
        self.app.state.draining = True
        threading.Thread(target=self._drain, name="rankserve-drain", daemon=True).start()

    def _drain(self) -> None:
        state = self.app.state
        deadline = time.monotonic() + self.shutdown_timeout
        while state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if state.engine is not None:
            if state.in_flight:
                log.info("aborting %d requests still in flight", state.in_flight)
            state.engine.shutdown()  # live requests end aborted ("shutdown")
        deadline = time.monotonic() + _LAST_EVENTS_S  # let their last events go out
        while state.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self.server.should_exit = True


def serve(settings: EngineSettings, host: str, port: int, api_key: str | None, max_queued: int,
          served_model_name: str | None = None, shutdown_timeout: float = 10.0,
          record_lengths: str | None = None, record_prompts: bool = False) -> None:
    """Run the server until a signal drains it. Raises ModelLoadError if the model fails to load.
    ``record_lengths`` / ``record_prompts``: see ``load_engine``."""
    from rankserve.model.loader import load_model_dir
    from rankserve.server.app import ServerConfig, build_app

    files = load_model_dir(settings.model)  # fails fast (with the install hint) if missing
    name = served_model_name or files.name
    config = ServerConfig(name, max_model_len=settings.max_model_len or 1, api_key=api_key, max_queued=max_queued)
    app = build_app(config, tokenizer=None, engine=None)
    server = _DrainingServer(app, host, port, shutdown_timeout)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            loaded = load_engine(settings, record_lengths, record_prompts)
        except Exception as exc:  # noqa: BLE001 - reported by serve() once uvicorn has stopped
            log.exception("loading the model failed")
            failure.append(exc)
            server.stop()
            return
        config.max_model_len, config.vocab_size = loaded.max_model_len, loaded.vocab_size
        app.state.tokenizer = loaded.tokenizer
        app.state.recorder = loaded.recorder
        app.state.engine = loaded.engine

    threading.Thread(target=load, name="rankserve-load", daemon=True).start()
    try:
        server.run()
    finally:
        if app.state.engine is not None:
            app.state.engine.shutdown()
        if app.state.recorder is not None:  # after the engine: the last requests' records too
            app.state.recorder.close()
    if failure:
        raise ModelLoadError(f"loading the model failed: {failure[0]}") from failure[0]
