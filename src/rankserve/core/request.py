"""The one Request type shared by the scheduler, the engine, the simulator and the benchmarks."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never run, or waiting to prefill again after recompute preemption
    RUNNING = "running"
    # Preempted by rank but KV cache still on the device: resuming costs nothing (the
    # learning-to-rank paper's "pause"). Evicted to one of the two states below under memory pressure.
    PREEMPTED_PAUSED = "preempted-paused"
    PREEMPTED_SWAPPED = "preempted-swapped"  # KV cache in the host pool
    PREEMPTED_RECOMPUTE = "preempted-recompute"  # KV cache dropped; prompt + output prefilled again
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)

    @property
    def is_queued(self) -> bool:
        """Waiting for a slot in the batch (in the scheduler's queue)."""
        return self in _QUEUED


_QUEUED = frozenset(
    {
        RequestStatus.WAITING,
        RequestStatus.PREEMPTED_PAUSED,
        RequestStatus.PREEMPTED_SWAPPED,
        RequestStatus.PREEMPTED_RECOMPUTE,
    }
)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


_request_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """A request and everything that happens to it.

    Token accounting follows vLLM V1: ``num_computed_tokens`` counts tokens whose KV is in the cache;
    the tokens still to compute are ``num_tokens - num_computed_tokens`` (the whole prompt at first,
    then one per decode step, prompt + output again after recompute preemption).
    """

    prompt_token_ids: Sequence[int]  # a list; the simulator passes range(n) to save memory
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    priority: int = 0  # client-given, lower runs first (vLLM convention)
    request_id: str = ""
    # Known true output length (simulation, replayed traces): what the oracle predictor reads.
    oracle_output_len: int | None = None
    # The prompt as text, for predictors that read text (a chat request: its user turns).
    prompt_text: str | None = None
    # Keep a timestamp for every token. Long simulations turn it off and keep running aggregates.
    record_token_times: bool = True

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    abort_reason: str | None = None

    # Predictions. ``score``: rank score from a prompt-side predictor, lower = shorter = runs first.
    # ``predicted_len``: estimated total output length, when the predictor gives lengths; refined
    # during decoding by per-step predictors. ``initial_predicted_len`` is kept for limited preemption.
    score: float | None = None
    predicted_len: float | None = None
    initial_predicted_len: float | None = None

    # Timestamps and counters (filled in by the scheduler).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    max_token_gap: float = 0.0
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    # Scheduler-private bookkeeping.
    seq: int = field(default_factory=lambda: next(_request_ids))
    block_table: list[int] = field(default_factory=list)
    queue_version: int = 0
    last_run_step: int = 0
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        # prompt + output tokens; a plain attribute because the scheduler reads it every step.
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)
        if not self.request_id:
            self.request_id = f"req-{self.seq}"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def predicted_remaining(self) -> float:
        """Estimated output tokens still to come (0 when unknown or overrun)."""
        if self.predicted_len is None:
            return 0.0
        return max(self.predicted_len - len(self.output_token_ids), 0.0)

    def set_prediction(self, score: float, predicted_len: float | None = None) -> None:
        self.score = score
        self.predicted_len = predicted_len
        if self.initial_predicted_len is None:
            self.initial_predicted_len = predicted_len

    def record_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            gap = now - self.last_token_time
            if gap > self.max_token_gap:
                self.max_token_gap = gap
        self.last_token_time = now
        if self.record_token_times:
            self.token_times.append(now)
