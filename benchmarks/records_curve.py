"""Learning from served traffic: tau against the served model's own lengths after 0, 1,000 and
3,000 recorded requests, and the scheduling gain it buys.

    python benchmarks/records_curve.py [--records out/records/served.sqlite] [--labels served]
        [--base src/rankserve/learn/weights/ranker-reference.safetensors] [--counts 0,1000,3000]
        [--epochs 2] [--sim-requests 1006] [--threads N] [--out out/records_curve.json]

1. Records: every train row of a label file (``rankserve label``: a prompt, the served model's
   output length and finish reason) becomes a finished request that the base ranker scores and
   ``LengthRecorder`` records, the code path of ``rankserve serve --record-lengths`` minus HTTP
   and generation (skipped when ``--records`` exists: e.g. a file the real server recorded).
2. ``--base`` fine-tuned on the first N records for each N in ``--counts`` (0: the base as is);
   requests cut at max_tokens count as lower bounds (``train_from_records``). The weights go
   beside the records file (and are reused when there).
3. Kendall's tau of each model against the label file's test lengths (first seed), and a
   simulated burst of the test prompts with their served lengths (cost model
   ``cpu-smollm2-135m``, 16 sequences, 512 batched tokens): ``ltr`` with each model against FCFS
   and against ``ltr`` with the true lengths (oracle).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from rankserve.bench.experiment import SimSpec, simulate_trace
from rankserve.core.request import FinishReason, Request, RequestStatus, SamplingParams
from rankserve.learn.datasets import SERVED_LABELS, load_label_data
from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.labels import read_labels
from rankserve.learn.predictors import TextModelPredictor, default_weights
from rankserve.learn.records import LengthRecorder
from rankserve.learn.text_model import TrainConfig
from rankserve.learn.training import set_threads, train_from_records
from rankserve.sim.machine import cpu_model


def record_label_rows(labels: Path, base: Path, path: Path, batch: int = 64) -> int:
    """Record the train rows of ``labels`` as served requests (scored by ``base``, as a server would)."""
    data = load_label_data(str(labels))
    finish = {r.conv_id: r.finish for r in read_labels(labels).rows if r.split == "train"}
    cap = int(read_labels(labels).meta.get("config", {}).get("max_tokens", max(data.train.lengths)))
    predictor = TextModelPredictor(base)
    recorder = LengthRecorder.for_predictor(path, predictor)
    train = data.train
    for start in range(0, len(train.texts), batch):
        requests = [Request([0] * int(train.prompt_lens[i]), SamplingParams(max_tokens=cap), prompt_text=train.texts[i])
                    for i in range(start, min(start + batch, len(train.texts)))]
        predictor.score(requests)
        for req, i in zip(requests, range(start, start + len(requests))):
            req.output_token_ids = [0] * int(train.lengths[i])
            req.status = RequestStatus.FINISHED
            req.finish_reason = FinishReason(finish[train.ids[i]])
            recorder.record(req)
    recorder.close(timeout=600)
    if recorder.stats.failed:
        raise RuntimeError(f"{recorder.stats.failed} records failed")
    return recorder.stats.written


def simulate_gain(data, predictors: dict[str, TextModelPredictor], n: int) -> dict[str, dict]:
    """Mean latency and latency per token of a burst of the first ``n`` test prompts (the
    predictors have scored them already: their caches answer)."""
    lengths = np.stack([data.test.prompt_lens[:n], data.test.lengths[:n]], axis=1).astype(np.int64)
    arrivals = np.zeros(n)
    fcfs = SimSpec(policy="fcfs", predictor=None, arrival="burst", num_requests=n, hardware="cpu-smollm2-135m",
                   max_num_seqs=16, max_num_batched_tokens=512)
    ltr = replace(fcfs, policy="ltr", predictor="ranker")
    systems = {"fcfs": (fcfs, None), "ltr + oracle": (replace(ltr, predictor="oracle"), None)}
    systems.update({f"ltr + {name}": (ltr, p) for name, p in predictors.items()})
    out = {}
    for name, (spec, predictor) in systems.items():
        result, _ = simulate_trace(spec, lengths, arrivals, data.test.texts[:n], predictor=predictor)
        out[name] = {k: result.summary[k] for k in ("mean_latency_s", "mean_latency_per_token_s")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=Path, default=SERVED_LABELS)
    ap.add_argument("--records", type=Path, default=Path("out/records/served.sqlite"))
    ap.add_argument("--base", type=Path, default=default_weights("ranker", "reference"))
    ap.add_argument("--counts", default="0,1000,3000")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sim-requests", type=int, default=1006)
    ap.add_argument("--compare", nargs="*", type=Path, default=[default_weights("ranker", "served")],
                    help="other weights to measure beside (default: the shipped ranker-served)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: one per core; on a busy machine 1 can be faster)")
    ap.add_argument("--out", type=Path, default=Path("out/records_curve.json"))
    args = ap.parse_args()
    set_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.records.parent.mkdir(parents=True, exist_ok=True)
    timings = {}
    if not args.records.exists():
        started = time.perf_counter()
        written = record_label_rows(args.labels, args.base, args.records)
        timings["record_s"] = round(time.perf_counter() - started, 1)
        print(f"recorded {written} requests in {args.records} ({timings['record_s']} s)", flush=True)
    data = load_label_data(str(args.labels))
    models = {}
    for n in (int(c) for c in args.counts.split(",")):
        if n == 0:
            models[f"{args.base.stem} (0 records)"] = args.base
            continue
        out = args.records.parent / f"{args.base.stem}+{n}-e{args.epochs}.safetensors"
        if not out.exists():  # kept from an earlier run
            started = time.perf_counter()
            train_from_records(args.records, args.base, TrainConfig(epochs=args.epochs), out, max_records=n)
            timings[f"train_{n}_s"] = round(time.perf_counter() - started, 1)
            print(f"fine-tuned on {n} records in {timings[f'train_{n}_s']} s", flush=True)
        models[f"{args.base.stem} + {n} records"] = out
    for path in args.compare:
        models[path.stem] = path
    rows, predictors = [], {}
    for name, path in models.items():
        predictors[name] = TextModelPredictor(path)
        requests = [Request([0], SamplingParams(), prompt_text=t) for t in data.test.texts]
        predictors[name].score(requests)
        rows.append({"model": name, "tau_served": kendall_tau([r.score for r in requests], data.test.lengths)})
    gain = simulate_gain(data, predictors, min(args.sim_requests, len(data.test.texts)))
    fcfs = gain["fcfs"]
    print(f"{cpu_model()}, {date.today()}; labels {args.labels.name}, test prompts {len(data.test.texts)}")
    print("| ranker | Kendall's tau (served lengths) | sim mean latency vs FCFS | sim latency per token vs FCFS |")
    print("|---|---|---|---|")
    for row in rows:
        g = gain[f"ltr + {row['model']}"]
        row.update({k: v / fcfs[k] for k, v in g.items()})
        print(f"| {row['model']} | {row['tau_served']:.3f} | {row['mean_latency_s']:.3f}x | "
              f"{row['mean_latency_per_token_s']:.3f}x |")
    oracle = gain["ltr + oracle"]
    print(f"| (ltr + oracle) | 1 | {oracle['mean_latency_s'] / fcfs['mean_latency_s']:.3f}x | "
          f"{oracle['mean_latency_per_token_s'] / fcfs['mean_latency_per_token_s']:.3f}x |")
    args.out.write_text(json.dumps({"cpu": cpu_model(), "date": str(date.today()), "labels": str(args.labels),
                                    "records": str(args.records), "epochs": args.epochs, "rows": rows,
                                    "simulated": gain, "timings": timings}, indent=2) + "\n")


if __name__ == "__main__":
    main()
