"""The backend protocol that Engine owns: sessions taken on the first next() and freed in
finally, stop strings, finish reasons, usage, cancel, and no half characters at a cut."""
from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from engines import synthetic
from infer_engine import InvalidRequest, SamplingParams
from infer_engine.base import Engine, Piece, StopStringFilter
from infer_engine.errors import SessionBusy
from infer_engine.transformers_backend import IncrementalDecoder

Q = [{"role": "user", "content": "one two three"}]


def filtered(stops, chunks) -> str:
    f = StopStringFilter(stops)
    return "".join(f.feed(c) for c in chunks) + f.flush()


@pytest.mark.parametrize("stops,text,expected", [
    (["END"], "abc END def", "abc "),
    (["END"], "abc EN", "abc EN"),                 # a stop string that never completes is text
    (["bc", "abcd"], "xabcd", "xa"),               # the match that ends first wins
    (["aab"], "aaab", "a"),                        # overlapping prefixes (the KMP fallback)
    (["ab", "b"], "ab", ""),
    ([], "plain", "plain"),
])
def test_stop_strings_cut_the_same_however_the_text_is_chunked(stops, text, expected):
    assert filtered(stops, [text]) == expected
    assert filtered(stops, list(text)) == expected  # one character at a time
    assert filtered(stops, [text[:2], text[2:]]) == expected


def test_stop_filter_holds_back_only_a_possible_start():
    f = StopStringFilter(["<END>"])
    assert f.feed("hello <E") == "hello "
    assert f.feed("ND") == ""
    assert f.feed("x") == "<ENDx"
    assert f.feed("<END> after") == "" and f.stopped


def test_stop_filter_work_is_linear_in_the_text():
    # The case: 16 stop strings of 30,000 characters that almost match the text all the
    # way. Requests may no longer send these (SamplingParams bounds them), but the filter must
    # not care: re-scanning the held text per token took seconds per token; linear it is
    # milliseconds for the whole stream.
    stops = ["a" * 29_999 + chr(ord("b") + i) for i in range(16)]
    f = StopStringFilter(stops)
    t0 = time.process_time()
    out = "".join(f.feed("a" * 7) for _ in range(3000))
    assert time.process_time() - t0 < 10
    assert out == "" and len(f.flush()) == 21000 and not f.stopped


class Scripted(Engine):
    """A backend yielding fixed pieces, to see what Engine makes of them."""

    def __init__(self, pieces):
        super().__init__()
        self.pieces = pieces
        self.closed = 0

    def generate(self, gen):
        try:
            yield from self.pieces
        finally:
            self.closed += 1


def test_a_stream_takes_its_session_on_the_first_next_and_frees_it_at_the_end():
    eng = synthetic()
    stream = eng.stream_chat(Q, SamplingParams(max_new_tokens=8), "s")
    assert eng.running_sessions() == []  # dropped before its first next(): nothing held
    del stream
    stream = eng.stream_chat(Q, SamplingParams(max_new_tokens=8), "s")
    assert next(stream).text == "You"
    assert eng.running_sessions() == ["s"]
    with pytest.raises(SessionBusy, match="already has a reply being generated") as err:
        next(eng.stream_chat(Q, SamplingParams(), "s"))
    assert "'s'" not in str(err.value)  # the id is not shown to whoever sent the request
    rest = list(stream)
    assert rest[-1].usage.finish_reason == "stop" and eng.running_sessions() == []
    eng.stream_chat(Q, SamplingParams(), "s").close()  # closed unread: nothing held either
    assert eng.chat(Q, SamplingParams(), "s")[0] == "You said: one two three"


def test_closing_a_stream_midway_closes_the_backend_and_frees_the_session():
    eng = Scripted([Piece("a"), Piece("b"), Piece("c")])
    stream = eng.stream_chat(Q, SamplingParams(), "s")
    assert next(stream).text == "a"
    stream.close()
    assert eng.closed == 1 and eng.running_sessions() == []


def test_finish_reasons_and_usage():
    text, usage = Scripted([Piece("a", completion_tokens=1), Piece("b", completion_tokens=2)]).chat(
        Q, SamplingParams(max_new_tokens=2))
    assert (text, usage.finish_reason, usage.completion_tokens) == ("ab", "length", 2)
    _, usage = Scripted([Piece("a"), Piece("", finish_reason="stop")]).chat(Q, SamplingParams(max_new_tokens=1))
    assert usage.finish_reason == "stop" and usage.completion_tokens == 1
    eng = Scripted([Piece("x STOP y"), Piece("z")])
    assert eng.chat(Q, SamplingParams(stop=["STOP"]))[0] == "x " and eng.closed == 1


def test_cancel_ends_the_stream_as_cancelled():
    eng = synthetic(tokens_per_s=50, reply_tokens=1000)
    stream = eng.stream_chat(Q, SamplingParams(max_new_tokens=1000), "c")
    next(stream)
    assert eng.cancel("c") is True
    rest = list(stream)
    assert rest[-1].usage.finish_reason == "cancelled" and rest[-1].usage.completion_tokens < 1000
    assert eng.cancel("c") is False and eng.running_sessions() == []


def test_a_reply_cut_in_the_middle_of_a_character_does_not_end_in_a_replacement_char(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode("我的名字是小明", add_special_tokens=False)
    # the tiny tokenizer is byte-level: find a cut that ends inside a character
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))

    class Decoding(Engine):
        def generate(self, gen):
            dec = IncrementalDecoder(tok)
            for n, i in enumerate(ids[:cut], 1):
                yield Piece(dec.add([i]), completion_tokens=n)
            yield Piece(dec.flush(), completion_tokens=cut, finish_reason="length")

    text, usage = Decoding().chat(Q, SamplingParams(max_new_tokens=cut))
    assert usage.finish_reason == "length" and text and "\ufffd" not in text
    assert "我的名字是小明".startswith(text)


@pytest.mark.parametrize("finish,expected", [("length", "ab"), ("stop", "ab\ufffd")])
def test_invalid_bytes_the_model_ended_with_are_kept_a_cut_is_not(finish, expected):
    """A remote server that cut at a stop string sends text ending in U+FFFD (invalid bytes
    the model wrote before the stop): the reply keeps them, as the reply read whole does."""
    text, usage = Scripted([Piece("ab\ufffd", completion_tokens=3, finish_reason=finish)]).chat(
        Q, SamplingParams(max_new_tokens=8))
    assert (text, usage.finish_reason) == (expected, finish)


def test_bad_requests_fail_at_the_call_before_anything_runs():
    eng = Scripted([Piece("never")])
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        eng.stream_chat([{"role": "user", "content": "a\ud800"}])
    with pytest.raises(InvalidRequest) as err:
        eng.stream_chat(Q, SamplingParams(stop=["x" * 257]))
    assert err.value.param == "stop"
    assert eng.closed == 0 and eng.running_sessions() == []
