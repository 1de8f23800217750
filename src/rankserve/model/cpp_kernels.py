"""CPU kernels as a small C++ extension (``csrc/cpp_kernels.cpp``): decode attention over the paged
KV cache (each block read where it lies, each sequence to its own length: no padding, no gathered
copy; a KV head's query heads share every row read), and a layer's residual add + RMS norm,
SiLU-and-multiply and RoPE, each one pass over memory instead of torch's chain of elementwise ops. Built
at first use with torch's extension tooling (g++ and ninja) for the CPU at hand
(``-march=native``, about 20 s), then loaded from
``~/.cache/rankserve/extensions`` (``TORCH_EXTENSIONS_DIR`` moves it). Where it cannot be built,
``load`` says why once and the pure-torch kernels remain."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from rankserve.model.cpu import cpu_identity

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpp_kernels.cpp"
# A build holds a lock file while it runs; one left by a killed build would make every later start
# wait on it forever, so a lock older than this (a build takes well under a minute) is removed.
STALE_LOCK_S = 600
# The last three let the compiler vectorise the dot products' sums (it may reorder them).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]


def build_dir() -> Path:
    """Where this source, these flags, this torch and this CPU's build lives."""
    # -march=native: a build is only good for this CPU's flags (and this torch, these flags).
    key = "\n".join([cpu_identity()["flags"], torch.__version__, *CFLAGS]).encode()
    name = f"rankserve_kernels_{hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "rankserve" / "extensions") / name


@functools.cache
def load() -> bool:
    """Build (or load from the cache) and register the ``torch.ops.rankserve`` kernels; False, with
    a warning, where that fails (no compiler, no ninja)."""
    try:
        from torch.utils import cpp_extension

        build = build_dir()
        build.mkdir(parents=True, exist_ok=True)
        lock = build / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        cpp_extension.load(name=build.name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), is_python_module=False)
        return True
    except Exception as exc:  # no compiler, no ninja, a build error: the other kernels remain
        log.warning("the C++ kernels cannot be built here: %s",
                    (str(exc).splitlines() or [type(exc).__name__])[0])
        return False


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, new_kv: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` [B, KV, G, D] against one layer's pool ``kv_layer`` [2, KV, blocks, block_size, D]
    through block ``tables`` [B, max_blocks] (int64) to ``lengths`` [B] tokens. ``new_kv`` [2, B,
    KV, D]: this step's keys and values, written to their slots (position ``lengths - 1``) first,
    which saves the forward a scattered write whose cache misses the read repeats. Needs ``load()``."""
    return torch.ops.rankserve.paged_decode_attention(q, kv_layer, tables, lengths, new_kv)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` (or ``x``) [T, hidden] and its RMS norm scaled by ``weight``, rounded as
    torch's ops round them (the norm's sum of squares is added in another order). Needs ``load()``."""
    return torch.ops.rankserve.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2I] (gate first), rounded as torch's two ops round
    it. Needs ``load()``."""
    return torch.ops.rankserve.silu_and_mul(gate_up)


def rope_(qkv: torch.Tensor, rotation: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate the first ``heads`` heads of each row of ``qkv`` [T, width] in place by ``rotation``
    [T, D/2, 2] (float32 cos, sin), rounded once as torch's complex multiply is. Needs ``load()``."""
    return torch.ops.rankserve.rope_(qkv, rotation, heads)
