"""Each policy's decisions on small hand-built scenarios."""

from __future__ import annotations

import pytest
from helpers import Harness, ran

from rankserve.core import RequestStatus, make_policy
from rankserve.core.policies import LearningToRank


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
    policy = LearningToRank(starvation_threshold=3, boost_quantum=2)
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
