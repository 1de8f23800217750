"""Learning from served traffic: the censored ranking loss, the length recorder behind
``rankserve serve --record-lengths``, and fine-tuning the ranker on its records."""

from __future__ import annotations

import asyncio
import sqlite3

import numpy as np
import pytest
import torch
from test_engine_loop import CountingExecutor, collect
from test_learn import _toy_prompts

from rankserve.cli.main import main
from rankserve.core.block_manager import BlockManager
from rankserve.core.policies import make_policy
from rankserve.core.request import FinishReason, Request, RequestStatus, SamplingParams
from rankserve.core.scheduler import Scheduler, SchedulerConfig
from rankserve.engine import AsyncEngine, EngineCore, WallClock
from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.predictors import TextModelPredictor
from rankserve.learn.records import LengthRecorder, read_records
from rankserve.learn.text_model import TextLengthModel, TextModelConfig, TrainConfig, listmle_loss, train_text_model
from rankserve.learn.training import train_from_records
from rankserve.server.metrics import ServerMetrics


# ---- the censored loss ----------------------------------------------------------------------
def test_listmle_with_every_length_observed_is_plain_listmle():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1])
    lengths = torch.tensor([40, 5, 300, 120, 40])
    plain = listmle_loss(scores, lengths, 10, torch.Generator().manual_seed(1))
    observed = listmle_loss(scores, lengths, 10, torch.Generator().manual_seed(1), torch.ones(5, dtype=torch.bool))
    assert observed.item() == pytest.approx(plain.item())


def _grad(scores: list[float], lengths: list[int], observed: list[bool] | None) -> torch.Tensor:
    s = torch.tensor(scores, requires_grad=True)
    mask = None if observed is None else torch.tensor(observed)
    listmle_loss(s, torch.tensor(lengths), 10, torch.Generator().manual_seed(0), mask).backward()
    return s.grad


def test_a_request_cut_early_is_a_lower_bound_not_a_short_answer():
    # Cut at 20 tokens (it may have gone on for 1,000), next to one that ended by itself at 200:
    # nothing says which is shorter, so the loss must not push their scores either way ...
    assert torch.all(_grad([0.0, 0.0], [20, 200], [False, True]) == 0)
    # ... while treating the cut as the length would rank it first.
    plain = _grad([0.0, 0.0], [20, 200], None)
    assert plain[0] > 0 and plain[1] < 0  # lowering the first score lowers the loss
    # Cut at 300 and one that ended at 200: the cut one is surely longer, and the loss says so.
    censored_longer = _grad([0.0, 0.0], [300, 200], [False, True])
    assert censored_longer[0] < 0 and censored_longer[1] > 0


# ---- the recorder -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ranker(tmp_path_factory):
    """A ranker with one trainable layer on 32 encoder tokens, trained a little on toy prompts."""
    path = tmp_path_factory.mktemp("ranker") / "ranker.safetensors"
    texts, lengths = _toy_prompts(np.random.default_rng(0), 64)
    model = TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=1, max_length=32))
    train_text_model(model, model.encode_bottom(texts), lengths, TrainConfig(epochs=2, list_size=16, lr=3e-4,
                                                                              head_lr=3e-3), progress=False)
    model.save(path)
    return path


def _engine(predictor, on_ended) -> AsyncEngine:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), make_policy("fcfs"),
                          BlockManager(64, 0, block_size=4), WallClock())
    return AsyncEngine(EngineCore(scheduler, CountingExecutor(), predictor), on_ended=on_ended)


def _serve(predictor, recorder, requests: list[Request]) -> None:
    engine = _engine(predictor, recorder.record)
    try:
        async def main():
            await asyncio.gather(*(collect(engine, r) for r in requests))

        asyncio.run(main())
    finally:
        engine.shutdown()
        recorder.close()


def _requests(texts: list[str]) -> list[Request]:
    # The fake executor samples 1, 2, 3, ...: stop token 4 ends a request after 4 tokens (stop);
    # the others run into max_tokens (length).
    return [Request(list(range(3 + i % 4)), SamplingParams(max_tokens=6 + i, stop_token_ids=(4,) if i % 2 else ()),
                    prompt_text=t) for i, t in enumerate(texts)]


@pytest.mark.parametrize("keep_prompts", [False, True])
def test_served_requests_are_recorded_with_the_ranker_features(tiny_ranker, tmp_path, keep_prompts):
    predictor = TextModelPredictor(tiny_ranker, precision="float32")
    path = tmp_path / "records.sqlite"
    recorder = LengthRecorder.for_predictor(path, predictor, keep_prompts=keep_prompts)
    texts = ["Answer yes or no: cats.", "Write a long story about the sea.", "Give one word for rain.",
             "Answer yes or no: cats."]  # the last one is a score-cache hit: its features are computed again
    requests = _requests(texts)
    _serve(predictor, recorder, requests)
    assert recorder.stats.written == 4 and recorder.stats.failed == 0
    assert not predictor._bottoms  # nothing kept once its request ended
    records = read_records(path)
    order = np.argsort(records.prompt_tokens)  # records come in finishing order; prompt i has 3 + i tokens
    assert list(records.prompt_tokens[order]) == [3, 4, 5, 6]
    assert list(records.output_tokens[order]) == [6, 4, 8, 4]
    assert list(records.observed[order]) == [False, True, False, True]
    expected = predictor.model.encode_bottom(texts)
    for i, want in zip(order, expected):
        assert records.features[i].shape == want.shape
        torch.testing.assert_close(records.features[i].float(), want.float(), atol=0.05, rtol=0.02)
    with sqlite3.connect(path) as conn:
        stored = [row[0] for row in conn.execute("SELECT prompt_text FROM records ORDER BY prompt_tokens")]
    assert stored == (texts if keep_prompts else [None] * 4)


