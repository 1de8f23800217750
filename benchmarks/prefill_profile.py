"""Time and profile one prefill step of the embedded SmolLM2 (bf16, the kernels chosen for this
machine): N fresh prompts of ``--prompt-len`` tokens in one step, on blocks scattered through the
KV pool.

    python benchmarks/prefill_profile.py [--prompts 4,16,64] [--prompt-len 128] [--rows 12]

For each N: the mean of 3 steps after 2 warm-up steps, then ``torch.profiler`` over one more step
(the ops by self CPU time, grouped by input shape). 4 x 128 tokens is one step of a server at
``--max-num-batched-tokens 512``; 64 x 128 is engine_throughput.py's batch-64 prefill.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rankserve.model.cpu import cpu_identity
from rankserve.model.kernels import choose_kernels
from rankserve.model.llama import SeqInput
from rankserve.model.loader import load_model

BLOCK_SIZE = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="4,16,64", help="comma-separated prompts per step")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=12, help="profile rows to print")
    args = ap.parse_args()
    counts = [int(n) for n in args.prompts.split(",")]
    _, model = load_model(None, dtype=torch.bfloat16)
    choose_kernels(model)
    per_seq = -(-args.prompt_len // BLOCK_SIZE) + 1
    num_blocks = max(counts) * per_seq + 8
    cache = model.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    order = torch.randperm(num_blocks).tolist()  # scattered blocks
    print(f"{cpu_identity()['cpu']}, {torch.get_num_threads()} threads, kernels {model.kernels.labels()}, "
          f"fused add + norm and SiLU-and-multiply: {model.fused_elementwise}")
    with torch.inference_mode():
        for n in counts:
            seqs = [SeqInput(list(range(100 + i, 100 + i + args.prompt_len)), 0, order[i * per_seq:(i + 1) * per_seq])
                    for i in range(n)]
            for _ in range(2):
                model.forward(seqs, cache)
            started = time.perf_counter()
            for _ in range(3):
                model.forward(seqs, cache)
            print(f"\n{n} x {args.prompt_len} tokens: {(time.perf_counter() - started) / 3 * 1e3:.1f} ms/step")
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model.forward(seqs, cache)
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=30, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
