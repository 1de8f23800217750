"""Kernel paths chosen by measurement: the timing, the per-machine cache, the override, the report."""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rankserve.model import kernels
from rankserve.model.llama import BUILT_KERNELS, DECODE_ATTENTION, KernelChoice, LlamaConfig, LlamaModel, SeqInput

BS = 4


def _tiny_weights(cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=False, initializer_range=0.1))
    return dict(hf.state_dict())


CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def weights():
    return _tiny_weights(CFG)


@pytest.fixture
def bf16(weights):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("fp32 copies are a oneDNN path")
    model = LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=True)
    assert model.lm_head.has_fp32_copy
    return model


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    monkeypatch.setenv(kernels.ENV_CACHE, str(path))
    monkeypatch.delenv(kernels.ENV_FORCE, raising=False)
    return path


def test_a_choice_made_without_fp32_copies_is_not_read_back_for_a_model_with_them(bf16, weights):
    """The copies were not a candidate for a model built without them: its cached choice (native
    GEMM) must not stand for a model that has them, or a machine keeps a slow choice forever."""
    without = LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=False)
    assert kernels.machine_key(bf16)["fp32_copies"] and not kernels.machine_key(without)["fp32_copies"]
    assert kernels._key_hash(kernels.machine_key(bf16)) != kernels._key_hash(kernels.machine_key(without))


def test_parse_forced():
    assert kernels.parse_forced("") == {}
    assert kernels.parse_forced("gemm=native, attention=matmul") == {"fp32_gemm_min_rows": None,
                                                                      "decode_attention": "matmul"}
    assert kernels.parse_forced("gemm=fp32") == {"fp32_gemm_min_rows": 1}
    assert kernels.parse_forced("gemm=fp32>=48") == {"fp32_gemm_min_rows": 48}
    for bad, named in (("gemm=int8", "gemm"), ("attention=fused", "attention"), ("speed=max", "speed"),
                       ("gemm=fp32>=0", "gemm")):
        with pytest.raises(ValueError, match=f"RANKSERVE_KERNELS.*{named}"):
            kernels.parse_forced(bad)


def test_fp32_threshold_is_where_fp32_stays_ahead():
    def t(*pairs):
        return {n: {"native": a, "fp32": b} for n, a, b in pairs}

    assert kernels.fp32_threshold(t((1, 1, 2), (32, 2, 1), (64, 4, 2))) == 32
    # a win at 16 that does not hold at 32 does not count
    assert kernels.fp32_threshold(t((16, 2, 1), (32, 2, 3), (64, 4, 2))) == 64
    assert kernels.fp32_threshold(t((1, 1, 2), (64, 4, 5))) is None


def test_first_use_times_and_caches_then_reads_back(bf16, weights, cache_file, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="rankserve.model.kernels")
    choice = kernels.choose_kernels(bf16)
    assert choice.source == "measured" and bf16.kernels == choice
    assert choice.decode_attention in DECODE_ATTENTION
    assert bf16.lm_head.has_fp32_copy == (choice.fp32_gemm_min_rows is not None)
    assert f"gemm {choice.gemm}, decode attention {choice.decode_attention} (measured)" in caplog.text
    (entry,) = json.loads(cache_file.read_text()).values()
    assert entry["machine"]["cpu"] == kernels.cpu_identity()["cpu"]
    assert entry["machine"]["torch"] == torch.__version__ and entry["machine"]["dtype"] == "bfloat16"
    assert set(entry["timings"]["decode_attention_s"]) == set(kernels.attention_candidates(bf16)) >= {"flash", "matmul"}
    assert set(entry["timings"]["gemm_s"]) == {str(n) for n in kernels.GEMM_ROWS}

    def no_timing(*_a, **_k):
        raise AssertionError("a cached choice must not be timed again")

    monkeypatch.setattr(kernels, "time_gemm", no_timing)
    monkeypatch.setattr(kernels, "time_decode_attention", no_timing)
    again = kernels.choose_kernels(LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=True))
    assert (again.fp32_gemm_min_rows, again.decode_attention, again.source) == (
        choice.fp32_gemm_min_rows, choice.decode_attention, "cached")
    # Another thread count is another machine as far as the choice goes.
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    with pytest.raises(AssertionError, match="cached choice"):
        kernels.choose_kernels(LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=True))


