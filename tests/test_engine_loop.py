"""The wall-clock engine front with a fake executor: streaming, stop tokens, aborts, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import wait_until

from rankserve.core import (
    BlockManager,
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    make_policy,
)
from rankserve.predict.base import Predictor
from rankserve.engine import ENGINE_ERROR, AsyncEngine, EngineCore, EngineLoop, WallClock


class CountingExecutor:
    """Samples token (tokens so far + 1) % 50 for each request; can sleep or fail on demand: once
    (``fail_next``), or on every step holding a request of ``poisoned`` (its ids)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.fail_next = False
        self.poisoned: set[str] = set()

    def execute(self, out):
        time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        if any(r.request_id in self.poisoned for r in out.requests):
            raise IndexError("index out of range in self")
        return [(r.num_output_tokens + 1) % 50 for r in out.requests]

    def hidden_states(self):
        return None


def make_engine(delay_s: float = 0.0, blocks: int = 64) -> tuple[AsyncEngine, CountingExecutor, BlockManager]:
    clock = WallClock()
    pool = BlockManager(blocks, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"), pool, clock)
    executor = CountingExecutor(delay_s)
    return AsyncEngine(EngineCore(scheduler, executor)), executor, pool


def request(max_tokens: int, **params) -> Request:
    return Request(list(range(5)), SamplingParams(max_tokens=max_tokens, **params))


async def collect(engine: AsyncEngine, req: Request) -> list:
    return [out async for out in engine.generate(req)]


def test_streams_every_token_once_and_finishes():
    engine, _, pool = make_engine()
    try:
        reqs = [request(n, ignore_eos=True) for n in (3, 17, 9, 30, 1, 12)]

        async def main():
            return await asyncio.gather(*(collect(engine, r) for r in reqs))

        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for req, outs in zip(reqs, results):
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == [(i + 1) % 50 for i in range(req.sampling.max_tokens)]
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert not any(o.finished for o in outs[:-1])
    assert pool.num_free_device_blocks == 64


def test_a_stop_token_counts_only_from_min_tokens_on():
    """The executor samples 1, 2, 3, ...: stop token 2 comes before min_tokens=4 and is passed
    over; stop token 6 comes after and ends the request."""
    engine, _, _ = make_engine()
    try:
        outs = asyncio.run(collect(engine, request(40, stop_token_ids=(2, 6), min_tokens=4)))
    finally:
        engine.shutdown()
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == [1, 2, 3, 4, 5, 6] and outs[-1].finish_reason is FinishReason.STOP


def test_ignore_eos_keeps_explicit_stop_token_ids():
    """As in vLLM: ignore_eos drops only EOS (the server leaves it out of stop_token_ids)."""
    engine, _, _ = make_engine()
    try:
        outs = asyncio.run(collect(engine, request(40, stop_token_ids=(4,), ignore_eos=True)))
    finally:
        engine.shutdown()
    assert [t for o in outs for t in o.new_token_ids] == [1, 2, 3, 4]
    assert outs[-1].finish_reason is FinishReason.STOP


def test_client_disconnect_aborts_and_frees_blocks_at_once():
    engine, _, pool = make_engine(delay_s=0.01)
    req = request(200, ignore_eos=True)

    async def main():
        async for out in engine.generate(req):
            if req.num_output_tokens >= 3:
                break  # the client goes away mid-stream

    try:
        asyncio.run(main())
        assert wait_until(lambda: req.status is RequestStatus.ABORTED, timeout_s=2.0)
        assert req.abort_reason == "client disconnected"
        assert req.num_output_tokens < 200
        assert pool.num_free_device_blocks == 64
    finally:
        engine.shutdown()


def test_a_step_that_fails_once_is_rerun_and_its_requests_finish():
    engine, executor, pool = make_engine()
    try:
        executor.fail_next = True
        outs = asyncio.run(collect(engine, request(5, ignore_eos=True)))
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert [t for o in outs for t in o.new_token_ids] == [1, 2, 3, 4, 5]
        assert pool.num_free_device_blocks == 64
    finally:
        engine.shutdown()


def test_a_request_that_breaks_the_step_ends_alone_and_its_neighbours_run_on():
    engine, executor, pool = make_engine(delay_s=0.002)
    victims = [request(60, ignore_eos=True) for _ in range(3)]
    poisoned = request(40, ignore_eos=True)
    executor.poisoned.add(poisoned.request_id)

    async def main():
        streams = [asyncio.ensure_future(collect(engine, r)) for r in victims]
        while sum(r.num_output_tokens for r in victims) < 10:  # the victims are mid-stream
            await asyncio.sleep(0.001)
        bad = await collect(engine, poisoned)
        return await asyncio.gather(*streams), bad

    try:
        results, bad = asyncio.run(main())
        assert bad[-1].finished and poisoned.status is RequestStatus.ABORTED
        assert poisoned.abort_reason.startswith(ENGINE_ERROR) and "IndexError" in poisoned.abort_reason
        for req, outs in zip(victims, results):
            assert outs[-1].finish_reason is FinishReason.LENGTH
            assert [t for o in outs for t in o.new_token_ids] == [(i + 1) % 50 for i in range(60)]
        assert pool.num_free_device_blocks == 64
    finally:
        engine.shutdown()


def test_a_request_that_can_never_run_is_refused_before_it_is_accepted():
    engine, _, _ = make_engine(blocks=4)
    try:
        with pytest.raises(ValueError, match="KV blocks"):
            asyncio.run(collect(engine, request(100)))
    finally:
        engine.shutdown()


def test_shutdown_ends_live_requests():
    engine, _, pool = make_engine(delay_s=0.01)
    req = request(200, ignore_eos=True)
    seen = []

    async def main():
        async for out in engine.generate(req):
            seen.append(out)
            if len(seen) == 2:
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    asyncio.run(main())
    assert seen[-1].finished and req.status is RequestStatus.ABORTED and req.abort_reason == "shutdown"
    assert pool.num_free_device_blocks == 64


def test_an_abort_drained_with_its_add_ends_that_request_only():
    """The engine thread drains its inbox in batches: a request aborted before the batch is
    admitted must not make the admission of the others in the batch fail."""
    clock = WallClock()
    pool = BlockManager(64, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"), pool, clock)
    loop = EngineLoop(EngineCore(scheduler, CountingExecutor()))
    gone, kept, finished = request(5, ignore_eos=True), request(5, ignore_eos=True), request(5, ignore_eos=True)
    outs: list = []
    for req in (gone, kept, finished):
        loop.submit(req, outs.append)
    loop.abort(gone.request_id, "client disconnected")
    loop.finish(finished.request_id)  # e.g. a stop string seen before the request ran
    loop.start()  # the first drain holds the three adds, the abort and the finish
    try:
        assert wait_until(lambda: kept.status.is_done)
        assert kept.finish_reason is FinishReason.LENGTH and kept.num_output_tokens == 5
        assert gone.status is RequestStatus.ABORTED and gone.abort_reason == "client disconnected"
        assert finished.status is RequestStatus.FINISHED and finished.num_output_tokens == 0
        assert scheduler.num_queued == 0 and not scheduler.has_work
        assert {o.request.request_id for o in outs if o.finished} == {r.request_id for r in (gone, kept, finished)}
    finally:
        loop.stop()


def test_on_end_reports_every_ending():
    engine, _, _ = make_engine(delay_s=0.005)
    ended: list = []
    reqs = [request(50, ignore_eos=True) for _ in range(2)]

    async def main():
        async for _ in engine.generate(reqs[0], on_end=ended.append):
            break  # the client leaves after the first output
        async for out in engine.generate(reqs[1], on_end=ended.append):
            engine.loop.finish(reqs[1].request_id)  # the server saw a stop string
            break

    try:
        asyncio.run(main())
        assert wait_until(lambda: len(ended) == 2)
        assert {r.request_id for r in ended} == {r.request_id for r in reqs}
    finally:
        engine.shutdown()


def test_a_duplicate_request_id_is_refused_and_the_first_runs_on():
    """A second request with the id of a live one ends at once, aborted with the reason; the
    first keeps its stream and finishes."""
    engine, _, pool = make_engine(delay_s=0.002)
    first = request(20, ignore_eos=True)
    twin = Request(list(range(5)), SamplingParams(max_tokens=20, ignore_eos=True), request_id=first.request_id)

    async def main():
        stream = engine.generate(first)
        head = await anext(stream)  # the first is live in the engine
        twin_outs = [out async for out in engine.generate(twin)]
        return [head, *[out async for out in stream]], twin_outs

    try:
        first_outs, twin_outs = asyncio.run(asyncio.wait_for(main(), 10))  # a lost stream fails, not hangs
    finally:
        engine.shutdown()
    assert [t for o in first_outs for t in o.new_token_ids] == [(i + 1) % 50 for i in range(20)]
    assert first_outs[-1].finish_reason is FinishReason.LENGTH and first.status is RequestStatus.FINISHED
    assert len(twin_outs) == 1 and twin_outs[0].finished and not twin_outs[0].new_token_ids
    assert twin.status is RequestStatus.ABORTED and twin.abort_reason == f"duplicate request id {first.request_id!r}"
    assert pool.num_free_device_blocks == 64


def test_an_admission_that_raises_rejects_its_batch_and_the_engine_serves_on(caplog):
    """Admission (scoring + queueing) raising is not a step failure: the batch being admitted ends
    aborted ("rejected: ..."), nothing is left in the scheduler, and later requests are served."""
    pool = BlockManager(64, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"), pool,
                          WallClock())
    core = EngineCore(scheduler, CountingExecutor())
    real_queue = core.queue_scored
    broken = {"yes": True}

    def queue_scored(reqs, failed):
        if broken["yes"]:
            raise MemoryError("no room for the batch")
        return real_queue(reqs, failed)

    core.queue_scored = queue_scored
    loop = EngineLoop(core)
    ended: list[Request] = []
    batch = [request(5, ignore_eos=True) for _ in range(3)]
    for req in batch:
        loop.submit(req, lambda out: out.finished and ended.append(out.request))
    loop.start()  # the first drain admits the three together
    try:
        assert wait_until(lambda: len(ended) == 3)
        assert all(r.status is RequestStatus.ABORTED and r.abort_reason == "rejected: no room for the batch"
                   for r in batch)
        assert not scheduler.has_work and pool.num_free_device_blocks == 64
        assert "admission failed" in caplog.text
        broken["yes"] = False
        later = request(5, ignore_eos=True)
        loop.submit(later, lambda out: out.finished and ended.append(out.request))
        assert wait_until(lambda: later.status.is_done)
        assert later.finish_reason is FinishReason.LENGTH and later.num_output_tokens == 5
    finally:
        loop.stop()


class FlakyRanker(Predictor):
    """Scores by prompt length; raises on a prompt whose text is "boom"."""

    name = "flaky"
    gives_lengths = False

    def score(self, requests):
        if any(r.prompt_text == "boom" for r in requests):
            raise RuntimeError("feature extraction failed")
        for r in requests:
            r.set_prediction(float(r.prompt_len))


def test_a_predictor_that_raises_queues_its_request_in_arrival_order(caplog):
    pool = BlockManager(256, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), make_policy("sjf"),
                          pool, WallClock())
    loop = EngineLoop(EngineCore(scheduler, CountingExecutor(delay_s=0.002), FlakyRanker()))
    ended: list[Request] = []

    def submit(prompt_len: int, text: str | None = None) -> Request:
        req = Request(list(range(prompt_len)), SamplingParams(max_tokens=3, ignore_eos=True), prompt_text=text)
        loop.submit(req, lambda out: out.finished and ended.append(out.request))
        return req

    blocker = submit(1)
    loop.start()
    assert wait_until(lambda: blocker.status is RequestStatus.RUNNING or blocker.status.is_done)
    try:
        short, long = submit(3), submit(9)
        failed = [submit(2, "boom"), submit(2, "boom")]  # would rank first if scored by length
        later = submit(20)  # arrives after them: FCFS would run it last
        assert wait_until(lambda: len(ended) == 6)
    finally:
        loop.stop()
    order = [r.request_id for r in ended]
    assert order[:3] == [blocker.request_id, short.request_id, long.request_id]
    assert {r.request_id for r in failed} == set(order[3:5]) and order[5] == later.request_id
    assert all(r.finish_reason is FinishReason.LENGTH for r in ended)
    assert loop.stats.predictor_failures == 2
    assert len([r for r in caplog.records if "predictor" in r.getMessage()]) == 1  # logged once


class GatedRanker(Predictor):
    """Scores by prompt length once ``release`` is set; notes the engine's step count meanwhile."""

    name = "gated"
    gives_lengths = False

    def __init__(self, loop_stats) -> None:
        self.stats = loop_stats
        self.started = threading.Event()
        self.release = threading.Event()
        self.steps_while_scoring = 0

    def score(self, requests):
        steps = self.stats().steps
        self.started.set()
        self.release.wait(5)
        self.steps_while_scoring = self.stats().steps - steps
        for r in requests:
            r.set_prediction(float(r.prompt_len))


def gated_loop(scoring_thread: bool) -> tuple[EngineLoop, GatedRanker, BlockManager]:
    pool = BlockManager(128, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("sjf"),
                          pool, WallClock())
    holder: list[EngineLoop] = []
    ranker = GatedRanker(lambda: holder[0].stats)
    loop = EngineLoop(EngineCore(scheduler, CountingExecutor(delay_s=0.002), ranker), scoring_thread=scoring_thread)
    holder.append(loop)
    return loop, ranker, pool


@pytest.mark.parametrize("scoring_thread", [True, False])
def test_steps_go_on_while_arrivals_are_scored_on_the_scoring_thread(scoring_thread):
    loop, ranker, _ = gated_loop(scoring_thread)
    ranker.release.set()  # the first request scores at once
    running = request(300, ignore_eos=True)
    loop.submit(running, lambda out: None)
    loop.start()
    try:
        assert wait_until(lambda: running.num_output_tokens > 0)
        ranker.release.clear()
        ranker.started.clear()
        newcomer = request(3, ignore_eos=True)
        loop.submit(newcomer, lambda out: None)
        assert ranker.started.wait(5)
        time.sleep(0.2)  # about 100 steps of 2 ms, if the loop is not held up
        ranker.release.set()
        assert wait_until(lambda: newcomer.status.is_done)
    finally:
        loop.stop()
    if scoring_thread:
        assert ranker.steps_while_scoring > 20 and loop.stats.scoring_wait_s < 0.1
    else:
        assert ranker.steps_while_scoring == 0 and loop.stats.scoring_wait_s >= 0.2
    assert loop.stats.scoring_s >= 0.2  # the scoring itself is counted wherever it ran


def test_a_request_aborted_while_being_scored_ends_and_never_queues():
    loop, ranker, pool = gated_loop(scoring_thread=True)
    ended: list[Request] = []
    req = request(5, ignore_eos=True)
    loop.submit(req, lambda out: out.finished and ended.append(out.request))
    loop.start()
    try:
        assert ranker.started.wait(5)
        assert loop.num_waiting == 1  # being scored still counts as waiting
        loop.abort(req.request_id, "client disconnected")
        assert wait_until(lambda: ended == [req])
        ranker.release.set()
        assert wait_until(lambda: loop.num_waiting == 0)
        assert req.status is RequestStatus.ABORTED and req.abort_reason == "client disconnected"
        assert not loop.core.scheduler.has_work and pool.num_free_device_blocks == 128
    finally:
        loop.stop()


def test_the_engine_thread_keeps_its_torch_threads_when_another_thread_lowers_them():
    """ATen gives a thread the process-wide thread count at its first op, and the ranker scores on
    one thread by lowering that count (torch_threads). The engine thread takes its own count when
    it starts, so a scoring thread that holds one meanwhile does not leave it on one thread."""
    torch = pytest.importorskip("torch")

    class TorchCountingExecutor(CountingExecutor):
        def __init__(self) -> None:
            super().__init__()
            self.threads_seen: list[int] = []

        def execute(self, out):
            self.threads_seen.append(torch.get_num_threads())  # the engine thread's first torch call
            return super().execute(out)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    executor = TorchCountingExecutor()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"),
                          BlockManager(64, 0, block_size=4), WallClock())
    loop = EngineLoop(EngineCore(scheduler, executor))
    loop.start()
    try:
        time.sleep(0.2)  # the engine thread is idle now, its first torch op still ahead
        torch.set_num_threads(1)  # what a scoring thread does while it scores
        req = request(3, ignore_eos=True)
        loop.submit(req, lambda out: None)
        assert wait_until(lambda: req.status.is_done)
    finally:
        loop.stop()
        torch.set_num_threads(before)
    assert executor.threads_seen and set(executor.threads_seen) == {2}


