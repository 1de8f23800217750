"""RankScheduler on vLLM's real Scheduler and KV cache manager, with hand-built request sets."""

from __future__ import annotations

import importlib
import sys

import pytest

pytest.importorskip("vllm")

from rankserve.integrations.vllm import RankAsyncScheduler, RankScheduler, user_text  # noqa: E402


def free_blocks(s) -> int:
    return s.kv_cache_manager.block_pool.get_num_free_blocks()


def test_waiting_queue_runs_in_score_order(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1)
    for rid, score in (("a", 5), ("b", 3), ("c", 1), ("d", 4)):
        s.add_request(make_request(rid, xargs={"rankserve_score": score}))
    d = driver(s)
    d.run()
    assert d.first_run() == ["c", "b", "d", "a"]
    assert d.finished == ["c", "b", "d", "a"]
    assert s.stats.scored == 4 and s.stats.score_failures == 0


def test_fcfs_policy_keeps_arrival_order_and_never_preempts(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1, additional={"rankserve_policy": "fcfs"})
    for rid, score in (("a", 5), ("b", 3), ("c", 1)):
        s.add_request(make_request(rid, xargs={"rankserve_score": score}))
    d = driver(s)
    d.step()
    s.add_request(make_request("z", xargs={"rankserve_score": -10}))
    d.run()
    assert d.first_run() == ["a", "b", "c", "z"]
    assert d.preempted == [] and s.stats.rank_preemptions == 0


def test_better_ranked_arrival_preempts_the_worst_running_one(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=2, num_blocks=100)
    initial_free = free_blocks(s)
    # Predicted lengths with the scores: ltr preempts only when the victim's predicted remaining work
    # exceeds the newcomer's by its error margin (4.1x before any request has finished).
    for rid, length in (("slow", 12), ("mid", 6)):
        s.add_request(make_request(rid, max_tokens=length,
                                   xargs={"rankserve_score": length, "rankserve_predicted_len": length}))
    d = driver(s)
    d.step()
    d.step()
    s.add_request(make_request("fast", max_tokens=2, xargs={"rankserve_score": 1, "rankserve_predicted_len": 2}))
    step = d.step()
    assert d.preempted == ["slow"]  # the worst-ranked running request, through vLLM's preemption
    assert set(step) == {"mid", "fast"}
    assert s.stats.rank_preemptions == 1
    d.run()
    assert sorted(d.finished) == ["fast", "mid", "slow"]  # preempted, then resumed to the end
    assert d.finished[0] == "fast"
    assert s.requests == {} and s._twins == {}
    assert free_blocks(s) == initial_free  # every KV block back in the pool


@pytest.mark.parametrize("mode", ["patient", "eager"])
def test_patient_preemption_waits_for_a_slot_that_frees_first(make_scheduler, make_request, driver, mode):
    s = make_scheduler(max_num_seqs=2, additional={"rankserve_preemption": mode})
    for rid, length in (("slow", 30), ("short", 3)):
        s.add_request(make_request(rid, max_tokens=length,
                                   xargs={"rankserve_score": length, "rankserve_predicted_len": length}))
    d = driver(s)
    d.step()
    d.step()
    # "short" has at most 2 tokens to go, fewer than the newcomer's 4: patient waits for its slot.
    s.add_request(make_request("fast", max_tokens=4, xargs={"rankserve_score": 4, "rankserve_predicted_len": 4}))
    d.run()
    assert d.preempted == ([] if mode == "patient" else ["slow"])
    assert s.stats.rank_preemptions == (0 if mode == "patient" else 1)
    assert sorted(d.finished) == ["fast", "short", "slow"]
    assert d.finished.index("fast") < d.finished.index("slow")


def test_sjf_orders_but_does_not_preempt(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1, additional={"rankserve_policy": "sjf"})
    s.add_request(make_request("long", max_tokens=5, xargs={"rankserve_score": 9}))
    d = driver(s)
    d.step()
    s.add_request(make_request("b", xargs={"rankserve_score": 3}))
    s.add_request(make_request("a", xargs={"rankserve_score": 1}))
    d.run()
    assert d.preempted == []
    assert d.first_run() == ["long", "a", "b"]


def test_srpt_uses_predicted_lengths_from_xargs(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1, additional={"rankserve_policy": "srpt"})
    s.add_request(make_request("long", max_tokens=8, xargs={"rankserve_predicted_len": 8}))
    d = driver(s)
    d.step()
    s.add_request(make_request("short", max_tokens=2, xargs={"rankserve_predicted_len": 2}))
    d.run()
    assert d.preempted == ["long"]
    assert d.finished == ["short", "long"]


def test_starvation_prevention_lets_a_low_ranked_request_run(make_scheduler, make_request, driver):
    def rounds(starvation: bool) -> list[dict]:
        s = make_scheduler(max_num_seqs=1, additional={"rankserve_policy_args": {
            "starvation_threshold": 6, "boost_quantum": 2, "starvation_prevention": starvation}})
        s.add_request(make_request("low", max_tokens=3, xargs={"rankserve_score": 100}))
        d = driver(s)
        for i in range(40):  # a steady stream of better-ranked requests
            s.add_request(make_request(f"hi{i}", max_tokens=2, xargs={"rankserve_score": 1}))
            d.step()
        return d.steps

    assert any("low" in step for step in rounds(True))
    assert not any("low" in step for step in rounds(False))


def test_a_bad_or_missing_score_runs_in_fcfs_position_and_is_counted(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1)
    s.add_request(make_request("bad", xargs={"rankserve_score": "not a number"}))
    s.add_request(make_request("late", xargs={"rankserve_score": 2}))
    s.add_request(make_request("none"))  # no score, and this scheduler has no predictor
    s.add_request(make_request("best", xargs={"rankserve_score": 0}))
    d = driver(s)
    d.run()
    # "bad" arrived before every ranked request; "none" before "best" only.
    assert d.first_run() == ["bad", "none", "best", "late"]
    assert sorted(d.finished) == ["bad", "best", "late", "none"]
    assert s.stats.score_failures == 2 and s.stats.scored == 2