def test_a_broken_cache_is_timed_again(bf16, weights, cache_file, caplog):
    caplog.set_level(logging.INFO, logger="rankserve.model.kernels")
    cache_file.write_text("{not json")
    digest = kernels._key_hash(kernels.machine_key(bf16))  # before the choice: a native GEMM drops the copies
    assert kernels.choose_kernels(bf16).source == "measured"
    assert digest in json.loads(cache_file.read_text())
    cache_file.write_text(json.dumps({digest: {"choice": {"decode_attention": "no-such-kernel"}}}))
    assert kernels.choose_kernels(LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=True)).source == "measured"
    assert json.loads(cache_file.read_text())[digest]["choice"]["decode_attention"] in DECODE_ATTENTION


def test_forced_paths_are_not_timed_nor_cached(bf16, cache_file, monkeypatch):
    monkeypatch.setenv(kernels.ENV_FORCE, "gemm=native,attention=matmul")
    monkeypatch.setattr(kernels, "time_gemm", None)  # calling either would fail
    monkeypatch.setattr(kernels, "time_decode_attention", None)
    choice = kernels.choose_kernels(bf16)
    assert choice == KernelChoice(None, "matmul", "forced")
    assert not bf16.lm_head.has_fp32_copy  # native GEMM: the copies' memory is given back
    assert not cache_file.exists()


def test_forcing_fp32_gemm_needs_the_copies(weights, cache_file, monkeypatch):
    monkeypatch.setenv(kernels.ENV_FORCE, "gemm=fp32")
    fp32_model = LlamaModel(CFG, weights, dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32 weight copies"):
        kernels.choose_kernels(fp32_model)


def test_fp32_gemm_threshold_decides_the_activation_dtype(bf16):
    """A step of fewer rows than the threshold runs the bf16 weights; one of as many or more the
    fp32 copies."""
    def logits():
        return bf16.forward([SeqInput(list(range(10)), 0, [0, 1, 2])], bf16.allocate_kv_cache(4, BS)).logits

    default = logits()  # 10 rows, under the default threshold of 32
    bf16.use_kernels(KernelChoice(11, "flash"))
    under = logits()
    bf16.use_kernels(KernelChoice(8, "flash"))
    over = logits()
    assert torch.equal(default, under)
    assert not torch.equal(over, under)
    assert (over - under).abs().max() < 0.05 * under.abs().max() + 0.05


def test_metrics_show_the_kernel_paths():
    from rankserve.server.metrics import ServerMetrics

    text = ServerMetrics("m").render(None, None, KernelChoice(64, "flash", "cached").labels()).decode()
    assert 'rankserve:kernel_info{decode_attention="flash",gemm="fp32>=64",model_name="m",source="cached"} 1.0' in text
    assert "kernel_info" not in ServerMetrics("m").render(None).decode()


def test_built_attention_kernels_are_candidates_only_where_they_build(bf16, weights, cache_file, monkeypatch, caplog):
    """Without a C++ compiler (simulated: the compile and the extension build fail) neither the
    paged kernel nor the C++ one is timed or read back from a cache, and forcing either fails
    naming the setting; the engine still runs."""
    from rankserve.model import llama

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(llama, "_compiled_paged", no_compiler)
    monkeypatch.setattr(llama.cpp_kernels, "load", lambda: False)
    assert not llama.attention_works("paged", CFG, torch.bfloat16)
    assert "cannot run here: no C++ compiler found" in caplog.text
    assert not llama.attention_works("cpp", CFG, torch.bfloat16)
    assert kernels.attention_candidates(bf16) == ["flash", "matmul"]
    digest = kernels._key_hash(kernels.machine_key(bf16))
    choice = kernels.choose_kernels(bf16)
    assert choice.decode_attention in ("flash", "matmul")
    assert set(json.loads(cache_file.read_text())[digest]["timings"]["decode_attention_s"]) == {"flash", "matmul"}
    for kernel in BUILT_KERNELS:
        cache_file.write_text(json.dumps({digest: {"choice": {"decode_attention": kernel, "fp32_gemm_min_rows": None}}}))
        assert kernels.choose_kernels(LlamaModel(CFG, weights, dtype=torch.bfloat16, fp32_copy=True)).source == "measured"
        monkeypatch.setenv(kernels.ENV_FORCE, f"attention={kernel}")
        with pytest.raises(ValueError, match=f"RANKSERVE_KERNELS: attention={kernel} cannot run here"):
            kernels.choose_kernels(bf16)
        monkeypatch.delenv(kernels.ENV_FORCE)
