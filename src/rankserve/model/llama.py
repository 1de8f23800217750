"""The Llama-family forward (Llama, SmolLM2, Qwen2) in plain torch, with a paged KV cache.

The KV cache is one tensor pool ``[num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]``
(index 0 on dim 1 holds keys, 1 values). A sequence owns the blocks listed in its block table, as the
core ``BlockManager`` hands them out: token ``p`` of the sequence lives in block ``table[p // bs]`` at
offset ``p % bs``.

``LlamaModel.forward`` runs a *mixed batch* in one pass: every sequence brings its new tokens (a prefill
chunk of any length or one decode token), how many of its tokens are already in the cache, and its block
table. The matmuls run over all new tokens of all sequences at once; attention (torch's flash kernel)
runs per prefill sequence and, for decode sequences, through the kernel ``rankserve.model.kernels``
chose: over gathered blocks, padded, once per group of similar context length, or in place.
It returns the logits of each sequence's last new token.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rankserve.model import cpp_kernels
from rankserve.model.shape import ModelShape

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class LlamaConfig(ModelShape):
    """The shape (parameter and KV-byte arithmetic in ``ModelShape``) plus what the forward needs."""

    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "default", ...}
    max_position_embeddings: int = 4096
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act '{d['hidden_act']}' is not supported (only silu)")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type '{rope_type}' is not supported (default, linear, llama3)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            model_type=model_type,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf(json.loads((Path(path) / "config.json").read_text()))


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama 3: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


@dataclass
class SeqInput:
    """One sequence of a batch: its new tokens, its cached-token count, its block table."""

    token_ids: Sequence[int]
    num_computed: int
    block_table: Sequence[int]


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [num_seqs, vocab], float32: the last new token of each sequence
    # Taps, one row per requested layer: [num_layers_tapped, num_seqs, hidden], float32.
    hidden_mean: torch.Tensor | None = None  # mean over each sequence's new tokens
    hidden_last: torch.Tensor | None = None  # each sequence's last new token


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` (or ``x``) and its norm: in one pass of the C++ extension where ``fused``
    (and the activations are in the weights' dtype), else with torch's ops."""
    if fused and x.dtype == weight.dtype:
        return cpp_kernels.add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    return x, _rms_norm(x, weight, eps)


def _pair_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (weight [heads * D, ...] or bias [heads * D]) so
    that each head's dims j and j + D/2, which RoPE rotates together (Hugging Face's half
    rotation), sit side by side. RoPE then is one complex multiply over adjacent pairs, and the
    attention scores are unchanged (q and k are reordered alike; the KV cache keeps keys so)."""
    d = weight.shape[0] // num_heads
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()
    rows = (torch.arange(num_heads)[:, None] * d + order).flatten().to(weight.device)
    return weight.index_select(0, rows)


def _rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs of ``x`` [T, heads, D] (see ``_pair_rows``) by ``rotation``
    [T, 1, D/2] (complex64), in float32; returned in ``x``'s dtype."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def _onednn_weight(weight: torch.Tensor, rows_hint: int = 1) -> torch.Tensor | None:
    """``weight`` reordered once into oneDNN's blocked layout for about ``rows_hint`` input rows, or
    None where oneDNN cannot run it (not on the CPU, no oneDNN, or no bf16 support for a bf16 weight)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
    except (RuntimeError, NotImplementedError):
        return None


# From this many input rows a bf16 linear runs on its fp32 copy (when the model keeps one), until
# a measured choice replaces it (rankserve.model.kernels).
FP32_GEMM_MIN_ROWS = 32
# A bf16 model keeps fp32 copies of its linear weights only while they take at most this much.
FP32_COPY_MAX_BYTES = 2 << 30


