"""Decode attention over a paged KV cache: the engine's kernels (gather the blocks, then flash or
matmul) against kernels that read the blocks in place, which all need ``torch.compile`` on the CPU
(inductor and a C++ compiler): FlexAttention with a block mask built from the block tables, and a
gather fused into the score and value reductions.

    python benchmarks/paged_attention.py [--batches 16,64] [--context 256] [--no-compiled]

SmolLM2's attention shape (3 KV heads, 3 query heads each, head dim 64), bf16, blocks of 16 tokens
scattered through a pool. Per call: the fastest of ``--repeats`` interleaved calls (a busy machine
only adds time). Compile: the first call's seconds, once per batch size (shapes are static).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rankserve.model.kernels import cpu_identity
from rankserve.model.llama import DECODE_ATTENTION, DecodeGroup

KV, G, D, BS = 3, 3, 64, 16


def flex_runner(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, context: int):
    """FlexAttention over the whole pool as one key sequence per KV head; the block mask lists
    each sequence's own blocks, so only those are read."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, num_blocks = q.shape[0], pool.shape[2]
    owner = torch.full((num_blocks,), -1, dtype=torch.long)
    index = torch.zeros(num_blocks, dtype=torch.long)
    for b in range(batch):
        owner[tables[b]] = b
        index[tables[b]] = torch.arange(tables.shape[1])

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // BS
        return (owner[block] == b) & (index[block] * BS + kv_idx % BS < context)

    mask = create_block_mask(mask_mod, batch, None, 1, num_blocks * BS, device="cpu", BLOCK_SIZE=(128, BS))
    k = pool[0].reshape(1, KV, num_blocks * BS, D).expand(batch, -1, -1, -1)
    v = pool[1].reshape(1, KV, num_blocks * BS, D).expand(batch, -1, -1, -1)
    qf = q.reshape(batch, KV * G, 1, D)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(qf, k, v, block_mask=mask, enable_gqa=True)


def fused_gather(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores and weighted values as reductions over indexed blocks: inductor fuses the indexing
    into the loops, so no gathered copy is made."""
    k = pool[0][:, tables].flatten(2, 3)  # [KV, B, ctx, D]
    v = pool[1][:, tables].flatten(2, 3)
    scores = (q.float().transpose(0, 1)[:, :, :, None, :] * k[:, :, None].float()).sum(-1) * D**-0.5
    probs = scores.masked_fill(~valid[None, :, None, :], float("-inf")).softmax(-1)  # [KV, B, G, ctx]
    return (probs[..., None] * v[:, :, None].float()).sum(-2).transpose(0, 1).to(q.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-compiled", action="store_true", help="skip the two torch.compile kernels")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"decode attention, one layer, context {args.context}, bf16, {torch.get_num_threads()} threads, "
          f"{cpu_identity()['cpu']}")
    print("batch | kernel | ms per call | vs gather+flash | compile s")
    for batch in (int(b) for b in args.batches.split(",")):
        per_seq = -(-args.context // BS)
        num_blocks = batch * per_seq + 8
        pool = torch.randn(2, KV, num_blocks, BS, D, dtype=torch.bfloat16)
        tables = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq)
        valid = (torch.arange(per_seq * BS) < args.context).expand(batch, -1)
        group = DecodeGroup(rows=torch.arange(batch),
                            blocks=(torch.arange(2 * KV)[:, None] * num_blocks + tables.flatten()[None, :]).flatten(),
                            mask=valid[:, None, None, :])
        q = torch.randn(batch, KV, G, D, dtype=torch.bfloat16)
        runs = {f"gather+{name}": (lambda f=f: f(q, pool, group), 0.0) for name, f in DECODE_ATTENTION.items()}
        ref = DECODE_ATTENTION["flash"](q, pool, group)
        if not args.no_compiled:
            for name, make in (("flex (compiled)", lambda: flex_runner(q, pool, tables, args.context)),
                               ("fused gather (compiled)",
                                lambda: (lambda c=torch.compile(fused_gather): c(q, pool, tables, valid)))):
                run = make()
                started = time.perf_counter()
                out = run()
                compile_s = time.perf_counter() - started
                err = (out.reshape(ref.shape).float() - ref.float()).abs().max().item()
                if err > 0.05:
                    raise SystemExit(f"{name} differs from gather+flash by {err}")
                runs[name] = (run, compile_s)
        for run, _ in runs.values():
            run()
        times = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):  # interleaved
            for name, (run, _) in runs.items():
                started = time.perf_counter()
                run()
                times[name] = min(times[name], time.perf_counter() - started)
        base = times["gather+flash"]
        for name, (_, compile_s) in runs.items():
            compiled = f"{compile_s:.1f}" if compile_s else "-"
            print(f"{batch:5d} | {name} | {times[name] * 1e3:.3f} | {base / times[name]:.2f}x | {compiled}")


if __name__ == "__main__":
    main()
