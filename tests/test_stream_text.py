"""Byte-exact streaming on the real model: stop sequences and multi-byte text."""

from __future__ import annotations

import pytest

from mullama import SamplerParams

PROMPT = "The capital of France is"


def _greedy_pieces(ctx, model, prompt, n):
    """Text of each greedy token (token_to_piece), and the whole text."""
    toks = list(ctx.stream_tokens(prompt, max_tokens=n, params=SamplerParams(temperature=0)))
    pieces = [model.token_to_piece(t.token_id).decode("utf-8") for t in toks]
    return pieces, "".join(t.text for t in toks)


def _straddling_stop(pieces, span):
    """A stop string that starts inside one token and ends inside the token span-1 later."""
    for i in range(2, len(pieces) - span):
        window = pieces[i : i + span]
        if all(len(p) >= 2 for p in (window[0], window[-1])):
            return window[0][-1] + "".join(window[1:-1]) + window[-1][:1], i
    raise AssertionError("no suitable tokens to build a straddling stop sequence")


@pytest.mark.parametrize("span", [2, 3])
def test_stop_split_over_tokens_never_leaks(ctx, model, greedy, span):
    pieces, full = _greedy_pieces(ctx, model, PROMPT, 40)
    stop, _ = _straddling_stop(pieces, span)
    expected = full[: full.index(stop)]
    stream = ctx.generate_stream(PROMPT, max_tokens=40, params=greedy, stop=[stop])
    got = list(stream)
    assert "".join(got) == expected
    assert stream.finish_reason == "stop" and stream.stop_sequence == stop
    assert all(stop not in "".join(got[: k + 1]) for k in range(len(got)))
    assert ctx.generate(PROMPT, max_tokens=40, params=greedy, stop=stop) == expected
    tokens = list(ctx.stream_tokens(PROMPT, max_tokens=40, params=greedy, stop=[stop]))
    assert tokens[-1].is_final and "".join(t.text for t in tokens) == expected


def test_stop_prefix_is_released_when_no_match(ctx, model, greedy):
    pieces, full = _greedy_pieces(ctx, model, PROMPT, 20)
    # a stop that begins like the text but diverges: its prefix is held, then emitted
    word = pieces[3]
    stop = word + "\x01never"
    stream = ctx.generate_stream(PROMPT, max_tokens=20, params=greedy, stop=stop)
    assert "".join(stream) == full
    assert stream.finish_reason == "length"


def test_stop_sequence_at_the_start(ctx, model, greedy):
    pieces, full = _greedy_pieces(ctx, model, PROMPT, 5)
    stream = ctx.generate_stream(PROMPT, max_tokens=5, params=greedy, stop=full[:3])
    assert list(stream) == [] and stream.finish_reason == "stop"


def test_earliest_of_several_stops_wins(ctx, model, greedy):
    pieces, full = _greedy_pieces(ctx, model, PROMPT, 30)
    late, early = pieces[20].strip() or pieces[21], pieces[8]
    text = ctx.generate(PROMPT, max_tokens=30, params=greedy, stop=[late, early])
    assert text == full[: min(full.index(late), full.index(early))]


# prompts that make the model emit byte-fallback tokens (one UTF-8 byte per token)
MULTIBYTE = ["Linear B: \U00010000\U00010001\U00010002\U00010003\U00010004\U00010005", "\U0001fae8" * 6,
             "\U00012000\U00012001\U00012002\U00012003\U00012004\U00012005"]


@pytest.mark.parametrize("prompt", MULTIBYTE)
def test_multibyte_output_is_whole_utf8(ctx, model, greedy, prompt):
    tokens = list(ctx.stream_tokens(prompt, max_tokens=40, params=greedy))
    raw = [model.token_to_piece(t.token_id) for t in tokens]
    assert any(len(r) == 1 and r[0] >= 0x80 for r in raw), "expected byte-fallback tokens"
    # every piece is text on its own; split characters were held back, not replaced
    pieces = [t.text for t in tokens]
    text = "".join(pieces)
    # only a character cut by max_tokens at the very end may become U+FFFD
    assert "\ufffd" not in text.rstrip("\ufffd")
    assert text == model.detokenize([t.token_id for t in tokens])
    assert ctx.generate(prompt, max_tokens=40, params=greedy) == text
    assert "".join(ctx.generate_stream(prompt, max_tokens=40, params=greedy)) == text
    assert any(p == "" for p in pieces)  # held-back bytes really happened


def test_multibyte_ending_on_a_whole_character_has_no_replacement(ctx, model, greedy):
    prompt = "\U0001fae8" * 6  # each emoji is 4 byte tokens
    tokens = list(ctx.stream_tokens(prompt, max_tokens=40, params=greedy))
    text = "".join(t.text for t in tokens)
    assert "\ufffd" not in text and text.count("\U0001fae8") >= 5
    assert all("\ufffd" not in t.text for t in tokens)


def test_unfinished_character_at_the_end_becomes_one_replacement(ctx, model, greedy):
    """Documented behaviour: if max_tokens cuts a character, its bytes are flushed as U+FFFD."""
    prompt = "\U0001fae8" * 6
    tokens = list(ctx.stream_tokens(prompt, max_tokens=41, params=greedy))
    raw = b"".join(model.token_to_piece(t.token_id) for t in tokens)
    text = "".join(t.text for t in tokens)
    assert raw.decode("utf-8", "replace") == text
    if len(raw.decode("utf-8", "ignore").encode()) != len(raw):
        assert text.endswith("\ufffd") and text.count("\ufffd") == 1
        assert tokens[-1].is_final and tokens[-1].text.endswith("\ufffd")
