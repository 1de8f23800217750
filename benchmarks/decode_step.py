"""Time of one decode step of the embedded SmolLM2 forward (bf16) at a given batch and context, on
blocks scattered through the KV pool as a long-running engine leaves them.

    python benchmarks/decode_step.py [--batch 96] [--context 600] [--repeats 5]

Sequence i has context ``context - (37 i mod context/2)`` (mixed lengths, as in a real batch).
Compare two versions of the forward by running this under each (e.g. PYTHONPATH=old/src).
"""

from __future__ import annotations

import argparse
import time

import torch

from rankserve.model.llama import SeqInput
from rankserve.model.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, model = load_model(None, dtype=torch.bfloat16)
    bs = 16
    blocks_per_seq = (args.context + bs) // bs + 1
    cache = model.allocate_kv_cache(args.batch * blocks_per_seq + 8, bs)
    order = torch.randperm(args.batch * blocks_per_seq).tolist()  # scattered blocks
    seqs = [SeqInput([5], args.context - (i * 37 % (args.context // 2)), order[i * blocks_per_seq:(i + 1) * blocks_per_seq])
            for i in range(args.batch)]
    for _ in range(2):
        model.forward(seqs, cache)
    started = time.perf_counter()
    for _ in range(args.repeats):
        model.forward(seqs, cache)
    step = (time.perf_counter() - started) / args.repeats
    print(f"batch {args.batch}, context <= {args.context}: {step * 1e3:.1f} ms/step, {args.batch / step:.0f} tok/s")


if __name__ == "__main__":
    main()
