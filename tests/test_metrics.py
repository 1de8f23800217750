from __future__ import annotations

import pytest

from rankserve.core import FinishReason, Request, RequestStatus, SamplingParams
from rankserve.core.metrics import finished_within, request_table, summarize, time_to_k_finished


def _finished(arrival, token_times, preemptions=0):
    req = Request([1, 2], SamplingParams(max_tokens=len(token_times)), arrival_time=arrival)
    for t in token_times:
        req.record_token(7, t)
    req.status = RequestStatus.FINISHED
    req.finish_reason = FinishReason.LENGTH
    req.finished_time = token_times[-1]
    req.num_preemptions = preemptions
    return req


def test_per_request_metrics():
    # arrives at 1, first token at 3, then gaps of 1 and 4: finish at 8
    table = request_table([_finished(1.0, [3.0, 4.0, 8.0], preemptions=2)])
    assert table["ttft"][0] == pytest.approx(2.0)
    assert table["e2e"][0] == pytest.approx(7.0)
    assert table["tpot"][0] == pytest.approx((7.0 - 2.0) / 2)
    assert table["latency_per_token"][0] == pytest.approx(7.0 / 3)
    assert table["max_wait"][0] == pytest.approx(4.0)  # the 4 s gap beats the 2 s TTFT
    assert table["preemptions"][0] == 2


def test_summary_aggregates_and_ignores_unfinished():
    reqs = [_finished(0.0, [1.0, 2.0]), _finished(1.0, [2.0, 5.0])]
    aborted = Request([1])
    aborted.status = RequestStatus.ABORTED
    s = summarize(reqs + [aborted])
    assert s["num_requests"] == 2 and s["num_aborted"] == 1
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["throughput_rps"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx(4 / 5)
    assert s["mean_latency_s"] == pytest.approx((2.0 + 4.0) / 2)
    assert s["mean_ttft_s"] == pytest.approx(1.0)
    assert s["p99_max_wait_s"] == pytest.approx(3.0, rel=0.02)


def test_synthetic_data_generation_metrics():
    reqs = [_finished(0.0, [t]) for t in (5.0, 1.0, 3.0, 9.0)]
    assert time_to_k_finished(reqs, 2) == pytest.approx(3.0)
    assert finished_within(reqs, 4.0) == 2
    with pytest.raises(ValueError, match="fewer than k"):
        time_to_k_finished(reqs, 5)


def test_token_gaps_are_tracked_without_storing_timestamps():
    req = Request([1], SamplingParams(max_tokens=3), record_token_times=False)
    for t in (1.0, 1.5, 4.0):
        req.record_token(0, t)
    assert req.token_times == [] and req.max_token_gap == pytest.approx(2.5)
    assert req.first_token_time == 1.0 and req.last_token_time == 4.0
