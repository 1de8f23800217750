"""Scoring prompts once at the router: the length predictor and a token counter, run in batches on
one worker thread so that the event loop keeps streaming while a batch is scored.

Requests that arrive while a batch is being scored form the next batch (no added wait). A failure
never holds a request back: it goes on without a score (the backend serves it in arrival order)
and is counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rankserve.core.request import Request
from rankserve.predict.base import Predictor
from rankserve.route.body import Prompt
from rankserve.route.policies import ROUTERS

TokenCounter = Callable[[Sequence[str]], list[int]]


def approximate_tokens(texts: Sequence[str]) -> list[int]:
    """About four characters per token (English BPE): the count when no tokenizer is given."""
    return [len(t) // 4 + 1 for t in texts]


def choose_predictor(name: str, router: str, mode: str) -> str | None:
    """The predictor ``--predictor auto`` stands for (None: no scoring)."""
    if name != "auto":
        return None if name == "none" else name
    if ROUTERS[router].needs_prediction:
        return "classifier"
    return "ranker" if mode != "none" else None


@dataclass(frozen=True)
class Scored:
    score: float | None  # rank score, lower = shorter; None when scoring failed or had no text
    predicted_len: float | None  # predicted output tokens, when the predictor gives lengths
    prompt_tokens: int


class PromptScorer:
    """``await scorer.score(prompt)`` -> Scored. ``predictor`` None: no scores, only token counts."""

    def __init__(self, predictor: Predictor | None, count_tokens: TokenCounter = approximate_tokens) -> None:
        self.predictor = predictor
        self.count_tokens = count_tokens
        self.num_scored = 0
        self.failures: dict[str, int] = {}  # reason -> requests forwarded without a score
        self.num_batches = 0
        self._pending: list[tuple[Prompt, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankserve-route-score")

    async def score(self, prompt: Prompt) -> Scored:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await asyncio.shield(future)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _fail(self, reason: str, n: int) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + n

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._thread, self._score_batch, [p for p, _ in batch])
            except Exception:  # the worker itself broke: the requests still go on
                self._fail("error", len(batch))
                results = [Scored(None, None, p.num_tokens or 1) for p, _ in batch]
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _score_batch(self, prompts: Sequence[Prompt]) -> list[Scored]:
        self.num_batches += 1
        to_count = [p.all_text for p in prompts if p.num_tokens is None]
        try:
            counted = iter(self.count_tokens(to_count) if to_count else [])
        except Exception:
            counted = iter(approximate_tokens(to_count))
        tokens = [p.num_tokens if p.num_tokens is not None else next(counted) for p in prompts]
        scores: list[tuple[float | None, float | None]] = [(None, None)] * len(prompts)
        if self.predictor is not None:
            texts = [i for i, p in enumerate(prompts) if p.text]
            if len(texts) < len(prompts):
                self._fail("no_text", len(prompts) - len(texts))
            requests = [Request([0], prompt_text=prompts[i].text, request_id=uuid.uuid4().hex) for i in texts]
            try:
                if requests:
                    self.predictor.score(requests)
                for i, req in zip(texts, requests):
                    scores[i] = (req.score, req.predicted_len)
                self.num_scored += len(requests)
            except Exception:
                self._fail("error", len(requests))
        return [Scored(s, n, max(int(t), 1)) for (s, n), t in zip(scores, tokens)]
