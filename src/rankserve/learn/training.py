"""Train and evaluate the prompt-side predictors; the work behind ``rankserve train`` / ``eval``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from rankserve.learn.datasets import LabelData
from rankserve.learn.evaluate import kendall_tau, mean_abs_error
from rankserve.learn.records import FeatureSpec, read_records
from rankserve.learn.text_model import TextLengthModel, TextModelConfig, TrainConfig, train_text_model


def train_text_predictor(data: LabelData, model_config: TextModelConfig, train_config: TrainConfig,
                         out: str | Path, progress: bool = True) -> dict:
    """Train one text model on ``data.train``, measure it on ``data.test``, save it; returns the record."""
    started = time.perf_counter()
    model = TextLengthModel(model_config)
    bottoms = model.encode_bottom(data.train.texts)
    encode_s = time.perf_counter() - started
    history = train_text_model(model, bottoms, data.train.lengths, train_config, progress=progress)
    train_s = time.perf_counter() - started - encode_s
    record = {
        "labels": data.name,
        "num_train": len(data.train.texts),
        "model": asdict(model_config),
        "train": asdict(train_config),
        "loss_per_epoch": history,
        "encode_s": round(encode_s, 1),
        "train_s": round(train_s, 1),
        **measure(model, data),
    }
    model.save(out, extra={"trained_on": record})
    return record


def train_from_records(records_path: str | Path, base: str | Path, train_config: TrainConfig, out: str | Path,
                       max_records: int | None = None, progress: bool = True) -> dict:
    """Fine-tune the ranker ``base`` on served traffic recorded by ``rankserve serve --record-lengths``
    (its first ``max_records`` records). A request cut at max_tokens gives a lower bound on its
    length, not the length: it is censored (``listmle_loss``), never taken as ending at the cap."""
    records = read_records(records_path, max_records)
    model = TextLengthModel.load(base)
    if model.config.kind != "ranker":
        raise ValueError(f"{base} is a {model.config.kind}; served records fine-tune a ranker")
    if FeatureSpec.of(model) != records.spec:
        raise ValueError(f"{records_path} holds features for {records.spec}, {base} needs {FeatureSpec.of(model)}: "
                         "record with that ranker serving (--predictor-weights)")
    if records.observed.sum() < 2:
        raise ValueError(f"{records_path} has {int(records.observed.sum())} requests that finished by themselves; "
                         "fine-tuning needs at least 2")
    started = time.perf_counter()
    history = train_text_model(model, records.features, records.output_tokens, train_config, progress=progress,
                               observed=records.observed)
    record = {
        "labels": f"served records ({Path(records_path).name})",
        "fine_tuned_from": Path(base).name,
        "num_train": len(records.features),
        "share_cut_at_max_tokens": round(float(1 - records.observed.mean()), 4),
        "model": asdict(model.config),
        "train": asdict(train_config),
        "loss_per_epoch": history,
        "train_s": round(time.perf_counter() - started, 1),
    }
    model.save(out, extra={"trained_on": record})
    return record


def measure(model: TextLengthModel, data: LabelData) -> dict:
    """Tau (and MAE when the model gives lengths) on the test split, and prompts scored per second."""
    started = time.perf_counter()
    scores, lengths = model.predict_texts(data.test.texts)
    elapsed = time.perf_counter() - started
    result = {"test_tau": kendall_tau(scores, data.test.lengths), "num_test": len(scores),
              "prompts_per_s": round(len(scores) / elapsed, 1)}
    if lengths is not None:
        result["test_mae"] = mean_abs_error(lengths, data.test.lengths)
    return result


def baseline_rows(data: LabelData) -> list[dict]:
    """Predictors that need no training: prompt length, and the seed-to-seed bound."""
    rows = [{"predictor": "prompt-len", "test_tau": kendall_tau(data.test.prompt_lens, data.test.lengths)}]
    if data.test.second_seed is not None:
        rows.append({"predictor": "same prompt, other seed (bound)",
                     "test_tau": kendall_tau(data.test.second_seed, data.test.lengths),
                     "test_mae": mean_abs_error(data.test.second_seed, data.test.lengths)})
    return rows


def evaluate_saved(data: LabelData, paths: Sequence[str | Path], dtype: torch.dtype = torch.float32) -> list[dict]:
    """Baselines, then each saved model scoring in ``dtype``."""
    rows = baseline_rows(data)
    for path in paths:
        model = TextLengthModel.load(path, dtype)
        rows.append({"predictor": Path(path).stem, "dtype": str(dtype).removeprefix("torch."), **measure(model, data)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| predictor | Kendall's tau | MAE (tokens) |", "|---|---|---|"]
    for r in rows:
        mae = f"{r['test_mae']:.1f}" if r.get("test_mae") is not None else "-"
        lines.append(f"| {r['predictor']} | {r['test_tau']:.3f} | {mae} |")
    return "\n".join(lines)


def set_threads() -> None:
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))
