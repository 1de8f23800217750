"""Learned predictors: losses, metrics, the probe's Bayesian refinement, label files, predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankserve.core.request import Request, SamplingParams
from rankserve.learn.evaluate import kendall_tau, mean_abs_error
from rankserve.learn.labels import LabelConfig, LabelRow, _append_rows, read_labels, request_seed, select_prompts
from rankserve.learn.probe import Probe, ProbeConfig, bin_edges, train_probe
from rankserve.learn.sharegpt import Prompt, first_pairs, iter_records
from rankserve.learn.text_model import TextModelConfig, TrainConfig, classifier_targets, listmle_loss, pairwise_loss


# ---- metrics and losses -------------------------------------------------------------------
def test_kendall_tau_orders():
    lengths = [10, 20, 30, 40]
    assert kendall_tau([1, 2, 3, 4], lengths) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], lengths) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 1, 1], lengths) == 0.0  # constant scores carry no order
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])
    assert mean_abs_error([1, 5], [2, 2]) == 2.0


def test_listmle_prefers_the_true_order():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 50, 120, 300, 700])
    right = listmle_loss(lengths.float() / 100, lengths, 10, gen)  # lower score = shorter: correct
    wrong = listmle_loss(-lengths.float() / 100, lengths, 10, gen)
    assert right < wrong
    # Gradient descent on free scores recovers the order.
    scores = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([scores], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        listmle_loss(scores, lengths, 10, gen).backward()
        opt.step()
    assert kendall_tau(scores.detach().numpy(), lengths.numpy()) == pytest.approx(1.0)


def test_listmle_ties_within_a_bucket_are_random():
    # Two lengths in one 10-token bucket: the loss cannot prefer either order on average.
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([101, 104])
    a = np.mean([float(listmle_loss(torch.tensor([0.0, 3.0]), lengths, 10, gen)) for _ in range(400)])
    b = np.mean([float(listmle_loss(torch.tensor([3.0, 0.0]), lengths, 10, gen)) for _ in range(400)])
    assert a == pytest.approx(b, rel=0.15)


def test_pairwise_loss_counts_discordant_pairs_smoothly():
    lengths = torch.tensor([5, 50, 120, 300, 700])
    right = pairwise_loss(lengths.float() / 100, lengths, 10)
    wrong = pairwise_loss(-lengths.float() / 100, lengths, 10)
    assert right < wrong
    # Free scores descend to the true order.
    scores = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([scores], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        pairwise_loss(scores, lengths, 10).backward()
        opt.step()
    assert kendall_tau(scores.detach().numpy(), lengths.numpy()) == pytest.approx(1.0)


def test_pairwise_loss_skips_ties_and_pairs_of_unknown_order():
    # One bucket: no pair is ordered, so nothing to learn (and no division by zero).
    s = torch.tensor([0.0, 3.0], requires_grad=True)
    pairwise_loss(s, torch.tensor([101, 104]), 10).backward()
    assert torch.all(s.grad == 0)
    # Cut at 20 tokens next to one that ended at 200: order unknown, no push either way; cut at 300
    # next to one that ended at 200: the cut one is surely longer.
    observed = torch.tensor([False, True])
    s = torch.zeros(2, requires_grad=True)
    pairwise_loss(s, torch.tensor([20, 200]), 10, observed).backward()
    assert torch.all(s.grad == 0)
    s = torch.zeros(2, requires_grad=True)
    pairwise_loss(s, torch.tensor([300, 200]), 10, observed).backward()
    assert s.grad[0] < 0 < s.grad[1]
    with pytest.raises(ValueError):
        TrainConfig(rank_loss="lambdarank")


def test_classifier_targets_clip_into_buckets():
    cfg = TextModelConfig(kind="classifier", num_buckets=4, max_output=400)
    assert classifier_targets(torch.tensor([0, 99, 100, 399, 5000]), cfg).tolist() == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError):
        TextModelConfig(kind="nope")


# ---- probe --------------------------------------------------------------------------------
def test_bin_edges():
    u = bin_edges("uniform", 4, 400)
    assert u.tolist() == [0, 100, 200, 300, 400]
    lg = bin_edges("log", 5, 256)
    assert lg[0] == 0 and lg[-1] == pytest.approx(256) and np.all(np.diff(lg) > 0)
    assert np.diff(lg)[1] < np.diff(lg)[-1]  # short bins are narrow
    with pytest.raises(ValueError):
        bin_edges("cubic", 4, 10)


def test_probe_advance_moves_mass_shorter_and_keeps_it():
    probe = Probe(ProbeConfig(hidden_size=8, width=4, num_bins=4, max_len=40))  # bins 10 tokens wide
    p = torch.tensor([0.0, 0.0, 0.0, 1.0])
    moved = probe.advance(p, 10)
    assert moved.sum() == pytest.approx(1.0)
    assert float(probe.expected(moved)) < float(probe.expected(p))
    assert float(probe.expected(p)) - float(probe.expected(moved)) == pytest.approx(10.0, rel=0.05)
    shortest = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(probe.advance(shortest, 50), shortest)  # the shortest bin keeps its mass


def test_probe_update_is_a_normalised_product():
    probe = Probe(ProbeConfig(hidden_size=8, width=4, num_bins=4, max_len=40))
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    obs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    post = probe.update(prior, obs)
    assert post.sum() == pytest.approx(1.0)
    assert torch.allclose(post, prior * obs / (prior * obs).sum())
    disjoint = probe.update(torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 1.0]))
    assert torch.equal(disjoint, torch.tensor([0, 0, 0, 1.0]))  # no NaN: falls back to the probe


def test_probe_median_interpolates_inside_the_middle_bin():
    probe = Probe(ProbeConfig(hidden_size=8, width=4, num_bins=4, max_len=400))  # bins of 100 tokens
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0], [0.6, 0.4, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7]])
    torch.testing.assert_close(probe.median(probs), torch.tensor([200.0, 350.0, 0.5 / 0.6 * 100, 300 + 0.2 / 0.7 * 100]))
    # A skewed distribution pulls the mean towards its tail, not the median.
    assert probe.estimate(probs[3], "mean") < probe.estimate(probs[3], "median")
    assert probe.estimate(probs[2], "median") < probe.estimate(probs[2], "mean")
    with pytest.raises(ValueError, match="mean or median"):
        probe.estimate(probs, "mode")


def test_probe_learns_remaining_length_from_states():
    # States that encode the remaining length (plus noise): the probe must beat the mean guess.
    rng = np.random.default_rng(0)
    remaining = rng.integers(0, 384, 4000).astype(np.float32)
    states = np.concatenate([remaining[:, None] / 384 + 0.05 * rng.standard_normal((4000, 1)),
                             rng.standard_normal((4000, 7))], axis=1).astype(np.float32)
    cfg = ProbeConfig(hidden_size=8, width=32, num_bins=10, max_len=384)
    probe = train_probe(cfg, states[:3000], remaining[:3000], epochs=15)
    est = probe.expected(probe.probs(torch.from_numpy(states[3000:]))).numpy()
    mae = mean_abs_error(est, remaining[3000:])
    assert mae < 0.5 * mean_abs_error(np.full(1000, remaining[:3000].mean()), remaining[3000:])


def test_probe_save_load_roundtrip(tmp_path):
    probe = Probe(ProbeConfig(hidden_size=8, width=4, bins="log", num_bins=5, max_len=100))
    probe.save(tmp_path / "p.safetensors", extra={"note": 1})
    again = Probe.load(tmp_path / "p.safetensors")
    x = torch.randn(3, 8)
    assert again.config == probe.config
    assert torch.allclose(again.probs(x), probe.probs(x))


# ---- probe predictor on engine taps ---------------------------------------------------------
class _FixedLengths:
    name, gives_lengths, refines = "fixed", True, False

    def score(self, requests):
        for r in requests:
            r.set_prediction(100.0, 100.0)

    def report(self):
        return {"predictor": "fixed"}


def test_probe_predictor_refines_from_taps(tmp_path):
    from rankserve.learn.predictors import ProbePredictor
    from rankserve.model.runner import HiddenStates

    probe = Probe(ProbeConfig(layer=3, hidden_size=4, width=4, num_bins=4, max_len=40))
    with torch.no_grad():  # a probe that always says "the longest bin"
        probe.mlp[2].weight.zero_()
        probe.mlp[2].bias.copy_(torch.tensor([-20.0, -20.0, -20.0, 20.0]))
    probe.save(tmp_path / "p.safetensors")
    pred = ProbePredictor(tmp_path / "p.safetensors", _FixedLengths(), every=4)
    req = Request([1, 2, 3], SamplingParams(max_tokens=100), request_id="a")
    pred.score([req])
    assert req.predicted_len == 100.0

    def taps():
        return HiddenStates((3,), ["a"], torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))

    req.output_token_ids.append(7)  # prefill done: first token out
    pred.refine([req], taps())
    assert req.predicted_len == pytest.approx(1 + 35.0, abs=0.01)  # generated + the longest bin's middle
    for n in range(2, 5):  # no refinement until 4 more tokens
        req.output_token_ids.append(7)
        pred.refine([req], taps())
        assert req.predicted_len == pytest.approx(36.0, abs=0.01)
    req.output_token_ids.append(7)
    pred.refine([req], taps())
    assert req.predicted_len == pytest.approx(5 + 35.0, abs=0.5)
    pred.refine([req], None)  # no taps (simulation): nothing changes
    assert pred.report()["refinements"] == 2


# ---- labels -------------------------------------------------------------------------------
def test_sharegpt_records_survive_a_truncated_file():
    text = '[{"id": "a_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},' \
           ' {"id": "b_0", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},' \
           ' {"id": "c_0", "conversa'
    assert list(first_pairs(iter_records(text))) == [("a_0", "hi", "yo")]


def _fake_prompts(n: int) -> list[Prompt]:
    return [Prompt(f"id{i}", "train" if i % 4 else "test", f"text {i}", i) for i in range(n)]


def test_select_prompts_is_fixed_and_seeds_only_test():
    prompts = _fake_prompts(200)
    cfg = LabelConfig(num_train=30, num_test=10, seeds=(0, 1))
    jobs = select_prompts(cfg, prompts)
    assert jobs == select_prompts(cfg, prompts)
    train = [p for p, s in jobs if p.split == "train"]
    test = [(p.conv_id, s) for p, s in jobs if p.split == "test"]
    assert len(train) == 30 and len({p.conv_id for p in train}) == 30
    assert len(test) == 20 and {s for _, s in test} == {0, 1}
    with pytest.raises(ValueError):
        select_prompts(LabelConfig(num_train=1000, num_test=1), prompts)
    assert request_seed("id1", 0) != request_seed("id1", 1)


def test_label_file_roundtrip(tmp_path):
    rows = [LabelRow("a", "train", 0, 12, 40, "stop"), LabelRow("b", "test", 1, 30, 384, "length")]
    path = tmp_path / "labels.csv"
    _append_rows(path, rows[:1])
    _append_rows(path, rows[1:])  # appending keeps one header
    got = read_labels(path)
    assert got.rows == rows
    assert got.lengths("test", 1) == {"b": 384}
    path.write_text("wrong,header\n")
    with pytest.raises(ValueError):
        read_labels(path)


# ---- text models (the real all-MiniLM-L6-v2 encoder) ------------------------------------------
def _toy_prompts(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """Prompts whose wording says how long the answer is."""
    asks = [("Answer yes or no:", 8), ("Give one word for", 20), ("Summarise in a sentence", 60),
            ("Write a detailed essay about", 300), ("Write a long story about", 350)]
    topics = ["cats", "the sea", "trains", "music", "rain", "cooking", "chess", "mountains"]
    texts, lengths = [], []
    for _ in range(n):
        ask, base = asks[rng.integers(len(asks))]
        texts.append(f"{ask} {topics[rng.integers(len(topics))]}.")
        lengths.append(int(base * rng.uniform(0.8, 1.2)))
    return texts, np.array(lengths)


@pytest.mark.parametrize("kind", ["ranker", "classifier"])
def test_text_model_learns_and_predicts_through_the_interface(kind, tmp_path):
    from rankserve.learn.predictors import TextModelPredictor
    from rankserve.learn.text_model import TextLengthModel, TrainConfig, train_text_model

    rng = np.random.default_rng(0)
    texts, lengths = _toy_prompts(rng, 96)
    model = TextLengthModel(TextModelConfig(kind=kind, trainable_layers=1, max_length=32, max_output=400))
    history = train_text_model(model, model.encode_bottom(texts), lengths,
                               TrainConfig(epochs=6, list_size=16, lr=3e-4, head_lr=3e-3), progress=False)
    assert history[-1] < history[0]
    test_texts, test_lengths = _toy_prompts(rng, 40)
    model.save(tmp_path / "m.safetensors")
    pred = TextModelPredictor(tmp_path / "m.safetensors")
    assert pred.gives_lengths == (kind == "classifier")
    reqs = [Request([1, 2], SamplingParams(max_tokens=8), prompt_text=t) for t in test_texts]
    pred.score(reqs)
    assert kendall_tau([r.score for r in reqs], test_lengths) > 0.5
    if kind == "classifier":
        assert all(0 < r.predicted_len <= 400 for r in reqs)
    assert pred.report()["prompts_scored"] == 40
    with pytest.raises(ValueError, match="prompt text"):
        pred.score([Request([1], SamplingParams())])
    # Seen prompts come from the bounded cache, with the same prediction as the first time.
    small = TextModelPredictor(tmp_path / "m.safetensors", cache_size=8)
    again = [Request([1, 2], SamplingParams(max_tokens=8), prompt_text=t) for t in test_texts[:4] * 2]
    small.score(again)
    assert small.report()["cache_hits"] == 4 and [r.score for r in again[:4]] == [r.score for r in again[4:]]
    np.testing.assert_allclose([r.score for r in again[:4]], [r.score for r in reqs[:4]], rtol=1e-3, atol=1e-4)
    small.score([Request([1, 2], SamplingParams(max_tokens=8), prompt_text=t) for t in test_texts])
    assert len(small._cache) == 8  # bounded


def test_arrivals_are_scored_in_groups_of_similar_length_with_the_same_scores():
    """One long prompt among short ones is scored apart (the short ones are not padded to it),
    and a prompt's score does not depend on the prompts it arrived with."""
    from rankserve.learn.text_model import GROUP_COST_TOKENS, TextLengthModel, _padding_groups

    assert _padding_groups([12, 10, 250, 11], 64) == [[1, 3, 0], [2]]
    assert _padding_groups([12, 12, 14], 64) == [[0, 1, 2]]  # padding 4 tokens costs less than a batch
    assert sorted(map(len, _padding_groups([10] * 5, 2))) == [1, 2, 2]  # at most batch_size each
    assert GROUP_COST_TOKENS > 2
    model = TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=1, max_length=64))
    texts = ["Answer yes or no: cats.", "Write a long story about " + "the sea and its storms, " * 12,
             "Give one word for rain.", "Summarise in a sentence: trains."]
    together, _, bottoms = model.score_texts(texts, keep_bottoms=True)
    alone = [model.score_texts([t])[0][0] for t in texts]
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert [b.shape[0] for b in bottoms] == [len(x) for x in model.tokenizer(texts, truncation=True, max_length=64)["input_ids"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_score_as_the_plain_ones(dtype):
    """Prepacking the encoder's and the head's weights for oneDNN changes the scores only by
    rounding (oneDNN blocks the sums differently), never their order: the shipped predictor scores
    with them packed."""
    from rankserve.learn.text_model import TextLengthModel, _PackedLinear

    if not torch.backends.mkldnn.is_available() or (dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN cannot run this dtype here")
    model = TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=2, max_length=64, head_hidden=16)).cast(dtype)
    texts = ["Answer yes or no: cats.", "Write a long story about " + "the sea, " * 9, "Give one word for rain."]
    plain, _, _ = model.score_texts(texts)
    model.pack_linears()
    linears = [m for part in (*model._bottom, model.top, model.head) for m in part.modules()]
    assert not any(isinstance(m, torch.nn.Linear) for m in linears)
    assert sum(isinstance(m, _PackedLinear) for m in linears) == 6 * 6 + 2  # six per BERT layer, two in the head
    packed = model.score_texts(texts)[0]
    np.testing.assert_allclose(packed, plain, rtol=1e-4 if dtype == torch.float32 else 3e-2, atol=1e-4)
    assert list(np.argsort(packed)) == list(np.argsort(plain))


def test_a_ranker_on_the_encoders_first_layers_saves_and_loads_them_only(tmp_path):
    """``encoder_layers`` keeps the encoder's first N layers (scoring costs about N/6): the frozen
    bottom and the trained top split those N, and a saved model loads back with the same scores."""
    from rankserve.learn.text_model import TextLengthModel

    model = TextLengthModel(TextModelConfig(kind="ranker", encoder_layers=3, trainable_layers=2, max_length=32))
    assert len(model._bottom) == 1 and len(model.top) == 2
    texts = ["Answer yes or no: cats.", "Write a long story about the sea and its storms."]
    model.save(tmp_path / "short.safetensors")
    loaded = TextLengthModel.load(tmp_path / "short.safetensors")
    assert loaded.config.encoder_layers == 3 and len(loaded._bottom) + len(loaded.top) == 3
    np.testing.assert_allclose(loaded.score_texts(texts)[0], model.score_texts(texts)[0], rtol=1e-3, atol=1e-3)
    whole = TextLengthModel(TextModelConfig(kind="ranker", trainable_layers=2, max_length=32))
    assert len(whole._bottom) + len(whole.top) == 6  # 0, the default: every layer
    for bad in (dict(encoder_layers=7), dict(encoder_layers=2, trainable_layers=3)):
        with pytest.raises(ValueError, match="encoder_layers|trainable_layers"):
            TextLengthModel(TextModelConfig(kind="ranker", max_length=32, **bad))
