"""The engine on a wall clock: the step loop in its own thread, and an asyncio front.

The server's event loop never runs model code: it hands requests and aborts to the engine thread
through a queue, and the engine thread hands token deltas back with ``call_soon_threadsafe``.
Every accepted request ends with a final output: finished, aborted (client gone, shutdown), or
aborted because its computation failed (``ENGINE_ERROR``; the core keeps its neighbours running).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rankserve.core.request import FinishReason, Request
from rankserve.core.scheduler import STEP_SHAPE, SchedulerOutput
from rankserve.engine.core import ENGINE_ERROR, EngineCore
from rankserve.predict.scoring_thread import ScoringThread

log = logging.getLogger(__name__)


class WallClock:
    """Seconds since the engine started (monotonic)."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start


@dataclass
class RequestOutput:
    request: Request
    new_token_ids: list[int]
    finished: bool

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.request.finish_reason if self.finished else None


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class EngineStats:
    """Running totals of the engine thread's work, read by the server's /metrics.

    busy_s per second of wall time is the share of its capacity in use; scoring_s / busy_s is
    the predictor's share at admission (on the scoring thread, beside the steps, when there is
    one); scoring_wait_s is what the step loop lost to it; tokens / steps is the mean batch."""

    steps: int = 0
    busy_s: float = 0.0  # inside EngineCore.step (forward, sampling, scheduling, refinement)
    scoring_s: float = 0.0  # scoring arrivals (EngineCore.score), wherever it ran
    scoring_wait_s: float = 0.0  # the step loop's time scoring arrivals or waiting for their scores
    prefill_tokens: int = 0
    decode_tokens: int = 0
    predictor_failures: int = 0  # arrivals the predictor raised on (queued in arrival order)


