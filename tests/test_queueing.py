"""With one sequence at a time and constant step costs the engine is an M/G/1 queue: mean response
times of FCFS, non-preemptive SJF and preemptive SRPT (oracle predictions) must match theory."""

from __future__ import annotations

import numpy as np
import pytest

from rankserve.sim.queueing import THEORY, mg1_fcfs, mg1_sjf, mg1_srpt, simulate_mg1, uniform_steps

# Enough requests that the sample mean sits well inside 5% at each load (the variance of the
# mean response time grows like 1/(1 - load)^4).
REQUESTS = {0.5: 30_000, 0.65: 50_000, 0.8: 120_000}


@pytest.mark.parametrize("rho", sorted(REQUESTS))
@pytest.mark.parametrize("policy", sorted(THEORY))
def test_mg1_mean_response_time_matches_closed_form(policy, rho):
    simulated, expected = simulate_mg1(policy, rho, REQUESTS[rho])
    assert simulated == pytest.approx(expected, rel=0.05)


def test_closed_forms_order_as_theory_says():
    sizes, probs = uniform_steps(40, 0.001)
    rate = 0.8 / float((sizes * probs).sum())
    fcfs, sjf, srpt = (THEORY[p](rate, sizes, probs) for p in ("fcfs", "sjf", "srpt"))
    assert srpt < sjf < fcfs
    # One size only: all three disciplines are the same queue.
    one = np.array([0.01]), np.array([1.0])
    assert mg1_fcfs(50, *one) == pytest.approx(mg1_sjf(50, *one)) == pytest.approx(mg1_srpt(50, *one))
    with pytest.raises(ValueError, match="unstable"):
        mg1_fcfs(200, *one)
