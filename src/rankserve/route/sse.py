"""Server-sent events as they pass through the router: whole events out of a byte stream, and the
output tokens an OpenAI stream event (or a whole answer) carries."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

_END_OF_EVENT = re.compile(rb"\r?\n\r?\n")


class EventReader:
    """Splits a byte stream into whole SSE events (each with its blank-line terminator), so that a
    stream cut by a failing backend is never forwarded half an event."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._ended = False

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> bytes:
        while True:
            end = _END_OF_EVENT.search(self._buffer)
            if end is not None:
                event, self._buffer = self._buffer[: end.end()], self._buffer[end.end():]
                return event
            if self._ended:
                if self._buffer.strip():  # a last event without its blank line
                    event, self._buffer = self._buffer, b""
                    return event
                raise StopAsyncIteration
            try:
                self._buffer += await anext(self._chunks)
            except StopAsyncIteration:
                self._ended = True


def output_tokens(event: bytes) -> int:
    """Output tokens in one OpenAI stream event: one per choice whose text or delta content is not
    empty (servers send a chunk per token); 0 for [DONE], usage-only chunks and comments."""
    count = 0
    for line in event.splitlines():
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            continue
        choices = data.get("choices") if isinstance(data, dict) else None
        for choice in choices or ():
            if isinstance(choice, dict) and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                count += 1
    return count


def completion_tokens(answer: bytes) -> int | None:
    """``usage.completion_tokens`` of a whole (non-streamed) OpenAI answer; None if it has none."""
    try:
        usage = json.loads(answer).get("usage") or {}
        tokens = usage.get("completion_tokens")
    except (ValueError, AttributeError):
        return None
    return tokens if isinstance(tokens, int) and tokens >= 0 else None


def error_event(message: str, status: int = 502) -> bytes:
    """A final error event in vLLM's form, then [DONE]: how a stream that already started ends when
    its backend fails (the OpenAI client raises it as an APIError)."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
