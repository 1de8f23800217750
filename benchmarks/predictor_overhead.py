"""Predictor overhead on the real engine: time spent scoring prompts (and refining with the probe)
as a share of engine time, on a trace of ShareGPT test prompts arriving in small batches.

    python benchmarks/predictor_overhead.py [--requests 96] [--batch 8] [--max-tokens 64]

Runs the embedded SmolLM2 with ``ltr`` + ranker and with ``trail`` + probe; prints a table and
writes out/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rankserve.core.request import Request, SamplingParams
from rankserve.engine.build import EngineSettings, build_core
from rankserve.learn.sharegpt import load_prompts
from rankserve.model.tokenizer import HFTextTokenizer


def run(policy: str, predictor: str, prompts, args) -> dict:
    from rankserve.model.loader import load_tokenizer

    files, core, _ = build_core(EngineSettings(policy=policy, predictor=predictor, max_num_seqs=32))
    tok = HFTextTokenizer(load_tokenizer(files))
    requests = [
        Request(tok.apply_chat_template([{"role": "user", "content": p.text}]),
                SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), prompt_text=p.text)
        for p in prompts
    ]
    started = time.perf_counter()
    step_s = 0.0
    pending = list(requests)
    done = 0
    steps = 0
    while done < len(requests):
        if pending and steps % args.every == 0:  # a batch arrives every few steps
            core.add_requests(pending[: args.batch])
            pending = pending[args.batch :]
        t = time.perf_counter()
        _, finished = core.step()
        step_s += time.perf_counter() - t
        done += len(finished)
        steps += 1
    total = time.perf_counter() - started
    report = core.predictor.report()
    predictor_s = report.get("score_time_s", 0.0) + report.get("refine_time_s", 0.0)
    return {"policy": policy, "predictor": predictor, "requests": len(requests), "engine_s": round(total, 2),
            "predictor_s": round(predictor_s, 3), "share": predictor_s / total,
            "prompts_per_s": report.get("prompts_scored", 0) / max(report.get("score_time_s", 1e-9), 1e-9),
            "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="requests per arrival batch")
    ap.add_argument("--every", type=int, default=4, help="engine steps between arrival batches")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("out/overhead.json"))
    args = ap.parse_args()
    prompts = [p for p in load_prompts() if p.split == "test"][: args.requests]
    rows = [run("ltr", "ranker", prompts, args), run("trail", "probe", prompts, args)]
    print("| policy + predictor | engine s | predictor s | share | prompts scored/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} + {r['predictor']} | {r['engine_s']:.1f} | {r['predictor_s']:.2f} | "
              f"{100 * r['share']:.2f}% | {r['prompts_per_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