class EngineLoop:
    """Runs ``EngineCore.step`` in a background thread while there is work. ``on_ended(req)``, if
    given, sees every request once as it ends (in the engine thread: it must be quick).

    Arrivals are scored between steps, or with ``scoring_thread`` on a scoring thread while the
    steps go on (not for a predictor that also refines every step, which would run on both
    threads at once); a request then queues once its score is back. Between steps is the default:
    on an Intel Xeon with AMX, a burst whose arrivals a ranker scored on the thread ran every
    later step about 1.4x slower, for the rest of the run (docs/RESULTS.md section 8).

    ``step_log``: append one JSON line per step that ran work (when it ended, its shape as the
    cost models see it, and its seconds) to this file; ``rankserve calibrate --from-steps`` fits a
    preset on it. Opened by ``start`` (a path it cannot write fails the caller, not the engine
    thread); should writing fail later, the log stops and the engine serves on."""

    def __init__(self, core: EngineCore, idle_wait_s: float = 0.05,
                 on_ended: Callable[[Request], None] | None = None, scoring_thread: bool = False,
                 step_log: Path | None = None) -> None:
        self.core = core
        self.step_log = step_log
        self._step_log: TextIO | None = None
        self.idle_wait_s = idle_wait_s
        self.on_ended = on_ended
        predictor = core.predictor
        self._scorer = (ScoringThread(self._timed_score) if scoring_thread and predictor is not None
                        and not predictor.refines else None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[str, tuple[Request, OutputCallback]] = {}
        self._emitted: dict[str, int] = {}
        self.stats = EngineStats()

    # ---- called from any thread ------------------------------------------------------------
    def start(self) -> None:
        if self.step_log is not None:  # line-buffered: each step readable at once
            self._step_log = open(self.step_log, "a", buffering=1, encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="rankserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still live end as aborted ("shutdown")."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._scorer is not None:
            self._scorer.stop(timeout)

    def submit(self, req: Request, on_output: OutputCallback) -> None:
        """Hand over a request. Raises ValueError at once if it could never run."""
        if self._stop.is_set():
            raise RuntimeError("the engine is stopped")
        self.core.scheduler.validate(req)
        req.arrival_time = self.core.scheduler.clock.now()
        self._inbox.put(("add", req, on_output))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        """Requests handed over and not yet running: queued, being scored, or still in the inbox."""
        scoring = self._scorer.in_flight if self._scorer is not None else 0
        return self.core.scheduler.num_queued + scoring + self._inbox.qsize()

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        self._inbox.put(("abort", request_id, reason))
        self._wake.set()

    def finish(self, request_id: str, reason: FinishReason = FinishReason.STOP) -> None:
        """End a request as finished (e.g. the server saw a stop string in its text)."""
        self._inbox.put(("finish", request_id, reason))
        self._wake.set()

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            _pin_torch_threads()
            self._step_until_stopped()
        finally:
            self._close_step_log()

    def _close_step_log(self) -> None:
        step_log, self._step_log = self._step_log, None
        if step_log is not None:
            try:
                step_log.close()
            except OSError:  # already reported by _log_step, or nothing left to lose
                pass

    def _log_step(self, out: SchedulerOutput, seconds: float) -> None:
        try:
            self._step_log.write(json.dumps(step_record(out, seconds, self.core.scheduler.clock.now())) + "\n")
        except (OSError, ValueError) as exc:  # a full disk must not stop the serving
            log.error("writing the step log %s failed (%s); no more steps are logged", self.step_log, exc)
            self._close_step_log()

    def _step_until_stopped(self) -> None:
        scheduler = self.core.scheduler
        while not self._stop.is_set():
            self._drain_inbox()
            if self._queue_scored(wait=not scheduler.has_work):
                continue  # nothing to run but scores to wait for: drain the inbox again meanwhile
            if not scheduler.has_work:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                out, _ = self.core.step()
            except Exception as exc:  # not one request's doing (the core isolates those): end them all
                log.exception("engine step failed")
                for req, _cb in list(self._live.values()):
                    self._end(req, f"{ENGINE_ERROR}: {exc}")
                continue
            seconds = time.perf_counter() - started
            stats = self.stats
            stats.busy_s += seconds
            stats.steps += 1
            if self._step_log is not None and not out.is_empty:
                self._log_step(out, seconds)
            stats.prefill_tokens += out.num_prefill_tokens
            stats.decode_tokens += out.num_decode_tokens
            for req in out.requests:
                self._emit(req)
        self._drain_inbox()
        for req, _cb in list(self._live.values()):
            self._end(req, "shutdown")

    def _drain_inbox(self) -> None:
        added: list[Request] = []
        while True:
            try:
                kind, first, second = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                if first.request_id in self._live:
                    first.abort_reason = f"duplicate request id {first.request_id!r}"
                    self.core.scheduler.abort(first, first.abort_reason)
                    second(RequestOutput(first, [], True))
                    continue
                self._live[first.request_id] = (first, second)
                self._emitted[first.request_id] = 0
                added.append(first)
            elif first in self._live:
                req = self._live[first][0]
                if kind == "finish":
                    self.core.scheduler.finish(req, second)
                    self._emit(req)
                else:
                    self._end(req, second)
        # An abort or finish drained with its own add has already ended that request.
        added = [req for req in added if not req.status.is_done]
        if not added:
            return
        if self._scorer is not None:
            self._scorer.submit(added)
            return
        started = time.perf_counter()
        failed, seconds = self._timed_score(added)
        self._queue(added, failed, seconds)
        self.stats.scoring_wait_s += time.perf_counter() - started

    def _timed_score(self, requests: list[Request]) -> tuple[list[Request], float]:
        started = time.perf_counter()
        return self.core.score(requests), time.perf_counter() - started

    def _queue_scored(self, wait: bool) -> bool:
        """Queue the batches the scoring thread has finished; with ``wait`` (the engine has nothing
        else to run), wait up to ``idle_wait_s`` for the next one. Returns whether it waited and
        scores are still due."""
        if self._scorer is None or not self._scorer.in_flight:
            return False
        started = time.perf_counter()
        for _, requests, outcome in self._scorer.results(wait, timeout=self.idle_wait_s):
            failed, seconds = outcome if isinstance(outcome, tuple) else (requests, 0.0)
            # Aborted or finished while being scored: already ended, nothing to queue.
            live = [req for req in requests if not req.status.is_done]
            self._queue(live, [req for req in failed if not req.status.is_done], seconds)
        if wait:
            self.stats.scoring_wait_s += time.perf_counter() - started
        return wait and not self.core.scheduler.has_work and self._scorer.in_flight > 0

    def _queue(self, requests: list[Request], failed: list[Request], scoring_s: float) -> None:
        self.stats.scoring_s += scoring_s
        try:
            self.stats.predictor_failures += self.core.queue_scored(requests, failed)
        except Exception as exc:
            log.exception("admission failed")
            for req in requests:
                self._end(req, f"rejected: {exc}")

    def _end(self, req: Request, reason: str) -> None:
        self.core.scheduler.abort(req, reason)
        self._emit(req)

    def _emit(self, req: Request) -> None:
        entry = self._live.get(req.request_id)
        if entry is None:
            return
        done = self._emitted[req.request_id]
        tokens = req.output_token_ids[done:]
        finished = req.status.is_done
        if not tokens and not finished:
            return
        self._emitted[req.request_id] = done + len(tokens)
        if finished:
            del self._live[req.request_id]
            del self._emitted[req.request_id]
            if self.on_ended is not None:
                try:
                    self.on_ended(req)
                except Exception:
                    log.exception("on_ended failed for %s", req.request_id)
        try:
            entry[1](RequestOutput(req, list(tokens), finished))
        except Exception:
            log.exception("output callback failed for %s", req.request_id)


def step_record(out: SchedulerOutput, seconds: float, now: float) -> dict[str, float]:
    """One line of a ``step_log``: when the step ended (engine clock), its shape, its seconds."""
    return {"t": round(now, 4), **dict(zip(STEP_SHAPE, out.step_shape)), "seconds": round(seconds, 6)}


def _pin_torch_threads() -> None:
    """Fix this thread's torch thread count now. ATen copies the process-wide count into a thread
    at its first op, and a scoring predictor lowers that count while it scores on one thread
    (``torch_threads``): an engine thread whose first op fell in that window ran on one thread for
    good (measured: steps 1.5x slower for a whole run)."""
    torch = sys.modules.get("torch")  # the simulator's engine never loads it
    if torch is not None:
        torch.get_num_threads()


class AsyncEngine:
    """``async for output in engine.generate(request)``; cancelling the iteration (a client that
    disconnects) aborts the request and frees its KV blocks at once."""

    def __init__(self, core: EngineCore, on_ended: Callable[[Request], None] | None = None,
                 scoring_thread: bool = False, step_log: Path | None = None) -> None:
        self.loop = EngineLoop(core, on_ended=on_ended, scoring_thread=scoring_thread, step_log=step_log)
        self.loop.start()

    async def generate(self, req: Request, on_end: Callable[[Request], None] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come. ``on_end(req)`` runs in the engine thread when the
        request ends, however it ends (also after the caller stopped iterating)."""
        event_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            if out.finished and on_end is not None:
                on_end(out.request)
            if not event_loop.is_closed():  # after the server stopped, nobody is listening
                event_loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.loop.submit(req, deliver)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(req.request_id, "client disconnected")

    def shutdown(self) -> None:
        self.loop.stop()
