"""Output-length predictors by name.

The model-free predictors are built in. Learned predictors live in a higher layer
(``rankserve.learn``), which registers them here when it is imported, so this layer never imports
it: a caller that wants them by name imports ``rankserve.learn`` first (the CLI, server, benchmark
and router layers do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from rankserve.predict.base import Predictor
from rankserve.predict.oracle import NoisyOraclePredictor, OraclePredictor, PromptLengthPredictor

BUILTIN_NAMES = ("oracle", "noisy", "prompt-len")

#: name -> factory(labels, weights) of the predictors that read the prompt text through a trained model.
LearnedFactory = Callable[["str | None", "str | Path | None"], Predictor]
_learned: dict[str, LearnedFactory] = {}


def register_learned(name: str, factory: LearnedFactory) -> None:
    """Make ``make_predictor(name, labels=..., weights=...)`` call ``factory(labels, weights)``."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"predictor name {name!r} is taken by a built-in predictor")
    _learned[name] = factory


def learned_names() -> tuple[str, ...]:
    """The registered learned predictors, in registration order."""
    return tuple(_learned)


def predictor_names() -> tuple[str, ...]:
    return BUILTIN_NAMES + learned_names()


def make_predictor(
    name: str,
    target_tau: float | None = None,
    seed: int = 0,
    calibration_lengths: Sequence[int] | None = None,
    labels: str | None = None,
    weights: str | Path | None = None,
) -> Predictor:
    """Build a predictor by name. ``noisy`` needs ``target_tau``. Learned predictors load their
    shipped weights trained on ``labels`` (served, reference, or None: the kind's default), or ``weights``."""
    if name == "oracle":
        return OraclePredictor()
    if name == "prompt-len":
        return PromptLengthPredictor()
    if name == "noisy":
        if target_tau is None:
            raise ValueError("predictor 'noisy' needs --target-tau")
        return NoisyOraclePredictor(target_tau, seed, calibration_lengths)
    if name in _learned:
        return _learned[name](labels, weights)
    hint = "" if _learned else "; learned predictors are registered by importing rankserve.learn"
    raise ValueError(f"unknown predictor '{name}' (choose from {', '.join(predictor_names())}{hint})")


__all__ = ["BUILTIN_NAMES", "NoisyOraclePredictor", "OraclePredictor", "Predictor", "PromptLengthPredictor",
           "learned_names", "make_predictor", "predictor_names", "register_learned"]
