"""Predictors that need no model: the oracle, a noisy oracle of chosen quality, prompt length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from rankserve.core.request import Request
from rankserve.predict.base import Predictor


def _true_len(req: Request) -> int:
    if req.oracle_output_len is None:
        raise ValueError(
            f"request {req.request_id} has no known output length; the oracle needs replayed lengths"
        )
    return req.oracle_output_len


class OraclePredictor(Predictor):
    """The true output length (known in simulation and when replaying recorded lengths)."""

    name = "oracle"

    def score(self, requests: Sequence[Request]) -> None:
        for req in requests:
            length = _true_len(req)
            req.set_prediction(float(length), float(length))


class PromptLengthPredictor(Predictor):
    """Longer prompt, longer answer: the cheapest baseline. The length it gives is the prompt
    length itself, a crude proxy (their rank correlation on ShareGPT is only ~0.14)."""

    name = "prompt-len"

    def score(self, requests: Sequence[Request]) -> None:
        for req in requests:
            req.set_prediction(float(req.prompt_len), float(req.prompt_len))


_CALIBRATION_STREAM = 0x7A0  # any constant: keeps calibration draws apart from workload draws


def noise_for_tau(lengths: np.ndarray, target_tau: float, seed: int = 0) -> float:
    """The sigma of log-normal noise on lengths that brings Kendall's tau to ``target_tau``.

    Bisection on sigma with fixed noise draws (tau falls as sigma grows), on at most 4,000 lengths.
    The draws come from their own stream of ``seed``: a workload sampled from ``default_rng(seed)``
    (a log-normal is exp of those very normals) would otherwise be the noise itself, tau would never
    fall, and sigma would run to the bisection's upper end (tau ~ 0 in place of the target).
    """
    if not 0 < target_tau < 1:
        raise ValueError(f"target tau must be in (0, 1), got {target_tau}")
    rng = np.random.default_rng([seed, _CALIBRATION_STREAM])
    sample = np.asarray(lengths, float)
    if len(sample) > 4000:
        sample = rng.choice(sample, 4000, replace=False)
    if len(np.unique(sample)) < 2:
        raise ValueError("calibrating a noisy oracle needs at least two distinct lengths")
    logs = np.log(np.maximum(sample, 1.0))
    noise = rng.standard_normal(len(sample))
    lo, hi = 0.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        tau = kendalltau(logs, logs + mid * noise).statistic
        if tau > target_tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class NoisyOraclePredictor(Predictor):
    """The oracle degraded to a chosen Kendall's tau: predicted length = true length x
    exp(sigma x N(0, 1)), with sigma calibrated on ``calibration_lengths`` (or on the first batch
    scored). ``report()`` gives the tau actually reached over every request scored."""

    name = "noisy"

    def __init__(
        self, target_tau: float, seed: int = 0, calibration_lengths: Sequence[int] | None = None
    ) -> None:
        if not 0 < target_tau < 1:
            raise ValueError(f"--target-tau must be in (0, 1), got {target_tau}")
        self.target_tau = target_tau
        self.seed = seed
        self._rng = np.random.default_rng(seed + 1)
        self.sigma: float | None = None
        if calibration_lengths is not None:
            self.sigma = noise_for_tau(np.asarray(calibration_lengths), target_tau, seed)
        self._true: list[float] = []
        self._pred: list[float] = []

    def score(self, requests: Sequence[Request]) -> None:
        true = np.array([_true_len(r) for r in requests], float)
        if self.sigma is None:
            self.sigma = noise_for_tau(true, self.target_tau, self.seed)
        pred = true * np.exp(self.sigma * self._rng.standard_normal(len(true)))
        for req, p in zip(requests, pred):
            req.set_prediction(float(p), float(p))
        self._true.extend(true.tolist())
        self._pred.extend(pred.tolist())

    def achieved_tau(self) -> float:
        if len(self._true) < 2:
            return float("nan")
        return float(kendalltau(self._true, self._pred).statistic)

    def report(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "target_tau": self.target_tau,
            "achieved_tau": self.achieved_tau(),
            "noise_sigma": self.sigma,
        }
