"""Each policy's decisions on small hand-built scenarios."""

from __future__ import annotations

import math

import pytest
from helpers import Harness, ran

from rankserve.core import Request, RequestStatus, SamplingParams, make_policy
from rankserve.core.policies import LearningToRank
from rankserve.core.policies.work import ScoreCalibration


def test_fcfs_runs_in_arrival_order_and_never_preempts():
    h = Harness(make_policy("fcfs"))
    long = h.add(5, name="long")
    h.step()
    short = h.add(1, name="short")
    outs = h.run_until_idle()
    assert [ran(o) for o in outs] == [["long"]] * 4 + [["short"]]
    assert long.num_preemptions == short.num_preemptions == 0
    assert long.finished_time < short.finished_time


def test_priority_preempts_lower_priority_and_resumes_without_recompute():
    h = Harness(make_policy("priority"))
    low = h.add(6, priority=5, name="low")
    h.step()
    h.step()
    computed = low.num_computed_tokens
    high = h.add(2, priority=0, name="high")
    out = h.step()
    assert ran(out) == ["high"]
    assert out.preempted == [low]
    assert low.status is RequestStatus.PREEMPTED_PAUSED
    assert low.num_computed_tokens == computed and low.block_table  # KV kept on the device
    h.run_until_idle()
    assert high.finished_time < low.finished_time
    assert low.num_output_tokens == 6


def test_sjf_is_non_preemptive_and_picks_the_shortest_queued():
    h = Harness(make_policy("sjf"))
    h.add(5, pred=100, name="a")
    h.step()
    h.add(3, pred=50, name="c")
    h.add(2, pred=10, name="d")
    outs = h.run_until_idle()
    order = [ran(o)[0] for o in outs]
    assert order == ["a"] * 4 + ["d"] * 2 + ["c"] * 3
    assert sum(len(o.preempted) for o in outs) == 0


def test_srpt_preempts_only_when_the_newcomer_has_less_remaining():
    h = Harness(make_policy("srpt"))
    a = h.add(10, pred=10, name="a")
    for _ in range(8):
        h.step()
    assert a.predicted_remaining == 2
    h.add(5, pred=5, name="b")
    assert ran(h.step()) == ["a"]  # 2 left < 5: a keeps the slot

    h2 = Harness(make_policy("srpt"))
    a2 = h2.add(10, pred=10, name="a")
    h2.step()
    h2.step()  # remaining 8
    h2.add(5, pred=5, name="b")
    out = h2.step()
    assert ran(out) == ["b"] and out.preempted == [a2]


def test_ltr_ranks_by_score_and_boosts_a_starving_request():
    # The paper's rule: a fixed threshold (backlog_factor 0), any running request preemptible.
    policy = LearningToRank(starvation_threshold=3, boost_quantum=2, backlog_factor=0, preempt_limit=1e9)
    h = Harness(policy)
    long = h.add(50, pred=100, name="long")
    h.step()  # long runs (prefill + first token)
    h.add(30, pred=1, name="s0")
    out = h.step()
    assert ran(out) == ["s0"] and out.preempted == [long]
    runs = []
    for _ in range(12):
        runs.append(ran(h.step())[0])
    # long last ran at step 0; it starves for 3 steps, is boosted, runs exactly 2 (the quantum),
    # then drops back behind the short request (score 1) and starves again.
    assert runs[:6] == ["s0", "s0", "long", "long", "s0", "s0"]
    assert not policy.is_boosted(long)
    assert runs.count("long") >= 4  # boosted again after another 3 idle steps


def test_ltr_without_starvation_prevention_starves_the_long_request():
    h = Harness(LearningToRank(starvation_prevention=False))
    long = h.add(50, pred=100, name="long")
    h.step()
    h.add(30, pred=1, name="s0")
    runs = [ran(h.step())[0] for _ in range(25)]
    assert runs == ["s0"] * 25
    assert long.status is RequestStatus.PREEMPTED_PAUSED