def test_the_step_log_holds_every_step_with_its_shape(tmp_path):
    from rankserve.sim.calibrate import read_step_logs

    clock = WallClock()
    pool = BlockManager(64, 0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"), pool, clock)
    path = tmp_path / "steps.jsonl"
    engine = AsyncEngine(EngineCore(scheduler, CountingExecutor(delay_s=0.001)), step_log=path)
    try:
        reqs = [request(n, ignore_eos=True) for n in (3, 8, 5)]

        async def main():
            return await asyncio.gather(*(collect(engine, r) for r in reqs))

        asyncio.run(main())
    finally:
        engine.shutdown()
    steps = read_step_logs([path])
    stats = engine.loop.stats
    assert len(steps) == stats.steps
    assert sum(s.prefill_tokens for s in steps) == stats.prefill_tokens == 3 * 5
    assert sum(s.decode_tokens for s in steps) == stats.decode_tokens
    # the first token comes with the prefill, the rest one per decode step
    assert stats.decode_tokens == sum(n - 1 for n in (3, 8, 5))
    assert all(1 <= s.num_seqs <= 4 and s.seconds >= 0.001 for s in steps)
    assert sum(s.seconds for s in steps) == pytest.approx(stats.busy_s, rel=0.01)


def test_a_step_log_that_fails_to_write_stops_logging_and_the_engine_serves_on(tmp_path, caplog):
    class BrokenFile:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    engine, _, pool = make_engine()
    engine.loop._step_log = BrokenFile()  # as if the disk filled after start
    try:
        async def main():
            return await collect(engine, request(6, ignore_eos=True))

        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 6
    assert "step log" in caplog.text and engine.loop._step_log is None
    assert pool.num_free_device_blocks == 64
