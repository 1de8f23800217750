"""The real server (embedded SmolLM2, uvicorn on loopback) driven by the official openai client, in
its default configuration: learning-to-rank scheduling with the shipped ranker."""

from __future__ import annotations

import re

import pytest
from helpers import serve_on_loopback, wait_until

import rankserve.learn  # noqa: F401 - registers the learned predictors (ranker, probe) by name
from rankserve.core import RequestStatus

openai = pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
    return tmp_path_factory.mktemp("records") / "records.sqlite"


@pytest.fixture(scope="module")
def server(records_path):
    from rankserve.engine.build import EngineSettings, load_engine
    from rankserve.model.loader import ModelNotFoundError
    from rankserve.server.app import ServerConfig, build_app
    from rankserve.server.serve import attach_recorder

    try:
        loaded = load_engine(EngineSettings(dtype="float32", kv_cache_gb=0.25, swap_space_gb=0.25, max_num_seqs=8,
                                            policy="ltr", predictor="ranker"))
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    app = build_app(ServerConfig(loaded.model_name, loaded.max_model_len, vocab_size=loaded.vocab_size),
                    loaded.tokenizer, loaded.engine)
    app.state.recorder = attach_recorder(loaded, records_path)  # --record-lengths
    with serve_on_loopback(app) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60), loaded
    loaded.engine.shutdown()
    app.state.recorder.close()


def test_models(server):
    client, loaded = server
    assert [m.id for m in client.models.list().data] == [loaded.model_name]


def test_completion_and_its_stream_agree(server):
    client, _ = server
    args = dict(model="smollm2-135m-instruct", prompt="The three primary colours are", max_tokens=12, temperature=0)
    full = client.completions.create(**args)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert streamed == full.choices[0].text and len(streamed.strip()) > 0


def test_chat_and_its_stream_agree(server):
    client, _ = server
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    full = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=40,
                                          temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == text and usage.completion_tokens == full.usage.completion_tokens


def test_seeded_sampling_repeats_and_errors_are_typed(server):
    client, loaded = server
    args = dict(model="smollm2-135m-instruct", prompt="Write a word:", max_tokens=8, temperature=1.0, seed=42)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2-135m-instruct", prompt="x", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    scheduler = loaded.engine.loop.core.scheduler
    assert not scheduler.has_work
    scheduler.blocks.check_invariants(scheduler.live_requests())
    assert scheduler.blocks.num_free_device_blocks == scheduler.blocks.device.num_blocks


def test_the_ranker_scores_every_request(server):
    """The module's server has served other tests: count this test's requests only."""
    client, loaded = server
    predictor = loaded.engine.loop.core.predictor
    before = predictor.report()["prompts_scored"]
    for prompt in ("Say hi.", "Name a colour."):
        client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=2)
    report = predictor.report()
    assert report["predictor"] == "ranker" and report["prompts_scored"] == before + 2


def test_finished_requests_are_recorded_for_fine_tuning(server, records_path):
    import httpx

    from rankserve.learn.records import read_records

    client, loaded = server
    metrics_url = str(client.base_url).removesuffix("/").removesuffix("/v1") + "/metrics"

    def written() -> float:
        found = re.search(r"^rankserve:length_records_written_total\{[^}]*\} (\S+)$", httpx.get(metrics_url).text, re.M)
        return float(found.group(1))

    before = written()
    client.completions.create(model="smollm2-135m-instruct", prompt="Name a colour.", max_tokens=3)
    assert wait_until(lambda: written() > before, timeout_s=30)  # written in batches, off the engine thread
    records = read_records(records_path)
    assert len(records.output_tokens) == written()
    assert records.output_tokens[-1] <= 3 and records.features[-1].shape[1] == 384
    assert (records.spec.bottom_layers, records.spec.max_length) == (3, 256)  # the serving ranker-reference's


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, monkeypatch):
    client, loaded = server
    scheduler = loaded.engine.loop.core.scheduler
    seen = []
    generate = loaded.engine.generate
    monkeypatch.setattr(loaded.engine, "generate", lambda req, **kw: seen.append(req) or generate(req, **kw))
    stream = client.completions.create(model="smollm2-135m-instruct", prompt="Tell me a very long story.",
                                       max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 5:
            assert scheduler.blocks.num_free_device_blocks < scheduler.blocks.device.num_blocks
            break
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: not scheduler.has_work, timeout_s=20)
    (req,) = seen
    assert req.status is RequestStatus.ABORTED and req.abort_reason == "client disconnected"
    assert req.num_output_tokens < 400
    scheduler.blocks.check_invariants(scheduler.live_requests())
    assert scheduler.blocks.num_free_device_blocks == scheduler.blocks.device.num_blocks


def test_probe_refines_from_the_engine_taps():
    """trail + probe on the real model: the classifier orders requests at admission, then the probe
    refines every running request's length from the hidden states the engine taps."""
    from rankserve.core.request import Request, SamplingParams
    from rankserve.engine.build import EngineSettings, build_core

    _, core, _ = build_core(EngineSettings(dtype="bfloat16", kv_cache_gb=0.1, swap_space_gb=0.0, policy="trail",
                                           predictor="probe", preemption_mode="recompute"))
    assert core.executor.hidden_layers == (core.predictor.layer,)
    reqs = [Request(list(range(20, 60 + 9 * i)), SamplingParams(max_tokens=24, ignore_eos=True),
                    prompt_text=text) for i, text in enumerate(["Say yes.", "Write a long essay on rivers."])]
    core.add_requests(reqs)
    initial = [r.predicted_len for r in reqs]
    while any(not r.status.is_done for r in reqs):
        core.step()
    report = core.predictor.report()
    assert report["refinements"] >= 2 * 3  # after prefill, then every 8 tokens
    assert [r.predicted_len for r in reqs] != initial
