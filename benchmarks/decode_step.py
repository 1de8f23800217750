"""Time of one decode step of a Llama-family forward at a given batch and context, on blocks
scattered through the KV pool as a long-running engine leaves them.

    python benchmarks/decode_step.py [--batch 96] [--context 600] [--repeats 5]
    python benchmarks/decode_step.py --random-config llama3-8b.json --device cuda --batch 64
    python benchmarks/decode_step.py --batch 15 --context 200 --same-context --long-context 1000
    python benchmarks/decode_step.py --batch 15 --context 250 --same-context --prefill-chunk 497
    python benchmarks/decode_step.py --batch 64 --context 256 --kernels "gemm=fp32>=32,attention=flash" auto

Default: the embedded SmolLM2 (bf16, CPU). ``--model`` serves any local Hugging Face directory;
``--random-config`` builds random weights of a config.json's shape instead (step time depends on
shapes, not values), so a model too large to ship can still be timed on a GPU.
Sequence i has context ``context - (37 i mod context/2)`` (mixed lengths, as in a real batch).
Compare two versions of the forward by running this under each (e.g. PYTHONPATH=old/src), or kernel
paths of this one with ``--kernels`` (``RANKSERVE_KERNELS``'s syntax, or ``auto``: the measured choice):
one model per spec, timed in alternating rounds; the best round counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from rankserve.model.kernels import ENV_FORCE, choose_kernels, cpu_identity, parse_forced
from rankserve.model.llama import LlamaConfig, LlamaModel, SeqInput
from rankserve.model.loader import load_model


def random_model(config_path: str, dtype: torch.dtype, device: str) -> LlamaModel:
    """A model of the config's shape with random weights, made on ``device``."""
    cfg = LlamaConfig.from_hf(json.loads(open(config_path).read()))
    q, kv, hidden, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    weights = {name: torch.randn(shape, dtype=dtype, device=device) * 0.02 for name, shape in shapes.items()}
    return LlamaModel(cfg, weights, dtype=dtype, device=device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="model spec or local HF directory (default: embedded SmolLM2)")
    ap.add_argument("--random-config", default=None, help="config.json: random weights of that shape")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--same-context", action="store_true", help="every sequence at --context (no mix)")
    ap.add_argument("--long-context", type=int, default=0, help="plus one sequence decoding at this context")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="plus one fresh prompt of this many tokens")
    ap.add_argument("--kernels", nargs="+", default=None,
                    help="kernel specs to compare (RANKSERVE_KERNELS syntax, or auto); default: the model as built")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --kernels")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    models = {}
    for spec in args.kernels or ["as built"]:
        if args.random_config:
            model = random_model(args.random_config, dtype, args.device)
        else:
            _, model = load_model(args.model, dtype=dtype, device=args.device)
        if args.kernels:
            os.environ.pop(ENV_FORCE, None)
            if spec != "auto":
                parse_forced(spec)
                os.environ[ENV_FORCE] = spec
            choose_kernels(model)
        models[spec] = model
    bs = 16
    blocks_per_seq = (max(args.context, args.long_context, args.prefill_chunk) + bs) // bs + 1
    cache = model.allocate_kv_cache((args.batch + 2) * blocks_per_seq + 8, bs)
    order = torch.randperm((args.batch + 2) * blocks_per_seq).tolist()  # scattered blocks
    tables = [order[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(args.batch + 2)]
    seqs = [SeqInput([5], args.context if args.same_context else args.context - (i * 37 % (args.context // 2)), tables[i])
            for i in range(args.batch)]
    if args.long_context:
        seqs.append(SeqInput([5], args.long_context, tables[args.batch]))
    if args.prefill_chunk:
        seqs.append(SeqInput(list(range(100, 100 + args.prefill_chunk)), 0, tables[args.batch + 1]))
    for model in models.values():
        for _ in range(2):
            model.forward(seqs, cache)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds if args.kernels else 1):
        for spec, model in models.items():
            synchronize(model.device)
            started = time.perf_counter()
            for _ in range(args.repeats):
                model.forward(seqs, cache)
            synchronize(model.device)
            best[spec] = min(best[spec], (time.perf_counter() - started) / args.repeats)
    extra = (f" + 1 at {args.long_context}" if args.long_context else "") + (
        f" + a {args.prefill_chunk}-token prefill" if args.prefill_chunk else "")
    first = next(iter(models))
    print(f"batch {args.batch}, context {'=' if args.same_context else '<='} {args.context}{extra}, "
          f"{model.device.type} ({cpu_identity()['cpu']}, {torch.get_num_threads()} threads):")
    for spec, model in models.items():
        print(f"  [{spec}] {model.kernels.labels()}: {best[spec] * 1e3:.1f} ms/step"
              + (f", {best[first] / best[spec]:.2f}x [{first}]'s speed" if spec != first else ""))


if __name__ == "__main__":
    main()
