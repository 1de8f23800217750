"""How well a predictor orders and sizes outputs: Kendall's tau and mean absolute error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kendall_tau(scores: Sequence[float], lengths: Sequence[float]) -> float:
    """Kendall's tau-b between predicted scores (lower = shorter) and true lengths."""
    from scipy.stats import kendalltau

    scores, lengths = np.asarray(scores, dtype=float), np.asarray(lengths, dtype=float)
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores for {len(lengths)} lengths")
    if len(scores) < 2 or np.ptp(scores) == 0 or np.ptp(lengths) == 0:
        return 0.0
    return float(kendalltau(scores, lengths).statistic)


def mean_abs_error(predicted: Sequence[float], actual: Sequence[float]) -> float:
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    return float(np.abs(predicted - actual).mean())
