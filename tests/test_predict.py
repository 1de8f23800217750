from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import kendalltau

from rankserve.bench.workloads import sample_workload
from rankserve.core import Request, SamplingParams
from rankserve.predict import make_predictor, predictor_names, register_learned
from rankserve.predict.oracle import noise_for_tau


def _requests(lengths, prompt=8):
    return [
        Request(range(prompt), SamplingParams(max_tokens=int(n), ignore_eos=True), oracle_output_len=int(n))
        for n in lengths
    ]


def test_oracle_gives_the_true_length():
    reqs = _requests([5, 50, 500])
    make_predictor("oracle").score(reqs)
    assert [r.predicted_len for r in reqs] == [5, 50, 500]
    assert [r.initial_predicted_len for r in reqs] == [5, 50, 500]


def test_oracle_without_known_lengths_says_why():
    req = Request([1, 2, 3])
    with pytest.raises(ValueError, match="no known output length"):
        make_predictor("oracle").score([req])


def test_prompt_length_predictor_ranks_by_prompt():
    reqs = [Request(range(p)) for p in (30, 10, 20)]
    make_predictor("prompt-len").score(reqs)
    assert [r.score for r in reqs] == [30, 10, 20]


@pytest.mark.parametrize("target", [0.3, 0.55, 0.62, 0.8])
def test_noisy_oracle_reaches_the_target_tau(target):
    rng = np.random.default_rng(3)
    lengths = np.maximum(rng.lognormal(5.3, 0.9, 6000).astype(int), 1)
    predictor = make_predictor("noisy", target_tau=target, seed=1, calibration_lengths=lengths[:3000])
    reqs = _requests(lengths[3000:])
    for start in range(0, len(reqs), 500):  # scored in batches, as at admission
        predictor.score(reqs[start : start + 500])
    achieved = predictor.report()["achieved_tau"]
    measured = kendalltau([r.oracle_output_len for r in reqs], [r.predicted_len for r in reqs]).statistic
    assert achieved == pytest.approx(measured)
    assert achieved == pytest.approx(target, abs=0.03)


def test_noisy_oracle_calibrates_on_its_first_batch_without_a_sample():
    lengths = np.arange(1, 2001)
    predictor = make_predictor("noisy", target_tau=0.5, seed=0)
    predictor.score(_requests(lengths))
    assert predictor.report()["achieved_tau"] == pytest.approx(0.5, abs=0.03)


def test_noisy_oracle_rejects_bad_targets():
    with pytest.raises(ValueError, match="needs --target-tau"):
        make_predictor("noisy")
    with pytest.raises(ValueError, match="target-tau"):
        make_predictor("noisy", target_tau=1.5)
    with pytest.raises(ValueError, match="distinct"):
        noise_for_tau(np.full(10, 7), 0.5)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("crystal-ball")


def test_noisy_oracle_is_calibrated_apart_from_a_workload_drawn_with_the_same_seed():
    # A log-normal workload is exp of default_rng(seed)'s normals: calibration noise drawn from the
    # same stream would be the lengths themselves, and tau would end near 0 whatever the target.
    lengths, _ = sample_workload("lognormal:68:0.6", 2000, np.random.default_rng(0), prompt_len=100)
    predictor = make_predictor("noisy", target_tau=0.45, seed=0, calibration_lengths=lengths[:, 1])
    predictor.score(_requests(lengths[:, 1]))
    assert predictor.report()["achieved_tau"] == pytest.approx(0.45, abs=0.03)


def test_predict_alone_knows_only_the_builtin_predictors():
    """predict does not import learn: a fresh interpreter that imports only predict knows the
    model-free predictors and says how the learned ones become known."""
    code = ("import sys; from rankserve.predict import make_predictor, predictor_names\n"
            "assert 'rankserve.learn' not in sys.modules, 'predict imported learn'\n"
            "print(','.join(predictor_names()))\n"
            "try:\n    make_predictor('ranker')\nexcept ValueError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, error = out.splitlines()
    assert names == "oracle,noisy,prompt-len"
    assert "unknown predictor 'ranker'" in error and "importing rankserve.learn" in error


def test_learn_registers_its_predictors_by_name(monkeypatch):
    from rankserve.learn import LEARNED_NAMES

    assert predictor_names() == ("oracle", "noisy", "prompt-len", *LEARNED_NAMES)
    built = []
    monkeypatch.setattr("rankserve.learn.predictors.make_learned_predictor",
                        lambda name, labels, weights: built.append((name, labels, weights)) or "model")
    assert make_predictor("probe", labels="reference", weights="w.safetensors") == "model"
    assert built == [("probe", "reference", "w.safetensors")]
    with pytest.raises(ValueError, match="taken by a built-in"):
        register_learned("oracle", lambda labels, weights: None)
