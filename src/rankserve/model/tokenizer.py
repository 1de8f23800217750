"""The model's Hugging Face tokenizer behind the server's ``TextTokenizer`` protocol (encode, decode,
chat template): what the server, the labelling and the benchmarks tokenize with."""

from __future__ import annotations

from collections.abc import Sequence


class HFTextTokenizer:
    """transformers' tokenizer behind the server's TextTokenizer protocol."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
