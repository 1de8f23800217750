"""Cost models: shapes of the curves, the sanity bands of the GPU presets, spec parsing."""

from __future__ import annotations

import json

import pytest

from rankserve.sim.cost_model import (
    A100_SXM4_40GB,
    LLAMA3_8B,
    LLAMA3_70B,
    PRESET_NAMES,
    SMOLLM2_135M,
    ConstantCostModel,
    CostModel,
    LinearCostModel,
    ModelSpec,
    RooflineCostModel,
    StepShape,
    get_cost_model,
)

ALL_SPECS = (*PRESET_NAMES, "constant:5:0.1")

# A spread of step shapes: pure decode, pure prefill, mixed (chunked prefill + decodes), tiny and large.
SHAPES = [
    StepShape.decode(1, 10),
    StepShape.decode(1, 4000),
    StepShape.decode(32, 300),
    StepShape.decode(256, 500),
    StepShape.prefill(1),
    StepShape.prefill(512, prefix=1024),
    StepShape.prefill(2048),
    StepShape(512, 64, 64 * 700 + 2048, 64 * 700 + 512 * 2048, 65),
]


def ms(model: CostModel, shape: StepShape) -> float:
    return model.step_time(*shape.astuple()) * 1e3


# ---- every model ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("arg", range(5))
def test_step_time_monotonic_in_each_argument(spec: str, shape: StepShape, arg: int) -> None:
    model = get_cost_model(spec)
    base = list(shape.astuple())
    t0 = model.step_time(*base)
    assert t0 > 0
    for bump in (1, 7, 1000, 100_000):
        grown = list(base)
        grown[arg] += bump
        assert model.step_time(*grown) >= t0


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_more_decode_sequences_cost_more_per_step_but_less_per_token(spec: str) -> None:
    model = get_cost_model(spec)
    times = [model.step_time(*StepShape.decode(b, 300).astuple()) for b in (1, 8, 64, 256)]
    assert times == sorted(times)
    if not isinstance(model, ConstantCostModel):
        assert times[-1] > times[0]
    per_token = [t / b for t, b in zip(times, (1, 8, 64, 256))]
    assert per_token == sorted(per_token, reverse=True)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_step_costs_nothing(spec: str) -> None:
    assert get_cost_model(spec).step_time(0, 0, 0, 0, 0) == 0.0


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_swap_time_proportional_to_blocks(spec: str) -> None:
    model = get_cost_model(spec)
    assert model.swap_time(0, 16) == 0.0
    one = model.swap_time(1, 16)
    for n in (2, 10, 1234):
        assert model.swap_time(n, 16) == pytest.approx(n * one, rel=1e-12)
    assert model.swap_time(10, 32) == pytest.approx(2 * model.swap_time(10, 16), rel=1e-12)
    if spec.startswith("constant"):
        assert one == 0.0
    else:
        assert one > 0.0


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_capacities_are_positive_ints_and_names_set(spec: str) -> None:
    model = get_cost_model(spec)
    assert isinstance(model.kv_capacity_tokens(), int) and model.kv_capacity_tokens() > 0
    assert isinstance(model.host_capacity_tokens(), int) and model.host_capacity_tokens() > 0
    assert model.name == spec
    assert spec in repr(model)


def test_step_time_is_a_float_from_ints() -> None:
    for spec in ALL_SPECS:
        assert type(get_cost_model(spec).step_time(3, 4, 500, 1000, 5)) is float


# ---- spec parsing --------------------------------------------------------------------------


def test_preset_names() -> None:
    assert PRESET_NAMES == ("a100-llama3-8b", "a100-80gb-llama3-8b", "8xa100-llama3-70b", "cpu-smollm2-135m")
    assert isinstance(get_cost_model("a100-llama3-8b"), RooflineCostModel)
    assert isinstance(get_cost_model("8xa100-llama3-70b"), RooflineCostModel)
    assert isinstance(get_cost_model("cpu-smollm2-135m"), LinearCostModel)
    assert get_cost_model("a100-llama3-8b") is not get_cost_model("a100-llama3-8b")


