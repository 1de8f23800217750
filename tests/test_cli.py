from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankserve.cli.main import main

REQUIRED = (
    "num_requests duration_s throughput_rps output_tokens_per_s mean_latency_s p50_latency_s p90_latency_s "
    "p99_latency_s mean_ttft_s p99_ttft_s mean_tpot_s mean_latency_per_token_s p90_latency_per_token_s "
    "mean_max_wait_s p99_max_wait_s preemptions"
).split()


def test_simulate_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    code = main(["simulate", "--policy", "ltr", "--predictor", "noisy", "--target-tau", "0.6",
                 "--workload", "sharegpt", "--rate", "20", "--num-requests", "300", "--json", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    for key in REQUIRED:
        assert key in data, key
    assert data["num_requests"] == 300
    assert data["mean_latency_s"] >= data["mean_ttft_s"] > 0
    assert 0.45 < data["predictor"]["achieved_tau"] < 0.75
    assert "ltr+noisy@0.6" in capsys.readouterr().out


def test_simulate_synthetic_data_generation(tmp_path):
    def run(policy: str) -> dict:
        path = tmp_path / f"{policy}.json"
        main(["simulate", "--policy", policy, "--arrival", "burst", "--num-requests", "200", "--first-k", "50",
              "--time-limit", "10", "--hardware", "constant:10", "--workload", "uniform:1:100",
              "--max-num-seqs", "8", "--json", str(path)])
        return json.loads(path.read_text())

    sjf, fcfs = run("sjf"), run("fcfs")
    # ~10,100 tokens, 8 per 10 ms step: the whole burst needs ~13 s, so the 10 s limit binds.
    for data in (sjf, fcfs):
        assert 0 < data["time_to_first_k_s"] < data["duration_s"]
        assert 50 <= data["finished_within_limit"] < 200
    # Shortest first finishes the first 50 sooner, and more of them inside the limit.
    assert sjf["time_to_first_k_s"] < fcfs["time_to_first_k_s"] / 2
    assert sjf["finished_within_limit"] > fcfs["finished_within_limit"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["simulate", "--workload", "exp:-3"], "--workload"),
        (["simulate", "--hardware", "tpu"], "--hardware"),
        (["simulate", "--rate", "0"], "--rate"),
        (["simulate", "--policy", "lottery"], "--policy"),
        (["simulate", "--predictor", "noisy"], "--predictor"),
        (["simulate", "--target-tau", "2"], "--target-tau"),
        (["simulate", "--policy", "trail", "--policy-arg", "c"], "--policy-arg"),
        (["simulate", "--policy", "trail", "--policy-arg", "speed=3"], "--policy-arg"),
        (["simulate", "--arrival", "gamma:0"], "--arrival"),
        (["simulate", "--num-requests", "0"], "--num-requests"),
        (["sweep", "--systems", "ltr+psychic"], "--systems"),
        (["sweep", "--rates", "5,abc"], "--rates"),
    ],
)
def test_bad_flags_get_one_line_naming_the_flag(argv, flag):
    proc = subprocess.run([sys.executable, "-m", "rankserve.cli.main", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0] and "Traceback" not in proc.stderr


def test_sweep_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "sweep"
    main(["sweep", "--systems", "fcfs", "sjf+oracle", "--rates", "15,25", "--num-requests", "200",
          "--workers", "1", "--out", str(out)])
    records = json.loads((out / "sweep.json").read_text())
    assert [(r["system"], r["spec"]["rate"]) for r in records] == [
        ("fcfs", 15), ("fcfs", 25), ("sjf+oracle", 15), ("sjf+oracle", 25)]
    table = (out / "sweep.md").read_text()
    assert "x vs fcfs" in table and "sjf+oracle" in table
    assert (out / "sweep.png").stat().st_size > 10_000


def test_simulate_with_the_trained_ranker_scores_sharegpt_prompts(tmp_path):
    """The reference-label ranker orders simulated ShareGPT prompts better than arrival order."""
    path = tmp_path / "ranker.json"
    main(["simulate", "--policy", "sjf", "--predictor", "ranker", "--workload", "sharegpt:test", "--arrival", "burst",
          "--num-requests", "120", "--hardware", "constant:10", "--max-num-seqs", "8", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["predictor"]["prompts_scored"] == 120 and data["predictor"]["weights"] == "ranker-reference.safetensors"
    fcfs = tmp_path / "fcfs.json"
    main(["simulate", "--policy", "fcfs", "--workload", "sharegpt:test", "--arrival", "burst",
          "--num-requests", "120", "--hardware", "constant:10", "--max-num-seqs", "8", "--json", str(fcfs)])
    assert data["mean_latency_s"] < json.loads(fcfs.read_text())["mean_latency_s"]


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--predictor", "ranker", "--workload", "exp:100"], "reads prompt text"),
    (["simulate", "--predictor", "probe", "--workload", "sharegpt"], "hidden states"),
    (["serve", "--policy", "srpt", "--predictor", "ranker"], "only ranks"),
    (["serve", "--predictor-weights", "/nonexistent.safetensors"], "does not exist"),
    (["serve", "--policy", "ltr", "--policy-arg", "starvation_prevention"], "argument --policy-arg"),
    (["serve", "--policy", "fcfs", "--policy-arg", "boost_quantum=3"], "argument --policy-arg"),
])
def test_learned_predictor_misuse_is_a_flag_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, threaded", [([], False), (["--scoring-thread"], True), (["--no-scoring-thread"], False)])
def test_serve_scores_between_steps_unless_told_to_use_a_thread(monkeypatch, flags, threaded):
    import rankserve.server.serve as serve_module

    seen = []
    monkeypatch.setattr(serve_module, "serve", lambda settings, *rest: seen.append(settings))
    main(["serve", "--policy", "fcfs", *flags])
    assert [s.scoring_thread for s in seen] == [threaded]