def test_trail_protects_a_request_past_c_times_its_prediction():
    h = Harness(make_policy("trail", c=0.5))
    a = h.add(20, pred=20, name="a")
    for _ in range(11):
        h.step()  # 11 > 0.5 x 20 tokens generated: a is no longer preemptible
    h.add(2, pred=2, name="b")
    assert ran(h.step()) == ["a"]
    assert a.num_preemptions == 0

    h2 = Harness(make_policy("trail", c=0.5))
    a2 = h2.add(20, pred=20, name="a")
    for _ in range(5):
        h2.step()  # 5 <= 10: still preemptible
    h2.add(2, pred=2, name="b")
    out = h2.step()
    assert ran(out) == ["b"] and out.preempted == [a2]


def test_trail_margin():
    h = Harness(make_policy("trail", c=10.0, margin=3.0))
    h.add(8, pred=8, name="a")
    h.step()
    h.step()  # remaining 6
    h.add(4, pred=4, name="b")  # 6 - 4 = 2 <= margin 3: no preemption
    assert ran(h.step()) == ["a"]
    h3 = Harness(make_policy("trail", c=10.0, margin=1.0))
    h3.add(8, pred=8, name="a")
    h3.step()
    h3.step()
    h3.add(4, pred=4, name="b")  # 2 > margin 1: preempt
    assert ran(h3.step()) == ["b"]


def test_mlfq_demotes_by_attained_service_and_new_work_preempts():
    policy = make_policy("mlfq", base_quantum_s=2.0, ratio=2.0)
    h = Harness(policy)
    a = h.add(20, name="a")
    for _ in range(3):
        h.step()  # 3 s of service > 2 s quantum: level 1
    assert policy.key(a)[0] == 1
    b = h.add(3, name="b")
    out = h.step()
    assert ran(out) == ["b"] and out.preempted == [a]
    h.run_until_idle()
    assert b.finished_time < a.finished_time


def test_mlfq_skip_join_puts_long_prefills_lower():
    policy = make_policy("mlfq", base_quantum_s=1.0, ratio=2.0, prefill_time_estimate=lambda p: p / 10)
    h = Harness(policy, max_num_seqs=4)
    short = h.add(3, prompt=5, name="short")
    long = h.add(3, prompt=50, name="long")  # 5 s estimated prefill: skips levels 0-2
    assert policy.key(short)[0] == 0
    assert policy.key(long)[0] == 3


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_memory_pressure_evicts_the_lowest_ranked(mode):
    # 6 blocks of 4 tokens; two requests of prompt 4 that each grow to 12 tokens.
    h = Harness(make_policy("sjf"), max_num_seqs=2, device_blocks=5, host_blocks=10, mode=mode)
    first = h.add(8, pred=1, name="first")
    second = h.add(8, pred=2, name="second")
    evicted = None
    for _ in range(20):
        out = h.step()
        if out.preempted:
            evicted = out
            break
    assert evicted is not None and evicted.preempted == [second]
    if mode == "swap":
        assert second.status is RequestStatus.PREEMPTED_SWAPPED
        assert len(evicted.swap_out) == len(second.block_table)
    else:
        assert second.status is RequestStatus.PREEMPTED_RECOMPUTE
        assert second.num_computed_tokens == 0 and not second.block_table
    generated = second.num_output_tokens
    outs = h.run_until_idle()
    assert first.status is second.status is RequestStatus.FINISHED
    assert second.num_output_tokens == 8
    if mode == "swap":
        assert sum(len(o.swap_in) for o in outs) > 0
    else:
        # recompute prefills prompt + the tokens already generated in one chunk
        resumed = next(o for o in outs if second in o.requests)
        assert resumed.num_tokens[resumed.requests.index(second)] == 4 + generated
    assert h.blocks.num_free_device_blocks == 5 and h.blocks.num_free_host_blocks == 10


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    h = Harness(make_policy("fcfs"), budget=32)
    req = h.add(2, prompt=100)
    chunks = [h.step().num_tokens[0] for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert req.num_output_tokens == 1  # the first token comes with the last chunk


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    h = Harness(make_policy("fcfs"), max_num_seqs=3, budget=12, chunked=False)
    h.add(5, prompt=4, name="a")
    h.add(5, prompt=7, name="b")
    h.add(5, prompt=7, name="c")  # 4 + 7 leaves 1 token of budget: c waits for the next step
    assert ran(h.step()) == ["a", "b"]
    assert ran(h.step()) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="chunked prefill off"):
        h.add(5, prompt=9)  # a recompute after 4 tokens (9 + 4 > 12) could never fit one step


