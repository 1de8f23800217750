"""Predictor overhead on the real engine: time spent scoring prompts (and refining with the probe)
as a share of engine time, on a trace of ShareGPT test prompts arriving in small batches.

    python benchmarks/predictor_overhead.py [--requests 96] [--batch 8] [--max-tokens 64]
        [--predictors ranker,probe] [--settings float32:2,auto:1] [--labels served] [--offline 96]

Runs the embedded SmolLM2 with ``ltr`` + ranker and with ``trail`` + probe, once per scoring
setting ``PRECISION:THREADS`` (``float32:2`` is how the encoder scored before 2026-11-28; THREADS
``-`` leaves the engine's own), all in the same run so that the shares compare on a shared
machine. ``--offline N`` also scores N test prompts alone in batches of ``--batch`` (the settings
interleaved batch by batch): prompts/s, CPU seconds per prompt and tau against the reference
lengths of those prompts. Prints the tables and writes out/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

from rankserve.core.request import Request, SamplingParams
from rankserve.engine.build import EngineSettings, build_core
from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.predictors import TextModelPredictor, default_weights
from rankserve.learn.sharegpt import load_prompts
from rankserve.learn.text_model import torch_threads
from rankserve.model.tokenizer import HFTextTokenizer
from rankserve.sim.machine import cpu_model

PROMPT_SIDE = {"ranker": "ranker", "probe": "classifier"}  # the text model each predictor scores with
POLICY = {"ranker": "ltr", "probe": "trail"}


def parse_setting(text: str) -> tuple[str, int | None]:
    precision, _, threads = text.partition(":")
    return precision, None if threads in ("", "-") else int(threads)


def text_predictor(predictor: str, setting: tuple[str, int | None], labels: str) -> TextModelPredictor:
    precision, threads = setting
    weights = default_weights(PROMPT_SIDE[predictor], labels if predictor == "ranker" else None)
    return TextModelPredictor(weights, precision=precision, threads=threads)


def run(predictor: str, setting: tuple[str, int | None], prompts, args) -> dict:
    from rankserve.model.loader import load_tokenizer

    files, core, _ = build_core(EngineSettings(policy=POLICY[predictor], predictor=predictor, max_num_seqs=32))
    if predictor == "probe":
        core.predictor.prompt_predictor = text_predictor(predictor, setting, args.labels)
    else:
        core.predictor = text_predictor(predictor, setting, args.labels)
    tok = HFTextTokenizer(load_tokenizer(files))
    requests = [
        Request(tok.apply_chat_template([{"role": "user", "content": p.text}]),
                SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), prompt_text=p.text)
        for p in prompts
    ]
    started = time.perf_counter()
    pending = list(requests)
    done = 0
    steps = 0
    while done < len(requests):
        if pending and steps % args.every == 0:  # a batch arrives every few steps
            core.add_requests(pending[: args.batch])
            pending = pending[args.batch :]
        _, finished = core.step()
        done += len(finished)
        steps += 1
    total = time.perf_counter() - started
    report = core.predictor.report()
    predictor_s = report.get("score_time_s", 0.0) + report.get("refine_time_s", 0.0)
    return {"policy": POLICY[predictor], "predictor": predictor, "setting": ":".join(map(str, setting)),
            "requests": len(requests), "engine_s": round(total, 2), "predictor_s": round(predictor_s, 3),
            "share": predictor_s / total,
            "prompts_per_s": report.get("prompts_scored", 0) / max(report.get("score_time_s", 1e-9), 1e-9),
            "report": report}


def offline(settings, prompts, batch: int, labels: str) -> list[dict]:
    """Score the prompts alone, each batch with every setting in turn (same load for all)."""
    models = {s: text_predictor("ranker", s, labels).model for s in settings}
    rows = {s: {"scores": [], "wall_s": 0.0, "cpu_s": 0.0} for s in settings}
    texts = [p.text for p in prompts]
    for start in range(0, len(texts), batch):
        for s, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            with torch_threads(s[1]):
                scores, _ = model.predict_texts(texts[start : start + batch])
            rows[s]["wall_s"] += time.perf_counter() - wall
            rows[s]["cpu_s"] += time.process_time() - cpu
            rows[s]["scores"].extend(scores)
    lengths = [p.reference_len for p in prompts]
    return [{"setting": ":".join(map(str, s)), "prompts": len(texts), "prompts_per_s": len(texts) / r["wall_s"],
             "cpu_s_per_prompt": r["cpu_s"] / len(texts), "tau_reference": kendall_tau(r["scores"], lengths)}
            for s, r in rows.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="requests per arrival batch")
    ap.add_argument("--every", type=int, default=4, help="engine steps between arrival batches")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--predictors", default="ranker,probe", help="comma-separated: ranker, probe")
    ap.add_argument("--settings", default="float32:2,auto:1", help="comma-separated PRECISION:THREADS")
    ap.add_argument("--labels", default=None, choices=("served", "reference"),
                    help="the ranker's shipped weights (ranker-<labels>; default: the server's default)")
    ap.add_argument("--offline", type=int, default=0, help="also score this many prompts alone")
    ap.add_argument("--out", type=Path, default=Path("out/overhead.json"))
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.settings.split(",")]
    prompts = [p for p in load_prompts() if p.split == "test"]
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads in the engine, {date.today()}")
    print("| policy + predictor | scoring (precision:threads) | engine s | predictor s | share | prompts scored/s |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = []
    for pred in args.predictors.split(","):
        for setting in settings:  # each row as it comes: a run takes minutes
            r = run(pred, setting, prompts[: args.requests], args)
            rows.append(r)
            print(f"| {r['policy']} + {r['predictor']} | {r['setting']} | {r['engine_s']:.1f} | {r['predictor_s']:.2f} | "
                  f"{100 * r['share']:.2f}% | {r['prompts_per_s']:.0f} |", flush=True)
    result = {"cpu": cpu_model(), "date": str(date.today()), "engine": rows}
    if args.offline:
        result["offline"] = offline(settings, prompts[: args.offline], args.batch, args.labels)
        print(f"\n{default_weights('ranker', args.labels).stem} scoring alone, {args.offline} test prompts in batches of {args.batch}")
        print("| scoring (precision:threads) | prompts/s | CPU s per prompt | tau (reference lengths) |")
        print("|---|---|---|---|")
        for r in result["offline"]:
            print(f"| {r['setting']} | {r['prompts_per_s']:.1f} | {r['cpu_s_per_prompt']:.4f} | {r['tau_reference']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