class PackedLinear:
    """``x @ weight.T + bias``, in ``x``'s dtype. On the CPU the weight is kept prepacked for
    oneDNN (as torch.compile's freezing does): the result of ``F.linear`` up to the order of its
    sums (the last bits can differ, in bf16 at 512 rows too), about 1.3-2x faster at decode batch
    sizes, where ``F.linear`` spends its time re-laying-out the weight. Also the text predictors'
    linears (``rankserve.learn.text_model``).

    A bf16 weight may also keep a prepacked fp32 copy, used for inputs of ``fp32_min_rows`` rows
    or more: on AVX-512 CPUs without AMX a bf16 dot product runs at the fp32 FMA rate, and oneDNN's
    fp32 GEMM is 1.2-1.6x faster there than its bf16 one (docs/ENGINE.md); below that, reading half
    the bytes of the bf16 copy wins. Where oneDNN has no bf16 kernels at all (AVX2-only CPUs), bf16
    GEMMs are emulated and the copy wins from a few rows up. The input is cast to the copy's dtype
    where it differs (the model keeps its activations in fp32 for such steps, so layers need no
    casts)."""

    __slots__ = ("bias", "bias32", "fp32_min_rows", "in_features", "packed", "packed32", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool, fp32_copy: bool = False) -> None:
        self.bias = bias
        self.in_features = weight.shape[1]
        self.packed = _onednn_weight(weight) if prepack else None
        self.weight = weight if self.packed is None else None  # the packed copy replaces it
        # Not gated on ``self.packed``: without oneDNN bf16 support the copy is the fast path.
        self.packed32 = None
        if prepack and fp32_copy and weight.dtype == torch.bfloat16:
            self.packed32 = _onednn_weight(weight.float(), rows_hint=64)
        self.bias32 = None if bias is None or self.packed32 is None else bias.float()
        self.fp32_min_rows = FP32_GEMM_MIN_ROWS

    @property
    def has_fp32_copy(self) -> bool:
        return self.packed32 is not None

    def drop_fp32_copy(self) -> None:
        self.packed32 = self.bias32 = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.packed32 is not None and x.shape[0] >= self.fp32_min_rows)

    def run(self, x: torch.Tensor, on_fp32_copy: bool) -> torch.Tensor:
        """The linear on the fp32 copy or on the model-dtype weight (the kernel tuner times both)."""
        if on_fp32_copy:
            y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed32, self.bias32, "none", [], "")
            return y.to(x.dtype)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.packed.dtype), self.packed, self.bias, "none", [], "")
            return y.to(x.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


# A decode group's extra gather and attention calls cost about as much as gathering and reading
# this many more padded blocks (measured on SmolLM2: ~2 us a block, ~100 us a group, per layer).
DECODE_GROUP_COST_BLOCKS = 48


def padded_rows(n: int) -> int:
    """``n`` rounded up to one of a few row counts: exact to 8, then 4 steps per power of two
    (at most 25% padding). oneDNN builds and caches a kernel per GEMM shape; a step of any token
    count is then one of ~30 shapes up to 512 instead of 512, which bounds that cache's memory."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def length_groups(lengths: Sequence[int], group_cost: float) -> list[list[int]]:
    """Split the indices of ``lengths`` into groups of similar length. A group costs its size
    times its longest length, plus ``group_cost``; the split returned minimises the total (groups
    are runs of the sorted lengths, so a dynamic program over split points is exact)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = np.array([lengths[i] for i in order], dtype=np.float64)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: cost of the first j sorted lengths
    cut = np.zeros(n + 1, dtype=np.int64)  # the last group of that best split starts here
    for j in range(1, n + 1):
        starts = np.arange(j)
        cost = best[:j] + (j - starts) * ordered[j - 1] + group_cost
        cut[j] = int(cost.argmin())
        best[j] = cost[cut[j]]
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = int(cut[j])
    return groups[::-1]


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # the group's sequences' rows in the step's token batch
    blocks: torch.Tensor  # their K block rows of one layer's pool, then their V block rows, padded
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size]: True where a real token is
    tables: torch.Tensor  # [B, max_blocks]: their block tables, padded (padding masked out)
    lengths: torch.Tensor  # [B] int64: their context lengths (this step's token included)


