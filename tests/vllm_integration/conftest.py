"""Fixtures for the vLLM integration tests. They run only in a venv with vLLM (``make vllm-test``);
elsewhere every module here skips at import (``pytest.importorskip``), so the default suite is
unaffected. vLLM's real Scheduler and KV cache manager are driven by hand: a VllmConfig for the
embedded SmolLM2 (no weights are loaded), a KV cache of ``num_blocks`` blocks, and a loop that plays
the model runner, sampling one token per request that reached the end of its tokens."""

from __future__ import annotations

import importlib.util

import pytest

BLOCK_SIZE = 16

# (This directory is not named "vllm": with tests/ on sys.path it would shadow the real package.)
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # no vLLM here: nothing to collect (the default suite)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from rankserve.model.loader import load_model_dir

    return str(load_model_dir(None).path)


@pytest.fixture(scope="session")
def make_scheduler(model_dir):
    """``make_scheduler(max_num_seqs=2, num_blocks=200, additional=None, async_scheduling=False,
    **scheduler_config)`` -> a RankScheduler on vLLM's real scheduler and KV cache manager."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from rankserve.integrations.vllm import RankScheduler

    def make(max_num_seqs: int = 2, num_blocks: int = 200, additional: dict | None = None,
             async_scheduling: bool = False, max_num_batched_tokens: int = 256, prefix_caching: bool = True):
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=1024, enable_chunked_prefill=True, is_encoder_decoder=False)
        config = VllmConfig(scheduler_config=sched, model_config=ModelConfig(model=model_dir, dtype="float32", seed=0),
                            cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching),
                            additional_config={"rankserve_predictor": "none", **(additional or {})})
        # vLLM turns async scheduling off on CPU; set it after validation to build the async variant.
        config.scheduler_config.async_scheduling = async_scheduling
        config.cache_config.num_gpu_blocks = num_blocks
        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32)
        kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        return RankScheduler(vllm_config=config, kv_cache_config=kv, block_size=BLOCK_SIZE, log_stats=True,
                             structured_output_manager=StructuredOutputManager(config))

    return make


@pytest.fixture(scope="session")
def make_request():
    """``make_request(rid, prompt_len=8, max_tokens=4, xargs=None, prompt=None)`` -> a vLLM Request
    (prompt: token ids, default ``[hash(rid)] * prompt_len`` so prompts differ)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.utils.hashing import sha256
    from vllm.v1.request import Request

    init_none_hash(sha256)  # what vLLM's engine uses for prefix-cache block hashes
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)

    def make(rid: str, prompt_len: int = 8, max_tokens: int = 4, xargs: dict | None = None,
             prompt: list[int] | None = None):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=xargs)
        tokens = prompt if prompt is not None else [abs(hash(rid)) % 40_000 + 10] * prompt_len
        return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                       block_hasher=hasher)

    return make


class Driver:
    """Plays vLLM's engine loop against a scheduler: schedule, 'run' the batch, apply the output."""

    def __init__(self, scheduler) -> None:
        self.s = scheduler
        self.steps: list[dict[str, int]] = []  # num_scheduled_tokens of every step
        self.preempted: list[str] = []
        self.finished: list[str] = []

    def step(self) -> dict[str, int]:
        from vllm.v1.outputs import ModelRunnerOutput

        out = self.s.schedule()
        ids = list(out.num_scheduled_tokens)
        self.preempted += sorted(out.preempted_req_ids)
        sampled = [[] if self.s.requests[r].is_prefill_chunk else [7] for r in ids]
        result = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled)
        for outputs in self.s.update_from_output(out, result).values():
            self.finished += [o.request_id for o in outputs.outputs if o.finish_reason is not None]
        self.steps.append(dict(out.num_scheduled_tokens))
        return dict(out.num_scheduled_tokens)

    def run(self, max_steps: int = 500) -> None:
        while self.s.has_unfinished_requests():
            assert len(self.steps) < max_steps, "the scheduler did not drain"
            self.step()

    def first_run(self) -> list[str]:
        """Request ids in the order they were first scheduled."""
        seen: list[str] = []
        for step in self.steps:
            seen += [r for r in step if r not in seen]
        return seen


@pytest.fixture
def driver():
    return Driver