def test_with_chunked_prefill_the_budget_is_filled_by_a_chunk():
    h = Harness(make_policy("fcfs"), max_num_seqs=3, budget=12)
    h.add(5, prompt=4, name="a")
    h.add(5, prompt=7, name="b")
    h.add(5, prompt=7, name="c")
    out = h.step()
    assert ran(out) == ["a", "b", "c"] and out.num_tokens == [4, 7, 1]


def test_abort_frees_blocks_at_once():
    h = Harness(make_policy("fcfs"), max_num_seqs=2)
    a = h.add(10, name="a")
    b = h.add(10, name="b")
    h.step()
    held = len(a.block_table)
    free_before = h.blocks.num_free_device_blocks
    h.sched.abort(a, "client disconnected")
    assert a.status is RequestStatus.ABORTED and a.abort_reason == "client disconnected"
    assert h.blocks.num_free_device_blocks == free_before + held
    h.run_until_idle()
    assert b.status is RequestStatus.FINISHED


def test_a_request_that_can_never_fit_is_rejected():
    h = Harness(make_policy("fcfs"), device_blocks=3, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        h.add(20, prompt=4)
    assert not h.sched.has_work


def test_policies_that_need_predictions_say_so():
    h = Harness(make_policy("sjf"))
    with pytest.raises(ValueError, match="no prediction"):
        h.add(3)  # no score
        h.step()


def test_unknown_policy_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery")
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("ltr", c=0.8)


def test_finishing_a_request_never_added_leaves_the_queue_count_alone():
    from rankserve.core import FinishReason, Request, SamplingParams

    h = Harness(make_policy("fcfs"))
    h.sched.finish(Request([1, 2], SamplingParams(max_tokens=3)), FinishReason.STOP)
    assert h.sched.num_queued == 0
    kept = h.add(3)
    assert h.sched.has_work
    h.run_until_idle()
    assert kept.status is RequestStatus.FINISHED


@pytest.mark.parametrize("policy", ["fcfs", "sjf"])
def test_aborted_queued_requests_do_not_pile_up_in_the_queue(policy):
    """Under sustained overload most queued requests are aborted (clients give up) before they
    surface; their heap entries must not outlive them."""
    h = Harness(make_policy(policy), max_num_seqs=1)
    h.add(1_000, pred=0.0)
    h.step()  # runs; everything after it waits
    front = h.add(5, pred=1.0)
    for i in range(2_000):
        h.sched.abort(h.add(5, pred=2.0 + i), "client disconnected")
    assert h.sched.num_queued == 1 and front.status is RequestStatus.WAITING
    assert len(h.sched._queue) <= 2 * h.sched.num_queued + 64


# ---- ltr made robust to predictor error (issue 17) ---------------------------------------------


def _add_scored(h: Harness, out_len: int, score: float, name: str, prompt: int = 4) -> Request:
    """A request with a rank score only (a ranker's prediction: no length)."""
    req = Request(list(range(prompt)), SamplingParams(max_tokens=out_len, ignore_eos=True),
                  arrival_time=h.clock.now(), request_id=name)
    req.score = score
    h.sched.add_request(req)
    return req


def test_ltr_preempts_only_when_the_work_gap_pays_for_the_preemption():
    # Nothing has finished, so the error spread is its prior (1.0): a newcomer must be predicted
    # exp(sqrt(2)) = 4.1x shorter than what the running request has left (ranked by work alone).
    policy = LearningToRank(starvation_prevention=False, length_exponent=0)
    assert policy.preemption_factor() == pytest.approx(math.exp(math.sqrt(2)))
    h = Harness(policy)
    a = h.add(40, pred=40, name="a")
    h.step()
    h.step()  # 38 left
    h.add(10, pred=10, name="b")  # 38 < 10 x 4.1: below the margin
    out = h.step()
    assert ran(out) == ["a"] and not out.preempted
    h.add(5, pred=5, name="c")  # 37 > 5 x 4.1: above it
    out = h.step()
    assert ran(out) == ["c"] and out.preempted == [a]


@pytest.mark.parametrize("name", ["srpt", "ltr"])
@pytest.mark.parametrize("patient", [False, True])
def test_a_patient_policy_waits_for_a_slot_that_frees_within_the_newcomers_work(name, patient):
    params = {"starvation_prevention": False, "length_exponent": 0, "confidence_z": 0} if name == "ltr" else {}
    h = Harness(make_policy(name, patient=patient, **params), max_num_seqs=2)
    slow = h.add(40, pred=40, name="slow")
    h.add(4, pred=4, name="short")
    h.step()
    h.step()  # short has 2 tokens left, slow 38
    h.add(5, pred=5, name="new")  # needs 5 steps; short's slot frees within 2
    out = h.step()
    assert out.preempted == ([] if patient else [slow])
    # When no slot frees within the newcomer's work, a patient policy displaces as before.
    h = Harness(make_policy(name, patient=patient, **params), max_num_seqs=2)
    slow = h.add(40, pred=40, name="slow")
    h.add(30, pred=30, name="long")
    h.step()
    h.add(3, pred=3, name="tiny")
    assert h.step().preempted == [slow]


def test_ltr_margin_shrinks_to_srpt_when_predictions_prove_exact():
    policy = LearningToRank(starvation_prevention=False, length_exponent=0)
    h = Harness(policy, max_num_seqs=4)
    for n in range(1, 21):
        h.add(n, pred=n)
    h.run_until_idle()
    assert policy.preemption_factor() == pytest.approx(1.0)
    h = Harness(policy)  # the same policy, one slot
    a = h.add(40, pred=40, name="a")
    h.step()
    h.step()  # 38 left
    h.add(38, pred=38, name="b")  # not shorter: keeps its place
    out = h.step()
    assert ran(out) == ["a"] and not out.preempted
    h.add(36, pred=36, name="c")  # 36 < a's 37 left: with exact predictions that pays
    out = h.step()
    assert ran(out) == ["c"] and out.preempted == [a]


def test_ltr_boosts_at_most_its_share_of_the_batch():
    policy = LearningToRank(starvation_threshold=2, backlog_factor=0, boost_share=0.5, boost_quantum=0,
                            preempt_limit=1e9)
    h = Harness(policy, max_num_seqs=4)
    for i in range(4):
        h.add(30, pred=1, name=f"run{i}")  # predicted short: they take the batch first
    waiting = [h.add(5, pred=100, name=f"wait{i}") for i in range(8)]
    most = 0
    while h.sched.has_work:
        out = h.step()
        boosted = [r for r in waiting if policy.is_boosted(r)]
        assert len(boosted) <= 2
        assert sum(policy.is_boosted(r) for r in out.requests) <= 2
        most = max(most, len(boosted))
    assert most == 2  # the bound was reached, not just respected by idling
    assert all(r.status is RequestStatus.FINISHED for r in waiting)


def test_ltr_starvation_threshold_follows_the_backlog():
    policy = LearningToRank(starvation_threshold=3, backlog_factor=1.0)
    h = Harness(policy)
    h.add(50, pred=50, name="running")
    h.step()
    queued = [h.add(5, pred=20, name=f"q{i}") for i in range(3)]
    h.step()  # 49 left < 4.1 x 20: no preemption
    # 3 x 20 predicted steps queued, a batch of 1: 60 steps to drain; the floor is 3.
    assert policy.starvation_limit() == pytest.approx(60)
    for _ in range(20):
        h.step()
    assert not any(policy.is_boosted(r) for r in queued)  # 20 idle steps: under 60, not starving

    fixed = LearningToRank(starvation_threshold=3, backlog_factor=0)
    h2 = Harness(fixed)
    h2.add(50, pred=50, name="running")
    h2.step()
    queued2 = [h2.add(5, pred=20, name=f"q{i}") for i in range(3)]
    for _ in range(6):
        h2.step()
    assert any(fixed.is_boosted(r) or r.num_output_tokens for r in queued2)


def test_ltr_with_a_rank_only_predictor_calibrates_scores_to_lengths():
    policy = LearningToRank(starvation_prevention=False, min_calibration=2)
    h = Harness(policy)
    a = _add_scored(h, 3, score=3.0, name="a")
    h.step()
    _add_scored(h, 1, score=1.0, name="b")
    out = h.step()
    assert ran(out) == ["a"] and not out.preempted  # no lengths yet: it cannot cost a preemption
    h.run_until_idle()
    assert a.finish_reason is not None and policy.calibration.ready
    # Scores seen 1, 3; lengths finished 1, 3. Queue three more at once: the lowest score runs.
    c = _add_scored(h, 2, score=2.0, name="c")
    d = _add_scored(h, 4, score=10.0, name="d")
    assert ran(h.step()) == ["c"]
    # d's work is its score's quantile among scores seen (1, 2, 3, 10 -> 3/4) in the lengths (1, 3).
    assert policy.work(d) == pytest.approx(3.0)
    h.run_until_idle()
    assert c.status is d.status is RequestStatus.FINISHED


def test_score_calibration_matches_quantiles():
    cal = ScoreCalibration(min_samples=3)
    for score in (-2.0, -1.0, 0.5, 4.0):
        cal.add_score(score)
    for length in (100, 10, 1000):
        cal.add_length(length)
    assert cal.ready
    assert [cal.length_for(s) for s in (-5.0, -1.0, 0.5, 4.0, 9.0)] == [10, 10, 100, 1000, 1000]


def test_score_calibration_keeps_a_bounded_window_of_the_latest():
    cal = ScoreCalibration(min_samples=2, window=3)
    for length in (1000, 2000, 3000, 10, 20, 30):  # the first three fall out of the window
        cal.add_length(length)
    for score in (1.0, 2.0, 3.0):
        cal.add_score(score)
    assert [cal.length_for(s) for s in (1.0, 2.0, 3.0)] == [10, 20, 30]


@pytest.mark.parametrize("name", ["sjf", "srpt", "ltr"])
def test_prefill_aware_policies_rank_by_predicted_work(name):
    # a: 40 prompt tokens + 5 output; b: 4 + 10. By output length a is shorter; at 0.5 decode steps
    # per prefill token a's work is 5 + 20 = 25 and b's 10 + 2 = 12.
    for weight, first in ((0.0, "a"), (0.5, "b")):
        h = Harness(make_policy(name, prefill_weight=weight))
        h.add(2, pred=2, name="blocker")
        h.step()
        h.add(5, prompt=40, pred=5, name="a")
        h.add(10, prompt=4, pred=10, name="b")
        order = [r for o in h.run_until_idle() for r in ran(o)]
        assert order[order.index("blocker") + 1] == first, (name, weight)


def test_prefill_weight_must_be_a_finite_non_negative_number():
    for name in ("sjf", "srpt", "trail", "ltr"):
        with pytest.raises(ValueError, match="prefill_weight"):
            make_policy(name, prefill_weight=-1.0)
