"""The hidden-state probe on the served model's own labels: layer sweep, uniform vs log bins, and
the remaining-length MAE against tokens generated, refined (Bayesian, every K tokens) or not, next
to the prompt-only predictors.

    python benchmarks/probe_sweep.py [--labels src/rankserve/learn/data/labels_smollm2.csv]
        [--train 1000] [--test 500] [--out out/probe] [--save-best src/rankserve/learn/weights/probe-served.safetensors]

Features are recomputed by teacher forcing from the label run's token ids (cached in --out).
Prints tables, writes probe.json and probe_mae.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rankserve.learn.datasets import SERVED_LABELS
from rankserve.learn.evaluate import mean_abs_error
from rankserve.learn.features import SWEEP_LAYERS, FeatureSet, extract_features
from rankserve.learn.probe import ProbeConfig, refined_estimates, train_probe, training_samples

REPORT_AT = (0, 1, 8, 16, 32, 64, 128, 192)


def prompt_only_mae(features: FeatureSet, weights: Path) -> dict[int, float]:
    """MAE of a prompt-side length predictor's (total - generated) at each generated count."""
    from rankserve.learn.sharegpt import load_prompts
    from rankserve.learn.text_model import TextLengthModel

    test = np.flatnonzero(features.split == "test")
    texts = {p.conv_id: p.text for p in load_prompts()}
    model = TextLengthModel.load(weights)
    _, total = model.predict_texts([texts[c] for c in features.conv_id[test]])
    total_of = dict(zip(test.tolist(), total))
    result = {}
    for g in REPORT_AT:
        if g == 0:
            rows = test
        else:
            idx = np.flatnonzero((features.dec_generated == g) & np.isin(features.dec_owner, test))
            rows = features.dec_owner[idx]
        if len(rows):
            est = np.maximum(np.array([total_of[int(r)] for r in rows]) - g, 0)
            result[g] = mean_abs_error(est, features.output_len[rows] - g)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=Path, default=SERVED_LABELS)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--every", type=int, default=8, help="K: decode steps between refinements")
    ap.add_argument("--max-generated", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("out/probe"))
    ap.add_argument("--save-best", type=Path, default=None, help="save the best probe here")
    ap.add_argument("--prompt-models", type=Path, nargs="*", default=[],
                    help="prompt-side models (.safetensors) to compare against")
    args = ap.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"features-{args.train}-{args.test}-{args.every}-{args.max_generated}.npz"
    started = time.perf_counter()
    if cache.exists():
        features = FeatureSet.load(cache)
    else:
        features = extract_features(args.labels, SWEEP_LAYERS, args.every, args.max_generated,
                                    {"train": args.train, "test": args.test})
        features.save(cache)
    print(f"features: {len(features.conv_id)} requests, {len(features.dec_owner)} decode states "
          f"({time.perf_counter() - started:.0f} s)")
    max_len = int(json.loads(args.labels.with_suffix(".json").read_text())["config"]["max_tokens"])

    def fit(layer: int, bins: str):
        x, y, _ = training_samples(features, layer, "train")
        return train_probe(ProbeConfig(layer=layer, hidden_size=x.shape[1], bins=bins, max_len=max_len), x, y)

    def raw_mae(probe, layer: int, estimator: str = "mean") -> dict[int, float]:
        x, y, g = training_samples(features, layer, "test")
        est = probe.estimate(probe.probs(torch.from_numpy(x)), estimator).numpy()
        return {int(k): mean_abs_error(est[g == k], y[g == k]) for k in REPORT_AT if np.any(g == k)}

    sweep = {}
    for layer in SWEEP_LAYERS:
        probe = fit(layer, "uniform")
        sweep[layer] = {"probe": probe, "mae": raw_mae(probe, layer)}
        print(f"layer {layer:2d}: MAE at 0/32/128 generated = "
              + " / ".join(f"{sweep[layer]['mae'].get(g, float('nan')):.1f}" for g in (0, 32, 128)))
    best_layer = min(sweep, key=lambda k: np.mean(list(sweep[k]["mae"].values())))
    log_probe = fit(best_layer, "log")
    variants = {"uniform": sweep[best_layer]["probe"], "log": log_probe}
    curves, refined_curves = {}, {}
    for name, probe in variants.items():
        for estimator in ("mean", "median"):
            refined = refined_estimates(probe, features, "test", estimator)
            curves[f"probe ({name} bins, {estimator})"] = raw_mae(probe, best_layer, estimator)
            refined_curves[name, estimator] = {g: mean_abs_error(*refined[g]) for g in REPORT_AT if g in refined}
            curves[f"probe ({name} bins, {estimator}), refined every {args.every}"] = refined_curves[name, estimator]
    for path in args.prompt_models:
        curves[f"prompt-only: {path.stem}"] = prompt_only_mae(features, path)

    print(f"\nbest layer: {best_layer}")
    header = "| predictor | " + " | ".join(f"g={g}" for g in REPORT_AT) + " |"
    lines = [header, "|---" * (len(REPORT_AT) + 1) + "|"]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{curve[g]:.1f}" if g in curve else "-" for g in REPORT_AT) + " |")
    layer_lines = ["| layer | " + " | ".join(f"g={g}" for g in REPORT_AT) + " |", "|---" * (len(REPORT_AT) + 1) + "|"]
    for layer, rec in sweep.items():
        layer_lines.append(f"| {layer} | " + " | ".join(f"{rec['mae'][g]:.1f}" if g in rec["mae"] else "-"
                                                          for g in REPORT_AT) + " |")
    print("\n".join(layer_lines))
    print()
    print("\n".join(lines))
    (args.out / "probe.md").write_text("\n".join(layer_lines) + "\n\n" + "\n".join(lines) + "\n")
    (args.out / "probe.json").write_text(json.dumps({
        "labels": str(args.labels), "train_requests": args.train, "test_requests": args.test, "every": args.every,
        "best_layer": best_layer, "layer_mae": {k: v["mae"] for k, v in sweep.items()}, "curves": curves,
    }, indent=2) + "\n")
    _plot(curves, args.out / "probe_mae.png")
    if args.save_best is not None:
        best_bins, estimator = min(refined_curves, key=lambda k: np.mean(list(refined_curves[k].values())))
        best = variants[best_bins]
        best.config = replace(best.config, estimator=estimator)
        best.save(args.save_best, extra={"trained_on": str(args.labels), "train_requests": args.train,
                                         "layer_sweep": {k: v["mae"] for k, v in sweep.items()}})
        print(f"saved the {best_bins}-bin probe at layer {best_layer} ({estimator} estimates) to {args.save_best}")


def _plot(curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        gs = sorted(curve)
        ax.plot(gs, [curve[g] for g in gs], marker="o", ms=3, label=name)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MAE of remaining length (tokens)")
    ax.set_title("Remaining-length error vs tokens generated (SmolLM2 labels, test split)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
