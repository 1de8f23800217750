"""Time rankserve's forward on a GPU over a grid of step shapes and set each time beside what the
simulator's roofline cost model predicts for the same shape on that GPU.

    python benchmarks/gpu_step_grid.py --random-config benchmarks/configs/llama3-8b.json \
        --gpu h200 --json out/gpu_step_grid.json

Random weights of the config's shape (step time depends on shapes, not values). Decode steps:
``batch`` sequences each at ``context`` tokens, blocks scattered through the pool; prefill steps: one
fresh prompt of ``tokens``. Each time is the median of ``--repeats`` synchronised steps after two
warm-ups. The roofline's prediction uses the GPU's datasheet numbers and the cost model's default
efficiency factors, so ``measured / roofline`` says how far this engine is from the model's
assumption of a vLLM-class server (CUDA graphs, fused kernels) on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from decode_step import random_model, synchronize  # same folder: the script's own directory is on sys.path

from rankserve.model.llama import LlamaConfig, SeqInput
from rankserve.sim.cost_model import GPU_SPECS, ModelSpec, RooflineCostModel, StepShape

BLOCK = 16


def time_step(model, seqs: list[SeqInput], cache: torch.Tensor, repeats: int) -> float:
    for _ in range(2):
        model.forward(seqs, cache)
    synchronize(model.device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.forward(seqs, cache)
        synchronize(model.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-config", required=True, help="a Hugging Face config.json (Llama family)")
    ap.add_argument("--gpu", default="h200", choices=sorted(GPU_SPECS), help="datasheet for the roofline")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--prefills", default="128,512,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    prefills = [int(x) for x in args.prefills.split(",")]

    torch.manual_seed(0)
    model = random_model(args.random_config, torch.bfloat16, args.device)
    cfg = LlamaConfig.from_hf(json.loads(Path(args.random_config).read_text()))
    roofline = RooflineCostModel(ModelSpec.of("config", cfg), GPU_SPECS[args.gpu])
    blocks_per_seq = max(contexts + prefills) // BLOCK + 2
    pool_blocks = max(batches) * (max(contexts) // BLOCK + 2) + blocks_per_seq
    cache = model.allocate_kv_cache(pool_blocks, BLOCK)
    order = torch.randperm(pool_blocks).tolist()  # scattered blocks, as a long-running engine leaves them

    rows = []
    shapes = [("decode", b, c) for c in contexts for b in batches] + [("prefill", 1, t) for t in prefills]
    for kind, batch, size in shapes:
        if kind == "decode":
            per = size // BLOCK + 2
            seqs = [SeqInput([5], size - 1, order[i * per:(i + 1) * per]) for i in range(batch)]
            shape = StepShape.decode(batch, size)
        else:
            seqs = [SeqInput(list(range(100, 100 + size)), 0, order[:blocks_per_seq])]
            shape = StepShape.prefill(size)
        measured = time_step(model, seqs, cache, args.repeats)
        predicted = roofline.step_time(*shape.astuple())
        rows.append({"kind": kind, "batch": batch, "tokens_or_context": size, "measured_ms": measured * 1e3,
                     "roofline_ms": predicted * 1e3, "ratio": measured / predicted})

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    print(f"{device_name}, torch {torch.__version__}, {cfg.num_layers} layers x {cfg.hidden_size}, bf16, "
          f"roofline: {args.gpu} datasheet, default efficiencies")
    print("| step | batch | context / prompt | measured ms | roofline ms | measured / roofline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['batch']} | {r['tokens_or_context']} | {r['measured_ms']:.2f} | "
              f"{r['roofline_ms']:.2f} | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                               "config": args.random_config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
