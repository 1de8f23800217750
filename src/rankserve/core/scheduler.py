"""The one scheduler: picks each step's batch; the executor runs it; ``update`` applies the result.

Each step (``schedule``):
1. the policy may change queued requests' keys (e.g. starvation boosts);
2. rank preemption: while ``max_num_seqs`` binds and the best queued request should displace the
   worst preemptible running one, that one pauses (its KV cache stays on the device);
3. running requests get their next tokens (one per decode, a chunk of a prefill) under the token
   budget; a request short of KV blocks first evicts paused requests, then the lowest-ranked
   running ones (swap to host or drop for recompute, as configured);
4. queued requests are admitted best first while slots, budget and blocks allow.
The queue is a heap keyed by the policy: a step costs O(log n) in the queue length.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rankserve.core.block_manager import BlockManager
from rankserve.core.clock import Clock
from rankserve.core.policies.base import Policy
from rankserve.core.request import FinishReason, Request, RequestStatus

_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING
_PAUSED = RequestStatus.PREEMPTED_PAUSED
_SWAPPED = RequestStatus.PREEMPTED_SWAPPED
_RECOMPUTE = RequestStatus.PREEMPTED_RECOMPUTE


def displaced_by_rank(policy: Policy, running: Iterable[Request], queued_best_first: Iterator[Request]) -> list[Request]:
    """Algorithm 1's rank preemption: the running requests that queued ones should displace.

    The worst-ranked preemptible running request is paired with the best queued one, the next
    worst with the next best, while the queued one should take the running one's place; nobody is
    displaced while the best queued request would rather wait for a slot (a patient policy). The
    iterator is consumed only as far as needed (one past the last displacement). Shared by this
    scheduler and the vLLM integration, so both preempt by the same rule."""
    running = list(running)
    victims = [r for r in running if policy.may_be_preempted(r)]
    if not victims:
        return []
    best = next(queued_best_first, None)
    worst = max(victims, key=policy.key)
    if best is None or not policy.should_preempt(worst, best) or policy.waits_for_a_slot(best, running):
        return []  # the common case: one comparison, no sort
    victims.sort(key=policy.key, reverse=True)
    displaced: list[Request] = []
    for victim, cand in zip(victims, itertools.chain([best], queued_best_first)):
        if not policy.should_preempt(victim, cand):
            break
        displaced.append(victim)
    return displaced


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    preemption_mode: str = "swap"  # "swap" (to the host pool when it has room) or "recompute"
    # Reject requests that can never fit; the executor's context limit.
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(f"preemption_mode must be 'swap' or 'recompute', got {self.preemption_mode!r}")


# The step's shape as cost models take it (``CostModel.step_time``'s arguments, in order).
STEP_SHAPE = ("prefill_tokens", "decode_tokens", "kv_tokens", "attn_pairs", "num_seqs")


@dataclass
class SchedulerOutput:
    """The one message from scheduler to executor."""

    step: int
    requests: list[Request] = field(default_factory=list)  # in batch order
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute for each request
    # Block copies. Executors perform every swap-out before any swap-in, then the forward pass:
    # a device block swapped out may be reused by a swap-in or an allocation of the same step.
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)
    preempted: list[Request] = field(default_factory=list)
    # Shape of the step, summed while scheduling (cost models and metrics read these).
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    kv_tokens: int = 0  # context length after the step, summed over the batch
    attn_pairs: int = 0  # tokens computed x context length, summed over the batch

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.swap_out and not self.swap_in

    @property
    def step_shape(self) -> tuple[int, int, int, int, int]:
        """The values of ``STEP_SHAPE`` for this step."""
        return (self.num_prefill_tokens, self.num_decode_tokens, self.kv_tokens, self.attn_pairs, len(self.requests))


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy,
        block_manager: BlockManager,
        clock: Clock,
    ) -> None:
        self.config = config
        self.policy = policy
        self.blocks = block_manager
        self.clock = clock
        self.step_count = 0
        self.running: dict[int, Request] = {}  # seq -> request, in admission order
        self.paused: dict[int, Request] = {}  # queued with their KV cache still on the device
        self._queue: list[tuple[tuple, int, Request]] = []  # (key, version, request)
        self._num_queued = 0
        self.num_preemptions = 0
        self.num_swaps = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a new request. Raises ValueError if it could never fit."""
        self.validate(req)
        req.last_run_step = self.step_count
        self._enqueue(req)

    def validate(self, req: Request) -> None:
        """Raise ValueError if ``req`` is not new or could never run. Reads only the
        configuration, so another thread may call it (a server, before handing the request over)."""
        if req.status is not _WAITING or req.num_computed_tokens or req.output_token_ids:
            raise ValueError(f"request {req.request_id} is not new")
        total = req.prompt_len + req.sampling.max_tokens
        limit = self.config.max_model_len
        if limit is not None and total > limit:
            raise ValueError(
                f"prompt ({req.prompt_len}) + max_tokens ({req.sampling.max_tokens}) = {total} tokens "
                f"exceeds the context limit of {limit}"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and total - 1 > budget:
            # Unchunked, a prefill (or a recompute of prompt + output so far) must fit one step;
            # the longest is prompt + max_tokens - 1 (the last token is never computed).
            raise ValueError(
                f"prompt ({req.prompt_len}) + max_tokens ({req.sampling.max_tokens}) = {total} tokens "
                f"exceeds max_num_batched_tokens ({budget}) with chunked prefill off"
            )
        need = self.blocks.extra_blocks_for(req, total)
        if need > self.blocks.device.num_blocks:
            raise ValueError(
                f"request {req.request_id} needs {need} KV blocks, the device pool has "
                f"{self.blocks.device.num_blocks}"
            )

    def abort(self, req: Request, reason: str = "aborted") -> None:
        """End ``req`` now wherever it is; frees its blocks at once."""
        if req.status.is_done:
            return
        req.abort_reason = reason
        self._end(req, FinishReason.ABORT, RequestStatus.ABORTED)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End ``req`` as finished (the engine calls this, e.g. on a stop string)."""
        if not req.status.is_done:
            self._end(req, reason, RequestStatus.FINISHED)

    def _end(self, req: Request, reason: FinishReason, status: RequestStatus) -> None:
        if req.queue_version == 0:  # never added: nothing of it to release, not counted as queued
            req.status, req.finish_reason, req.finished_time = status, reason, self.clock.now()
            return
        self._finish(req, reason, self.clock.now(), status)

    @property
    def num_queued(self) -> int:
        return self._num_queued

    @property
    def has_work(self) -> bool:
        return bool(self.running) or self._num_queued > 0

    def live_requests(self) -> list[Request]:
        """Every unfinished request the scheduler holds (for invariant checks and shutdown)."""
        queued = {e[2].seq: e[2] for e in self._queue if e[2].status.is_queued}
        return list(self.running.values()) + list(queued.values())

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = self.step_count
        out = SchedulerOutput(step)
        for req in self.policy.begin_step(step, self.clock.now()):
            if req.status.is_queued:
                self._requeue(req)
        if self.policy.preemptive and self._num_queued and len(self.running) >= self.config.max_num_seqs:
            self._preempt_by_rank(out)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        self._admit(out, budget)
        self.blocks.end_step()
        self._measure(out)
        return out

    def update(self, out: SchedulerOutput, sampled: list[int] | None, now: float) -> list[Request]:
        """Apply a finished step. ``sampled[i]`` is the token sampled for ``out.requests[i]``
        (read only where the request reached the end of its tokens); None samples token 0
        (simulation). Returns the requests that finished."""
        ran: list[Request] = []
        finished: list[tuple[Request, FinishReason]] = []
        step = out.step
        for i, (req, n) in enumerate(zip(out.requests, out.num_tokens)):
            if req.status is not _RUNNING:  # aborted while the step ran
                continue
            ran.append(req)
            computed = req.num_computed_tokens + n
            req.num_computed_tokens = computed
            req.last_run_step = step
            if computed < req.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            token = 0 if sampled is None else sampled[i]
            req.record_token(token, now)
            reason = self._stop_reason(req, token)
            if reason is not None:
                finished.append((req, reason))
        # The policy learns from the step before finished requests' state is dropped.
        self.policy.end_step(ran, step, now)
        for req, reason in finished:
            self._finish(req, reason, now, RequestStatus.FINISHED)
        self.step_count += 1
        return [req for req, _ in finished]

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _stop_reason(req: Request, token: int) -> FinishReason | None:
        sp = req.sampling
        n = len(req.output_token_ids)
        if n >= sp.max_tokens:
            return FinishReason.LENGTH
        if sp.stop_token_ids and n >= sp.min_tokens and token in sp.stop_token_ids:
            return FinishReason.STOP
        return None

    def _finish(self, req: Request, reason: FinishReason, now: float, status: RequestStatus) -> None:
        if req.status is _RUNNING:
            del self.running[req.seq]
        elif req.status.is_queued:
            self._num_queued -= 1
            self.paused.pop(req.seq, None)
            self._drop_stale_entries()  # its heap entry is stale now
        if req.block_table:
            self.blocks.free(req)
        req.status = status
        req.finish_reason = reason
        req.finished_time = now
        self.policy.on_finish(req)

    def _enqueue(self, req: Request) -> None:
        self._num_queued += 1
        self.policy.on_enqueue(req, self.step_count)
        req.queue_version += 1
        heapq.heappush(self._queue, (self.policy.key(req), req.queue_version, req))

    def _requeue(self, req: Request) -> None:
        """Re-insert a queued request whose key changed; its old heap entry goes stale."""
        req.queue_version += 1
        heapq.heappush(self._queue, (self.policy.key(req), req.queue_version, req))
        self._drop_stale_entries()

    def _drop_stale_entries(self) -> None:
        """Rebuild the heap once stale entries (aborted or re-keyed requests) outnumber live ones:
        otherwise those ranked low never surface and pin finished requests. Amortised O(log n)."""
        q = self._queue
        if len(q) <= 2 * self._num_queued + 64:
            return
        self._queue = [e for e in q if e[1] == e[2].queue_version and e[2].status.is_queued]
        heapq.heapify(self._queue)

    def _peek(self) -> Request | None:
        q = self._queue
        while q:
            _, version, req = q[0]
            if version == req.queue_version and req.status.is_queued:
                return req
            heapq.heappop(q)  # stale: re-keyed, admitted or finished since it was pushed
        return None

    def _pop(self) -> Request | None:
        req = self._peek()
        if req is not None:
            heapq.heappop(self._queue)
            self._num_queued -= 1
        return req

    def _push_back(self, req: Request) -> None:
        """Undo a ``_pop`` without changing the request's key or version."""
        self._num_queued += 1
        heapq.heappush(self._queue, (self.policy.key(req), req.queue_version, req))

    def _preempt_by_rank(self, out: SchedulerOutput) -> None:
        popped: list[Request] = []

        def queued_best_first() -> Iterator[Request]:
            while (cand := self._pop()) is not None:
                popped.append(cand)
                yield cand

        displaced = displaced_by_rank(self.policy, self.running.values(), queued_best_first())
        for cand in popped:
            self._push_back(cand)
        for victim in displaced:
            self._preempt(victim, out, evict=False)

    def _preempt(self, req: Request, out: SchedulerOutput, evict: bool) -> None:
        """Take a running request out of the batch: pause it, or evict its KV cache too."""
        del self.running[req.seq]
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        if evict:
            self._evict_kv(req, out)
        else:
            req.status = _PAUSED
            self.paused[req.seq] = req
        self._enqueue(req)

    def _evict_kv(self, req: Request, out: SchedulerOutput) -> None:
        """Move a (paused or running) request's KV cache off the device."""
        self.paused.pop(req.seq, None)
        if self.config.preemption_mode == "swap" and self.blocks.can_swap_out(req):
            out.swap_out.extend(self.blocks.swap_out(req))
            req.status = _SWAPPED
            self.num_swaps += 1
        else:
            self.blocks.free(req)
            req.num_computed_tokens = 0
            req.status = _RECOMPUTE

    def _make_room(self, need: int, out: SchedulerOutput, rank_key: tuple | None, exclude: Request) -> bool:
        """Evict paused requests, lowest-ranked first, until ``need`` device blocks are free.
        With ``rank_key`` only those ranked below it, and only if that frees enough: an
        admission that fails anyway should not cost swaps."""
        blocks = self.blocks
        if need <= blocks.num_free_device_blocks:
            return True
        key = self.policy.key
        victims = [r for r in self.paused.values() if r is not exclude and (rank_key is None or key(r) > rank_key)]
        if rank_key is not None and blocks.num_free_device_blocks + sum(len(r.block_table) for r in victims) < need:
            return False
        victims.sort(key=key, reverse=True)
        for victim in victims:
            if need <= blocks.num_free_device_blocks:
                break
            self._evict_kv(victim, out)
        return need <= blocks.num_free_device_blocks

    @staticmethod
    def _measure(out: SchedulerOutput) -> None:
        """Sum the step's shape over the batch (one tight pass; this runs every step)."""
        prefill = decode = kv = pairs = 0
        for req, n in zip(out.requests, out.num_tokens):
            ctx = req.num_computed_tokens + n
            kv += ctx
            pairs += n * ctx
            if n == 1 and req.output_token_ids:
                decode += 1
            else:
                prefill += n
        out.num_prefill_tokens = prefill
        out.num_decode_tokens = decode
        out.kv_tokens = kv
        out.attn_pairs = pairs

    def _tokens_to_compute(self, req: Request, budget: int) -> int:
        """All the tokens ``req`` has left to compute, or a chunk that fills the budget;
        0 if it must wait for a bigger budget (chunked prefill off)."""
        n = req.num_tokens - req.num_computed_tokens
        if n <= budget:
            return n
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        blocks = self.blocks
        block_size = blocks.block_size
        batch, batch_tokens = out.requests, out.num_tokens
        order = list(self.running.values())
        for i, req in enumerate(order):
            if budget <= 0:
                break
            if req.status is not _RUNNING:  # evicted earlier in this loop
                continue
            n = self._tokens_to_compute(req, budget)
            if not n:
                continue
            target = req.num_computed_tokens + n
            if target <= len(req.block_table) * block_size:  # the common case: room in the last block
                batch.append(req)
                batch_tokens.append(n)
                budget -= n
                continue
            while not blocks.allocate(req, target):
                need = blocks.extra_blocks_for(req, target)
                if self._make_room(need, out, None, req):
                    continue
                # The lowest-ranked request not yet in this step's batch (``req`` at worst).
                victim = max((r for r in order[i:] if r.status is _RUNNING), key=self.policy.key)
                self._preempt(victim, out, evict=True)
                if victim is req:
                    break
            if req.status is _RUNNING:
                batch.append(req)
                batch_tokens.append(n)
                budget -= n
        return budget

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        blocks = self.blocks
        max_seqs = self.config.max_num_seqs
        while budget > 0 and len(self.running) < max_seqs:
            req = self._peek()
            if req is None:
                return
            n = self._tokens_to_compute(req, budget)
            if not n:
                return
            target = req.num_computed_tokens + n
            swapped = req.status is _SWAPPED
            have = 0 if swapped else len(req.block_table)
            need = max(blocks.blocks_for(target), len(req.block_table)) - have
            if need > blocks.num_free_device_blocks and not self._make_room(
                need, out, self.policy.key(req), req
            ):
                return
            self._pop()
            if swapped:
                out.swap_in.extend(blocks.swap_in(req))
            elif req.status is _PAUSED:
                del self.paused[req.seq]
            blocks.allocate(req, target)
            req.status = _RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self.clock.now()
            self.running[req.seq] = req
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
