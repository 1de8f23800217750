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


THEORY = {"fcfs": mg1_fcfs, "sjf": mg1_sjf, "srpt": mg1_srpt}


def uniform_steps(max_len: int, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Job sizes of 1..max_len constant-time steps, equally likely."""
    return np.arange(1, max_len + 1) * step_s, np.full(max_len, 1 / max_len)


def simulate_mg1(
    policy: str, rho: float, num_requests: int, seed: int = 7, step_s: float = 0.001, max_len: int = 40
) -> tuple[float, float]:
    """Simulate the engine as an M/G/1 queue (one sequence at a time, ``constant`` steps, output
    lengths uniform on 1..max_len, oracle predictions) at load ``rho``.

    Returns (simulated mean response time, closed-form mean response time) in seconds.
    """
    from rankserve.core.policies import make_policy
    from rankserve.core.scheduler import SchedulerConfig
    from rankserve.predict import make_predictor
    from rankserve.sim.cost_model import get_cost_model
    from rankserve.sim.simulator import build_requests, simulate

    sizes, probs = uniform_steps(max_len, step_s)
    rate = rho / float((sizes * probs).sum())
    rng = np.random.default_rng(seed)
    lengths = np.stack([np.ones(num_requests, dtype=int), rng.integers(1, max_len + 1, num_requests)], axis=1)
    arrivals = np.cumsum(rng.exponential(1 / rate, num_requests))
    result = simulate(
        build_requests(lengths, arrivals),
        make_policy(policy),
        make_predictor("oracle"),
        get_cost_model(f"constant:{step_s * 1000:g}"),
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64),
    )
    if result.summary["num_requests"] != num_requests:
        raise RuntimeError("not every request finished")
    return result.summary["mean_latency_s"], THEORY[policy](rate, sizes, probs)
