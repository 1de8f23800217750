"""Token ids -> text as they stream, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TextTokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


class TextStream:
    """Decodes a growing list of output tokens into text deltas.

    Text that could still turn out to be the start of a stop string, or that ends in an
    incomplete UTF-8 sequence, is held back until the next tokens (or the end) settle it.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # the text emitted so far
        self.stopped = False

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the new text to emit. Sets ``stopped`` when a stop string appears
        (the text is cut just before it)."""
        self.token_ids.extend(new_ids)
        full = self.tokenizer.decode(self.token_ids)
        for stop in self.stop:
            at = full.find(stop, max(0, len(self.text) - len(stop)))
            if at != -1:
                full = full[:at]
                self.stopped = final = True
        end = len(full)
        if not final:
            end -= self._hold
            while end > len(self.text) and full[end - 1] == "\ufffd":
                end -= 1  # an incomplete multi-byte character: wait for its other bytes
        if end <= len(self.text):
            return ""
        delta = full[len(self.text) : end]
        self.text = full[:end]
        return delta