def test_constant_spec_parsing_and_exact_values() -> None:
    model = get_cost_model("constant:5:0.1")
    assert isinstance(model, ConstantCostModel)
    assert model.step_time(0, 1, 100, 100, 1) == pytest.approx(0.005)
    assert model.step_time(0, 256, 10**6, 10**6, 256) == pytest.approx(0.005)
    assert model.step_time(100, 0, 100, 10_000, 1) == pytest.approx(0.005 + 100 * 0.0001)
    assert model.step_time(100, 20, 5000, 20_000, 21) == pytest.approx(0.015)
    assert model.swap_time(1000, 16) == 0.0
    assert model.kv_capacity_tokens() >= 10**7  # memory never binds

    plain = get_cost_model("constant:2.5")
    assert plain.step_time(0, 1, 1, 1, 1) == pytest.approx(0.0025)
    assert plain.step_time(4096, 0, 4096, 4096**2, 1) == pytest.approx(0.0025)
    assert ConstantCostModel(5, 0.1).step_time(10, 0, 10, 100, 1) == pytest.approx(0.006)


@pytest.mark.parametrize(
    "spec",
    ["", "a100", "A100-LLAMA3-8B", "constant", "constant:", "constant:x", "constant:5:y", "constant:5:0.1:3",
     "constant:0", "constant:-1", "constant:5:-0.1", "constant:nan", "constant:inf", "linear:1"],
)
def test_bad_specs_raise_value_error_naming_the_spec(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        get_cost_model(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "\n" not in message
    for name in PRESET_NAMES:
        assert name in message
    assert "constant:STEP_MS" in message


# ---- the roofline presets against known numbers --------------------------------------------


def test_llama3_parameter_counts_and_kv_bytes() -> None:
    assert LLAMA3_8B.params == 8_030_261_248
    assert LLAMA3_70B.params == 70_553_706_496
    assert SMOLLM2_135M.params == 134_515_008
    assert LLAMA3_8B.kv_bytes_per_token == 128 * 1024
    assert LLAMA3_70B.kv_bytes_per_token == 320 * 1024
    assert SMOLLM2_135M.kv_bytes_per_token == 23_040


def test_the_smollm2_preset_is_the_embedded_models_shape() -> None:
    """The simulator's SmolLM2 spec and the model the engine serves have one shape (and so one KV
    size per token): the spec built from the model's own config.json equals the preset."""
    pytest.importorskip("torch")
    from rankserve.model.llama import LlamaConfig
    from rankserve.model.loader import ModelNotFoundError, load_model_dir

    try:
        shape = LlamaConfig.from_hf(load_model_dir(None).config)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    assert ModelSpec.of("SmolLM2-135M", shape) == SMOLLM2_135M


def test_a100_8b_decode_batch_one_is_weights_over_bandwidth() -> None:
    model = get_cost_model("a100-llama3-8b")
    for context in (16, 512, 2048):
        assert 10.0 <= ms(model, StepShape.decode(1, context)) <= 16.0
    # Not less than the physical floor: the weights streamed once at the datasheet bandwidth.
    floor_ms = LLAMA3_8B.weight_bytes_read_per_step / A100_SXM4_40GB.mem_bytes_per_s * 1e3
    assert ms(model, StepShape.decode(1, 16)) > floor_ms


def test_a100_8b_large_decode_batch_and_prefill() -> None:
    model = get_cost_model("a100-llama3-8b")
    assert 30.0 <= ms(model, StepShape.decode(256, 500)) <= 45.0
    # 2048-token prefill: above the peak-FLOP floor (2 x matmul params x tokens / 312 TFLOP/s = 92 ms)
    # and within what vLLM on an A100 shows (~15k prompt tok/s).
    floor_ms = 2 * LLAMA3_8B.n_layers * LLAMA3_8B.layer_matmul_params * 2048 / 312e12 * 1e3
    assert floor_ms < ms(model, StepShape.prefill(2048)) <= 200.0


def test_a100_8b_kv_capacity_matches_vllm() -> None:
    model = get_cost_model("a100-llama3-8b")
    assert 100_000 <= model.kv_capacity_tokens() <= 160_000
    assert model.host_capacity_tokens() == 64 * 1024**3 // (128 * 1024)


def test_8xa100_70b_decode_and_capacity() -> None:
    model = get_cost_model("8xa100-llama3-70b")
    assert 15.0 <= ms(model, StepShape.decode(1, 1024)) <= 30.0
    # Per-GPU KV of a token is 1/8 of the model's (one KV head per GPU).
    assert model.kv_bytes_per_token_per_gpu == LLAMA3_70B.kv_bytes_per_token // 8
    assert 800_000 <= model.kv_capacity_tokens() <= 2_000_000


def test_breakdown_adds_up_to_step_time() -> None:
    for spec in ("a100-llama3-8b", "8xa100-llama3-70b"):
        model = get_cost_model(spec)
        assert isinstance(model, RooflineCostModel)
        for shape in SHAPES:
            parts = model.breakdown(*shape.astuple())
            assert parts["total"] == pytest.approx(model.step_time(*shape.astuple()), rel=1e-12)


def test_tp_communication_only_when_tp_above_one() -> None:
    shape = StepShape.decode(8, 100).astuple()
    single = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=1)
    assert single.breakdown(*shape)["tp_comm"] == 0.0
    for tp in (2, 4, 8):
        model = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=tp)
        assert model.breakdown(*shape)["tp_comm"] > 0.0
    assert get_cost_model("8xa100-llama3-70b").breakdown(*shape)["tp_comm"] > 0.0
    # More tokens, more bytes to all-reduce.
    tp2 = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=2)
    assert tp2.breakdown(*StepShape.prefill(2048).astuple())["tp_comm"] > tp2.breakdown(*shape)["tp_comm"]


