"""TextStream: incremental detokenization with stop strings and split multi-byte characters."""

from __future__ import annotations

import pytest

from rankserve.server.text import TextStream


class ByteTokenizer:
    """Token i is byte i (so a character may span tokens); counts the ids it decodes."""

    eos_token_id = None

    def __init__(self) -> None:
        self.decoded_ids = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        self.decoded_ids += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))


def stream_all(text: str, stop=(), chunk: int = 1) -> tuple[str, TextStream, list[str]]:
    tok = ByteTokenizer()
    stream = TextStream(tok, stop)
    ids = tok.encode(text)
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(stream.push(ids[i : i + chunk], final=i + chunk >= len(ids)))
        if stream.stopped:
            break
    return "".join(deltas), stream, deltas


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_split_characters_are_held_until_complete(chunk):
    text = "héllo wörld ✓ 日本語 🎉!"
    out, _, deltas = stream_all(text, chunk=chunk)
    assert out == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_strings_cut_the_text(chunk):
    out, stream, _ = stream_all("one two three four", stop=("thr", "x"), chunk=chunk)
    assert out == "one two " and stream.stopped
    out, stream, _ = stream_all("ab🎉cd", stop=("🎉c",), chunk=chunk)
    assert out == "ab" and stream.stopped
    out, stream, _ = stream_all("no stop here", stop=("zz",), chunk=chunk)
    assert out == "no stop here" and not stream.stopped


def test_nothing_that_could_start_a_stop_string_is_emitted_early():
    tok = ByteTokenizer()
    stream = TextStream(tok, ("END",))
    assert stream.push(tok.encode("abcE")) == "ab"  # "cE" could be the start of "END"
    assert stream.push(tok.encode("N")) == "c"  # "EN" could
    assert stream.push(tok.encode("x")) == "E"
    assert stream.push(tok.encode("yEND")) == "Nxy" and stream.stopped


def test_an_incomplete_character_at_the_end_is_flushed():
    tok = ByteTokenizer()
    stream = TextStream(tok)
    assert stream.push([0xE2, 0x9C]) == ""
    assert stream.push([], final=True) == "\ufffd"


def test_decoding_cost_is_linear_in_the_stream_length():
    """Each push decodes a short window, not everything so far (that was O(n^2))."""
    text = "word " * 2000
    _, stream, _ = stream_all(text)
    assert stream.tokenizer.decoded_ids < 5 * len(text)  # re-decoding everything: ~n^2 / 2 = 5e7
