"""Training and test sets for the length predictors: prompts with one of two kinds of labels.

``reference``: ShareGPT's own reply lengths (what the GPU-scale simulations replay).
``served`` (or a label CSV path): the served model's output lengths from ``rankserve label``; its
test prompts carry a second seed's length, the seed-to-seed bound on tau.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankserve.learn.labels import read_labels
from rankserve.learn.sharegpt import Prompt, load_prompts, sharegpt_table

DATA_DIR = Path(__file__).resolve().parent / "data"
SERVED_LABELS = DATA_DIR / "labels_smollm2.csv"


@dataclass
class Split:
    ids: list[str]
    texts: list[str]
    lengths: np.ndarray
    prompt_lens: np.ndarray  # served-model prompt tokens (chat template) or ShareGPT prompt tokens
    second_seed: np.ndarray | None = None  # the same prompts sampled with another seed


@dataclass
class LabelData:
    name: str
    train: Split
    test: Split


def _split(prompts: list[Prompt], lengths, prompt_lens, second=None) -> Split:
    return Split([p.conv_id for p in prompts], [p.text for p in prompts], np.asarray(lengths),
                 np.asarray(prompt_lens), None if second is None else np.asarray(second))


def load_label_data(source: str = "served", max_train: int | None = None) -> LabelData:
    """``source``: "reference", "served", or the path of a label CSV."""
    prompts = load_prompts()
    if source == "reference":
        _, table, _ = sharegpt_table()
        plen = {p.conv_id: int(row[0]) for p, row in zip(prompts, table)}
        train = [p for p in prompts if p.split == "train"][:max_train]
        test = [p for p in prompts if p.split == "test"]
        return LabelData(
            "reference",
            _split(train, [p.reference_len for p in train], [plen[p.conv_id] for p in train]),
            _split(test, [p.reference_len for p in test], [plen[p.conv_id] for p in test]),
        )
    path = SERVED_LABELS if source == "served" else Path(source)
    labels = read_labels(path)
    by_id = {p.conv_id: p for p in prompts}
    seeds = sorted({r.seed for r in labels.rows})
    first = {(r.conv_id, r.split): r for r in labels.rows if r.seed == seeds[0]}
    other = {r.conv_id: r.output_len for r in labels.rows if len(seeds) > 1 and r.seed == seeds[1]}
    train_rows = [r for (cid, split), r in first.items() if split == "train"][:max_train]
    test_rows = [r for (cid, split), r in first.items() if split == "test" and (not other or cid in other)]
    test_second = [other[r.conv_id] for r in test_rows] if other else None
    return LabelData(
        "served" if source == "served" else path.stem,
        _split([by_id[r.conv_id] for r in train_rows], [r.output_len for r in train_rows],
               [r.prompt_len for r in train_rows]),
        _split([by_id[r.conv_id] for r in test_rows], [r.output_len for r in test_rows],
               [r.prompt_len for r in test_rows], test_second),
    )