def test_tp_splits_weights_and_kv() -> None:
    one = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=1)
    two = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=2)
    decode = StepShape.decode(1, 100).astuple()
    assert two.breakdown(*decode)["weight_read"] == pytest.approx(one.breakdown(*decode)["weight_read"] / 2)
    assert two.kv_capacity_tokens() > 2 * one.kv_capacity_tokens()  # weights no longer crowd one GPU
    # tp beyond the KV heads replicates them: at least one head per GPU.
    sixteen = RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=16)
    assert sixteen.kv_bytes_per_token_per_gpu == LLAMA3_8B.kv_bytes_per_token // 8


def test_roofline_rejects_impossible_setups() -> None:
    with pytest.raises(ValueError):
        RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=3)  # 32 heads do not split 3 ways
    with pytest.raises(ValueError):
        RooflineCostModel(LLAMA3_70B, A100_SXM4_40GB, tp=1)  # 141 GB of weights on a 40 GB GPU
    with pytest.raises(ValueError):
        RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, compute_efficiency=0.0)


# ---- the CPU placeholder -------------------------------------------------------------------


def test_cpu_calibration_matches_the_engine_at_small_batches() -> None:
    model = get_cost_model("cpu-smollm2-135m")
    # docs/ENGINE.md measured a batch-1 decode step of 26.3 ms at ~192 tokens of context (2026-11-26).
    assert 21.0 <= ms(model, StepShape.decode(1, 192)) <= 33.0
    steps = [ms(model, StepShape.decode(b, 192)) for b in (1, 4, 16, 64)]
    assert steps == sorted(steps)
    assert model.kv_capacity_tokens() == 2 * 1024**3 // 23_040


def test_linear_model_from_json_round_trip(tmp_path) -> None:
    original = get_cost_model("cpu-smollm2-135m")
    assert isinstance(original, LinearCostModel)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(original.to_dict()))
    loaded = LinearCostModel.from_json(path)
    assert loaded.to_dict() == original.to_dict()
    for shape in SHAPES:
        assert loaded.step_time(*shape.astuple()) == original.step_time(*shape.astuple())

    custom = LinearCostModel(base_s=0.01, decode_s_per_token=0.001, kv_capacity_tokens=1000)
    assert custom.step_time(0, 10, 500, 500, 10) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        LinearCostModel.from_dict({"base_s": 0.01, "kv_capacity_tokens": 10, "bogus": 1})
    with pytest.raises(ValueError):
        LinearCostModel(base_s=-1.0, kv_capacity_tokens=10)
