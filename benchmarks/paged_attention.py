"""Decode attention over a paged KV cache: the engine's kernels (gather the blocks, then flash or
matmul; ``paged``: reductions over the indexed blocks, compiled, reading them in place; ``cpp``:
the C++ extension, reading them in place) against FlexAttention with a block mask built from the
block tables. All but the gathers need a C++ compiler (``torch.compile``'s inductor, or torch's
extension build).

    python benchmarks/paged_attention.py [--batches 16,64] [--context 256] [--no-compiled]

SmolLM2's attention shape (3 KV heads, 3 query heads each, head dim 64), bf16, blocks of 16 tokens
scattered through a pool. Per call: the fastest of ``--repeats`` interleaved calls (a busy machine
only adds time). Compile: the first call's seconds (flex: once per batch size; paged: one dynamic graph, compiled
by ``attention_works`` before the first batch, or loaded from inductor's cache; cpp: built once by
``attention_works``, or loaded from torch's extension cache).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from rankserve.model.cpu import cpu_identity
from rankserve.model.llama import BUILT_KERNELS, DECODE_ATTENTION, DecodeGroup, attention_works

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the two torch.compile kernels (paged, flex)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():  # as the engine's forward runs (the compiled graph is guarded on it)
        time_kernels(args)


def time_kernels(args: argparse.Namespace) -> None:
    print(f"decode attention, one layer, context {args.context}, bf16, {torch.get_num_threads()} threads, "
          f"{cpu_identity()['cpu']}")
    compiled = not args.no_compiled
    shape = SimpleNamespace(num_kv_heads=KV, num_heads=KV * G, head_dim=D)
    if compiled:
        started = time.perf_counter()
        if not attention_works("paged", shape, torch.bfloat16, block_size=BS):
            raise SystemExit("torch.compile cannot build the paged kernel here (see the warning); try --no-compiled")
        paged_compile_s = time.perf_counter() - started
    started = time.perf_counter()
    cpp_build_s = time.perf_counter() - started if attention_works("cpp", shape, torch.bfloat16, block_size=BS) else None
    print("batch | kernel | ms per call | vs gather+flash | compile s")
    for batch in (int(b) for b in args.batches.split(",")):
        per_seq = -(-args.context // BS)
        num_blocks = batch * per_seq + 8
        with torch.inference_mode(False):  # a normal tensor, as the engine's pool (the compiled graph is guarded on it)
            pool = torch.randn(2, KV, num_blocks, BS, D, dtype=torch.bfloat16)
        tables = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq)
        valid = (torch.arange(per_seq * BS) < args.context).expand(batch, -1)
        group = DecodeGroup(rows=torch.arange(batch),
                            blocks=(torch.arange(2 * KV)[:, None] * num_blocks + tables.flatten()[None, :]).flatten(),
                            mask=valid[:, None, None, :], tables=tables,
                            lengths=torch.full((batch,), args.context))
        q = torch.randn(batch, KV, G, D, dtype=torch.bfloat16)
        runs = {f"gather+{name}": (lambda f=f: f(q, pool, group), 0.0)
                for name, f in DECODE_ATTENTION.items() if name not in BUILT_KERNELS}
        if cpp_build_s is not None:
            runs["cpp (in place)"] = (lambda: DECODE_ATTENTION["cpp"](q, pool, group), cpp_build_s)
        ref = DECODE_ATTENTION["flash"](q, pool, group)
        if compiled:
            runs["paged (compiled)"] = (lambda: DECODE_ATTENTION["paged"](q, pool, group), paged_compile_s)
            run = flex_runner(q, pool, tables, args.context)
            started = time.perf_counter()
            out = run()
            compile_s = time.perf_counter() - started
            err = (out.reshape(ref.shape).float() - ref.float()).abs().max().item()
            if err > 0.05:
                raise SystemExit(f"flex differs from gather+flash by {err}")
            runs["flex (compiled)"] = (run, compile_s)
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
            compile_text = f"{compile_s:.1f}" if compile_s else "-"
            print(f"{batch:5d} | {name} | {times[name] * 1e3:.3f} | {base / times[name]:.2f}x | {compile_text}")


if __name__ == "__main__":
    main()
