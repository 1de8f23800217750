"""Every later turn of ShareGPT as ranker training data: which exchanges count, what the encoder
sees, what the label is, and that the fixed split never lets a test conversation into training."""

from __future__ import annotations

import json

import pytest

from rankserve.cli.main import main
from rankserve.learn import datasets, sharegpt
from rankserve.learn.datasets import load_label_data, served_token_counter
from rankserve.learn.sharegpt import Turn, first_pairs, load_later_turns, sharegpt_split_of, turn_pairs
from rankserve.learn.text_model import TrainConfig


def _record(conv_id: str, *messages: tuple[str, str]) -> dict:
    return {"id": conv_id, "conversations": [{"from": who, "value": text} for who, text in messages]}


CHAT = _record("a_0", ("human", "q one"), ("gpt", "a one two"), ("human", "q two"), ("gpt", "a two"),
               ("gpt", "stray reply"), ("human", "q three"), ("gpt", "a three x y z w"))


def test_turn_pairs_yield_every_human_then_gpt_exchange():
    turns = list(turn_pairs([CHAT, _record("b_0", ("gpt", "x"), ("human", "y"))]))
    assert [(t.index, t.prompt, t.reply) for t in turns] == [
        (0, "q one", "a one two"), (2, "q two", "a two"), (5, "q three", "a three x y z w")]
    assert turns[1].history == (("human", "q one"), ("gpt", "a one two"))
    # first_pairs is the index-0 subset, as before
    assert list(first_pairs([CHAT])) == [("a_0", "q one", "a one two")]


def test_context_input_puts_the_message_first_then_the_newest_context():
    turn = list(turn_pairs([CHAT]))[1]
    assert turn.text("last") == "q two"
    assert turn.text("context") == "q two\n\nAssistant: a one two\n\nUser: q one"
    first = Turn("c", 0, (), "hello", "hi")
    assert first.text("context") == first.text("last") == "hello"  # test prompts read the same either way
    with pytest.raises(ValueError, match="turn input"):
        turn.text("everything")


def test_later_turn_labels_count_the_reply_and_obey_the_filters(monkeypatch):
    long_prompt = " ".join(["w"] * 1100)
    text = json.dumps([
        CHAT,
        _record("c_1", ("human", "p"), ("gpt", "r r r r"), ("human", "tiny"), ("gpt", "r r r r r")),
        _record("d_0", ("human", "p p p p"), ("gpt", "r r r r"), ("human", long_prompt), ("gpt", "r r r r")),
    ])
    monkeypatch.setattr(sharegpt, "read_raw_dataset", lambda: text)
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 (a tokenizer: one token per word)
    later = load_later_turns(words)
    # a_0's later exchanges have prompts under 4 tokens, c_1's "tiny" too, and d_0's prompt is
    # over 1,024 tokens: vLLM's filters keep none of them.
    assert [(t.turn.conv_id, t.turn.index) for t in later] == []
    keep = json.dumps([_record("e_3", ("human", "p p p p"), ("gpt", "r r r r"),
                               ("human", "one two three four five"), ("gpt", "six seven eight nine ten eleven"))])
    monkeypatch.setattr(sharegpt, "read_raw_dataset", lambda: keep)
    (turn,) = load_later_turns(words)
    assert (turn.turn.index, turn.prompt_len, turn.reference_len) == (2, 5, 6)  # the label is the reply's count
    assert turn.split == sharegpt_split_of("e_0")  # the conversation's side, whatever the piece


def test_served_token_counter_counts_no_special_tokens():
    count = served_token_counter()
    empty, hello, longer = count(["", "hello world", "hello world, hello world"])
    assert empty == 0 and 0 < hello < longer


@pytest.fixture(scope="module")
def all_turns_data():
    """The real dataset with every later turn, labelled by word count (the tokenizer is not what
    is under test here, and it takes a minute on two cores)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets, "served_token_counter", lambda: lambda texts: [len(t.split()) for t in texts])
    try:
        yield load_label_data("reference", turns="all", turn_input="context")
    finally:
        patch.undo()


def test_all_turns_never_train_on_a_test_conversation(all_turns_data):
    first = load_label_data("reference")
    data = all_turns_data
    conversations = {cid.split(":")[0] for cid in data.train.ids}
    assert all(sharegpt_split_of(c) == "train" for c in conversations)
    test_keys = {sharegpt.conversation_key(c) for c in first.test.ids}
    assert not {sharegpt.conversation_key(c) for c in conversations} & test_keys
    # the test split is exactly the first-turn one every shipped ranker is measured on
    assert data.test.ids == first.test.ids and (data.test.lengths == first.test.lengths).all()
    # first turns come first, unchanged; later turns follow, several times as many
    n = len(first.train.ids)
    assert data.train.ids[:n] == first.train.ids and (data.train.lengths[:n] == first.train.lengths).all()
    assert len(data.train.ids) > 4 * n
    later = data.train.ids[n:]
    assert all(int(i.split(":")[1]) > 0 for i in later[:100])


def test_max_train_caps_first_and_later_turns_together(all_turns_data):
    n = len(load_label_data("reference").train.ids)
    data = all_turns_data
    capped = datasets._head(data.train, n + 10)
    assert capped.ids == data.train.ids[: n + 10] and len(capped.lengths) == n + 10


def test_all_turns_need_reference_labels_and_known_modes():
    with pytest.raises(ValueError, match="reference labels"):
        load_label_data("served", turns="all")
    with pytest.raises(ValueError, match="turns"):
        load_label_data("reference", turns="some")
    with pytest.raises(ValueError, match="turn input"):
        load_label_data("reference", turns="all", turn_input="whole")
    with pytest.raises(ValueError, match="training precision"):
        TrainConfig(precision="float16")


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "ranker", "--labels", "served", "--turns", "all", "--out", "x.safetensors"], "argument --turns"),
    (["train", "ranker", "--turns", "all", "--from-records", "r.sqlite", "--out", "x.safetensors"],
     "argument --turns"),
    (["train", "ranker", "--turn-input", "everything", "--out", "x.safetensors"], "argument --turn-input"),
])
def test_turn_flags_misuse_is_a_flag_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.sqlite").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err

