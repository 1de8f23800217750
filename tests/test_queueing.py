"""With one sequence at a time and constant step costs the engine is an M/G/1 queue: mean response
times of FCFS, non-preemptive SJF and preemptive SRPT (oracle predictions) must match theory."""

from __future__ import annotations

import numpy as np
import pytest

from rankserve.core import SchedulerConfig, make_policy
from rankserve.predict import make_predictor
from rankserve.sim.cost_model import get_cost_model
from rankserve.sim.queueing import load, mg1_fcfs, mg1_sjf, mg1_srpt
from rankserve.sim.simulator import build_requests, simulate

STEP_S = 0.001
MAX_LEN = 40  # output lengths uniform on 1..40 steps
SIZES = np.arange(1, MAX_LEN + 1) * STEP_S
PROBS = np.full(MAX_LEN, 1 / MAX_LEN)
# Enough requests that the sample mean sits well inside 5% at each load (the variance of the
# mean response time grows like 1/(1 - load)^4).
REQUESTS = {0.5: 30_000, 0.65: 50_000, 0.8: 120_000}
THEORY = {"fcfs": mg1_fcfs, "sjf": mg1_sjf, "srpt": mg1_srpt}


def _simulated_mean_response(policy: str, rho: float, seed: int = 7) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = REQUESTS[rho]
    rate = rho / float((SIZES * PROBS).sum())
    lengths = np.stack([np.ones(n, dtype=int), rng.integers(1, MAX_LEN + 1, n)], axis=1)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    result = simulate(
        build_requests(lengths, arrivals),
        make_policy(policy),
        make_predictor("oracle"),
        get_cost_model(f"constant:{STEP_S * 1000:g}"),
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64),
    )
    assert result.summary["num_requests"] == n
    return result.summary["mean_latency_s"], rate


@pytest.mark.parametrize("rho", sorted(REQUESTS))
@pytest.mark.parametrize("policy", sorted(THEORY))
def test_mg1_mean_response_time_matches_closed_form(policy, rho):
    simulated, rate = _simulated_mean_response(policy, rho)
    assert load(rate, SIZES, PROBS) == pytest.approx(rho)
    expected = THEORY[policy](rate, SIZES, PROBS)
    assert simulated == pytest.approx(expected, rel=0.05)


def test_closed_forms_order_as_theory_says():
    rate = 0.8 / float((SIZES * PROBS).sum())
    fcfs, sjf, srpt = (THEORY[p](rate, SIZES, PROBS) for p in ("fcfs", "sjf", "srpt"))
    assert srpt < sjf < fcfs
    # One size only: all three disciplines are the same queue.
    one = np.array([0.01]), np.array([1.0])
    assert mg1_fcfs(50, *one) == pytest.approx(mg1_sjf(50, *one)) == pytest.approx(mg1_srpt(50, *one))
    with pytest.raises(ValueError, match="unstable"):
        mg1_fcfs(200, *one)