def test_abort_waiting_and_running_frees_everything(make_scheduler, make_request, driver):
    from vllm.v1.request import RequestStatus

    s = make_scheduler(max_num_seqs=1)
    initial_free = free_blocks(s)
    for rid, score in (("run", 1), ("wait", 2), ("keep", 3)):
        s.add_request(make_request(rid, max_tokens=5, xargs={"rankserve_score": score}))
    d = driver(s)
    d.step()
    s.finish_requests(["run", "wait"], RequestStatus.FINISHED_ABORTED)
    d.run()
    assert d.first_run() == ["run", "keep"]
    assert s.requests == {} and s._twins == {} and len(s.waiting) == 0
    assert free_blocks(s) == initial_free


def test_chunked_prefill_and_prefix_caching_keep_working(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    prompt = list(range(100, 260))  # 160 tokens: three chunks of at most 64
    s.add_request(make_request("first", prompt=prompt, max_tokens=2, xargs={"rankserve_score": 1}))
    d = driver(s)
    d.run()
    assert [step["first"] for step in d.steps[:3]] == [64, 64, 32]
    s.add_request(make_request("again", prompt=prompt, max_tokens=2, xargs={"rankserve_score": 1}))
    step = d.step()
    assert step["again"] <= 16  # only the last block: the other 144 prompt tokens came from the prefix cache


def test_async_scheduling_gets_the_async_variant(make_scheduler, make_request, driver):
    s = make_scheduler(max_num_seqs=1, async_scheduling=True)
    assert isinstance(s, RankAsyncScheduler) and isinstance(s, RankScheduler)
    assert isinstance(make_scheduler(max_num_seqs=1), RankScheduler)
    assert not isinstance(make_scheduler(max_num_seqs=1), RankAsyncScheduler)


@pytest.fixture(scope="module")
def chat(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)


LONG_ASK = "Write a detailed 3000-word essay on the history of the Roman Empire, with sections and references."


@pytest.mark.parametrize("thread", ["1", "0"])
def test_the_ranker_scores_prompt_text_in_process(make_scheduler, make_request, driver, chat, thread):
    s = make_scheduler(max_num_seqs=1, additional={"rankserve_predictor": "ranker", "rankserve_scoring_thread": thread})
    assert (s._scorer is not None) == (thread == "1")
    s.add_request(make_request("essay", prompt=chat(LONG_ASK), max_tokens=2))
    s.add_request(make_request("yes", prompt=chat("Answer yes or no: is 7 a prime number?"), max_tokens=2))
    d = driver(s)
    d.run()
    assert s.stats.scored == 2 and s.stats.score_failures == 0
    assert s.stats.score_seconds > 0 and s.stats.score_cpu_seconds > 0 and s.stats.score_wait_seconds > 0
    assert d.first_run() == ["yes", "essay"]
    s.shutdown()


def test_requests_on_the_scoring_thread_wait_without_blocking_the_others(make_scheduler, make_request, driver, chat):
    s = make_scheduler(max_num_seqs=2, additional={"rankserve_predictor": "ranker"})
    s.add_request(make_request("scored", xargs={"rankserve_score": 0}, max_tokens=3))
    s.add_request(make_request("thread", prompt=chat(LONG_ASK), max_tokens=2))
    d = driver(s)
    d.run()  # vLLM peeks the waiting queue while "thread" is still being scored: nothing to peek yet
    assert d.steps[0].keys() == {"scored"} and sorted(d.finished) == ["scored", "thread"]
    assert s.stats.scored == 2
    s.shutdown()


def test_a_request_aborted_while_the_thread_scores_it_is_dropped_cleanly(make_scheduler, make_request, driver, chat):
    from vllm.v1.request import RequestStatus

    s = make_scheduler(max_num_seqs=1, additional={"rankserve_predictor": "ranker"})
    s.add_request(make_request("run", xargs={"rankserve_score": 0}, max_tokens=3))
    s.add_request(make_request("gone", prompt=chat(LONG_ASK), max_tokens=2))
    d = driver(s)
    d.step()  # "run" runs; "gone" is on the scoring thread
    s.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
    d.run()
    assert d.first_run() == ["run"] and s.requests == {} and s._twins == {} and len(s.waiting) == 0
    s.shutdown()


@pytest.mark.parametrize("bad", [{"rankserve_policy": "lifo"}, {"rankserve_policy_args": "{not json"},
                                 {"rankserve_policy_args": {"no_such_knob": 1}}, {"rankserve_predictor": "psychic"},
                                 {"rankserve_preemption": "sometimes"}])
def test_bad_settings_fail_at_startup_with_a_clear_error(make_scheduler, bad):
    with pytest.raises(ValueError, match="lifo|JSON|no_such_knob|psychic|RANKSERVE_PREEMPTION"):
        make_scheduler(additional=bad)


def test_user_text_reads_chatml_user_turns():
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nTell me more\nplease<|im_end|>\n")
    assert user_text(prompt) == "Hi there\nTell me more\nplease"
    assert user_text("a plain completion prompt") == "a plain completion prompt"


def test_an_untested_vllm_version_fails_at_import_with_one_line(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.delitem(sys.modules, "rankserve.integrations.vllm")
    with pytest.raises(ImportError) as err:
        importlib.import_module("rankserve.integrations.vllm")
    assert "0.99.0" in str(err.value) and "0.32.0" in str(err.value) and "\n" not in str(err.value)