def _gather_group(kv_layer: torch.Tensor, g: DecodeGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V, [B, KV, ctx, D] each (views of one gather: one call for both)."""
    _, kv_heads, num_blocks, bs, d = kv_layer.shape
    kv = kv_layer.view(2 * kv_heads * num_blocks, bs * d).index_select(0, g.blocks)
    kv = kv.view(2, kv_heads, len(g.rows), -1, d).transpose(1, 2)
    return kv[0], kv[1]


def decode_attention_flash(q: torch.Tensor, kv_layer: torch.Tensor, g: DecodeGroup) -> torch.Tensor:
    """Torch's flash kernel over the group's gathered blocks. ``q`` [B, KV, G, D]: a KV head's G
    query heads are G query rows against its keys. Returns [B, KV, G, D]."""
    k, v = _gather_group(kv_layer, g)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)


def decode_attention_matmul(q: torch.Tensor, kv_layer: torch.Tensor, g: DecodeGroup) -> torch.Tensor:
    """Two batched matmuls and a float32 softmax over the gathered blocks (the scores come out of
    the matmul in the model's dtype): the alternative to the flash kernel for one query row per
    head; which is faster depends on the CPU (``rankserve.model.kernels`` times both)."""
    k, v = _gather_group(kv_layer, g)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~g.mask, float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v.dtype), v)


def _paged_reductions(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor
                      ) -> torch.Tensor:
    """Decode attention written as reductions over indexed blocks. Eager, this would materialise a
    huge product; compiled, inductor folds the indexing into its loops and reads each block where
    it lies (no gathered copy). ``valid`` [B, ctx]. Returns [B, KV, G, D]."""
    blocks, bs = tables.shape[1], kv_layer.shape[3]
    k = kv_layer[0][:, tables]  # [KV, B, blocks, bs, D]
    v = kv_layer[1][:, tables]
    q32 = q.float().transpose(0, 1)[:, :, :, None, None, :]  # [KV, B, G, 1, 1, D]
    scores = (q32 * k[:, :, None].float()).sum(-1).flatten(3) * q.shape[-1] ** -0.5  # [KV, B, G, ctx]
    probs = scores.masked_fill(~valid[None, :, None, :], float("-inf")).softmax(-1)
    # The G query heads innermost in the weighted sum: each value row is read once for all of
    # them (measured 1.2x faster than G outside at 64 sequences).
    probs = probs.view(*probs.shape[:3], blocks, bs).permute(0, 1, 3, 4, 2)  # [KV, B, blocks, bs, G]
    out = (probs[..., None] * v[:, :, :, :, None].float()).sum((2, 3))  # [KV, B, G, D]
    return out.transpose(0, 1).to(q.dtype)


@functools.cache
def _compiled_paged() -> Callable[..., torch.Tensor]:
    # dynamic: one graph for every batch and context (sizes 1 are specialised: see below).
    return torch.compile(_paged_reductions, dynamic=True)


def decode_attention_paged(q: torch.Tensor, kv_layer: torch.Tensor, g: DecodeGroup) -> torch.Tensor:
    """Reads the blocks in place (``torch.compile``d reductions: needs a C++ compiler; the first
    call compiles). A group of one sequence or of one block would compile another graph (sizes of
    1 are specialised), so it takes the flash path instead."""
    if g.tables.shape[0] < 2 or g.tables.shape[1] < 2:
        return decode_attention_flash(q, kv_layer, g)
    return _compiled_paged()(q, kv_layer, g.tables, g.mask[:, 0, 0, :])


def decode_attention_cpp(q: torch.Tensor, kv_layer: torch.Tensor, g: DecodeGroup,
                         new_kv: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ extension (``rankserve.model.cpp_kernels``): reads each sequence's blocks in place, to
    its own length (padding costs nothing, so the decodes of a step run as one group). In the
    forward it also writes the step's new keys and values (``new_kv``) of these sequences."""
    return cpp_kernels.paged_decode_attention(q, kv_layer, g.tables, g.lengths, new_kv)


# Kernels that must be built before they run, and what building them needs.
BUILT_KERNELS = {"paged": "torch.compile needs a C++ compiler", "cpp": "a C++ compiler and ninja"}


def attention_works(name: str, cfg: ModelShape, dtype: torch.dtype, device: torch.device | str = "cpu",
                    block_size: int = 16) -> bool:
    """Whether decode attention kernel ``name`` runs here. A kernel of ``BUILT_KERNELS`` is built
    (or loaded from its cache) for this model's heads and ``dtype`` and checked against SDPA;
    False where that fails (no C++ compiler, a build error), with a warning. Later calls of any
    batch and context reuse the build."""
    if name not in BUILT_KERNELS:
        return name in DECODE_ATTENTION
    kv, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    batch, blocks, pool = 5, 7, 41  # sizes unlike the model's: a size equal to another would be tied to it
    try:
        if name == "cpp" and (torch.device(device).type != "cpu" or not cpp_kernels.load()):
            raise RuntimeError("the extension is CPU-only and needs a build (see the warning above)")
        # As in the engine (the compiled graph is guarded on it): the pool a normal tensor, the
        # rest made under inference mode.
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode(False):
            kv_layer = torch.randn(2, kv, pool, block_size, d, generator=gen).to(device, dtype)
        with torch.inference_mode():
            tables = torch.randperm(pool, generator=gen)[: batch * blocks].view(batch, blocks).to(device)
            lengths = torch.tensor([blocks * block_size - 3 * i for i in range(batch)])
            mask = (torch.arange(blocks * block_size)[None, :] < lengths[:, None]).to(device)
            group = DecodeGroup(rows=torch.arange(batch, device=device), blocks=torch.empty(0),
                                mask=mask[:, None, None, :], tables=tables, lengths=lengths.to(device))
            q = torch.randn(batch, kv, g, d, generator=gen).to(device, dtype)
            out = DECODE_ATTENTION[name](q, kv_layer, group)
            k = kv_layer[0][:, tables].flatten(2, 3).transpose(0, 1)  # [B, KV, ctx, D]
            v = kv_layer[1][:, tables].flatten(2, 3).transpose(0, 1)
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=group.mask)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        error = (out.float() - want).abs().max().item()
        if not error <= tolerance:
            raise ValueError(f"differs from SDPA by {error:.3g}")
        return True
    except Exception as exc:  # no compiler, a build error: the other kernels remain
        log.warning("decode attention '%s' (%s) cannot run here: %s", name, BUILT_KERNELS[name],
                    (str(exc).splitlines() or [type(exc).__name__])[0])
        return False


# Decode attention kernels by name; the first is the default where nothing was measured. Those of
# BUILT_KERNELS run only where ``attention_works`` (rankserve.model.kernels checks before timing them).
DECODE_ATTENTION = {"flash": decode_attention_flash, "matmul": decode_attention_matmul,
                    "paged": decode_attention_paged, "cpp": decode_attention_cpp}


@dataclass(frozen=True)
class KernelChoice:
    """The kernel paths a model runs. ``fp32_gemm_min_rows``: a bf16 model's linears run on fp32
    copies of their weights from this many input rows up (None: never; the copies are dropped).
    ``decode_attention``: a key of ``DECODE_ATTENTION``. ``source``: how the choice was made
    ("default", "measured", "cached" or "forced")."""

    fp32_gemm_min_rows: int | None
    decode_attention: str
    source: str = "default"

    @property
    def gemm(self) -> str:
        """The GEMM path in one word: "native" (the model's dtype at every row count), "fp32" (fp32
        copies at every row count) or "fp32>=N"."""
        if self.fp32_gemm_min_rows is None:
            return "native"
        return "fp32" if self.fp32_gemm_min_rows <= 1 else f"fp32>={self.fp32_gemm_min_rows}"

    def labels(self) -> dict[str, str]:
        return {"gemm": self.gemm, "decode_attention": self.decode_attention, "source": self.source}


class _Layer:
    __slots__ = ("down", "gate_up", "ln1", "ln2", "o", "qkv")


class LlamaModel:
    """Weights as plain tensors and a forward over a paged KV cache. Inference only."""

    def __init__(
        self,
        cfg: LlamaConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prepack: bool = True,
        fp32_copy: bool | None = None,
    ) -> None:
        """``prepack``: keep the linear weights in oneDNN's layout on the CPU (False: plain
        ``F.linear``, for comparison). ``fp32_copy``: a bf16 model on the CPU also keeps fp32
        copies of its linear weights for batched rows (see ``PackedLinear``); None: while they take at
        most ``FP32_COPY_MAX_BYTES``."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        if fp32_copy is None:
            fp32_copy = 4 * cfg.num_linear_params <= FP32_COPY_MAX_BYTES

        def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
            return PackedLinear(weight, bias, prepack, fp32_copy)

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"weight '{name}' missing from the checkpoint")
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = linear(self.embed if tied else w("lm_head.weight"), None)
        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layer = _Layer()
            layer.ln1 = w(p + "input_layernorm.weight")
            layer.ln2 = w(p + "post_attention_layernorm.weight")
            a = p + "self_attn."
            heads = (cfg.num_heads, cfg.num_kv_heads)
            wq, wk = (_pair_rows(w(a + f"{n}_proj.weight"), h) for n, h in zip("qk", heads))
            wqkv = torch.cat([wq, wk, w(a + "v_proj.weight")])
            biases = [opt(a + f"{n}_proj.bias") for n in "qkv"]
            if any(b is not None for b in biases):  # qwen2: q/k/v biases
                sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
                biases = [b if b is not None else torch.zeros(n, dtype=dtype, device=self.device) for b, n in zip(biases, sizes)]
                biases[:2] = [_pair_rows(b, h) for b, h in zip(biases[:2], heads)]
                bqkv = torch.cat(biases)
            else:
                bqkv = None
            layer.qkv = linear(wqkv, bqkv)
            layer.o = linear(w(a + "o_proj.weight"), opt(a + "o_proj.bias"))
            m = p + "mlp."
            layer.gate_up = linear(torch.cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")]), None)
            layer.down = linear(w(m + "down_proj.weight"), None)
            self.layers.append(layer)
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.kernels = KernelChoice(FP32_GEMM_MIN_ROWS if self.lm_head.has_fp32_copy else None, "flash")
        # Residual add + norm and SiLU-and-multiply in the C++ extension (set by use_kernels).
        self.fused_elementwise = False

    @property
    def linears(self) -> list[PackedLinear]:
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.lm_head]

    def use_kernels(self, choice: KernelChoice) -> None:
        """Run ``choice``'s paths from now on. A choice of no fp32 GEMM drops the fp32 weight
        copies (their memory is freed); one that wants them needs a model built with them."""
        if choice.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"unknown decode attention '{choice.decode_attention}' "
                             f"(known: {', '.join(DECODE_ATTENTION)})")
        if choice.fp32_gemm_min_rows is not None and not self.lm_head.has_fp32_copy:
            raise ValueError("fp32 GEMM needs a bf16 model on the CPU built with fp32 weight copies")
        for lin in self.linears:
            if choice.fp32_gemm_min_rows is None:
                lin.drop_fp32_copy()
            else:
                lin.fp32_min_rows = choice.fp32_gemm_min_rows
        self.kernels = choice
        # Always faster where the extension builds (3-10x at 512+ rows); bf16 only, so that the
        # fp32 forward stays token-exact against transformers (the C++ sums round in another order).
        self.fused_elementwise = (self.device.type == "cpu" and self.dtype == torch.bfloat16
                                  and cpp_kernels.load())

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> LlamaModel:
        """Load from a Hugging Face directory: config.json + *.safetensors."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg = LlamaConfig.from_dir(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(str(f)))
        return cls(cfg, weights, dtype=dtype, device=device)

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, device: str | torch.device | None = None, zeroed: bool = True
    ) -> torch.Tensor:
        """A pool [num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim].

        Head-major: one head's blocks are contiguous rows, so a decode step gathers whole blocks
        per head into contiguous tensors for the attention kernel. The pool
        attention reads must be ``zeroed``: padding slots are masked out of the softmax, but a
        NaN left in memory would still poison the weighted sum. A swap pool, whose blocks are
        always written before they are read, need not be, and then takes no memory until used."""
        c = self.cfg
        shape = (c.num_layers, 2, c.num_kv_heads, num_blocks, block_size, c.head_dim)
        make = torch.zeros if zeroed else torch.empty
        return make(shape, dtype=self.dtype, device=self.device if device is None else device)

    # ---- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        seqs: Sequence[SeqInput],
        kv_cache: torch.Tensor,
        hidden_layers: Sequence[int] = (),
    ) -> ForwardOutput:
        """Run one mixed batch; write its new K/V into ``kv_cache``; return last-token logits.

        Each k in ``hidden_layers`` taps the residual stream after decoder layer k (0 = the
        embeddings, as in Hugging Face's ``hidden_states[k]``, but the last layer's is taken before
        the final norm).
        """
        cfg = self.cfg
        if not seqs:
            raise ValueError("empty batch")
        if kv_cache.dtype != self.dtype or kv_cache.device != self.device:
            raise ValueError(f"kv_cache must be {self.dtype} on {self.device}")
        num_blocks, bs = kv_cache.shape[3], kv_cache.shape[4]
        dev = self.device
        if any(not 0 <= k <= cfg.num_layers for k in hidden_layers):
            raise ValueError(f"hidden layers must be in [0, {cfg.num_layers}], got {list(hidden_layers)}")

        # Token layout, positions, cache slots (shared by every layer).
        ids: list[int] = []
        positions: list[int] = []
        lens: list[int] = []
        ctx_slots: list[torch.Tensor] = []
        offs = torch.arange(bs)
        for s in seqs:
            n = len(s.token_ids)
            if n == 0:
                raise ValueError("every sequence needs at least one new token")
            ctx = s.num_computed + n
            if len(s.block_table) * bs < ctx:
                raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {ctx} tokens")
            ids.extend(s.token_ids)
            positions.extend(range(s.num_computed, ctx))
            lens.append(n)
            table = torch.as_tensor(list(s.block_table), dtype=torch.long)
            ctx_slots.append((table[:, None] * bs + offs).flatten()[:ctx])
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long)
        new_slots = torch.cat([cs[s.num_computed :] for cs, s in zip(ctx_slots, seqs)])
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)

        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = H // KV  # query heads per KV head; query head h reads KV head h // G
        # The pool of one layer is read as rows of [KV * num_blocks * bs, D] (or whole blocks,
        # [KV * num_blocks, bs * D]): head h's rows start at h * num_blocks (* bs). Gathers are then
        # one index_select over contiguous rows, several times faster than advanced indexing.
        head_rows = torch.arange(KV)[:, None] * (num_blocks * bs)
        dec = [i for i, n in enumerate(lens) if n == 1]
        pre = [i for i, n in enumerate(lens) if n > 1]
        # The C++ decode kernel reads each sequence to its own length (padding costs it nothing, so
        # a step's decodes are one group) and writes their new keys and values itself; the forward
        # writes the others' (all of them on the other kernels).
        in_place = self.kernels.decode_attention == "cpp" and bool(dec)
        written = None  # the rows of the new tokens the forward writes (None: all)
        if in_place:
            written = torch.tensor([r for i in pre for r in range(starts[i], starts[i + 1])], dtype=torch.long)
            new_slots = new_slots[written]
            written = written.to(dev)
        new_rows = (head_rows + new_slots[None, :]).flatten().to(dev)

        # Decode sequences (one new token) attend in groups of similar context length: each group
        # gathers its sequences' whole blocks, padded to its longest (padding masked out).
        dec_ctx = [len(ctx_slots[i]) for i in dec]
        dec_blocks = [-(-c // bs) for c in dec_ctx]
        dec_groups: list[DecodeGroup] = []
        for members in [list(range(len(dec)))] if in_place else length_groups(dec_blocks, DECODE_GROUP_COST_BLOCKS):
            max_blocks = max(dec_blocks[j] for j in members)
            tables = torch.zeros(len(members), max_blocks, dtype=torch.long)
            for row, j in enumerate(members):
                tables[row, : dec_blocks[j]] = torch.as_tensor(list(seqs[dec[j]].block_table)[: dec_blocks[j]])
            blocks = (torch.arange(2 * KV)[:, None] * num_blocks + tables.flatten()[None, :]).flatten()  # K, then V
            lengths = torch.tensor([dec_ctx[j] for j in members])
            valid = torch.arange(max_blocks * bs)[None, :] < lengths[:, None]
            dec_groups.append(DecodeGroup(
                rows=torch.tensor([starts[dec[j]] for j in members], dtype=torch.long, device=dev),
                blocks=blocks.to(dev),
                mask=valid.to(dev)[:, None, None, :],  # [B, 1, 1, ctx]: True = attend
                tables=tables.to(dev),
                lengths=lengths.to(dev),
            ))
        # A prefill chunk attends causally to its own tokens and, after the first chunk, to the
        # sequence's earlier tokens, gathered from the cache (flash attention; no score matrix).
        # pre_cached: a later chunk's cache rows and mask (a first chunk needs neither).
        pre_cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in pre:
            if seqs[i].num_computed == 0:
                continue
            ctx = len(ctx_slots[i])
            q_pos = torch.arange(ctx - lens[i], ctx)
            pre_cached[i] = ((head_rows + ctx_slots[i][None, :]).flatten().to(dev),
                             (torch.arange(ctx)[None, :] <= q_pos[:, None]).to(dev))  # [n, ctx]: True = attend

        # RoPE angles in float32, as Hugging Face computes them: one unit complex per position and pair.
        freqs = pos_t.float()[:, None] * self.inv_freq.cpu()[None, :]
        rotation = torch.polar(torch.ones_like(freqs), freqs).to(dev)[:, None, :]  # [T, 1, D/2]
        T = len(ids)
        # Activations (prefill attention included) in fp32 where the linears run on their fp32
        # copies (see PackedLinear); the KV cache and decode attention stay in the model's dtype.
        min_rows = self.kernels.fp32_gemm_min_rows
        act = torch.float32 if self.lm_head.has_fp32_copy and min_rows is not None and T >= min_rows else self.dtype
        decode_attention = DECODE_ATTENTION[self.kernels.decode_attention]

        # The linears run on padded_rows(T) rows (the padding rows are token 0 at position 0, never
        # written to the cache nor attended to, and dropped before the outputs).
        Tp = padded_rows(T)
        if Tp > T:
            ids_t = torch.cat([ids_t, ids_t.new_zeros(Tp - T)])
            rotation = torch.cat([rotation, rotation.new_ones(Tp - T, *rotation.shape[1:])])
        x = self.embed[ids_t].to(act)
        last_rows = torch.tensor([starts[i + 1] - 1 for i in range(len(seqs))], device=dev)
        taps: dict[int, torch.Tensor] = {0: x} if 0 in hidden_layers else {}
        fused, eps = self.fused_elementwise, cfg.rms_norm_eps
        _, h = _add_rms_norm(x, None, self.layers[0].ln1, eps, fused)  # later layers' come with the residual add
        # The C++ RoPE where the activations are in the weights' dtype (as for the fused norm).
        rope_pairs = torch.view_as_real(rotation[:, 0]) if fused and act == self.dtype else None  # [Tp, D/2, 2]
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            if rope_pairs is not None:
                cpp_kernels.rope_(qkv, rope_pairs, H + KV)  # queries' and keys' heads, in place
            q = qkv[:, : H * D].view(Tp, H, D)
            k = qkv[:, H * D : (H + KV) * D].view(Tp, KV, D)[:T]
            v = qkv[:, (H + KV) * D :].view(Tp, KV, D)[:T]
            if rope_pairs is None:
                q = _rope(q, rotation)
                k = _rope(k, rotation[:T])
            k_rows = kv_cache[li, 0].view(KV * num_blocks * bs, D)
            v_rows = kv_cache[li, 1].view(KV * num_blocks * bs, D)
            if len(new_rows):
                kw, vw = (k, v) if written is None else (k[written], v[written])
                k_rows.index_copy_(0, new_rows, kw.transpose(0, 1).reshape(len(new_rows), D).to(self.dtype))
                v_rows.index_copy_(0, new_rows, vw.transpose(0, 1).reshape(len(new_rows), D).to(self.dtype))

            attn = torch.zeros(Tp, H, D, dtype=act, device=dev) if Tp > T else torch.empty(T, H, D, dtype=act, device=dev)
            for i in pre:
                a, b = starts[i], starts[i + 1]
                cached = pre_cached.get(i)
                if cached is not None:
                    kc = k_rows.index_select(0, cached[0]).view(1, KV, -1, D).to(act)  # [1, KV, ctx, D]
                    vc = v_rows.index_select(0, cached[0]).view(1, KV, -1, D).to(act)
                    mask = cached[1]
                else:
                    kc, vc, mask = k[None, a:b].transpose(1, 2), v[None, a:b].transpose(1, 2), None
                # Four dimensions: with three, CPU SDPA falls back from flash to its math path.
                o = F.scaled_dot_product_attention(q[None, a:b].transpose(1, 2), kc, vc, attn_mask=mask,
                                                   is_causal=mask is None, enable_gqa=True)  # [1, H, n, D]
                attn[a:b] = o[0].transpose(0, 1)
            for g in dec_groups:
                B = len(g.rows)
                qg = q[g.rows].to(self.dtype).view(B, KV, G, D)
                if in_place:
                    o = decode_attention(qg, kv_cache[li], g, torch.stack([k[g.rows], v[g.rows]]).to(self.dtype))
                else:
                    o = decode_attention(qg, kv_cache[li], g)
                attn[g.rows] = o.reshape(B, H, D).to(act)

            x, h = _add_rms_norm(x, layer.o(attn.view(Tp, H * D)), layer.ln2, eps, fused)
            gu = layer.gate_up(h)
            if fused and gu.dtype == self.dtype:
                mlp = layer.down(cpp_kernels.silu_and_mul(gu))
            else:
                gate, up = gu.chunk(2, dim=-1)
                mlp = layer.down(F.silu(gate) * up)
            if li + 1 < len(self.layers):
                x, h = _add_rms_norm(x, mlp, self.layers[li + 1].ln1, eps, fused)
            else:
                x = x + mlp
            if li + 1 in hidden_layers:
                taps[li + 1] = x

        last = _rms_norm(x[last_rows], self.norm, cfg.rms_norm_eps)
        logits = self.lm_head(last).float()
        out = ForwardOutput(logits=logits)
        if hidden_layers:
            hf = torch.stack([taps[k][:T] for k in hidden_layers]).float()  # [L, T, hidden]
            out.hidden_last = hf[:, last_rows]
            seq_of_row = torch.repeat_interleave(torch.arange(len(seqs), device=dev), torch.tensor(lens, device=dev))
            sums = hf.new_zeros(len(hidden_layers), len(seqs), hf.shape[-1]).index_add_(1, seq_of_row, hf)
            out.hidden_mean = sums / torch.tensor(lens, dtype=hf.dtype, device=dev)[None, :, None]
        return out


def copy_blocks(pairs: Sequence[tuple[int, int]], src_pool: torch.Tensor, dst_pool: torch.Tensor) -> None:
    """Copy whole blocks ``src -> dst`` between pools (swap out: device -> host; swap in: back).

    Both pools have the layout [num_layers, 2, kv_heads, num_blocks, block_size, head_dim]; they may
    live on different devices and have different block counts.
    """
    if not pairs:
        return
    src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=src_pool.device)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dst_pool.device)
    dst_pool[:, :, :, dst] = src_pool[:, :, :, src].to(dst_pool.device, dst_pool.dtype)


def swap_blocks(
    swap_out: Sequence[tuple[int, int]],
    swap_in: Sequence[tuple[int, int]],
    device_pool: torch.Tensor,
    host_pool: torch.Tensor,
) -> None:
    """A step's swaps in the order the scheduler promises: every swap-out before any swap-in."""
    copy_blocks(swap_out, device_pool, host_pool)
    copy_blocks(swap_in, host_pool, device_pool)
