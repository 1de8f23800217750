"""How long one engine step takes: the cost models behind the simulator's virtual clock.

The simulator runs the real scheduler and, for every step it schedules, asks a cost model how many
seconds that step would take on some hardware. The step is described by five integers (see
:class:`StepShape`); ``step_time`` is called once per simulated step, hundreds of thousands of times
per run, so every model precomputes its constants in ``__init__`` and ``step_time`` is a handful of
multiply-adds with no allocation.

Three families:

* :class:`RooflineCostModel`: a GPU serving a Llama-family model with tensor parallelism, from
  datasheet numbers and a few stated efficiency factors (presets ``a100-llama3-8b`` and
  ``8xa100-llama3-70b``, the two setups of the learning-to-rank paper);
* :class:`LinearCostModel`: a linear fit, for the CPU engine on these machines
  (preset ``cpu-smollm2-135m``, coefficients fitted to timed steps of the real engine; ``rankserve
  calibrate`` fits one on the machine at hand and writes it as a JSON file, which ``get_cost_model``
  reads from its path, or as ``cpu-local``, the one last written on this machine);
* :class:`ConstantCostModel`: ``constant:STEP_MS[:PREFILL_MS_PER_TOKEN]``, for tests and toy runs.

Conventions shared by every model:

* a step that schedules no tokens (``prefill_tokens + decode_tokens == 0``) does no work and costs 0.0;
* cost never decreases when any argument grows;
* capacities are in tokens of KV cache; the block manager turns them into blocks
  (``capacity // block_size``).
"""

from __future__ import annotations

import abc
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankserve.model.shape import ModelShape

GiB = 1024**3

__all__ = [
    "LOCAL_PRESET",
    "PRESET_NAMES",
    "A100_SXM4_40GB",
    "A100_SXM4_80GB",
    "ConstantCostModel",
    "CostModel",
    "GPU_SPECS",
    "GpuSpec",
    "H200_SXM",
    "LLAMA3_8B",
    "LLAMA3_70B",
    "LinearCostModel",
    "ModelSpec",
    "RooflineCostModel",
    "SMOLLM2_135M",
    "StepShape",
    "get_cost_model",
    "local_preset_path",
]


@dataclass(frozen=True)
class StepShape:
    """The work in one engine step, as the cost models see it (the arguments of ``step_time``).

    The simulator passes these as plain ints to ``CostModel.step_time``; this class names and
    documents them and is handy in tests (``model.step_time(*shape.astuple())``).
    """

    prefill_tokens: int  # tokens scheduled for requests still in prefill (chunked-prefill chunks)
    decode_tokens: int  # requests decoding one token this step
    kv_tokens: int  # sum over scheduled requests of their context length after this step (KV read)
    attn_pairs: int  # sum over scheduled requests of (tokens scheduled x context length)
    num_seqs: int  # requests in the batch

    def astuple(self) -> tuple[int, int, int, int, int]:
        return (self.prefill_tokens, self.decode_tokens, self.kv_tokens, self.attn_pairs, self.num_seqs)

    @classmethod
    def decode(cls, batch: int, context: int) -> StepShape:
        """``batch`` requests each decoding one token with ``context`` tokens of context after the step."""
        return cls(0, batch, batch * context, batch * context, batch)

    @classmethod
    def prefill(cls, tokens: int, prefix: int = 0) -> StepShape:
        """One request prefilling a chunk of ``tokens`` after ``prefix`` already-cached tokens."""
        ctx = prefix + tokens
        return cls(tokens, 0, ctx, tokens * ctx, 1)


