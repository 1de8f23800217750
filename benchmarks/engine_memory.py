"""The engine's own memory over many requests: EngineCore stepped directly (no HTTP, no ranker),
rounds of short requests of random lengths, RSS after each round.

    python benchmarks/engine_memory.py [--model DIR] [--rounds 6] [--batches 50] [--json out/engine_memory.json]

Each round submits ``--batches`` batches of 16 requests (5-40 random prompt tokens, 4 output
tokens, half greedy, half sampled) and steps the engine until they finish. Growth is measured from
the end of the first round (warm-up) to the end; a flat line means no per-request leak and no cache
that grows with the variety of step shapes (docs/SERVER.md, the soak section). A tiny random model
with SmolLM2's tokenizer (``--model``) runs in seconds; the default is the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

from rankserve.core import Request, SamplingParams
from rankserve.engine.build import EngineSettings, build_core
from rankserve.sim.machine import cpu_model

BATCH = 16


def rss_mib() -> float:
    """This process's resident set now (not its peak), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def random_requests(rng: random.Random, vocab: int, n: int) -> list[Request]:
    return [
        Request([rng.randrange(vocab) for _ in range(rng.randint(5, 40))],
                SamplingParams(max_tokens=4, temperature=rng.choice([0.0, 0.8])))
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, default=50, help="batches of 16 requests per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rounds < 2 or args.batches < 1:
        ap.error("--rounds must be >= 2 and --batches >= 1")

    settings = EngineSettings(model=args.model, policy="fcfs", dtype=args.dtype, max_num_seqs=BATCH,
                              kv_cache_gb=0.1, swap_space_gb=0.1, max_model_len=512)
    _, core, _ = build_core(settings)
    vocab = core.executor.model.cfg.vocab_size
    rng = random.Random(args.seed)
    rows = []
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for _ in range(args.batches):
            core.add_requests(random_requests(rng, vocab, BATCH))
            while core.scheduler.has_work:
                core.step()
        gc.collect()
        rows.append({"round": r + 1, "requests": (r + 1) * args.batches * BATCH,
                     "seconds": round(time.perf_counter() - t0, 1), "rss_mib": round(rss_mib(), 1)})
        print(f"  {rows[-1]['requests']} requests, {rows[-1]['seconds']} s, RSS {rows[-1]['rss_mib']:.0f} MiB", flush=True)

    warm, end = rows[0]["rss_mib"], rows[-1]["rss_mib"]
    growth = (end - warm) / warm
    print(f"\nengine memory: {args.model or 'embedded SmolLM2'}, {args.dtype}; {cpu_model()}\n")
    print("| requests | seconds | RSS MiB |\n|---:|---:|---:|")
    for row in rows:
        print(f"| {row['requests']} | {row['seconds']} | {row['rss_mib']:.0f} |")
    print(f"\nRSS after the first round {warm:.0f} MiB, at the end {end:.0f} MiB ({growth:+.1%})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "model": args.model, "dtype": args.dtype,
                                               "rounds": rows, "growth_after_warmup": growth}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
