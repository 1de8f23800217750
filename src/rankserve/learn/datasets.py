"""Training and test sets for the length predictors: prompts with one of two kinds of labels.

``reference``: ShareGPT's own reply lengths (what the GPU-scale simulations replay).
``served`` (or a label CSV path): the served model's output lengths from ``rankserve label``; its
test prompts carry a second seed's length, the seed-to-seed bound on tau.

With reference labels, ``turns="all"`` adds every later (user, reply) exchange of the train-side
conversations to the training set (about 5x the pairs); the test split stays the first turns, so
taus compare with the first-turn models'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankserve.learn.labels import read_labels
from rankserve.learn.sharegpt import TURN_INPUTS, LaterTurn, Prompt, load_later_turns, load_prompts, sharegpt_table

DATA_DIR = Path(__file__).resolve().parent / "data"
SERVED_LABELS = DATA_DIR / "labels_smollm2.csv"
TURNS = ("first", "all")
#: Later turns join the first-turn train prompts in one fixed shuffled order (a prefix is a sample).
LATER_TURN_SEED = 0


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


def load_label_data(source: str = "served", max_train: int | None = None, turns: str = "first",
                    turn_input: str = "last") -> LabelData:
    """``source``: "reference", "served", or the path of a label CSV. ``turns="all"`` (reference
    only) appends the train conversations' later turns, shown to the encoder as ``turn_input``
    ("last": the user message; "context": the conversation so far, see ``Turn.text``), and
    ``max_train`` then caps first and later turns together."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    if turn_input not in TURN_INPUTS:
        raise ValueError(f"turn input must be one of {TURN_INPUTS}, got {turn_input!r}")
    if turns == "all" and source != "reference":
        raise ValueError("later turns are labelled with ShareGPT's own replies: use them with reference labels")
    prompts = load_prompts()
    if source == "reference":
        _, table, _ = sharegpt_table()
        plen = {p.conv_id: int(row[0]) for p, row in zip(prompts, table)}
        train = [p for p in prompts if p.split == "train"]
        test = [p for p in prompts if p.split == "test"]
        train_split = _split(train, [p.reference_len for p in train], [plen[p.conv_id] for p in train])
        if turns == "all":
            later = [t for t in load_later_turns(served_token_counter()) if t.split == "train"]
            train_split = _with_later_turns(train_split, later, turn_input)
        return LabelData(
            "reference" if turns == "first" else f"reference, all turns ({turn_input})",
            _head(train_split, max_train),
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


def served_token_counter():
    """Texts -> token counts in the served model's tokenizer, without special tokens (the unit of
    every length label)."""
    from rankserve.model.loader import load_model_dir, load_tokenizer

    tokenizer = load_tokenizer(load_model_dir())
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _with_later_turns(first: Split, later: list[LaterTurn], turn_input: str) -> Split:
    """``first`` followed by ``later`` in the fixed shuffled order; ids are ``conv_id:index``."""
    order = np.random.default_rng(LATER_TURN_SEED).permutation(len(later))
    later = [later[i] for i in order]
    return Split(
        first.ids + [f"{t.turn.conv_id}:{t.turn.index}" for t in later],
        first.texts + [t.turn.text(turn_input) for t in later],
        np.concatenate([first.lengths, np.array([t.reference_len for t in later], dtype=np.int64)]),
        np.concatenate([first.prompt_lens, np.array([t.prompt_len for t in later], dtype=np.int64)]),
    )


def _head(split: Split, n: int | None) -> Split:
    if n is None:
        return split
    return Split(split.ids[:n], split.texts[:n], split.lengths[:n], split.prompt_lens[:n],
                 None if split.second_seed is None else split.second_seed[:n])