class CostModel(abc.ABC):
    """Seconds per engine step, seconds per swap, and how much KV cache fits, for one replica."""

    name: str
    # The machine a measured preset was fitted on (CPU model and flags, torch, dtype, threads,
    # date; see sim/machine.py), or None for models derived from datasheets.
    fitted_on: dict[str, Any] | None = None

    @abc.abstractmethod
    def step_time(
        self, prefill_tokens: int, decode_tokens: int, kv_tokens: int, attn_pairs: int, num_seqs: int
    ) -> float:
        """Seconds one engine step takes (see :class:`StepShape` for the arguments)."""

    # Set by each subclass: KV tokens on the device and in host swap space, and the time to copy
    # one token's KV one way over the host link.
    _kv_capacity: int
    _host_capacity: int
    _swap_s_per_token: float

    def prefill_weight(self, batch: int, context: int = 256, chunk: int = 256) -> float:
        """Decode steps one prefill token is worth: the time a prefill token adds to a step of
        ``batch`` requests decoding at ``context`` tokens (prefilled in chunks of ``chunk``), over
        one request's share of that step. Policies that order by predicted work read it."""
        kv = batch * context
        decode = self.step_time(0, batch, kv, kv, batch)
        with_chunk = self.step_time(chunk, batch, kv + chunk, kv + chunk * chunk, batch + 1)
        return (with_chunk - decode) / chunk / (decode / batch)

    def swap_time(self, num_blocks: int, block_size: int) -> float:
        """Seconds to copy ``num_blocks`` KV blocks of ``block_size`` tokens one way (device <-> host)."""
        return num_blocks * block_size * self._swap_s_per_token

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache that fit on the device (after weights and activations)."""
        return self._kv_capacity

    def host_capacity_tokens(self) -> int:
        """Tokens of KV cache that fit in the host swap space."""
        return self._host_capacity

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Hardware and model descriptions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A named Llama-family shape at a weight precision, in the cost models' words; the parameter
    and KV-byte arithmetic is ``rankserve.model.shape.ModelShape``'s, the model's own."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2  # bf16

    @classmethod
    def of(cls, name: str, shape: ModelShape, dtype_bytes: int = 2) -> ModelSpec:
        """The spec of a model's shape (e.g. a loaded model's ``LlamaConfig``)."""
        return cls(name, n_layers=shape.num_layers, hidden=shape.hidden_size, n_heads=shape.num_heads,
                   n_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, intermediate=shape.intermediate_size,
                   vocab=shape.vocab_size, tied_embeddings=shape.tie_word_embeddings, dtype_bytes=dtype_bytes)

    @property
    def shape(self) -> ModelShape:
        return ModelShape(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                          num_layers=self.n_layers, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                          head_dim=self.head_dim, tie_word_embeddings=self.tied_embeddings)

    @property
    def layer_matmul_params(self) -> int:
        return self.shape.layer_matmul_params

    @property
    def params(self) -> int:
        return self.shape.num_params

    @property
    def lm_head_params(self) -> int:
        return self.shape.lm_head_params

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held in device memory."""
        return self.params * self.dtype_bytes

    @property
    def weight_bytes_read_per_step(self) -> int:
        return self.shape.weight_bytes_read_per_step(self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token(self.dtype_bytes)


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one accelerator (peaks; achievable fractions live in the cost model)."""

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    mem_bytes_per_s: float  # HBM bandwidth
    memory_bytes: int  # device memory
    pcie_bytes_per_s: float  # effective host<->device copy bandwidth, one direction
    interconnect_bytes_per_s: float = 0.0  # GPU-GPU link bandwidth per GPU, one direction
    interconnect_latency_s: float = 0.0  # fixed cost of one all-reduce among the TP group


# Llama-3 configurations: Hugging Face config.json of meta-llama/Meta-Llama-3-8B and -70B
# (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
# vocab_size 128256, tie_word_embeddings false, torch_dtype bfloat16; head_dim = hidden / heads).
LLAMA3_8B = ModelSpec("Llama-3-8B", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                      intermediate=14336, vocab=128256)
LLAMA3_70B = ModelSpec("Llama-3-70B", n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, head_dim=128,
                       intermediate=28672, vocab=128256)
# SmolLM2-135M-Instruct (REFERENCE.md section 6 and its config.json): 30 layers x 576 hidden, 9 heads /
# 3 KV heads of 64, MLP 1536, vocab 49152, tied embeddings; 134,515,008 parameters.
SMOLLM2_135M = ModelSpec("SmolLM2-135M", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64,
                         intermediate=1536, vocab=49152, tied_embeddings=True)

# NVIDIA A100 Tensor Core GPU datasheet (SXM4): 312 TFLOP/s dense BF16 (624 with 2:4 sparsity, not
# used by LLM inference); HBM2 1,555 GB/s on the 40GB part, HBM2e 2,039 GB/s on the 80GB part; NVLink 3
# 600 GB/s total per GPU = 300 GB/s each direction, through NVSwitch in DGX/HGX A100; PCIe Gen4 x16
# 64 GB/s bidirectional = 32 GB/s each way, of which ~25 GB/s is what pinned cudaMemcpy typically
# reaches (assumption, the figure the brief gives). Memory sizes are nominal (40 GiB / 80 GiB; CUDA
# reports a little less, e.g. 40,441 MiB, which the activation reserve below absorbs).
# The interconnect latency is an assumption: the effective fixed cost of one small (16 KB-1 MB)
# all-reduce among 8 A100s inside a decode step, including the skew between ranks. That this fixed
# cost dominates decode-sized all-reduces is why vLLM wrote its own (vllm-project/vllm PR #2192,
# "Custom all reduce kernels"); the 40 us is not a measurement.
A100_SXM4_40GB = GpuSpec("A100-SXM4-40GB", peak_flops=312e12, mem_bytes_per_s=1555e9, memory_bytes=40 * GiB,
                         pcie_bytes_per_s=25e9, interconnect_bytes_per_s=300e9, interconnect_latency_s=40e-6)
A100_SXM4_80GB = GpuSpec("A100-SXM4-80GB", peak_flops=312e12, mem_bytes_per_s=2039e9, memory_bytes=80 * GiB,
                         pcie_bytes_per_s=25e9, interconnect_bytes_per_s=300e9, interconnect_latency_s=40e-6)
# NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity), HBM3e 4.8 TB/s, 141 GB
# (CUDA sees 143,771 MiB on the machines lent here); NVLink 4 900 GB/s total = 450 GB/s each way; PCIe
# Gen5 x16 64 GB/s each way, of which ~50 GB/s pinned (assumption, as for the A100's 25 of 32).
H200_SXM = GpuSpec("H200-SXM", peak_flops=989e12, mem_bytes_per_s=4.8e12, memory_bytes=143771 * 2**20,
                   pcie_bytes_per_s=50e9, interconnect_bytes_per_s=450e9, interconnect_latency_s=40e-6)
GPU_SPECS: dict[str, GpuSpec] = {"a100-40gb": A100_SXM4_40GB, "a100-80gb": A100_SXM4_80GB, "h200": H200_SXM}


# ---------------------------------------------------------------------------------------------
# Roofline model
# ---------------------------------------------------------------------------------------------


class RooflineCostModel(CostModel):
    """A GPU replica (``tp`` GPUs, tensor parallel) serving a Llama-family model, by roofline.

    One step runs two kinds of kernels one after the other, so each gets its own roofline and the
    times add up::

        step = overhead + num_seqs * per_seq_overhead
             + max(dense FLOPs / F, weight bytes / B)      # the matmuls (projections, MLP, lm_head)
             + max(attention FLOPs / F, KV bytes / B)      # the attention kernel over the KV cache
             + tp communication                            # 0 when tp == 1

    per GPU, with ``F = peak_flops * compute_efficiency`` and ``B = mem_bytes_per_s *
    bandwidth_efficiency``:

    * dense FLOPs = (2 x layer matmul params x tokens + 2 x lm_head params x num_seqs) / tp: every
      scheduled token goes through the layers; logits are computed only at the one position per
      sequence that samples (taking every scheduled sequence is a slight overestimate for partial
      prefill chunks, which do not sample);
    * weight bytes = every weight but the embedding table, read once per step, / tp;
    * attention FLOPs = 4 x layers x heads x head_dim x attn_pairs / tp (QK^T and PV, 2 FLOPs per
      multiply-add each); ``attn_pairs`` counts query-key pairs, so a causal prefill chunk is
      ``c*(L-c) + c*(c+1)/2`` exactly and ``c*L`` (what the simulator may pass) is at most 2x high;
    * KV bytes = kv_tokens x kv_bytes_per_token / tp (K and V of each head live on one GPU; when tp
      exceeds the KV heads they are replicated, so a GPU holds at least one head);
    * tp communication = 2 all-reduces per layer (after attention and after the MLP), each moving
      ``tokens x hidden x dtype_bytes`` through a ring: ``latency + 2 (tp-1)/tp x bytes / (link x
      interconnect_efficiency)``.

    A single ``max(compute, memory)`` over the whole step, as in a whole-model roofline, would let the
    KV reads of attention hide behind the matmuls' compute. They cannot: the kernels run in sequence.
    It also underestimates large decode batches (the 256 x 500 check below would come out ~26 ms).

    KV capacity per GPU follows vLLM's profiling: ``gpu_memory_utilization x memory - weights/tp -
    activation reserve``, divided by the per-GPU KV bytes of a token. Host swap space follows vLLM's
    ``--swap-space``, which is per GPU. Swaps move each GPU's shard over its own PCIe link at once.
    """

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int = 1,
        *,
        name: str | None = None,
        compute_efficiency: float = 0.7,
        bandwidth_efficiency: float = 0.8,
        interconnect_efficiency: float = 0.8,
        step_overhead_s: float = 1.5e-3,
        per_seq_overhead_s: float = 25e-6,
        gpu_memory_utilization: float = 0.9,
        activation_reserve_bytes: int = 3 * GiB,
        swap_space_bytes_per_gpu: int = 64 * GiB,
    ) -> None:
        if tp < 1 or model.n_heads % tp:
            raise ValueError(f"tensor-parallel degree {tp} must be >= 1 and divide the {model.n_heads} heads")
        for label, value in (("compute_efficiency", compute_efficiency),
                             ("bandwidth_efficiency", bandwidth_efficiency),
                             ("interconnect_efficiency", interconnect_efficiency),
                             ("gpu_memory_utilization", gpu_memory_utilization)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {value}")
        if step_overhead_s < 0 or per_seq_overhead_s < 0:
            raise ValueError("overheads must be >= 0")
        if tp > 1 and gpu.interconnect_bytes_per_s <= 0:
            raise ValueError(f"{gpu.name} has no interconnect bandwidth: cannot run tp={tp}")

        self.model = model
        self.gpu = gpu
        self.tp = tp
        self.name = name or f"{tp}x{gpu.name}/{model.name}"
        self.compute_efficiency = compute_efficiency
        self.bandwidth_efficiency = bandwidth_efficiency
        self.interconnect_efficiency = interconnect_efficiency
        self.step_overhead_s = step_overhead_s
        self.per_seq_overhead_s = per_seq_overhead_s
        self.gpu_memory_utilization = gpu_memory_utilization
        self.activation_reserve_bytes = activation_reserve_bytes
        self.swap_space_bytes_per_gpu = swap_space_bytes_per_gpu

        flops = gpu.peak_flops * compute_efficiency * tp  # the group's achievable FLOP/s
        bw = gpu.mem_bytes_per_s * bandwidth_efficiency  # one GPU's achievable bytes/s
        kv_heads_per_gpu = -(-model.n_kv_heads // tp)  # ceil: replicated when tp > n_kv_heads
        # The model's KV bytes per token, for this GPU's share of the heads (exact: a multiple of the head count).
        self.kv_bytes_per_token_per_gpu = model.kv_bytes_per_token * kv_heads_per_gpu // model.n_kv_heads

        # Seconds per unit of each argument (all per GPU; the GPUs of the group work in parallel).
        self._s_per_token_flops = 2.0 * model.n_layers * model.layer_matmul_params / flops
        self._s_per_seq_flops = 2.0 * model.lm_head_params / flops
        self._weight_read_s = model.weight_bytes_read_per_step / tp / bw
        self._s_per_pair = 4.0 * model.n_layers * model.n_heads * model.head_dim / flops
        self._s_per_kv_token = self.kv_bytes_per_token_per_gpu / bw
        if tp > 1:
            n_allreduce = 2 * model.n_layers
            ring = 2.0 * (tp - 1) / tp
            link = gpu.interconnect_bytes_per_s * interconnect_efficiency
            self._comm_fixed_s = n_allreduce * gpu.interconnect_latency_s
            self._comm_s_per_token = n_allreduce * ring * model.hidden * model.dtype_bytes / link
        else:
            self._comm_fixed_s = 0.0
            self._comm_s_per_token = 0.0
        self._swap_s_per_token = self.kv_bytes_per_token_per_gpu / gpu.pcie_bytes_per_s

        kv_budget = (gpu_memory_utilization * gpu.memory_bytes - model.weight_bytes / tp - activation_reserve_bytes)
        if kv_budget <= 0:
            raise ValueError(f"{model.name} does not fit on {tp}x{gpu.name}: {kv_budget / GiB:.1f} GiB left for KV")
        self._kv_capacity = int(kv_budget // self.kv_bytes_per_token_per_gpu)
        self._host_capacity = int(swap_space_bytes_per_gpu // self.kv_bytes_per_token_per_gpu)

    def step_time(
        self, prefill_tokens: int, decode_tokens: int, kv_tokens: int, attn_pairs: int, num_seqs: int
    ) -> float:
        tokens = prefill_tokens + decode_tokens
        if tokens <= 0:
            return 0.0
        dense = tokens * self._s_per_token_flops + num_seqs * self._s_per_seq_flops
        if dense < self._weight_read_s:
            dense = self._weight_read_s
        attn = attn_pairs * self._s_per_pair
        kv = kv_tokens * self._s_per_kv_token
        if attn < kv:
            attn = kv
        return (self.step_overhead_s + num_seqs * self.per_seq_overhead_s + dense + attn
                + self._comm_fixed_s + tokens * self._comm_s_per_token)

    def breakdown(
        self, prefill_tokens: int, decode_tokens: int, kv_tokens: int, attn_pairs: int, num_seqs: int
    ) -> dict[str, float]:
        """The terms of ``step_time`` by name (for reports and tests; not for the hot path)."""
        tokens = prefill_tokens + decode_tokens
        if tokens <= 0:
            return dict.fromkeys(("overhead", "dense_compute", "weight_read", "attn_compute", "kv_read",
                                  "tp_comm", "total"), 0.0)
        parts = {
            "overhead": self.step_overhead_s + num_seqs * self.per_seq_overhead_s,
            "dense_compute": tokens * self._s_per_token_flops + num_seqs * self._s_per_seq_flops,
            "weight_read": self._weight_read_s,
            "attn_compute": attn_pairs * self._s_per_pair,
            "kv_read": kv_tokens * self._s_per_kv_token,
            "tp_comm": self._comm_fixed_s + tokens * self._comm_s_per_token,
        }
        parts["total"] = (parts["overhead"] + max(parts["dense_compute"], parts["weight_read"])
                          + max(parts["attn_compute"], parts["kv_read"]) + parts["tp_comm"])
        return parts


# ---------------------------------------------------------------------------------------------
# Linear model (the CPU engine)
# ---------------------------------------------------------------------------------------------


class LinearCostModel(CostModel):
    """``step = base + prefill x p + decode x d + kv_tokens x k + attn_pairs x a + num_seqs x s``.

    Meant for engines whose cost has not been derived from hardware but measured: fit the
    coefficients to timed steps (least squares over step shapes) and load them with
    :meth:`from_json` or keyword arguments. Each coefficient is seconds per unit of its argument.
    Swaps cost ``kv_bytes_per_token / swap_bytes_per_s`` per token moved.
    """

    _FIELDS = ("base_s", "prefill_s_per_token", "decode_s_per_token", "kv_s_per_token", "attn_s_per_pair",
               "seq_s", "kv_capacity_tokens", "host_capacity_tokens", "kv_bytes_per_token", "swap_bytes_per_s",
               "name", "fitted_on")

    def __init__(
        self,
        *,
        base_s: float,
        prefill_s_per_token: float = 0.0,
        decode_s_per_token: float = 0.0,
        kv_s_per_token: float = 0.0,
        attn_s_per_pair: float = 0.0,
        seq_s: float = 0.0,
        kv_capacity_tokens: int,
        host_capacity_tokens: int = 0,
        kv_bytes_per_token: int = 0,
        swap_bytes_per_s: float = 0.0,
        name: str = "linear",
        fitted_on: dict[str, Any] | None = None,
    ) -> None:
        coeffs = (base_s, prefill_s_per_token, decode_s_per_token, kv_s_per_token, attn_s_per_pair, seq_s)
        if not all(math.isfinite(c) and c >= 0 for c in coeffs):
            raise ValueError(f"linear cost coefficients must be finite and >= 0, got {coeffs}")
        if kv_capacity_tokens < 1 or host_capacity_tokens < 0:
            raise ValueError("kv_capacity_tokens must be >= 1 and host_capacity_tokens >= 0")
        if kv_bytes_per_token > 0 and swap_bytes_per_s <= 0:
            raise ValueError("swap_bytes_per_s must be > 0 when kv_bytes_per_token is set")
        self.name = name
        self.fitted_on = fitted_on
        self.base_s = float(base_s)
        self.prefill_s_per_token = float(prefill_s_per_token)
        self.decode_s_per_token = float(decode_s_per_token)
        self.kv_s_per_token = float(kv_s_per_token)
        self.attn_s_per_pair = float(attn_s_per_pair)
        self.seq_s = float(seq_s)
        self._kv_capacity = int(kv_capacity_tokens)
        self._host_capacity = int(host_capacity_tokens)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.swap_bytes_per_s = float(swap_bytes_per_s)
        self._swap_s_per_token = kv_bytes_per_token / swap_bytes_per_s if kv_bytes_per_token > 0 else 0.0

    def step_time(
        self, prefill_tokens: int, decode_tokens: int, kv_tokens: int, attn_pairs: int, num_seqs: int
    ) -> float:
        if prefill_tokens + decode_tokens <= 0:
            return 0.0
        return (self.base_s + prefill_tokens * self.prefill_s_per_token + decode_tokens * self.decode_s_per_token
                + kv_tokens * self.kv_s_per_token + attn_pairs * self.attn_s_per_pair + num_seqs * self.seq_s)

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (what :meth:`from_dict` and :meth:`from_json` read back)."""
        fitted = {} if self.fitted_on is None else {"fitted_on": self.fitted_on}
        return {
            "name": self.name,
            "base_s": self.base_s,
            "prefill_s_per_token": self.prefill_s_per_token,
            "decode_s_per_token": self.decode_s_per_token,
            "kv_s_per_token": self.kv_s_per_token,
            "attn_s_per_pair": self.attn_s_per_pair,
            "seq_s": self.seq_s,
            "kv_capacity_tokens": self._kv_capacity,
            "host_capacity_tokens": self._host_capacity,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "swap_bytes_per_s": self.swap_bytes_per_s,
        } | fitted

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearCostModel:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of linear cost model fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls._FIELDS))
        if unknown:
            raise ValueError(f"unknown linear cost model fields {unknown}; expected some of {list(cls._FIELDS)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> LinearCostModel:
        """Load coefficients written by a calibration run (a JSON object of constructor arguments)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Constant model
# ---------------------------------------------------------------------------------------------


class ConstantCostModel(CostModel):
    """``constant:STEP_MS[:PREFILL_MS_PER_TOKEN]``: every step costs STEP_MS plus PREFILL_MS_PER_TOKEN
    per prefill token (default 0); swaps are free and memory never binds.

    "Never binds" is ``capacity_tokens`` (2**24, about 16.8M tokens, more than any workload here keeps
    in flight) rather than something like 10**9, because the block manager allocates one list entry per
    block of capacity.
    """

    def __init__(self, step_ms: float, prefill_ms_per_token: float = 0.0, *, capacity_tokens: int = 2**24,
                 name: str | None = None) -> None:
        if not (math.isfinite(step_ms) and step_ms > 0):
            raise ValueError(f"STEP_MS must be a finite number > 0, got {step_ms}")
        if not (math.isfinite(prefill_ms_per_token) and prefill_ms_per_token >= 0):
            raise ValueError(f"PREFILL_MS_PER_TOKEN must be a finite number >= 0, got {prefill_ms_per_token}")
        self.step_s = step_ms / 1000.0
        self.prefill_s_per_token = prefill_ms_per_token / 1000.0
        self._kv_capacity = self._host_capacity = int(capacity_tokens)
        self._swap_s_per_token = 0.0
        self.name = name or f"constant:{step_ms:g}:{prefill_ms_per_token:g}"

    def step_time(
        self, prefill_tokens: int, decode_tokens: int, kv_tokens: int, attn_pairs: int, num_seqs: int
    ) -> float:
        if prefill_tokens + decode_tokens <= 0:
            return 0.0
        return self.step_s + prefill_tokens * self.prefill_s_per_token


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def a100_llama3_8b() -> RooflineCostModel:
    """``a100-llama3-8b``: Llama-3-8B (bf16) on one A100-SXM4-40GB, as in the learning-to-rank paper.

    Numbers and where they come from:

    * model: Hugging Face config of meta-llama/Meta-Llama-3-8B (32 layers, hidden 4096, MLP 14336,
      32 query / 8 KV heads of 128, vocab 128256, untied embeddings): 8,030,261,248 parameters,
      16.06 GB of bf16 weights, 15.01 GB read per step (all but the embedding table), KV 131,072
      bytes (128 KiB) per token;
    * GPU: A100 datasheet: 312 TFLOP/s dense bf16, 1,555 GB/s HBM2, 40 GiB; PCIe Gen4 x16 at ~25 GB/s
      effective for swaps (assumption; 32 GB/s raw);
    * compute_efficiency 0.7 (assumption: large bf16 GEMMs on A100 reach ~70-80% of peak in cuBLAS;
      the smaller decode GEMMs less);
    * bandwidth_efficiency 0.8 (assumption, checked: a public vLLM sweep measured Llama-3.1-8B on an
      A100-40GB at ~75 tok/s for one request, "about 77% of the memory-bandwidth ceiling",
      johnmusgrave.com/p/vllm-throughput-latency-sweep-on);
    * step overhead 1.5 ms + 25 us per sequence (assumption: vLLM V0's CPU work per step -- scheduling,
      input preparation, sampling, detokenisation -- is serial with the GPU; the vLLM v0.6.0 blog,
      2024-09-05, measured scheduling at 29% and the API server at 33% of the time for Llama-3-8B on an
      H100 with vLLM 0.5.3, the paper's artifact is vLLM 0.4.1);
    * memory: gpu_memory_utilization 0.9 (vLLM default), activation + CUDA-graph + context reserve 3 GiB
      (assumption), swap space 64 GiB (vLLM's --swap-space, per GPU; the brief's choice: the paper
      needed a large one).

    Sanity checks (what this code computes; ``StepShape`` helpers):

    * decode, batch 1, 1,024 tokens of context: 13.7 ms/token (12.1 ms weights, 0.1 ms KV,
      1.5 ms overhead) -- the sweep above measured ~13.3 ms (75 tok/s) with a newer vLLM;
    * decode, 256 sequences at 500 tokens of context: 39.0 ms/step (17.6 ms matmuls, compute-bound;
      13.5 ms KV reads; 7.9 ms overhead), i.e. ~6,600 tok/s;
    * prefill of one 2,048-token prompt: 142 ms (131 ms matmuls, 10 ms attention). The brief expected
      60-90 ms, which no A100 can do: the matmul FLOPs alone (2 x 6.98e9 x 2,048 = 28.6 TFLOP) take
      92 ms at 100% of the 312 TFLOP/s peak (105 ms counting all 8.03e9 parameters);
    * KV capacity: 147,803 tokens (9,237 blocks of 16), inside the 100k-160k expected for vLLM at 0.9
      utilisation; host swap: 524,288 tokens.
    """
    return RooflineCostModel(LLAMA3_8B, A100_SXM4_40GB, tp=1, name="a100-llama3-8b")


def a100_80gb_llama3_8b() -> RooflineCostModel:
    """``a100-80gb-llama3-8b``: ``a100-llama3-8b`` on the 80GB A100 (HBM2e at 2,039 GB/s against
    1,555, twice the memory), every efficiency and overhead unchanged: the faster half of a mixed
    A100 cluster. Decode at batch 1 and 1,024 tokens of context: 10.8 ms/token (13.7 on the 40GB
    part); KV capacity 442,715 tokens (the 40GB part: 147,803).
    """
    return RooflineCostModel(LLAMA3_8B, A100_SXM4_80GB, tp=1, name="a100-80gb-llama3-8b")


def eight_a100_llama3_70b() -> RooflineCostModel:
    """``8xa100-llama3-70b``: Llama-3-70B (bf16) on 8 A100-SXM4-80GB with tensor parallelism 8.

    The learning-to-rank paper says "8 A100" without, in what we could read, the memory size; 80GB is
    assumed (the common DGX/HGX A100 part by 2024; 70B also fits on 8 x 40GB, with less KV room).

    * model: Hugging Face config of meta-llama/Meta-Llama-3-70B (80 layers, hidden 8192, MLP 28672,
      64 query / 8 KV heads of 128, vocab 128256, untied): 70,553,706,496 parameters, 141.1 GB bf16,
      17.6 GB per GPU; KV 327,680 bytes per token in all, 40,960 per GPU (one KV head each);
    * GPU: A100-80GB datasheet: 312 TFLOP/s, 2,039 GB/s HBM2e, 80 GiB; NVLink 3 at 300 GB/s per
      direction through NVSwitch; interconnect_efficiency 0.8, i.e. 240 GB/s all-reduce bus bandwidth
      (assumption, in line with nccl-tests all_reduce_perf on DGX A100, ~230 GB/s busbw for large
      messages); 40 us per all-reduce (assumption, see ``A100_SXM4_80GB``), 160 all-reduces a step;
    * compute_efficiency 0.6 and bandwidth_efficiency 0.75, below the single-GPU preset (assumption:
      each GPU's shards are 1/8 as wide, so GEMMs and GEMVs are smaller and less efficient);
    * step overhead 3 ms + 25 us per sequence (assumption: the single-GPU 1.5 ms plus vLLM V0's per-step
      broadcast of the batch metadata from the driver to the 7 other workers);
    * memory: utilisation 0.9, reserve 3 GiB per GPU, swap space 64 GiB per GPU (512 GiB of host RAM;
      a DGX A100 80GB has 2 TB).

    Sanity checks (what this code computes):

    * decode, batch 1, 1,024 tokens of context: 20.8 ms/token (11.4 ms weights, 6.4 ms all-reduce
      latency, 3 ms overhead), inside the 20-30 ms the brief expected; the all-reduce latency and the
      TP overhead, both assumptions, are a third of it, so this is the least certain number here;
    * decode, 64 sequences at 1,000 tokens: 25.3 ms/step; prefill of 2,048 tokens: 243 ms
      (187 ms matmuls, 46 ms all-reduce traffic);
    * KV capacity: 1,378,167 tokens; host swap: 1,677,721 tokens.
    """
    return RooflineCostModel(LLAMA3_70B, A100_SXM4_80GB, tp=8, name="8xa100-llama3-70b",
                             compute_efficiency=0.6, bandwidth_efficiency=0.75, step_overhead_s=3e-3)


def cpu_smollm2_135m() -> LinearCostModel:
    """``cpu-smollm2-135m``: rankserve's own engine serving SmolLM2-135M-Instruct in bf16 on the
    2-core machines here.

    Calibrated on the real engine, 2026-11-26, on a 2-vCPU Intel Xeon (``lscpu`` model name
    ``Intel(R) Xeon(R) Processor``, with ``avx512f``, ``avx512_bf16`` and ``avx512_fp16`` but no
    ``amx_*``; torch 2.13.0+cpu, bf16, 2 threads; ``python benchmarks/calibrate_cpu.py``): 2,041 timed steps (schedule, forward, sampling, update) from a
    replayed ShareGPT trace (120 requests, prompts <= 512 and outputs <= 256 tokens, Poisson
    1.5 req/s, max_num_seqs 16, max_num_batched_tokens 512) and a sweep of batch shapes (1-64
    sequences, contexts 64-768), fitted by non-negative least squares; mean absolute error per step
    3.2 percent. On a second trace (another seed) the simulator's mean latency came within -2.2
    percent of the engine's (TTFT -4.1 percent, throughput +0.8 percent).

    * base 26.9 ms per step; 1.96 ms per scheduled sequence (the fit puts decode there: 0 per
      decode token);
    * prefill 0.78 ms per prompt token; attention 0.40 us per query-key pair;
    * 3.8 us per context token read (the decode KV gather, docs/ENGINE.md).
    It predicts 29.6 ms for a batch-1 decode step at 192 tokens of context (engine_throughput
    measured 26.3 ms) and 204 ms at batch 64 (measured 157.5 ms: the fit is linear in batch size).

    KV capacity: 2 GiB (rankserve serve's default --kv-cache-gb) / 23,040 bytes per token (30 layers
    x 3 KV heads x 64 x 2 (K, V) x 2 bytes) = 93,206 tokens. Host swap: 4 GiB (--swap-space-gb)
    = 186,413 tokens, copied at 10 GB/s (assumption: a memcpy on 2 cores; swaps were not timed).

    On any other CPU (another model, or the same model name with other kernel flags, e.g. AMX) its
    step times do not hold: ``rankserve simulate`` warns, and ``rankserve calibrate`` fits one there.
    """
    kv_bytes = SMOLLM2_135M.kv_bytes_per_token
    return LinearCostModel(
        name="cpu-smollm2-135m",
        base_s=0.02686,
        prefill_s_per_token=0.0007764,
        decode_s_per_token=0.0,
        kv_s_per_token=3.784e-06,
        attn_s_per_pair=3.978e-07,
        seq_s=0.001961,
        kv_capacity_tokens=2 * GiB // kv_bytes,
        host_capacity_tokens=4 * GiB // kv_bytes,
        kv_bytes_per_token=kv_bytes,
        swap_bytes_per_s=10e9,
        fitted_on={"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_flags": ["avx2", "avx512_bf16", "avx512_fp16",
                                                                             "avx512f"],
                   "cpu_count": 2, "threads": 2, "torch": "2.13.0+cpu", "dtype": "bfloat16",
                   "model": "SmolLM2-135M-Instruct", "date": "2026-11-26"},
    )


_PRESETS = {
    "a100-llama3-8b": a100_llama3_8b,
    "a100-80gb-llama3-8b": a100_80gb_llama3_8b,
    "8xa100-llama3-70b": eight_a100_llama3_70b,
    "cpu-smollm2-135m": cpu_smollm2_135m,
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
#: The preset ``rankserve calibrate`` last wrote on this machine (see :func:`local_preset_path`).
LOCAL_PRESET = "cpu-local"


def local_preset_path() -> Path:
    """Where ``rankserve calibrate`` writes, and ``cpu-local`` reads, this machine's preset:
    $RANKSERVE_PRESETS/cpu-local.json, or ~/.cache/rankserve/presets/cpu-local.json."""
    root = os.environ.get("RANKSERVE_PRESETS")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rankserve" / "presets"
    return base / f"{LOCAL_PRESET}.json"


def cpu_prefill_weight(max_num_seqs: int) -> tuple[float, str]:
    """(decode steps one prompt token is worth at ``max_num_seqs``, the preset it comes from) for
    a CPU server: this machine's ``cpu-local`` if ``rankserve calibrate`` wrote one, else the
    shipped ``cpu-smollm2-135m`` (0.18-0.23 at 16 sequences on every CPU fitted so far)."""
    spec = LOCAL_PRESET if local_preset_path().is_file() else "cpu-smollm2-135m"
    return get_cost_model(spec).prefill_weight(max_num_seqs), spec


def _is_preset_file(spec: str) -> bool:
    return spec.endswith(".json") or os.sep in spec


def _preset_file(spec: str) -> LinearCostModel:
    """A preset written by ``rankserve calibrate``, from its path or ``cpu-local``."""
    path = local_preset_path() if spec == LOCAL_PRESET else Path(spec).expanduser()
    if spec == LOCAL_PRESET and not path.is_file():
        raise ValueError(f"no {LOCAL_PRESET} preset at {path}: run `rankserve calibrate` on this machine first")
    try:
        return LinearCostModel.from_json(path)
    except OSError as err:
        raise ValueError(f"cannot read cost-model preset {str(path)!r}: {err.strerror or err}") from None
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        reason = " ".join(str(err).split())
        raise ValueError(f"bad cost-model preset {str(path)!r}: {reason}") from None


def get_cost_model(spec: str) -> CostModel:
    """A cost model from a preset name, a preset file (a path, or ``cpu-local``: see
    :func:`local_preset_path`) or ``constant:STEP_MS[:PREFILL_MS_PER_TOKEN]``.

    Raises ``ValueError`` with a one-line message naming ``spec`` and the valid choices.
    """
    factory = _PRESETS.get(spec)
    if factory is not None:
        return factory()
    if isinstance(spec, str) and (spec == LOCAL_PRESET or _is_preset_file(spec)):
        return _preset_file(spec)
    valid = (", ".join(PRESET_NAMES) + f", {LOCAL_PRESET}, a preset file (PATH.json), "
             "constant:STEP_MS[:PREFILL_MS_PER_TOKEN]")
    if isinstance(spec, str) and spec.startswith("constant:"):
        fields = spec.split(":")[1:]
        try:
            if not 1 <= len(fields) <= 2:
                raise ValueError("expected 1 or 2 numbers")
            numbers = [float(f) for f in fields]
            return ConstantCostModel(*numbers, name=spec)
        except ValueError as err:
            raise ValueError(f"bad cost model {spec!r} ({err}); valid: {valid}") from None
    raise ValueError(f"unknown cost model {spec!r}; valid: {valid}")
