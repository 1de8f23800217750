"""``rankserve calibrate`` and the presets it writes: the fit, the file, ``cpu-local``, the CPU
check, and the errors a bad flag or a bad file gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_tiny_llama

from rankserve.cli.main import main
from rankserve.sim.calibrate import FEATURES, TimedStep, fit_coefficients
from rankserve.sim.cost_model import LinearCostModel, get_cost_model, local_preset_path
from rankserve.sim.machine import KERNEL_FLAGS, cpu_flags, cpu_mismatch, cpu_model

SIMULATE = ["simulate", "--policy", "fcfs", "--num-requests", "30", "--rate", "2", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "256"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_llama(path)
    return path


@pytest.fixture
def presets(tmp_path, monkeypatch):
    """An empty preset directory standing in for this machine's cache."""
    monkeypatch.setenv("RANKSERVE_PRESETS", str(tmp_path / "presets"))
    return tmp_path / "presets"


def _calibrate_tiny(model_dir, *extra: str) -> int:
    return main(["calibrate", "--model", str(model_dir), "--dtype", "float32", "--batches", "1,3", "--contexts",
                 "8,40", "--decode-steps", "2", "--trace-requests", "4", "--max-prompt", "48", "--max-output", "6",
                 "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--kv-cache-gb", "0.01",
                 "--swap-space-gb", "0.01", *extra])


def test_fit_recovers_the_coefficients_that_made_the_steps() -> None:
    truth = dict(zip(FEATURES, (0.02, 7e-4, 1e-4, 3e-6, 4e-7, 2e-3)))
    model = LinearCostModel(**truth, kv_capacity_tokens=1)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(200):
        shape = (int(rng.integers(0, 512)), int(rng.integers(0, 64)), int(rng.integers(1, 40000)),
                 int(rng.integers(1, 200000)), int(rng.integers(1, 64)))
        steps.append(TimedStep(*shape, model.step_time(*shape)))
    fitted = fit_coefficients(steps)
    for key, value in truth.items():
        assert fitted[key] == pytest.approx(value, rel=1e-4), key


