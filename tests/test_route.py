"""The router's load trackers and policies (route/load.py, route/policies.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankserve.route import (
    ROUTER_NAMES,
    NoHealthyReplica,
    ReplicaLoad,
    RouteRequest,
    ScoreLengths,
    make_router,
    remaining_output,
)


def test_router_names_are_the_issue_s():
    assert set(ROUTER_NAMES) == {"round-robin", "random", "least-requests", "pow2", "least-kv", "sal"}


# ---- load tracker ----------------------------------------------------------------------------


def test_work_counts_prefill_weighted_then_falls_as_tokens_stream_back():
    load = ReplicaLoad(prefill_weight=0.5, overrun_factor=0.0)
    load.on_send("a", 100, 10.0, None, now=0.0)
    assert load.outstanding_work == pytest.approx(0.5 * 100 + 10)
    load.on_tokens("a", 1, now=1.0)  # the first token: prefill done
    assert load.outstanding_work == pytest.approx(9)
    load.on_tokens("a", 4, now=2.0)
    assert load.outstanding_work == pytest.approx(5)
    assert load.num_in_flight == 1
    load.on_finish("a", now=3.0)
    assert load.outstanding_work == 0 and load.num_in_flight == 0
    assert (load.num_sent, load.num_finished) == (1, 1)


def test_prefill_done_without_tokens_drops_the_prompt_work():
    load = ReplicaLoad(prefill_weight=2.0)
    load.on_send("a", 10, 5.0, None, 0.0)
    load.on_prefill_done("a", 0.5)
    assert load.outstanding_work == pytest.approx(5)


def test_a_request_that_outlives_its_prediction_still_counts_as_work():
    load = ReplicaLoad(prefill_weight=0.0, overrun_factor=0.5)
    load.on_send("a", 1, 10.0, None, 0.0)
    load.on_tokens("a", 20, 1.0)
    assert load.outstanding_work == pytest.approx(10)  # 0.5 x 20 generated
    clamped = ReplicaLoad(prefill_weight=0.0, overrun_factor=0.0)
    clamped.on_send("a", 1, 10.0, None, 0.0)
    clamped.on_tokens("a", 20, 1.0)
    assert clamped.outstanding_work == 0


def test_max_tokens_caps_the_remaining_estimate():
    assert remaining_output(100.0, 10, 30, 0.5) == 20
    assert remaining_output(100.0, 30, 30, 0.5) == 0
    assert remaining_output(5.0, 10, None, 0.0) == 0


@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["send", "tok", "pre", "fin"]),
                          st.integers(1, 50), st.floats(0, 300)), max_size=60),
       st.floats(0, 2), st.floats(0, 3))
@settings(max_examples=150, deadline=None)
def test_work_is_never_negative_and_returns_to_zero(events, overrun, weight):
    load = ReplicaLoad(prefill_weight=weight, overrun_factor=overrun)
    live: set[str] = set()
    for rid, kind, n, pred in events:
        key = f"r{rid}"
        if kind == "send" and key not in live:
            load.on_send(key, n, pred, None, 0.0)
            live.add(key)
        elif kind == "tok":
            load.on_tokens(key, n, 0.0)
        elif kind == "pre":
            load.on_prefill_done(key, 0.0)
        elif kind == "fin":
            load.on_finish(key, 0.0)
            live.discard(key)
        assert load.outstanding_work >= 0 and load.kv_demand_tokens >= 0
        assert load.num_in_flight == len(live)
    for key in list(live):
        load.on_finish(key, 0.0)
    assert load.outstanding_work == 0 and load.kv_held_tokens == 0


def test_sending_an_id_twice_is_an_error_and_finishing_twice_is_not():
    load = ReplicaLoad()
    load.on_send("a", 3, None, None, 0.0)
    with pytest.raises(ValueError, match="already in flight"):
        load.on_send("a", 3, None, None, 0.0)
    load.on_finish("a", 0.0)
    load.on_finish("a", 0.0)
    assert load.num_finished == 1


def test_kv_usage_is_reported_or_estimated():
    load = ReplicaLoad(kv_capacity_tokens=1000)
    load.on_send("a", 100, 50.0, None, 0.0)
    assert load.kv_usage == 0  # nothing prefilled yet
    load.on_tokens("a", 10, 0.0)
    assert load.kv_usage == pytest.approx(110 / 1000)
    load.set_kv(500, 2000)
    assert load.kv_usage == pytest.approx(0.25)
    assert ReplicaLoad().kv_usage is None


def test_can_fit_uses_the_predicted_footprint():
    load = ReplicaLoad(kv_capacity_tokens=1000, overrun_factor=0.0)
    load.on_send("a", 400, 400.0, None, 0.0)
    assert load.kv_demand_tokens == 800
    assert load.can_fit(200) and not load.can_fit(201)
    assert ReplicaLoad().can_fit(10**9)


# ---- policies --------------------------------------------------------------------------------


def _replicas(in_flight: list[int], **kw) -> list[ReplicaLoad]:
    reps = [ReplicaLoad(f"r{i}", **kw) for i in range(len(in_flight))]
    for i, n in enumerate(in_flight):
        for j in range(n):
            reps[i].on_send(f"{i}-{j}", 10, 10.0, None, 0.0)
    return reps


def test_round_robin_takes_turns_and_skips_the_unhealthy():
    reps = _replicas([0, 0, 0])
    router = make_router("round-robin")
    assert [router.choose(RouteRequest(1), reps) for _ in range(4)] == [0, 1, 2, 0]
    reps[1].healthy = False
    assert [router.choose(RouteRequest(1), reps) for _ in range(3)] == [2, 0, 2]


def test_least_requests_and_pow2_prefer_fewer_in_flight():
    reps = _replicas([3, 1, 2])
    assert make_router("least-requests").choose(RouteRequest(1), reps) == 1
    two = _replicas([5, 0])
    assert make_router("pow2", seed=3).choose(RouteRequest(1), two) == 1


def test_pow2_is_seeded():
    reps = _replicas([1, 1, 1, 1, 1, 1])
    def picks(seed: int) -> list[int]:
        router = make_router("pow2", seed=seed)
        return [router.choose(RouteRequest(1), reps) for _ in range(20)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)


def test_least_kv_reads_reported_usage():
    reps = _replicas([0, 0, 0])
    for r, used in zip(reps, (800, 100, 400)):
        r.set_kv(used, 1000)
    assert make_router("least-kv").choose(RouteRequest(1), reps) == 1


def test_sal_counts_tokens_not_requests():
    reps = [ReplicaLoad("a", prefill_weight=0.0), ReplicaLoad("b", prefill_weight=0.0)]
    reps[0].on_send("long", 10, 2000.0, None, 0.0)  # one long request
    for j in range(5):
        reps[1].on_send(f"s{j}", 10, 20.0, None, 0.0)  # five short ones
    assert make_router("sal").choose(RouteRequest(10, 50.0), reps) == 1
    assert make_router("least-requests").choose(RouteRequest(10, 50.0), reps) == 0


def test_sal_divides_work_by_speed():
    reps = [ReplicaLoad("slow", speed=1.0, prefill_weight=0.0), ReplicaLoad("fast", speed=4.0, prefill_weight=0.0)]
    reps[0].on_send("a", 1, 100.0, None, 0.0)
    reps[1].on_send("b", 1, 300.0, None, 0.0)
    assert make_router("sal").choose(RouteRequest(1, 10.0), reps) == 1  # 310/4 < 110/1


def test_expected_latency_reads_the_replica_s_step_curve_and_its_co_runners():
    def step(ms_per_seq):
        return lambda batch, kv: 0.010 + ms_per_seq * 1e-3 * batch

    fast, slow = ReplicaLoad("fast", prefill_weight=0.0, decode_step_s=step(0.1)), \
        ReplicaLoad("slow", prefill_weight=0.0, decode_step_s=step(0.4))
    assert ReplicaLoad().expected_latency(10, 50.0) is None  # no step curve: unknown
    assert fast.expected_latency(10, 100.0) == pytest.approx(100 * (0.010 + 0.0001))  # alone
    for j in range(20):  # 20 co-runners, each with 1000 tokens left: all share the new request's life
        fast.on_send(f"f{j}", 10, 1000.0, None, 0.0)
    assert fast.expected_latency(10, 100.0) == pytest.approx(100 * (0.010 + 0.0001 * 21))
    for j in range(20):  # 20 with 5 tokens left: together they share ~1 step of the new one's 100
        slow.on_send(f"s{j}", 10, 5.0, None, 0.0)
    assert slow.expected_latency(10, 100.0) == pytest.approx(100 * (0.010 + 0.0004 * 2))
    # sal by latency: the slow replica whose requests end soon beats the fast one that is full
    request = RouteRequest(10, 100.0)
    assert make_router("sal", estimate="latency").choose(request, [fast, slow]) == 1
    assert make_router("sal").choose(request, [fast, slow]) == 1  # by work too (100 vs 20000)
    # ... but for a one-token request the fast replica's lower step time at its batch wins by latency only
    short = RouteRequest(10, 1.0)
    assert make_router("sal", estimate="latency").choose(short, [fast, slow]) == 0
    assert make_router("sal").choose(short, [fast, slow]) == 1
    with pytest.raises(ValueError, match="estimate must be one of"):
        make_router("sal", estimate="guess")


def test_sal_skips_a_replica_whose_kv_cannot_take_the_request():
    reps = [ReplicaLoad("full", kv_capacity_tokens=1000, prefill_weight=0.0),
            ReplicaLoad("busy", kv_capacity_tokens=100_000, prefill_weight=0.0)]
    reps[0].on_send("a", 900, 10.0, None, 0.0)  # little work left, but its KV is nearly full
    for j in range(3):
        reps[1].on_send(f"b{j}", 10, 100.0, None, 0.0)
    request = RouteRequest(200, 50.0)
    assert make_router("sal").choose(request, reps) == 1
    assert make_router("sal", memory_aware=False).choose(request, reps) == 0
    reps[1].healthy = False  # no replica can take it: the least loaded healthy one still does
    assert make_router("sal").choose(request, reps) == 0


def test_no_healthy_replica_is_a_clear_error():
    reps = _replicas([0, 0])
    for r in reps:
        r.healthy = False
    for name in ROUTER_NAMES:
        with pytest.raises(NoHealthyReplica):
            make_router(name).choose(RouteRequest(1), reps)


def test_unknown_router_and_bad_params_are_value_errors():
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        make_router("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        make_router("pow2", memory_aware=True)


@given(st.sampled_from(ROUTER_NAMES), st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.floats(0, 500)),
                                               min_size=1, max_size=8),
       st.integers(1, 500), st.floats(0, 500), st.integers(0, 10))
@settings(max_examples=200, deadline=None)
def test_a_chosen_replica_is_always_healthy(name, states, prompt, predicted, seed):
    reps = []
    for i, (healthy, n, pred) in enumerate(states):
        r = ReplicaLoad(f"r{i}", kv_capacity_tokens=2000)
        for j in range(n):
            r.on_send(f"{j}", 50, pred, None, 0.0)
        r.healthy = healthy
        reps.append(r)
    router = make_router(name, seed=seed)
    if not any(r.healthy for r in reps):
        with pytest.raises(NoHealthyReplica):
            router.choose(RouteRequest(prompt, predicted), reps)
        return
    for _ in range(3):
        assert reps[router.choose(RouteRequest(prompt, predicted), reps)].healthy


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=8), st.integers(0, 500))  # token counts
@settings(max_examples=200, deadline=None)
def test_sal_picks_the_least_work(predictions, new):
    reps = []
    for i, pred in enumerate(predictions):
        r = ReplicaLoad(f"r{i}", prefill_weight=0.0)
        r.on_send("x", 1, pred, None, 0.0)
        reps.append(r)
    chosen = make_router("sal").choose(RouteRequest(1, new), reps)
    assert reps[chosen].outstanding_work == min(r.outstanding_work for r in reps)


@given(st.lists(st.tuples(st.integers(0, 3000), st.booleans()), min_size=2, max_size=8), st.integers(1, 1500))
@settings(max_examples=200, deadline=None)
def test_sal_chooses_a_replica_that_fits_when_one_does(used, prompt):
    reps = []
    for i, (tokens, healthy) in enumerate(used):
        r = ReplicaLoad(f"r{i}", kv_capacity_tokens=3000, overrun_factor=0.0)
        if tokens:
            r.on_send("x", tokens, 0.0, None, 0.0)
        r.healthy = healthy
        reps.append(r)
    if not any(r.healthy for r in reps):
        return
    request = RouteRequest(prompt, 0.0)
    chosen = make_router("sal").choose(request, reps)
    if any(r.healthy and r.can_fit(request.kv_footprint) for r in reps):
        assert reps[chosen].can_fit(request.kv_footprint)


def test_score_lengths_learns_the_mean_length_of_a_score_bin():
    lengths = ScoreLengths(bins=2, refit_every=10, min_samples=10)
    assert lengths.predict(0.0) is None
    for i in range(40):
        short = i % 2 == 0
        lengths.observe(-1.0 - 0.01 * i if short else 1.0 + 0.01 * i, 10 if short else 500)
    assert lengths.predict(-5.0) == pytest.approx(10)
    assert lengths.predict(5.0) == pytest.approx(500)


def test_the_tracker_remembers_when_it_last_heard_from_the_replica():
    load = ReplicaLoad()
    assert load.last_event_time is None
    load.on_send("a", 3, None, None, 1.0)
    load.on_tokens("a", 2, 2.5)
    assert load.last_event_time == 2.5
    load.on_finish("a", 4.0)
    assert load.last_event_time == 4.0
