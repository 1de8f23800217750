"""The cluster simulation (sim/cluster.py) and its command line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_cli import REQUIRED
from test_cli import test_bad_flags_get_one_line_naming_the_flag as check_one_line_flag_error

from rankserve.bench.experiment import SimSpec, run_spec
from rankserve.bench.workloads import arrival_times, sample_workload
from rankserve.cli.main import main
from rankserve.core.request import RequestStatus
from rankserve.core.scheduler import SchedulerConfig
from rankserve.predict import make_predictor
from rankserve.route import ROUTER_NAMES, make_router
from rankserve.sim.cluster import parse_hardware_list, relative_speeds, simulate_cluster
from rankserve.sim.cost_model import get_cost_model
from rankserve.sim.simulator import build_requests, make_sim_policy


@pytest.mark.parametrize("system", [
    dict(policy="fcfs", predictor=None),
    dict(policy="ltr", predictor="oracle"),
    dict(policy="ltr", predictor="noisy", target_tau=0.6),
    dict(policy="mlfq", predictor=None),
])
@pytest.mark.parametrize("router", ["sal", "pow2"])
def test_a_cluster_of_one_replays_the_single_engine_simulation(system, router):
    # Near capacity, so that queues, preemption and swaps all happen.
    spec = SimSpec(rate=24, num_requests=400, **system)
    single, single_result = run_spec(spec)
    # replicas=1 takes the single-engine path; the cluster code is called directly here.
    rng = np.random.default_rng(spec.seed)
    lengths, _ = sample_workload(spec.workload, spec.num_requests, rng)
    arrivals = arrival_times(spec.arrival, spec.rate, spec.num_requests, rng)
    cost = get_cost_model(spec.hardware)
    predictor = None
    if spec.predictor:
        predictor = make_predictor(spec.predictor, spec.target_tau, spec.seed, calibration_lengths=lengths[:, 1])
    cluster = simulate_cluster(build_requests(lengths, arrivals), lambda c: make_sim_policy(spec.policy, c),
                               predictor, [cost], SchedulerConfig(), make_router(router))
    assert cluster.summary == single_result.summary
    assert cluster.num_steps == single_result.num_steps
    assert cluster.replicas[0]["requests"] == spec.num_requests


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_requests_are_conserved_and_counted_once(router):
    spec = SimSpec(policy="ltr", predictor="oracle", rate=80, num_requests=600, replicas=4, router=router,
                   hardware="a100-llama3-8b")
    record, result = run_spec(spec)
    assert len(result.requests) == 600
    assert all(r.status is RequestStatus.FINISHED for r in result.requests)
    assert record["summary"]["num_requests"] == 600
    per_replica = record["cluster"]["replicas"]
    assert len(per_replica) == 4
    assert sum(r["requests"] for r in per_replica) == 600
    assert sum(r["output_tokens"] for r in per_replica) == sum(r.num_output_tokens for r in result.requests)
    assert record["cluster"]["imbalance"]["requests_max_over_mean"] >= 1.0


def test_trackers_end_empty_and_every_replica_frees_its_blocks():
    requests = build_requests(np.array([[50, 30]] * 200), np.linspace(0, 2, 200))
    costs = [get_cost_model("constant:5:0.01")] * 3
    result = simulate_cluster(requests, lambda c: make_sim_policy("fcfs", c), None, costs, SchedulerConfig(),
                              make_router("least-requests"))
    assert sum(r["requests"] for r in result.replicas) == 200
    assert result.summary["num_requests"] == 200
    for load in result.loads:
        assert load.num_sent == load.num_finished > 0
        assert load.num_in_flight == 0 and load.outstanding_work == 0
        assert load.kv_held_tokens == 0  # the last KV report: every block back in the pool


def test_sal_sends_more_work_to_the_faster_replica():
    spec = SimSpec(policy="fcfs", predictor="oracle", rate=60, num_requests=800,
                   hardware="a100-llama3-8b x1,8xa100-llama3-70b x1", replicas=2, router="sal")
    speeds = relative_speeds([get_cost_model("a100-llama3-8b"), get_cost_model("8xa100-llama3-70b")])
    fast = int(np.argmax(speeds))
    record, _ = run_spec(spec)
    tokens = [r["output_tokens"] for r in record["cluster"]["replicas"]]
    assert tokens[fast] > tokens[1 - fast]
    rr, _ = run_spec(replace(spec, router="round-robin"))
    assert [r["requests"] for r in rr["cluster"]["replicas"]] == [400, 400]


def test_per_replica_report_shows_batches_queues_and_kv():
    # max_num_seqs 4 binds: requests wait in the replicas' queues; with 256 they never do
    spec = SimSpec(policy="fcfs", predictor=None, rate=60, num_requests=300, replicas=2, router="round-robin",
                   max_num_seqs=4)
    tight = run_spec(spec)[0]["cluster"]["replicas"]
    loose = run_spec(replace(spec, max_num_seqs=256))[0]["cluster"]["replicas"]
    for r in tight:
        assert r["max_batch"] == 4 and 1 <= r["mean_batch"] <= 4
        assert r["queued_time_fraction"] > 0.5 and r["max_queued"] > 0
        assert 0 < r["peak_kv_usage"] <= 1
    for r in loose:
        assert r["queued_time_fraction"] == 0 and r["max_queued"] == 0 and r["max_batch"] > 4


def test_sal_by_latency_runs_on_a_mixed_cluster_and_favours_the_faster_replica():
    spec = SimSpec(policy="fcfs", predictor="oracle", rate=40, num_requests=400,
                   hardware="a100-llama3-8b x1,a100-80gb-llama3-8b x1", replicas=2, router="sal",
                   router_params={"estimate": "latency"})
    record, result = run_spec(spec)
    assert all(r.status is RequestStatus.FINISHED for r in result.requests)
    tokens = [r["output_tokens"] for r in record["cluster"]["replicas"]]
    assert tokens[1] > tokens[0]  # the 80GB part decodes faster at any batch


def test_parse_hardware_list():
    assert parse_hardware_list("a100-llama3-8b", 3) == ["a100-llama3-8b"] * 3
    assert parse_hardware_list("a100-llama3-8b x2,constant:5:0.1 x1") == ["a100-llama3-8b"] * 2 + ["constant:5:0.1"]
    assert parse_hardware_list("8xa100-llama3-70b x2", 2) == ["8xa100-llama3-70b"] * 2
    with pytest.raises(ValueError, match="lists 2 replicas but --replicas is 3"):
        parse_hardware_list("a100-llama3-8b x2", 3)
    with pytest.raises(ValueError, match="unknown cost model"):
        parse_hardware_list("a100-llama3-8b x2,gpu x1")
    with pytest.raises(ValueError, match="bad hardware entry"):
        parse_hardware_list("a100-llama3-8b x2 x3")


def test_simulate_cluster_writes_the_same_json_keys_plus_per_replica_load(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    code = main(["simulate", "--replicas", "3", "--router", "sal", "--policy", "ltr", "--predictor", "oracle",
                 "--rate", "50", "--num-requests", "300", "--json", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    for key in REQUIRED:
        assert key in data, key
    assert data["num_requests"] == 300
    assert data["system"] == "sal/ltr+oracle"
    assert [r["requests"] for r in data["cluster"]["replicas"]] and len(data["cluster"]["replicas"]) == 3
    assert sum(r["requests"] for r in data["cluster"]["replicas"]) == 300
    assert "busy_max_over_mean" in data["cluster"]["imbalance"]
    assert "r2:a100-llama3-8b" in capsys.readouterr().out


def test_sweep_runs_every_router(tmp_path):
    out = tmp_path / "sweep"
    main(["sweep", "--systems", "fcfs", "--routers", "pow2", "sal", "--replicas", "2",
          "--rates", "30", "--num-requests", "150", "--workers", "1", "--out", str(out)])
    records = json.loads((out / "sweep.json").read_text())
    assert [r["system"] for r in records] == ["pow2/fcfs", "sal/fcfs+oracle"]
    assert all(sum(x["requests"] for x in r["cluster"]["replicas"]) == 150 for r in records)


@pytest.mark.parametrize("argv, flag", [
    (["simulate", "--replicas", "0"], "--replicas"),
    (["simulate", "--replicas", "3", "--hardware", "a100-llama3-8b x2"], "--replicas"),
    (["simulate", "--replicas", "2", "--router", "least-latency"], "--router"),
    (["simulate", "--replicas", "2", "--router-arg", "memory_awareness=false"], "--router-arg"),
    (["simulate", "--replicas", "2", "--router-arg", "prefill_weight=-1"], "--router-arg"),
    (["simulate", "--replicas", "2", "--router", "sal", "--router-arg", "estimate=guess"], "--router-arg"),
    (["simulate", "--hardware", "a100-llama3-8b x2,tpu x2"], "--hardware"),
    (["sweep", "--replicas", "2", "--routers", "fastest"], "--routers"),
])
def test_bad_cluster_flags_get_one_line_naming_the_flag(argv, flag):
    check_one_line_flag_error(argv, flag)
