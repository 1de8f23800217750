"""Tests for rankserve.bench.workloads (length specs, arrival processes) and the ShareGPT lengths
file of rankserve.learn.sharegpt."""

from __future__ import annotations

import csv
import io
import math
import re
from importlib import resources

import numpy as np
import pytest

from rankserve.bench.workloads import WorkloadSpecError, arrival_times, sample_lengths
from rankserve.learn.sharegpt import load_sharegpt_lengths, sharegpt_split_of

N = 20_000


def rng(seed: int = 1234) -> np.random.Generator:
    return np.random.default_rng(seed)


def packaged_rows() -> list[tuple[str, int, int]]:
    text = resources.files("rankserve.learn").joinpath("data", "sharegpt_lengths.csv").read_text("utf-8")
    reader = csv.reader(io.StringIO(text))
    assert next(reader) == ["conv_id", "prompt_len", "output_len"]
    return [(row[0], int(row[1]), int(row[2])) for row in reader if row]


# ---------------------------------------------------------------------------------------------
# ShareGPT file
# ---------------------------------------------------------------------------------------------


def test_packaged_file_loads_through_the_installed_package():
    rows = packaged_rows()
    table = load_sharegpt_lengths()
    assert table.shape == (len(rows), 2)
    assert table.dtype.kind == "i"
    np.testing.assert_array_equal(table, np.array([(p, o) for _, p, o in rows]))


def test_sharegpt_row_count_and_vllm_filters():
    table = load_sharegpt_lengths()
    assert 8000 < len(table) < 12000
    prompt, output = table[:, 0], table[:, 1]
    assert prompt.min() >= 4 and output.min() >= 4
    assert prompt.max() <= 1024
    assert (prompt + output).max() <= 2048
    # Real conversational data: replies are much longer than prompts at the median.
    assert np.median(prompt) < np.median(output)


def test_sharegpt_conversation_ids_are_unique_and_look_like_sharegpt():
    ids = [conv_id for conv_id, _, _ in packaged_rows()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r".+_\d+", conv_id) for conv_id in ids)


def test_load_returns_a_copy_that_does_not_touch_the_cache():
    first = load_sharegpt_lengths()
    first[:] = -1
    assert load_sharegpt_lengths().min() >= 4


def test_train_test_split_is_disjoint_complete_and_stable():
    rows = packaged_rows()
    sides = [sharegpt_split_of(conv_id) for conv_id, _, _ in rows]
    assert set(sides) == {"train", "test"}
    train, test = load_sharegpt_lengths("train"), load_sharegpt_lengths("test")
    assert len(train) + len(test) == len(rows)
    assert 0.75 < len(train) / len(rows) < 0.85
    expected_train = np.array([(p, o) for (_, p, o), s in zip(rows, sides) if s == "train"])
    expected_test = np.array([(p, o) for (_, p, o), s in zip(rows, sides) if s == "test"])
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(test, expected_test)
    # Same answer on a second call.
    np.testing.assert_array_equal(load_sharegpt_lengths("train"), train)
    np.testing.assert_array_equal(load_sharegpt_lengths("test"), test)


def test_split_is_pinned_and_keeps_conversation_pieces_together():
    # MD5-based, so these hold on every machine and Python version (no hash randomisation).
    assert sharegpt_split_of("a") == "train"
    assert sharegpt_split_of("e") == "test"
    for conv_id in ("QWJhYvA", "e", "xyz123"):
        sides = {sharegpt_split_of(f"{conv_id}_{k}") for k in range(6)}
        assert sides == {sharegpt_split_of(conv_id)}


def test_bad_split_name():
    with pytest.raises(ValueError, match="valid|use None"):
        load_sharegpt_lengths("validation")


def test_sharegpt_spec_is_a_cycled_permutation():
    table = load_sharegpt_lengths()
    n = 2 * len(table) + 7
    out = sample_lengths("sharegpt", n, rng())
    assert out.shape == (n, 2)
    first = out[: len(table)]
    # One pass is a permutation of the table: same multiset of rows.
    assert sorted(map(tuple, first)) == sorted(map(tuple, table))
    np.testing.assert_array_equal(out[len(table) : 2 * len(table)], first)
    np.testing.assert_array_equal(out[2 * len(table) :], first[:7])


def test_sharegpt_spec_with_split_and_cap():
    test_rows = {tuple(r) for r in load_sharegpt_lengths("test")}
    out = sample_lengths("sharegpt:test", 500, rng())
    assert {tuple(r) for r in out} <= test_rows
    capped = sample_lengths("sharegpt,max=100", 3000, rng())
    assert capped[:, 1].max() == 100
    assert capped[:, 0].max() > 100  # prompts are not capped


# ---------------------------------------------------------------------------------------------
# Synthetic lengths
# ---------------------------------------------------------------------------------------------


def test_fixed():
    out = sample_lengths("fixed:128", 10, rng(), prompt_len=7)
    assert out.shape == (10, 2) and out.dtype.kind == "i"
    assert (out[:, 0] == 7).all() and (out[:, 1] == 128).all()


def test_exp_mean():
    out = sample_lengths("exp:200", N, rng())
    assert (out[:, 0] == 32).all()
    assert out[:, 1].min() >= 1
    assert out[:, 1].mean() == pytest.approx(200, rel=0.03)
    # Exponential: the standard deviation equals the mean.
    assert out[:, 1].std() == pytest.approx(200, rel=0.05)


