"""A small harness to drive the Scheduler by hand in tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rankserve.core import (
    BlockManager,
    Policy,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    VirtualClock,
)


class Harness:
    def __init__(
        self,
        policy: Policy,
        max_num_seqs: int = 1,
        budget: int = 256,
        device_blocks: int = 1000,
        host_blocks: int = 1000,
        block_size: int = 4,
        mode: str = "swap",
        chunked: bool = True,
    ) -> None:
        self.clock = VirtualClock()
        self.blocks = BlockManager(device_blocks, host_blocks, block_size)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            preemption_mode=mode,
            enable_chunked_prefill=chunked,
        )
        self.sched = Scheduler(config, policy, self.blocks, self.clock)

    def add(
        self,
        out_len: int,
        prompt: int = 4,
        pred: float | None = None,
        priority: int = 0,
        name: str = "",
    ) -> Request:
        req = Request(
            list(range(prompt)),
            SamplingParams(max_tokens=out_len, ignore_eos=True),
            arrival_time=self.clock.now(),
            priority=priority,
            oracle_output_len=out_len,
            request_id=name,
        )
        if pred is not None:
            req.set_prediction(pred, pred)
        self.sched.add_request(req)
        return req

    def step(self, dt: float = 1.0) -> SchedulerOutput:
        out = self.sched.schedule()
        self.clock.advance(dt)
        self.sched.update(out, None, self.clock.now())
        self.blocks.check_invariants(self.sched.live_requests())
        return out

    def run_until_idle(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_work:
            outs.append(self.step())
            assert len(outs) < max_steps, "scheduler did not drain"
        return outs


def ran(out: SchedulerOutput) -> list[str]:
    return [r.request_id for r in out.requests]


@contextmanager
def serve_on_loopback(app, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yields its /v1 base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(condition, timeout_s: float = 3.0) -> bool:
    """Poll ``condition()`` until it is true or ``timeout_s`` passes; returns its last value. For
    work the engine thread finishes after the HTTP response (an abort on a stop string, a disconnect)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def write_tiny_llama(path) -> None:
    """A randomly initialised 2-layer Llama (hidden 64, vocab 128) saved as a Hugging Face
    directory: loads and steps in milliseconds."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
