"""Closed-form M/G/1 mean response times, to check the simulator against queueing theory.

Job sizes take values ``sizes`` (seconds) with probabilities ``probs`` (a discrete distribution,
as when a request of L tokens needs exactly L constant-time steps); ``rate`` is the arrival rate.
"""

from __future__ import annotations

import numpy as np


def _dist(sizes: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes, float)
    probs = np.asarray(probs, float)
    order = np.argsort(sizes)
    return sizes[order], probs[order] / probs.sum()


def load(rate: float, sizes: np.ndarray, probs: np.ndarray) -> float:
    s, p = _dist(sizes, probs)
    return rate * float((s * p).sum())


def mg1_fcfs(rate: float, sizes: np.ndarray, probs: np.ndarray) -> float:
    """Pollaczek-Khinchine: E[T] = E[S] + rate E[S^2] / (2 (1 - rho))."""
    s, p = _dist(sizes, probs)
    rho = rate * (s * p).sum()
    if rho >= 1:
        raise ValueError(f"unstable queue: load {rho:.3f} >= 1")
    return float((s * p).sum() + rate * (s * s * p).sum() / (2 * (1 - rho)))


def mg1_sjf(rate: float, sizes: np.ndarray, probs: np.ndarray) -> float:
    """Non-preemptive shortest job first (ties FCFS): priority classes by size,
    E[T(x)] = x + W0 / ((1 - rho(<x)) (1 - rho(<=x))), W0 = rate E[S^2] / 2."""
    s, p = _dist(sizes, probs)
    w0 = rate * (s * s * p).sum() / 2
    rho_le = np.cumsum(rate * s * p)
    rho_lt = rho_le - rate * s * p
    if rho_le[-1] >= 1:
        raise ValueError(f"unstable queue: load {rho_le[-1]:.3f} >= 1")
    t = s + w0 / ((1 - rho_lt) * (1 - rho_le))
    return float((t * p).sum())


def mg1_srpt(rate: float, sizes: np.ndarray, probs: np.ndarray) -> float:
    """Preemptive shortest remaining processing time (Schrage & Miller, 1966):
    E[T(x)] = rate (m2(x) + x^2 (1 - F(x))) / (2 (1 - rho(x))^2) + integral_0^x dt / (1 - rho(t)),
    with rho(x) = rate * sum of y p(y) over sizes y <= x and m2(x) the same over y^2."""
    s, p = _dist(sizes, probs)
    rho_le = np.cumsum(rate * s * p)
    if rho_le[-1] >= 1:
        raise ValueError(f"unstable queue: load {rho_le[-1]:.3f} >= 1")
    rho_lt = rho_le - rate * s * p
    m2_le = np.cumsum(rate * s * s * p)
    tail = 1 - np.cumsum(p)
    # Ties go FCFS: earlier jobs of the same size are ahead (rho(<=x)), later ones do not
    # preempt (rho(<x)); for continuous sizes both are rho(x), as in the paper's formula.
    waiting = (m2_le + rate * s * s * tail) / (2 * (1 - rho_le) * (1 - rho_lt))
    # rho(t) is a step function: on (s[k-1], s[k]) it counts the sizes below s[k].
    rho_below = np.concatenate([[0.0], rho_le[:-1]])
    edges = np.concatenate([[0.0], s])
    residence = np.cumsum(np.diff(edges) / (1 - rho_below))
    return float(((waiting + residence) * p).sum())