def test_lognormal_mean_and_sigma():
    mean, sigma = 300.0, 1.0
    out = sample_lengths(f"lognormal:{mean}:{sigma}", N, rng())[:, 1]
    assert out.mean() == pytest.approx(mean, rel=0.04)
    # Median of a log-normal is exp(mu) = MEAN * exp(-SIGMA^2 / 2).
    assert np.median(out) == pytest.approx(mean * math.exp(-(sigma**2) / 2), rel=0.04)
    assert np.log(out).std() == pytest.approx(sigma, rel=0.05)


def test_uniform_is_inclusive_with_right_mean():
    out = sample_lengths("uniform:10:50", N, rng())[:, 1]
    assert out.min() == 10 and out.max() == 50
    assert out.mean() == pytest.approx(30, rel=0.02)
    assert len(np.unique(out)) == 41


def test_bimodal_mix():
    out = sample_lengths("bimodal:16:1024:0.2", N, rng())[:, 1]
    assert set(np.unique(out)) == {16, 1024}
    assert (out == 1024).mean() == pytest.approx(0.2, abs=0.015)


def test_small_means_round_up_to_one_and_cap_applies():
    out = sample_lengths("exp:0.3", 5000, rng())
    assert out.min() >= 1
    capped = sample_lengths("exp:200,max=64", 5000, rng())[:, 1]
    assert capped.max() == 64 and capped.min() >= 1


def test_same_seed_same_lengths_and_empty_request():
    a = sample_lengths("lognormal:100:0.8", 100, rng(7))
    b = sample_lengths("lognormal:100:0.8", 100, rng(7))
    np.testing.assert_array_equal(a, b)
    assert sample_lengths("exp:10", 0, rng()).shape == (0, 2)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("exp:-3", "MEAN must be > 0"),
        ("lognormal:5", "argument"),
        ("foo", "unknown distribution"),
        ("fixed:0", ">= 1"),
        ("fixed:abc", "integer"),
        ("uniform:5:2", "HI must be >= LO"),
        ("uniform:0:2", "LO must be >= 1"),
        ("bimodal:1:2:1.5", "P_LONG"),
        ("lognormal:100:-1", "SIGMA"),
        ("exp:nan", "finite"),
        ("exp:200,min=5", "max=N"),
        ("exp:200,max=0", "max"),
        ("sharegpt:dev", "train"),
        ("", "non-empty"),
    ],
)
def test_bad_length_specs_name_the_spec_and_the_forms(spec, reason):
    with pytest.raises(WorkloadSpecError) as info:
        sample_lengths(spec, 10, rng())
    message = str(info.value)
    assert message.startswith(f"invalid workload {spec!r}: ")
    assert reason in message
    assert "forms: sharegpt" in message and "exp:MEAN" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_bad_prompt_len_and_n():
    with pytest.raises(ValueError):
        sample_lengths("fixed:3", 5, rng(), prompt_len=0)
    with pytest.raises(ValueError):
        sample_lengths("fixed:3", -1, rng())


# ---------------------------------------------------------------------------------------------
# Arrivals
# ---------------------------------------------------------------------------------------------


def test_poisson_rate_and_shape():
    rate = 5.0
    times = arrival_times("poisson", rate, N, rng())
    assert times.shape == (N,) and times.dtype == np.float64
    assert np.all(np.diff(times) >= 0)
    assert times[0] > 0
    assert N / times[-1] == pytest.approx(rate, rel=0.03)
    gaps = np.diff(times, prepend=0.0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_rate_and_cv(cv):
    rate = 8.0
    times = arrival_times(f"gamma:{cv}", rate, N, rng())
    assert np.all(np.diff(times) >= 0)
    gaps = np.diff(times, prepend=0.0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_gamma_cv_one_matches_poisson_statistics():
    gaps = np.diff(arrival_times("gamma:1", 2.0, N, rng()), prepend=0.0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


def test_burst_and_infinite_rate():
    assert (arrival_times("burst", 3.0, 50, rng()) == 0).all()
    assert (arrival_times("burst", 0.0, 5, rng()) == 0).all()  # rate ignored
    for spec in ("poisson", "gamma:2"):
        out = arrival_times(spec, math.inf, 40, rng())
        assert out.shape == (40,) and (out == 0).all()


def test_arrivals_reproducible_and_empty():
    np.testing.assert_array_equal(arrival_times("gamma:3", 1.0, 50, rng(3)), arrival_times("gamma:3", 1.0, 50, rng(3)))
    assert arrival_times("poisson", 1.0, 0, rng()).shape == (0,)


@pytest.mark.parametrize(
    "spec, rate, reason",
    [
        ("gamma:0", 1.0, "CV must be > 0"),
        ("gamma:-1", 1.0, "CV must be > 0"),
        ("gamma", 1.0, "argument"),
        ("gamma:x", 1.0, "number"),
        ("uniform", 1.0, "unknown arrival process"),
        ("poisson:3", 1.0, "no argument"),
        ("poisson", 0.0, "rate must be > 0"),
        ("poisson", -2.0, "rate must be > 0"),
        ("gamma:2", float("nan"), "rate must be > 0"),
    ],
)
def test_bad_arrival_specs(spec, rate, reason):
    with pytest.raises(WorkloadSpecError) as info:
        arrival_times(spec, rate, 10, rng())
    message = str(info.value)
    assert message.startswith(f"invalid arrival process {spec!r}: ")
    assert reason in message
    assert "forms: poisson, gamma:CV, burst" in message
