"""``rankserve serve``: load a model, build the engine around the one scheduler, run the app.

The app answers 503 while the model loads in the background, then serves; a model that fails to
load ends the process (non-zero). SIGTERM or SIGINT drains it (see ``_DrainingServer``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import rankserve.learn  # noqa: F401 - registers the learned predictors (--predictor ranker, ...) by name
from rankserve.core.policies import POLICIES
from rankserve.engine.build import EngineSettings, LoadedEngine, load_engine
from rankserve.server import DEFAULT_SHUTDOWN_TIMEOUT_S

if TYPE_CHECKING:
    from rankserve.learn.records import LengthRecorder

log = logging.getLogger(__name__)


def attach_recorder(loaded: LoadedEngine, path: str | Path, keep_prompts: bool = False) -> LengthRecorder:
    """``--record-lengths``: record every request the engine finishes into ``path``, for fine-tuning
    the ranker (docs/PREDICTORS.md, section 5). Call before the engine gets requests."""
    from rankserve.learn.records import LengthRecorder  # torch, loaded with the model

    recorder = LengthRecorder.for_predictor(path, loaded.engine.loop.core.predictor, keep_prompts)
    loaded.engine.loop.on_ended = recorder.record
    return recorder


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


def rank_by_work(settings: EngineSettings) -> EngineSettings:
    """``settings`` with a prefill-aware policy (``ltr``, ``sjf``, ``srpt``, ``trail``) ranking by
    predicted work, prompt included: without a ``prefill_weight`` of its own it gets the cost
    model's for this CPU at ``max_num_seqs`` (``sim.cost_model.cpu_prefill_weight``; on the
    engine at 3 req/s it served 5% more requests/s at 11% lower mean latency than 0, docs/RESULTS.md
    section 8). On a GPU no preset fits the served model, so the weight stays 0 there."""
    if not POLICIES[settings.policy].prefill_aware or "prefill_weight" in settings.policy_params:
        return settings
    import torch

    if torch.cuda.is_available():
        return settings
    from rankserve.sim.cost_model import cpu_prefill_weight

    weight, preset = cpu_prefill_weight(settings.max_num_seqs)
    log.info("%s ranks by predicted work: prefill_weight %.3f decode steps per prompt token (%s at %d sequences)",
             settings.policy, weight, preset, settings.max_num_seqs)
    return dataclasses.replace(settings, policy_params={**settings.policy_params, "prefill_weight": round(weight, 4)})


def serve(settings: EngineSettings, host: str, port: int, api_key: str | None, max_queued: int,
          served_model_name: str | None = None, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
          record_lengths: str | Path | None = None, record_prompts: bool = False) -> None:
    """Run the server until a signal drains it. Raises ModelLoadError if the model fails to load.
    ``record_lengths`` / ``record_prompts``: see ``attach_recorder``."""
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
            loaded = load_engine(rank_by_work(settings))
            if record_lengths is not None:
                app.state.recorder = attach_recorder(loaded, record_lengths, record_prompts)
        except Exception as exc:  # noqa: BLE001 - reported by serve() once uvicorn has stopped
            log.exception("loading the model failed")
            failure.append(exc)
            server.stop()
            return
        config.max_model_len, config.vocab_size = loaded.max_model_len, loaded.vocab_size
        app.state.tokenizer = loaded.tokenizer
        app.state.kernels = loaded.kernels
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