def test_calibrate_writes_cpu_local_and_simulate_uses_it(tiny_model, presets, capsys) -> None:
    with pytest.raises(ValueError, match="rankserve calibrate"):
        get_cost_model("cpu-local")  # nothing calibrated on this "machine" yet
    assert _calibrate_tiny(tiny_model) == 0
    assert "wrote" in capsys.readouterr().out
    path = local_preset_path()
    assert path.parent == presets and path.is_file()
    data = json.loads(path.read_text())
    fitted = data["fitted_on"]
    assert fitted["cpu_model"] == cpu_model() and fitted["cpu_flags"] == cpu_flags()
    assert fitted["dtype"] == "float32" and fitted["threads"] >= 1 and fitted["torch"]
    assert fitted["date"].endswith("Z") and fitted["model"] == tiny_model.name
    # 4 traced requests plus 2 batch sizes x 2 contexts, each prefilled and decoded 2 steps
    assert fitted["fit"]["steps"] >= 4 * 3 and fitted["fit"]["trace_requests"] == 4
    model = get_cost_model("cpu-local")
    assert isinstance(model, LinearCostModel) and model.name == "cpu-local"
    assert model.step_time(0, 1, 10, 10, 1) > 0
    # KV capacity is the calibrated engine's pool: 0.01 GiB of 2 layers x 2 heads x 16 x 2 x 4 bytes
    assert model.kv_capacity_tokens() == int(0.01 * 2**30 // (512 * 16)) * 16

    assert main([*SIMULATE, "--hardware", "cpu-local"]) == 0
    captured = capsys.readouterr()
    assert "30 requests" in captured.out and "warning" not in captured.err  # fitted on this very CPU
    copy = presets / "copied.json"
    copy.write_text(path.read_text())
    assert main([*SIMULATE, "--hardware", f"{copy} x2", "--router", "round-robin"]) == 0
    assert "30 requests" in capsys.readouterr().out


def test_calibrate_to_a_file(tiny_model, tmp_path, presets, capsys, caplog) -> None:
    out = tmp_path / "mine.json"
    assert _calibrate_tiny(tiny_model, "--out", str(out), "--trace-requests", "0") == 0
    assert "failed while scoring" not in caplog.text  # the timed engine runs no predictor
    assert get_cost_model(str(out)).name == "mine"
    assert json.loads(out.read_text())["fitted_on"]["fit"]["trace_requests"] == 0
    assert not local_preset_path().exists()  # --out leaves cpu-local alone


@pytest.mark.parametrize(("argv", "flag"), [
    (["--batches", "0"], "--batches"),
    (["--contexts", "8,x"], "--contexts"),
    (["--contexts", "300"], "--contexts"),  # past the tiny model's 256 positions
    (["--trace-requests", "-1"], "--trace-requests"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_calibrate_flags_are_one_line_errors(tiny_model, presets, argv, flag, capsys) -> None:
    args = ["calibrate", "--model", str(tiny_model), *argv]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err and err.count("\n") == 1
    assert not local_preset_path().exists()


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file"),
    ("{not json", "bad cost-model preset"),
    ("[1, 2]", "expected a JSON object"),
    ('{"base_s": 0.01, "kv_capacity_tokens": 10, "bogus": 1}', "unknown linear cost model fields"),
    ('{"base_s": -1, "kv_capacity_tokens": 10}', "must be finite and >= 0"),
    ('{"kv_capacity_tokens": 10}', "base_s"),
])
def test_unreadable_presets_are_one_line_hardware_errors(tmp_path, content, message, capsys) -> None:
    path = tmp_path / "preset.json"
    if content is not None:
        path.write_text(content)
    for command in (SIMULATE, ["sweep", "--rates", "1", "--num-requests", "5", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--hardware", str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "argument --hardware" in err and message in err and err.count("\n") == 1


def test_cpu_local_without_a_calibration_names_the_command(presets, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*SIMULATE, "--hardware", "cpu-local"])
    err = capsys.readouterr().err
    assert "argument --hardware" in err and "rankserve calibrate" in err and str(presets) in err


def _preset(tmp_path, fitted_on: dict) -> str:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"base_s": 0.02, "seq_s": 0.002, "kv_capacity_tokens": 100000,
                                "fitted_on": fitted_on}))
    return str(path)


def test_simulate_warns_on_a_preset_from_another_cpu(tmp_path, capsys) -> None:
    other = _preset(tmp_path, {"cpu_model": "Some Other CPU 9000", "cpu_flags": []})
    assert main([*SIMULATE, "--hardware", other]) == 0
    err = capsys.readouterr().err
    assert "warning: --hardware" in err and "Some Other CPU 9000" in err and "rankserve calibrate" in err
    assert main([*SIMULATE, "--hardware", "constant:20"]) == 0  # no CPU behind it: nothing to warn about
    assert "warning" not in capsys.readouterr().err


def test_cpu_mismatch_compares_model_name_then_kernel_flags() -> None:
    here = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags()}
    assert cpu_mismatch(here) is None and cpu_mismatch(None) is None and cpu_mismatch({}) is None
    assert "this CPU is" in cpu_mismatch(here | {"cpu_model": "Another CPU"})
    if cpu_flags():  # the flags are compared where the OS lists them
        ours = set(cpu_flags()) & set(KERNEL_FLAGS)
        toggled = sorted(ours ^ {"amx_bf16"})
        assert "kernel flags" in cpu_mismatch(here | {"cpu_flags": toggled})
        # flags that pick no kernel do not matter
        assert cpu_mismatch(here | {"cpu_flags": sorted(ours | {"not_a_kernel_flag"})}) is None


