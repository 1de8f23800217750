"""OpenAI request bodies (and vLLM's extensions), validated by pydantic.

Everything the engine could choke on is refused here or in ``sampling`` (400), never inside a step:
token ids are checked against the model's vocabulary, seeds against vLLM's signed 64-bit range,
floats must be finite, text must be valid Unicode.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rankserve.core.request import SamplingParams

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # vLLM's range (torch's generator takes it too)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias


def _valid_unicode(text: str) -> str:
    """Reject lone surrogates (JSON "\\ud800"): no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode at character {exc.start}") from None
    return text


class InvalidField(ValueError):
    """A field's value the engine cannot take; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def check_token_ids(ids: list[int], vocab_size: int, name: str) -> None:
    """Raise InvalidField if an id is outside [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidField(name, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n = 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM extensions
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    priority: int = Field(0, ge=SEED_MIN, le=SEED_MAX)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return [_valid_unicode(s) for s in value] if value is not None else None

    def _logit_bias(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidField("logit_bias", f"key {key!r} is not a token id") from None
            check_token_ids([token], vocab_size, "logit_bias")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise InvalidField("logit_bias", f"bias {bias} for token {token} is outside [-100, 100]")
            pairs.append((token, bias))
        return tuple(pairs)

    def sampling(self, max_tokens: int, eos_token_id: int | None, vocab_size: int) -> SamplingParams:
        """The engine's parameters; raises ValueError on ids outside the vocabulary."""
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        stop_ids = tuple(self.stop_token_ids)
        # ignore_eos drops only EOS: explicit stop_token_ids still stop the request (as in vLLM).
        if eos_token_id is not None and eos_token_id not in stop_ids and not self.ignore_eos:
            stop_ids += (eos_token_id,)
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop_token_ids=stop_ids,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            logit_bias=self._logit_bias(vocab_size),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return _valid_unicode(value) if isinstance(value, str) else value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return _valid_unicode(value)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
