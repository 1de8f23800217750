"""A better length ranker on the ShareGPT reference labels: does training on every later turn of
the train conversations (not only first turns) raise Kendall's tau on the reference test split?

    python benchmarks/ranker_tau.py [--variants first,last,context] [--later 4000] [--epochs 1]
        [--base src/rankserve/learn/weights/ranker-reference.safetensors] [--from-scratch]
        [--precision float32] [--threads 1] [--out out/ranker_tau/ranker_tau.json]

Each variant trains one ranker with the base's shape (frozen bottom layers, trained top layers,
encoder tokens); by default it starts from the base's weights (fine-tuning, so that a small CPU
budget measures the data and not a fresh 3-epoch training):

- ``first``: the 7,815 first-turn train prompts only (the control: as many first turns, the same
  schedule, no new data);
- ``last``: those plus ``--later`` later turns of train conversations, each shown as its user
  message alone;
- ``context``: the same later turns shown as the conversation so far (the message, then the
  earlier messages newest first, cut at the encoder's budget).

Tau is measured on the reference test split (1,998 first-turn prompts, the split every shipped
ranker is measured on), with the frozen layers' output computed once and shared by all variants
(and cached on disk under ``--cache``). Scoring speed is the whole encoder on ``--speed-prompts``
test prompts in the serving precision, base and variants interleaved batch by batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

from rankserve.learn.datasets import Split, load_label_data
from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.predictors import default_weights
from rankserve.learn.text_model import TextLengthModel, TrainConfig, inference_dtype, train_text_model
from rankserve.sim.machine import cpu_model

VARIANTS = ("first", "last", "context")


def cached_bottoms(model: TextLengthModel, texts: list[str], cache: Path) -> list[torch.Tensor]:
    """The frozen layers' output for ``texts``, read from ``cache`` when it was computed before."""
    spec = f"{len(model._bottom)}:{model.config.max_length}:" + "\x00".join(texts)
    path = cache / f"bottoms-{hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()}.pt"
    if path.is_file():
        return torch.load(path)
    bottoms = model.encode_bottom(texts)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(bottoms, path)
    return bottoms


def train_split(variant: str, first: int | None, later: int) -> tuple[Split, int]:
    """The variant's train prompts (the first ``first`` first turns, then ``later`` later turns),
    and how many of them are first turns."""
    firsts = load_label_data("reference", max_train=first).train
    if variant == "first":
        return firsts, len(firsts.texts)
    data = load_label_data("reference", turns="all", turn_input=variant).train
    num_first = len(load_label_data("reference").train.texts)
    keep = list(range(len(firsts.texts))) + list(range(num_first, num_first + later))
    return Split([data.ids[i] for i in keep], [data.texts[i] for i in keep], data.lengths[keep],
                 data.prompt_lens[keep]), len(firsts.texts)


def new_model(base: Path, from_scratch: bool) -> TextLengthModel:
    loaded = TextLengthModel.load(base)
    return TextLengthModel(loaded.config) if from_scratch else loaded


def scoring_speed(paths: list[Path], texts: list[str], batch: int = 8) -> dict[str, float]:
    """Prompts/s of the whole encoder in the serving precision, models interleaved batch by batch."""
    models = {p.stem: TextLengthModel.load(p, inference_dtype("auto")) for p in paths}
    spent = dict.fromkeys(models, 0.0)
    for start in range(0, len(texts), batch):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.predict_texts(texts[start : start + batch], batch_size=batch)
            spent[name] += time.perf_counter() - t0
    return {name: round(len(texts) / s, 1) for name, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    ap.add_argument("--first", type=int, default=None, help="first-turn train prompts used (default: all 7,815)")
    ap.add_argument("--later", type=int, default=4000, help="later turns added (0 < N <= 36,886; all: 36886)")
    ap.add_argument("--base", type=Path, default=default_weights("ranker", "reference"))
    ap.add_argument("--from-scratch", action="store_true", help="train the base's shape from the pretrained encoder")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5, help="top layers (the head gets 10x)")
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                    help="training precision; bfloat16 pays only where the CPU has AMX (emulated, and far slower, "
                    "on AVX2-only CPUs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-prompts", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("out/ranker_tau/cache"))
    ap.add_argument("--out", type=Path, default=Path("out/ranker_tau/ranker_tau.json"))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        ap.error(f"argument --variants: unknown {unknown}; choose from {VARIANTS}")
    if args.later < 1:
        ap.error("argument --later: must be at least 1")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    test = load_label_data("reference").test
    base = TextLengthModel.load(args.base)
    test_bottoms = cached_bottoms(base, test.texts, args.cache)
    rows = [{"variant": f"base ({args.base.name})", "num_train": base_meta(args.base)["num_train"],
             "test_tau": kendall_tau(base.predict_bottoms(test_bottoms)[0], test.lengths), "train_s": None}]
    print(f"{rows[0]['variant']}: tau {rows[0]['test_tau']:.4f}", flush=True)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, head_lr=10 * args.lr, precision=args.precision)
    weights = []
    for variant in variants:
        split, num_first = train_split(variant, args.first, args.later)
        t0 = time.perf_counter()
        bottoms = cached_bottoms(base, split.texts[:num_first], args.cache)
        if len(split.texts) > num_first:
            bottoms = bottoms + cached_bottoms(base, split.texts[num_first:], args.cache)
        encode_s = time.perf_counter() - t0
        model = new_model(args.base, args.from_scratch)
        t0 = time.perf_counter()
        history = train_text_model(model, bottoms, split.lengths, config, progress=False)
        train_s = time.perf_counter() - t0
        tau = kendall_tau(model.predict_bottoms(test_bottoms)[0], test.lengths)
        path = args.out.parent / f"ranker-{variant}.safetensors"
        record = {"variant": variant, "num_train": len(split.texts), "num_later": len(split.texts) - num_first,
                  "test_tau": tau, "train_s": round(train_s, 1), "encode_s": round(encode_s, 1),
                  "loss_per_epoch": history}
        model.save(path, extra={"trained_on": {"labels": "reference", "turns": "first" if variant == "first" else "all",
                                               "turn_input": "last" if variant == "first" else variant,
                                               "fine_tuned_from": None if args.from_scratch else args.base.name,
                                               "train": asdict(config), **record}})
        weights.append(path)
        rows.append(record)
        print(f"{variant}: {len(split.texts)} prompts ({record['num_later']} later turns), tau {tau:.4f}, "
              f"train {train_s:.0f} s, encode {encode_s:.0f} s", flush=True)
    speed = scoring_speed([args.base, *weights], test.texts[: args.speed_prompts])
    for row, path in zip(rows, [args.base, *weights]):
        row["prompts_per_s"] = speed[path.stem]
    cpu = cpu_model()
    print(f"\nCPU: {cpu}; {args.threads} torch thread(s); {args.epochs} epoch(s), {args.precision} training, "
          f"{'from scratch' if args.from_scratch else f'fine-tuned from {args.base.name}'}\n")
    print("| train data | prompts | Kendall's tau (1,998 test) | train s | prompts/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        train_s = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        print(f"| {r['variant']} | {r['num_train']:,} | {r['test_tau']:.4f} | {train_s} | {r['prompts_per_s']} |")
    args.out.write_text(json.dumps({"date": str(date.today()), "cpu": cpu, "args": {**vars(args), "base": str(args.base),
                                    "cache": str(args.cache), "out": str(args.out)},
                                    "train": asdict(config), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def base_meta(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text()).get("trained_on", {})


if __name__ == "__main__":
    main()
