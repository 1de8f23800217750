"""Output-length predictors by name."""

from __future__ import annotations

from collections.abc import Sequence

from rankserve.predict.base import Predictor
from rankserve.predict.oracle import NoisyOraclePredictor, OraclePredictor, PromptLengthPredictor

PREDICTOR_NAMES = ("oracle", "noisy", "prompt-len", "ranker", "classifier", "regressor", "probe")
#: Predictors that read the prompt text through a trained model (need rankserve[model]).
LEARNED_NAMES = ("ranker", "classifier", "regressor", "probe")


def make_predictor(
    name: str,
    target_tau: float | None = None,
    seed: int = 0,
    calibration_lengths: Sequence[int] | None = None,
    labels: str = "served",
    weights: str | None = None,
) -> Predictor:
    """Build a predictor by name. ``noisy`` needs ``target_tau``. Learned predictors load their
    shipped weights trained on ``labels`` (served or reference), or ``weights``."""
    if name == "oracle":
        return OraclePredictor()
    if name == "prompt-len":
        return PromptLengthPredictor()
    if name == "noisy":
        if target_tau is None:
            raise ValueError("predictor 'noisy' needs --target-tau")
        return NoisyOraclePredictor(target_tau, seed, calibration_lengths)
    if name in LEARNED_NAMES:
        from rankserve.learn.predictors import make_learned_predictor

        return make_learned_predictor(name, labels, weights)
    raise ValueError(f"unknown predictor '{name}' (choose from {', '.join(PREDICTOR_NAMES)})")


__all__ = ["LEARNED_NAMES", "PREDICTOR_NAMES", "NoisyOraclePredictor", "OraclePredictor", "Predictor",
           "PromptLengthPredictor", "make_predictor"]
