"""Output-length predictors by name."""

from __future__ import annotations

from collections.abc import Sequence

from rankserve.predict.base import Predictor
from rankserve.predict.oracle import NoisyOraclePredictor, OraclePredictor, PromptLengthPredictor

PREDICTOR_NAMES = ("oracle", "noisy", "prompt-len")


def make_predictor(
    name: str,
    target_tau: float | None = None,
    seed: int = 0,
    calibration_lengths: Sequence[int] | None = None,
) -> Predictor:
    """Build a predictor by name. ``noisy`` needs ``target_tau``."""
    if name == "oracle":
        return OraclePredictor()
    if name == "prompt-len":
        return PromptLengthPredictor()
    if name == "noisy":
        if target_tau is None:
            raise ValueError("predictor 'noisy' needs --target-tau")
        return NoisyOraclePredictor(target_tau, seed, calibration_lengths)
    raise ValueError(f"unknown predictor '{name}' (choose from {', '.join(PREDICTOR_NAMES)})")


__all__ = ["PREDICTOR_NAMES", "NoisyOraclePredictor", "OraclePredictor", "Predictor",
           "PromptLengthPredictor", "make_predictor"]
