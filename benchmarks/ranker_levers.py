"""Which training lever raises the ranker's Kendall's tau on the ShareGPT reference test split?

    python benchmarks/ranker_levers.py --precision bfloat16 --threads 2 \\
        --variant "listmle:" --variant "pairwise:rank_loss=pairwise" \\
        --variant "all6:trainable_layers=6,rank_loss=pairwise,lr=5e-5"

Each ``--variant NAME:key=value,...`` trains one ranker from the pretrained encoder on the 7,815
first-turn train prompts, starting from the shipped ``ranker-reference``'s settings (top 3 layers
trained, 256 encoder tokens, ListMLE over lists of 32, 3 epochs) and overriding the given keys of
the model config (``trainable_layers``, ``max_length``, ``head_hidden``, ``encoder_layers``) or the training config
(``rank_loss``, ``list_size``, ``epochs``, ``lr``, ``head_lr``, ``micro_batch``, ``seed``; the head's
learning rate stays 10x the layers' unless given). Tau is measured on the 1,998 first-turn test
prompts (after every epoch too, which the training time includes); the frozen layers' outputs are computed once per (frozen layers, encoder tokens) and
cached under ``--cache``. Scoring speed is the whole model (every encoder layer it keeps) in the
serving precision, one thread, timed interleaved with the base model's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from datetime import date
from pathlib import Path

import torch
from ranker_tau import cached_bottoms, scoring_speed

from rankserve.learn.datasets import load_label_data
from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.predictors import default_weights
from rankserve.learn.text_model import TextLengthModel, TextModelConfig, TrainConfig, train_text_model
from rankserve.sim.machine import cpu_model

MODEL_KEYS = {"trainable_layers": int, "max_length": int, "head_hidden": int, "encoder_layers": int}
TRAIN_KEYS = {f.name: f.type for f in fields(TrainConfig) if f.name != "precision"}
CASTS = {"int": int, "float": float, "str": str}


def parse_variant(spec: str, base_model: TextModelConfig, base_train: TrainConfig) -> tuple[str, TextModelConfig,
                                                                                              TrainConfig]:
    """``NAME:key=value,...`` -> (name, model config, train config)."""
    name, _, body = spec.partition(":")
    if not name:
        raise ValueError(f"variant {spec!r} has no name (NAME:key=value,...)")
    model_changes, train_changes = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key in MODEL_KEYS:
            model_changes[key] = MODEL_KEYS[key](value)
        elif key in TRAIN_KEYS:
            train_changes[key] = CASTS[str(TRAIN_KEYS[key])](value)
        else:
            raise ValueError(f"variant {name!r}: unknown key {key!r}; known: {sorted(MODEL_KEYS) + sorted(TRAIN_KEYS)}")
    if "lr" in train_changes and "head_lr" not in train_changes:
        train_changes["head_lr"] = 10 * train_changes["lr"]
    return name, replace(base_model, **model_changes), replace(base_train, **train_changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    ap.add_argument("--base", type=Path, default=default_weights("ranker", "reference"),
                    help="the model whose settings every variant starts from")
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                    help="training precision; bfloat16 pays only where the CPU has AMX")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-prompts", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("out/ranker_tau/cache"))
    ap.add_argument("--out", type=Path, default=Path("out/ranker_levers/ranker_levers.json"))
    args = ap.parse_args()
    base_meta = json.loads(args.base.with_suffix(".json").read_text())
    base_model = TextModelConfig(**base_meta["config"])
    base_train = replace(TrainConfig(**base_meta["trained_on"]["train"]), precision=args.precision)
    try:
        variants = [parse_variant(v, base_model, base_train) for v in args.variant or ["listmle:"]]
    except (ValueError, KeyError) as e:
        ap.error(f"argument --variant: {e}")
    if any(f"ranker-{name}" == args.base.stem for name, _, _ in variants):
        ap.error(f"argument --variant: a variant's file would be named as the base's ({args.base.stem}); rename it")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    data = load_label_data("reference")
    rows, paths = [], []
    base_speed = None  # prompts/s, once timed beside the variants

    def save() -> None:
        args.out.write_text(json.dumps({"date": str(date.today()), "cpu": cpu_model(),
                                        "base_prompts_per_s": base_speed, "args": {
            **vars(args), "base": str(args.base), "cache": str(args.cache), "out": str(args.out)}, "rows": rows},
            indent=2) + "\n")

    for name, model_config, train_config in variants:
        model = TextLengthModel(model_config)
        t0 = time.perf_counter()
        train_bottoms = cached_bottoms(model, data.train.texts, args.cache)
        test_bottoms = cached_bottoms(model, data.test.texts, args.cache)
        encode_s = time.perf_counter() - t0
        taus: list[float] = []

        def after_epoch(epoch: int, loss: float) -> None:  # runs within this variant's training
            taus.append(kendall_tau(model.predict_bottoms(test_bottoms)[0], data.test.lengths))
            print(f"{name}: epoch {epoch + 1}, loss {loss:.4f}, tau {taus[-1]:.4f}", flush=True)

        t0 = time.perf_counter()
        history = train_text_model(model, train_bottoms, data.train.lengths, train_config, progress=False,
                                   on_epoch=after_epoch)
        train_s = time.perf_counter() - t0
        tau = taus[-1]
        row = {"variant": name, "model": asdict(model_config), "train": asdict(train_config), "test_tau": tau,
               "tau_per_epoch": taus, "train_s": round(train_s, 1), "encode_s": round(encode_s, 1),
               "loss_per_epoch": history}
        path = args.out.parent / f"ranker-{name}.safetensors"
        model.save(path, extra={"trained_on": {"labels": "reference", "num_train": len(data.train.texts),
                                               **{k: v for k, v in row.items() if k != "variant"}}})
        rows.append(row)
        paths.append(path)
        print(f"{name}: tau {tau:.4f}, train {train_s:.0f} s, encode {encode_s:.0f} s, loss {history}", flush=True)
        save()  # what is done so far, should a later variant fail
    # The base model is timed beside the variants (interleaved batch by batch): the ratio holds
    # on a busy machine where the absolute speeds do not.
    speed = scoring_speed([args.base, *paths], data.test.texts[: args.speed_prompts])
    base_speed = speed[args.base.stem]
    for row, path in zip(rows, paths):
        row["prompts_per_s"] = speed[path.stem]
        row["speed_vs_base"] = round(speed[path.stem] / speed[args.base.stem], 2)
    print(f"\nCPU: {cpu_model()}; {args.threads} torch thread(s), {args.precision} training, from the pretrained "
          f"encoder with {args.base.name}'s settings unless stated\n")
    print("| variant | changes | Kendall's tau (1,998 test) | train s | prompts/s | scoring speed vs base |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.base.stem} (base, as trained) | - | - | - | {speed[args.base.stem]} | 1.00 |")
    base = {**asdict(base_model), **asdict(base_train)}
    for (name, m, t), row in zip(variants, rows):
        changes = {k: v for k, v in {**asdict(m), **asdict(t)}.items() if base[k] != v}
        print(f"| {name} | {changes or '-'} | {row['test_tau']:.4f} | {row['train_s']:.0f} | {row['prompts_per_s']} | "
              f"{row['speed_vs_base']:.2f} |")
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