def test_the_shipped_cpu_preset_says_where_it_was_fitted() -> None:
    fitted = get_cost_model("cpu-smollm2-135m").fitted_on
    assert fitted["cpu_model"] == "Intel(R) Xeon(R) Processor" and fitted["date"] == "2026-11-26"
    assert "amx_bf16" not in fitted["cpu_flags"] and "avx512_bf16" in fitted["cpu_flags"]


def _step_log(path, model: LinearCostModel, n: int = 120) -> None:
    """A served engine's step log whose steps took exactly what ``model`` says."""
    rng = np.random.default_rng(1)
    with open(path, "w") as log:
        for i in range(n):
            shape = (int(rng.integers(0, 256)), int(rng.integers(0, 16)), int(rng.integers(1, 5000)),
                     int(rng.integers(1, 60000)), int(rng.integers(1, 16)))
            log.write(json.dumps({"t": i * 0.05, **dict(zip(("prefill_tokens", "decode_tokens", "kv_tokens",
                                                               "attn_pairs", "num_seqs"), shape)),
                                  "seconds": model.step_time(*shape)}) + "\n")
            if i == n // 2:
                log.write("\n")  # blank lines are skipped
        log.write('{"t": 9.9, "prefill_tok')  # the last line, cut short by the server's end: skipped


def test_calibrate_from_served_steps_fits_them_without_timing_anything(tiny_model, tmp_path, presets, capsys) -> None:
    truth = dict(zip(FEATURES, (0.02, 5e-4, 2e-4, 3e-6, 4e-7, 1e-3)))
    logs = [tmp_path / "a.steps.jsonl", tmp_path / "b.steps.jsonl"]
    for log in logs:
        _step_log(log, LinearCostModel(**truth, kv_capacity_tokens=1))
    out = tmp_path / "served.json"
    assert main(["calibrate", "--model", str(tiny_model), "--dtype", "float32", "--kv-cache-gb", "0.01",
                 "--from-steps", *map(str, logs), "--out", str(out)]) == 0
    assert "from 2 step log(s): 240 steps" in capsys.readouterr().out
    model = get_cost_model(str(out))
    for key, value in truth.items():
        assert getattr(model, key) == pytest.approx(value, rel=1e-3), key
    assert model.fitted_on["fit"]["step_logs"] == [str(p) for p in logs]
    assert model.fitted_on["fit"]["step_mean_abs_error"] < 1e-3
    assert model.kv_capacity_tokens() == int(0.01 * 2**30 // (512 * 16)) * 16  # the engine's pool, as above


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file"),
    ("", "no steps"),
    ('{"prefill_tokens": 1}\n', ":1 is not a step log line"),
    ("not json\n", "is not a step log line"),
    ('{"prefill_tokens": "1", "decode_tokens": 0, "kv_tokens": 1, "attn_pairs": 1, "num_seqs": 1, "seconds": 0.1}\n',
     "must be numbers"),
])
def test_a_bad_step_log_is_a_one_line_error(tiny_model, tmp_path, presets, content, message, capsys) -> None:
    path = tmp_path / "steps.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", str(tiny_model), "--from-steps", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --from-steps" in err and message in err and err.count("\n") == 1
    assert not local_preset_path().exists()


@pytest.mark.parametrize("where", ["/nonexistent-dir/steps.jsonl", "DIR"])
def test_a_step_log_that_cannot_be_written_is_a_serve_flag_error(tmp_path, where, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--step-log", str(tmp_path) if where == "DIR" else where])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --step-log" in err and err.count("\n") == 1


def test_calibrate_from_steps_refuses_an_engine_setting_in_one_line(tiny_model, tmp_path, presets, capsys) -> None:
    log = tmp_path / "steps.jsonl"
    _step_log(log, LinearCostModel(base_s=0.02, kv_capacity_tokens=1), n=10)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", str(tiny_model), "--from-steps", str(log), "--kv-cache-gb", "1e-9"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--kv-cache-gb" in err and err.count("\n") == 1

