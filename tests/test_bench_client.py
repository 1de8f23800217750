"""rankserve bench against a live HTTP server (fake executor, real uvicorn): timings and metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import serve_on_loopback
from test_engine_loop import make_engine
from test_server import CharTokenizer

from rankserve.bench.client import SLO, bench_summary, build_items, run_bench
from rankserve.server.app import ServerConfig, build_app


@pytest.fixture(scope="module")
def server():
    engine, _, pool = make_engine(delay_s=0.002, blocks=512)
    app = build_app(ServerConfig("tiny", max_model_len=400), CharTokenizer(), engine)
    with serve_on_loopback(app) as url:
        yield url, pool
    engine.shutdown()


def test_bench_times_every_request(server):
    url, pool = server
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 24)
    items = build_items([f"prompt {i}" for i in range(24)], lengths, np.sort(rng.uniform(0, 0.3, 24)), True)
    results = run_bench(url, "tiny", items, progress=False)
    assert all(r.status.value == "finished" for r in results)
    assert [r.num_output_tokens for r in results] == lengths.tolist()
    for r, item in zip(results, items):
        assert r.arrival_time >= item.arrival_s - 0.01  # sent no earlier than scheduled
        assert r.arrival_time <= r.first_token_time <= r.finished_time
        assert len(r.token_times) == r.num_output_tokens
    summary = bench_summary(results, SLO(ttft_s=10.0))
    assert summary["num_requests"] == 24 and summary["num_aborted"] == 0
    assert summary["goodput_rps"] == pytest.approx(summary["throughput_rps"])
    assert 0 < summary["mean_itl_s"] < summary["mean_latency_s"]
    assert pool.num_free_device_blocks == 512


def test_an_item_can_carry_its_own_body_fields(server):
    from dataclasses import replace

    url, _ = server
    plain, own = build_items(["a", "b"], [9, 9], [0.0, 0.0], True)
    results = run_bench(url, "tiny", [plain, replace(own, extra={"max_tokens": 3})], progress=False)
    assert [r.num_output_tokens for r in results] == [9, 3]


def test_failures_are_recorded_not_lost(server):
    url, _ = server
    items = build_items(["a", "b"], [5, 5], [0.0, 0.0], True)
    results = run_bench(url, "no-such-model", items, progress=False)
    assert all(r.status.value == "aborted" and "404" in r.abort_reason for r in results)
    assert bench_summary(results)["num_aborted"] == 2


def test_cli_bench_and_report(server, tmp_path):
    url, _ = server
    cmd = [sys.executable, "-m", "rankserve.cli.main"]
    run = subprocess.run(cmd + ["bench", "--url", url, "--dataset", "synthetic:uniform:2:20", "--num-requests", "12",
                                "--rates", "20,inf", "--label", "fcfs", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "fcfs.json").read_text())
    assert [r["spec"]["rate"] for r in records] == [20.0, None]
    assert all(r["summary"]["num_requests"] == 12 for r in records)
    assert all(r["summary"]["preemptions"] == 0 for r in records)  # read from the server's /metrics
    rep = subprocess.run(cmd + ["bench-report", str(tmp_path / "fcfs.json"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "latency_cdf.png").exists() and "fcfs" in (tmp_path / "report.md").read_text()
    bad = subprocess.run(cmd + ["bench", "--url", "http://127.0.0.1:9/v1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --url" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_bench_length_scale_and_data_generation_metrics(server, tmp_path):
    url, _ = server
    cmd = [sys.executable, "-m", "rankserve.cli.main"]
    run = subprocess.run(cmd + ["bench", "--url", url, "--dataset", "synthetic:fixed:20", "--prompt-len", "5",
                                "--num-requests", "8", "--rates", "inf", "--length-scale", "0.5", "--first-k", "3",
                                "--time-limit", "60", "--label", "gen", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (record,) = json.loads((tmp_path / "gen.json").read_text())
    assert [r["output_tokens"] for r in record["requests"]] == [10] * 8  # 20 scaled by 0.5
    assert all(r["prompt_tokens"] > 5 for r in record["requests"])  # the server's count, template included
    s = record["summary"]
    assert s["finished_within_limit"] == 8
    assert 0 < s["time_to_first_k_s"] <= s["duration_s"]
    assert "time to first K" in run.stdout
    bad = subprocess.run(cmd + ["bench", "--url", url, "--num-requests", "4", "--first-k", "5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --first-k" in bad.stderr


def test_replayed_lengths_scale_without_reordering():
    import argparse

    from rankserve.cli.bench import bench_workload

    args = argparse.Namespace(dataset="sharegpt", replay="reference", max_tokens=10_000, length_scale=1.0,
                              prompt_len=32)
    texts, full, ignore_eos, _ = bench_workload(args, 50, np.random.default_rng(3))
    args.length_scale, args.max_tokens = 0.25, 100
    texts_scaled, scaled, _, _ = bench_workload(args, 50, np.random.default_rng(3))
    assert ignore_eos and texts_scaled == texts
    assert scaled.min() >= 1 and scaled.max() <= 100
    np.testing.assert_array_equal(scaled, np.clip(np.rint(full * 0.25), 1, 100))
    order = np.argsort(full, kind="stable")
    assert np.all(np.diff(scaled[order]) >= 0)  # the order of lengths is kept (ties aside)


def test_server_preemptions_reads_the_vllm_counter(monkeypatch):
    import httpx

    from rankserve.bench.client import server_preemptions

    pages = {
        "http://h:1/metrics": ('# TYPE vllm:num_preemptions_total counter\n'
                               'vllm:num_preemptions_total{model_name="a"} 3.0\n'
                               'vllm:num_preemptions_total{model_name="b"} 4.0\n'
                               'vllm:num_preemptions_created{model_name="a"} 1.7e9\n'),
        "http://h:2/metrics": "# HELP vllm:num_preemptions Requests taken out\n# TYPE vllm:num_preemptions counter\n",
        "http://h:3/metrics": "process_cpu_seconds_total 1.0\n",
        # A sample with a timestamp, and a label value holding a space: the exposition format allows both.
        "http://h:4/metrics": ('# TYPE vllm:num_preemptions counter\n'
                               'vllm:num_preemptions_total{model_name="a b"} 5.0 1700000000000\n'),
    }
    monkeypatch.setattr(httpx, "get", lambda url, **kw: httpx.Response(200, text=pages[url]))
    assert server_preemptions("http://h:1/v1") == 7
    assert server_preemptions("http://h:2/v1/") == 0  # declared, no sample yet
    assert server_preemptions("http://h:3/v1") is None  # a server without the metric
    assert server_preemptions("http://h:4/v1") == 5


def test_server_samples_sums_histogram_parts_over_labels(monkeypatch):
    import httpx

    from rankserve.bench.client import server_samples

    page = ('# TYPE vllm:iteration_tokens_total histogram\n'
            'vllm:iteration_tokens_total_bucket{engine="0",le="1.0"} 2.0\n'
            'vllm:iteration_tokens_total_count{engine="0"} 10.0\n'
            'vllm:iteration_tokens_total_sum{engine="0"} 300.0\n'
            'vllm:iteration_tokens_total_count{engine="1"} 5.0\n'
            'vllm:iteration_tokens_total_sum{engine="1"} 45.0\n')

    def get(url, **kw):
        if "down" in url:
            raise httpx.ConnectError("refused")
        if "nometrics" in url:
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, text=page)

    monkeypatch.setattr(httpx, "get", get)
    names = ["vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum", "vllm:prefix_cache_hits_total"]
    assert server_samples("http://h:1/v1", names) == {"vllm:iteration_tokens_total_count": 15.0,
                                                      "vllm:iteration_tokens_total_sum": 345.0}
    assert server_samples("http://down:1/v1", names) == {}
    assert server_samples("http://nometrics:1/v1", names) == {}  # a 404 is no metrics, not an error


def test_requests_due_together_are_sent_a_gap_apart_in_trace_order():
    """Sent at the same instant, a burst reaches the server in whatever order its connections race
    to; spaced ``min_gap_s`` apart it arrives in the trace's order. Later arrivals keep their times."""
    items = build_items(["a", "b", "c", "d", "e"], [1] * 5, [0.0, 0.0, 0.0, 0.0031, 1.0], True, min_gap_s=0.002)
    assert [it.arrival_s for it in items] == pytest.approx([0.0, 0.002, 0.004, 0.006, 1.0])
    assert [it.prompt for it in items] == ["a", "b", "c", "d", "e"]
    together = build_items(["a", "b"], [1, 1], [0.0, 0.0], True, min_gap_s=0.0)
    assert [it.arrival_s for it in together] == [0.0, 0.0]
