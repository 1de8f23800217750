"""GFLOP/s of the CPU linear kernels the engine can use, on the embedded SmolLM2's layer shapes:
oneDNN with bf16 weights against oneDNN with fp32 weights (both prepacked, as ``PackedLinear`` keeps
them), by rows per call. Where fp32 wins from some row count up, a bf16 model's fp32 copies pay (the
engine times the same comparison on first use and picks the row count: ``rankserve.model.kernels``).

    python benchmarks/linear_kernels.py [--rows 1,8,16,32,64,256]

The weights of all 30 layers are cycled through, so each call streams its weights from memory
as a real forward does.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS = 30


def per_forward_ms(weights: list[dict[str, torch.Tensor]], rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    xs = {name: torch.randn(rows, k, dtype=dtype) for name, (_, k) in SHAPES.items()}

    def run() -> None:
        for layer in weights:
            for name, w in layer.items():
                torch.ops.mkldnn._linear_pointwise(xs[name], w, None, "none", [], "")

    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,16,32,64,256")
    args = ap.parse_args()
    torch.manual_seed(0)
    raw = [{name: torch.randn(n, k) * 0.02 for name, (n, k) in SHAPES.items()} for _ in range(LAYERS)]
    packed = {
        dt: [{name: torch.ops.mkldnn._reorder_linear_weight(w.to(dt), 64) for name, w in layer.items()} for layer in raw]
        for dt in (torch.bfloat16, torch.float32)
    }
    flop_per_row = 2 * LAYERS * sum(n * k for n, k in SHAPES.values())
    print("rows | bf16 ms | bf16 GFLOP/s | fp32 ms | fp32 GFLOP/s | fp32 / bf16 speed")
    for rows in (int(r) for r in args.rows.split(",")):
        b16 = per_forward_ms(packed[torch.bfloat16], rows, torch.bfloat16)
        f32 = per_forward_ms(packed[torch.float32], rows, torch.float32)
        gf = flop_per_row * rows / 1e6
        print(f"{rows:4d} | {b16:7.1f} | {gf / b16:12.0f} | {f32:7.1f} | {gf / f32:12.0f} | {b16 / f32:.2f}x")


if __name__ == "__main__":
    main()
