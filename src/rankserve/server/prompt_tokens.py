"""Counting prompt tokens outside the engine (the router's load trackers need them before a backend
has seen the request): the served model's tokenizer, offline, or four characters per token."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rankserve.route.scoring import TokenCounter, approximate_tokens


def token_counter(spec: str) -> TokenCounter:
    """``spec``: a model name (the embedded one by default), a local tokenizer directory, or
    ``approx``. Raises OSError / ValueError when the tokenizer cannot be loaded."""
    if spec == "approx":
        return approximate_tokens
    os.environ["HF_HUB_OFFLINE"] = "1"
    if Path(spec).expanduser().is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(spec).expanduser())
    else:
        from rankserve.model.loader import load_model_dir, load_tokenizer

        tokenizer = load_tokenizer(load_model_dir(spec))

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count