def test_only_finished_requests_are_recorded_and_nothing_is_kept_for_aborted(tiny_ranker, tmp_path):
    predictor = TextModelPredictor(tiny_ranker)
    recorder = LengthRecorder.for_predictor(tmp_path / "r.sqlite", predictor)
    engine = _engine(predictor, recorder.record)
    finished = Request([1, 2, 3], SamplingParams(max_tokens=3), prompt_text="Give one word for chess.")
    try:
        async def main():
            stream = engine.generate(Request([1, 2], SamplingParams(max_tokens=200), prompt_text="Write a long "
                                             "story about trains."))
            await stream.__anext__()
            await stream.aclose()  # the client goes: aborted, not a label
            await collect(engine, finished)

        asyncio.run(main())
    finally:
        engine.shutdown()
        recorder.close()
    assert recorder.stats.written == 1 and not predictor._bottoms
    assert list(read_records(tmp_path / "r.sqlite").output_tokens) == [3]


def test_a_failed_write_is_counted_and_never_fails_the_request(tiny_ranker, tmp_path):
    predictor = TextModelPredictor(tiny_ranker)
    path = tmp_path / "r.sqlite"
    recorder = LengthRecorder.for_predictor(path, predictor)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE records")  # every insert fails from now on
    requests = _requests(["Answer yes or no: rain.", "Summarise in a sentence music."])
    _serve(predictor, recorder, requests)
    assert all(r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for r in requests)
    assert recorder.stats.failed == 2 and recorder.stats.written == 0
    text = ServerMetrics("m").render(None, None, record_stats=recorder.stats).decode()
    assert 'rankserve:length_record_failures_total{model_name="m"} 2.0' in text
    assert 'rankserve:length_records_written_total{model_name="m"} 0.0' in text


def test_a_records_file_of_another_ranker_is_refused(tiny_ranker, tmp_path):
    path = tmp_path / "r.sqlite"
    LengthRecorder(path, TextLengthModel.load(tiny_ranker)).close()
    other = TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=2, max_length=32))
    with pytest.raises(ValueError, match="holds features"):
        LengthRecorder(path, other)


# ---- fine-tuning on records ---------------------------------------------------------------------
def test_fine_tuning_on_records_learns_the_served_lengths(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "base.safetensors"
    TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=1, max_length=32)).save(base)  # untrained head
    model = TextLengthModel.load(base)
    texts, lengths = _toy_prompts(rng, 96)
    cap = 250  # every max_tokens is 250: the essays and stories are cut (lower bounds)
    recorder = LengthRecorder(tmp_path / "r.sqlite", model)
    for text, n in zip(texts, lengths):
        req = Request([1] * 4, SamplingParams(max_tokens=cap), prompt_text=text)
        req.output_token_ids = [7] * int(min(n, cap))
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.STOP if n < cap else FinishReason.LENGTH
        recorder.record(req)
    recorder.close()
    assert recorder.stats.written == 96
    out = tmp_path / "tuned.safetensors"
    record = train_from_records(tmp_path / "r.sqlite", base, TrainConfig(epochs=6, list_size=16, lr=3e-4, head_lr=3e-3),
                                out, progress=False)
    assert record["num_train"] == 96 and 0.2 < record["share_cut_at_max_tokens"] < 0.6
    test_texts, test_lengths = _toy_prompts(rng, 40)
    tuned = TextModelPredictor(out)  # loads like any shipped weights (--predictor-weights)
    requests = [Request([1], SamplingParams(), prompt_text=t) for t in test_texts]
    tuned.score(requests)
    assert kendall_tau([r.score for r in requests], test_lengths) > 0.5
    with pytest.raises(ValueError, match="features"):
        other = tmp_path / "other.safetensors"
        TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=2, max_length=32)).save(other)
        train_from_records(tmp_path / "r.sqlite", other, TrainConfig(epochs=1), tmp_path / "x.safetensors",
                           progress=False)


# ---- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["serve", "--record-prompts"], "argument --record-prompts: only with --record-lengths"),
    (["serve", "--record-lengths", "/nonexistent-dir/records.sqlite"], "argument --record-lengths"),
    (["train", "ranker", "--from-records", "/nonexistent.sqlite", "--out", "x.safetensors"],
     "argument --from-records: /nonexistent.sqlite does not exist"),
    (["train", "classifier", "--from-records", "/nonexistent.sqlite", "--out", "x.safetensors"],
     "argument --from-records: fine-tunes a ranker"),
    (["train", "ranker", "--base", "/nonexistent.safetensors", "--out", "x.safetensors"],
     "argument --base: only with --from-records"),
])
def test_recording_flags_misuse_is_a_flag_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_from_a_file_that_is_not_records_is_a_flag_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_text("not a database")
    with pytest.raises(SystemExit) as exc:
        main(["train", "ranker", "--from-records", str(bogus), "--out", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "argument --from-records" in capsys.readouterr().err
