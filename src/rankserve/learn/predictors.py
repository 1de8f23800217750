"""The trained models behind the Predictor interface.

``ranker`` / ``classifier`` / ``regressor`` score prompt text at admission, one batch per call (the
engine loop calls ``score`` when requests arrive, never inside a step). ``probe`` starts from a
prompt-side length predictor and refines every running request's remaining length from the
engine's hidden-state taps every K decode steps (TRAIL).

Trained weights ship in ``rankserve/learn/weights``: ``<kind>-served`` (trained on the served
model's own lengths) and ``<kind>-reference`` (ShareGPT reply lengths). ``default_weights`` picks
``ranker-reference`` for the ranker (it ranks both kinds of lengths better) and the served
weights of the other kinds (the only ones shipped).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rankserve.core.request import Request
from rankserve.learn import LEARNED_NAMES, TEXT_MODEL_KINDS
from rankserve.learn.text_model import TextLengthModel, inference_dtype, torch_threads
from rankserve.predict.base import Predictor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


# The ranker trained on ShareGPT's reply lengths ranks the served model's own lengths better than the
# one trained on them (tau 0.186 vs 0.157 on the served test split, 0.437 vs 0.222 on the reference
# one; docs/PREDICTORS.md section 5), so it is the default. The other kinds ship only served weights.
DEFAULT_LABELS = {"ranker": "reference"}


def default_weights(kind: str, labels: str | None = None) -> Path:
    """The shipped weights of one predictor kind (``labels``: served, reference, or None: the default)."""
    return WEIGHTS_DIR / f"{kind}-{labels or DEFAULT_LABELS.get(kind, 'served')}.safetensors"


def _text_of(req: Request) -> str:
    if req.prompt_text is None:
        raise ValueError(f"request {req.request_id} has no prompt text; text predictors need it")
    return req.prompt_text


class TextModelPredictor(Predictor):
    """A MiniLM-based ranker, bucket classifier or regressor over the prompt text. Predictions of
    recently seen prompts are kept (up to ``cache_size``, by a digest of the text): the same prompt
    always gets the same prediction, and simulations and chat servers see prompts again.

    Scoring runs in ``precision`` (``auto``: bfloat16 where the CPU has it) on ``threads`` torch
    threads of the caller (None: the caller's setting). One thread is the measured default: the
    encoder shares the CPU with the served model, and on 2 busy cores one bfloat16 thread scored
    faster than two (docs/PREDICTORS.md, section 4)."""

    def __init__(self, path: str | Path, cache_size: int = 65_536, precision: str = "auto",
                 threads: int | None = 1) -> None:
        self.path = Path(path)
        self.model = TextLengthModel.load(self.path, inference_dtype(precision)).pack_linears()
        self.threads = threads
        self.name = self.model.config.kind
        self.gives_lengths = self.model.config.kind != "ranker"
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[float, float | None]] = OrderedDict()
        self.num_scored = 0
        self.num_cache_hits = 0
        self.score_time_s = 0.0
        # Set by a LengthRecorder: keep each scored prompt's frozen-layer output until it is taken.
        self.capture_bottoms = False
        self._bottoms: dict[int, torch.Tensor] = {}

    def take_bottom(self, req: Request) -> torch.Tensor | None:
        """The frozen-layer output kept when ``req`` was scored (None: not kept, e.g. a cache hit)."""
        return self._bottoms.pop(req.seq, None)

    def score(self, requests: Sequence[Request]) -> None:
        if not requests:
            return
        started = time.perf_counter()
        keys = [hashlib.blake2b(_text_of(r).encode(), digest_size=16).digest() for r in requests]
        missing = list({k: r for k, r in zip(keys, requests) if k not in self._cache}.items())
        if missing:
            with torch_threads(self.threads):
                scores, lengths, bottoms = self.model.score_texts([_text_of(r) for _, r in missing],
                                                                  keep_bottoms=self.capture_bottoms)
            for i, (key, req) in enumerate(missing):
                self._cache[key] = (float(scores[i]), None if lengths is None else float(lengths[i]))
                if bottoms is not None:
                    self._bottoms[req.seq] = bottoms[i]
        for key, req in zip(keys, requests):
            self._cache.move_to_end(key)
            req.set_prediction(*self._cache[key])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.num_scored += len(requests)
        self.num_cache_hits += len(requests) - len(missing)
        self.score_time_s += time.perf_counter() - started

    def report(self) -> dict[str, Any]:
        return {"predictor": self.name, "weights": self.path.name, "dtype": str(self.model.dtype).removeprefix("torch."),
                "threads": self.threads, "prompts_scored": self.num_scored,
                "cache_hits": self.num_cache_hits, "score_time_s": round(self.score_time_s, 3)}


class ProbePredictor(Predictor):
    """Prompt-side lengths first, then the hidden-state probe's Bayesian refinement every
    ``every`` decode steps. ``predicted_len`` is the refined total length; between refinements the
    remaining estimate counts down one per token by itself."""

    name = "probe"
    refines = True

    def __init__(self, probe_path: str | Path, prompt_predictor: Predictor, every: int = 8) -> None:
        from rankserve.learn.probe import Probe

        if not prompt_predictor.gives_lengths:
            raise ValueError("the probe starts from a prompt-side predictor that gives lengths")
        self.probe = Probe.load(probe_path)
        self.layer = self.probe.config.layer
        self.prompt_predictor = prompt_predictor
        self.every = every
        self._posterior: dict[int, tuple[Request, torch.Tensor, int]] = {}  # seq -> (req, bins, at output)
        self.refine_time_s = 0.0
        self.num_refinements = 0

    def score(self, requests: Sequence[Request]) -> None:
        self.prompt_predictor.score(requests)

    def refine(self, requests: Sequence[Request], hidden_states: Any = None) -> None:
        if hidden_states is None:
            return
        started = time.perf_counter()
        row_of = {rid: i for i, rid in enumerate(hidden_states.request_ids)}
        layer_row = hidden_states.layers.index(self.layer)
        due, rows, at_prefill = [], [], []
        for req in requests:
            row = row_of.get(req.request_id)
            generated = req.num_output_tokens
            entry = self._posterior.get(req.seq)
            if row is None or generated == 0:
                continue
            if entry is None and generated == 1:  # prefill just ended: the prompt's mean state
                due.append(req), rows.append(row), at_prefill.append(True)
            elif entry is not None and generated - entry[2] >= self.every:
                due.append(req), rows.append(row), at_prefill.append(False)
        if due:
            index = torch.tensor(rows)
            mean = hidden_states.mean[layer_row, index]
            last = hidden_states.last[layer_row, index]
            states = torch.where(torch.tensor(at_prefill)[:, None], mean, last)
            probs = self.probe.probs(states)
            for req, p, first in zip(due, probs, at_prefill):
                generated = req.num_output_tokens
                if first:
                    post = p
                else:
                    _, prior, at = self._posterior[req.seq]
                    post = self.probe.update(self.probe.advance(prior, generated - at), p)
                self._posterior[req.seq] = (req, post, generated)
                req.predicted_len = generated + float(self.probe.estimate(post, self.probe.config.estimator))
            self.num_refinements += len(due)
        if len(self._posterior) > 4 * max(len(requests), 64):  # forget finished requests now and then
            self._posterior = {k: v for k, v in self._posterior.items() if not v[0].status.is_done}
        self.refine_time_s += time.perf_counter() - started

    def report(self) -> dict[str, Any]:
        return {**self.prompt_predictor.report(), "predictor": "probe", "layer": self.layer, "every": self.every,
                "refinements": self.num_refinements, "refine_time_s": round(self.refine_time_s, 3)}


def make_learned_predictor(name: str, labels: str | None = None, weights: str | Path | None = None) -> Predictor:
    """``ranker`` / ``classifier`` / ``regressor`` from their shipped (or given) weights; ``probe``
    refines the classifier's lengths."""
    if name in TEXT_MODEL_KINDS:
        return TextModelPredictor(weights or _require(default_weights(name, labels)))
    if name == "probe":
        prompt_side = TextModelPredictor(_require(default_weights("classifier", labels)))  # served only
        return ProbePredictor(weights or _require(default_weights("probe")), prompt_side)
    raise ValueError(f"unknown learned predictor {name!r} (choose from {', '.join(LEARNED_NAMES)})")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at {path}; train them with `rankserve train` (docs/PREDICTORS.md)")
    return path
