"""What the router reads from an OpenAI request body, and how it writes the score onto it.

The body is forwarded as the client sent it except for one field, chosen by the mode:

- ``priority``: vLLM's ``priority`` (an int, lower runs first) for a stock vLLM started with
  ``--scheduling-policy priority``, or ``rankserve serve --policy priority``;
- ``xargs``: ``vllm_xargs[KEY] = score`` (a float, lower = shorter) and, when the predictor gives
  lengths, ``vllm_xargs["rankserve_predicted_len"]`` for rankserve's vLLM scheduler class
  (``rankserve.integrations.vllm``), which reads them from ``SamplingParams.extra_args``;
- ``none``: nothing (the backend scores the prompt itself, e.g. ``rankserve serve --policy ltr``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORE_MODES = ("priority", "xargs", "none")
DEFAULT_XARGS_KEY = "rankserve_score"
XARGS_LENGTH_KEY = "rankserve_predicted_len"  # the vLLM scheduler class's name for it
DEFAULT_PRIORITY_SCALE = 1000.0  # the ranker's scores span about one unit: keep three decimals


@dataclass(frozen=True)
class Prompt:
    """The prompt as the router needs it: ``text`` for the length predictor (a chat request's user
    turns, as the server scores them; None for token-id prompts), ``all_text`` for counting the
    tokens to prefill, or ``num_tokens`` when the client sent token ids."""

    text: str | None
    all_text: str
    num_tokens: int | None = None


def _content_text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (only text parts count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def read_prompt(chat: bool, body: dict) -> Prompt:
    """The prompt of a completion (``chat`` False) or chat completion body. Raises ValueError when
    the body has none (the router answers 400 without forwarding)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a non-empty list of message objects")
        user = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "user")
        every = "\n".join(_content_text(m.get("content")) for m in messages)
        return Prompt(user or None, every)
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return Prompt(prompt, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        joined = "\n".join(prompt)
        return Prompt(joined, joined)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return Prompt(None, "", len(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return Prompt(None, "", sum(len(p) for p in prompt))
    raise ValueError("prompt must be a non-empty string, list of strings or list of token ids")


def max_tokens_of(chat: bool, body: dict) -> int | None:
    """The client's output cap, when it gave one (OpenAI's completions default to 16)."""
    value = (body.get("max_completion_tokens") or body.get("max_tokens")) if chat else body.get("max_tokens", 16)
    return value if isinstance(value, int) and value > 0 else None


def score_to_priority(score: float, scale: float = DEFAULT_PRIORITY_SCALE) -> int:
    """vLLM's priority for a rank score: the same order (lower first), as an int."""
    return round(score * scale)


def mark_score(body: dict, mode: str, score: float | None, predicted_len: float | None = None,
               xargs_key: str = DEFAULT_XARGS_KEY, priority_scale: float = DEFAULT_PRIORITY_SCALE) -> dict:
    """The body to forward. Without a score it is the client's, unchanged (the backend then serves
    the request in its arrival order); a client's own ``priority`` is kept."""
    if score is None or mode == "none":
        return body
    if mode == "priority":
        return body if "priority" in body else {**body, "priority": score_to_priority(score, priority_scale)}
    if mode == "xargs":
        xargs = {**(body["vllm_xargs"] if isinstance(body.get("vllm_xargs"), dict) else {}), xargs_key: float(score)}
        if predicted_len is not None:
            xargs[XARGS_LENGTH_KEY] = float(predicted_len)
        return {**body, "vllm_xargs": xargs}
    raise ValueError(f"unknown score mode {mode!r} (choose from {', '.join(SCORE_MODES)})")
