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
    """Decodes a growing list of output tokens into text deltas, incrementally.

    Each push decodes only a short window: the tokens since the last settled text plus a few
    before them for context (a token's text can depend on its neighbours: leading spaces, bytes
    of one character split over tokens), so a stream of n tokens costs O(n), not O(n^2).
    Text that could still turn out to be the start of a stop string, or that ends in an
    incomplete UTF-8 sequence, is held back until the next tokens (or the end) settle it.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.stopped = False
        self._pending = ""  # settled text not emitted yet (at most the held-back tail and a delta)
        self._context = 0  # the window decodes token_ids[_context:]; [_context:_read] is settled
        self._read = 0

    def _decode_new(self, final: bool) -> str:
        """The text of the tokens past ``_read``, once it is complete ("" until then)."""
        ids = self.token_ids
        before = self.tokenizer.decode(ids[self._context : self._read])
        window = self.tokenizer.decode(ids[self._context :])
        if len(window) <= len(before) or (window.endswith("\ufffd") and not final):
            return ""  # nothing yet, or an incomplete multi-byte character: wait for its other bytes
        self._context, self._read = self._read, len(ids)
        return window[len(before) :]

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the new text to emit. Sets ``stopped`` when a stop string appears
        (the text is cut just before it). A stop string can only end in new text and the held-back
        tail is as long as the longest one but a character, so it lies within ``_pending``."""
        self.token_ids.extend(new_ids)
        self._pending += self._decode_new(final)
        for stop in self.stop:
            at = self._pending.find(stop)
            if at != -1:
                self._pending = self._pending[:at]
                self.stopped = final = True
        n = len(self._pending) - (0 if final else self._hold)
        if n <= 0:
            return ""
        delta, self._pending = self._pending[:n], self._pending[n:]
        return delta
