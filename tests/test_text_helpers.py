"""Tests for the C text helpers (include/mullama/mll_utf8.h, mll_stop.h) via mullama._engine._text.

The stop matcher is checked against an obviously-correct quadratic reference
over many random texts, stop sets and chunkings; the UTF-8 holdback against
Python's own strict decoder. No model is needed.
"""

from __future__ import annotations

import random

import pytest

from mullama._engine._text import StopMatcher, Utf8Holdback, utf8_complete_len


# --------------------------------------------------------------------------
# reference models and drivers
# --------------------------------------------------------------------------

def ref_stop(text: bytes, stops: list[bytes]):
    """(output, matched_index | None): the earliest position where any stop
    *ends*; among the stops ending there the longest wins (the lowest index
    among identical strings). Output is the text before it."""
    for end in range(1, len(text) + 1):
        ending = [i for i, s in enumerate(stops) if text[:end].endswith(s)]
        if ending:
            best = max(len(stops[i]) for i in ending)
            idx = min(i for i in ending if len(stops[i]) == best)
            return text[: end - best], idx
    return text, None


def ref_held(fed: bytes, stops: list[bytes]) -> int:
    """Length of the longest suffix of `fed` that is a proper prefix of a stop:
    exactly what the matcher must hold back (no more, no less)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(fed)), best, -1):
            if fed.endswith(s[:k]):
                best = k
                break
    return best


def random_split(rng: random.Random, data: bytes, allow_empty: bool = True) -> list[bytes]:
    """Split `data` at random byte positions (may cut inside a UTF-8 character);
    occasionally inserts empty chunks, which must be harmless."""
    chunks: list[bytes] = []
    i = 0
    while i < len(data):
        if allow_empty and rng.random() < 0.1:
            chunks.append(b"")
        n = rng.randint(1, 6)
        chunks.append(data[i : i + n])
        i += n
    if allow_empty and rng.random() < 0.2:
        chunks.append(b"")
    return chunks


def run_stop(stops: list[bytes], chunks: list[bytes]):
    """Feed chunks one by one, checking the per-feed invariants on the way.
    Returns (all emitted bytes incl. flush, matched_index)."""
    m = StopMatcher(stops)
    ref_out, ref_idx = ref_stop(b"".join(chunks), stops)
    max_len = max((len(s) for s in stops), default=0)
    fed = b""
    emitted = b""
    matched = False
    for chunk in chunks:
        out, now_matched = m.feed(chunk)
        if matched:
            # after a match nothing more comes out, and the match is sticky
            assert (out, now_matched) == (b"", True)
            continue
        fed += chunk
        emitted += out
        # emitted bytes are never taken back: always a prefix of the final output
        assert ref_out.startswith(emitted), (stops, chunks, emitted)
        # no emitted prefix contains a stop sequence (the stop never leaks)
        for s in stops:
            assert s not in emitted, (stops, chunks, emitted)
        if now_matched:
            matched = True
            assert m.held == 0
            assert m.matched_index == ref_idx
        else:
            assert m.matched_index is None
            # held back exactly the longest possible stop start, all else emitted
            assert m.held == ref_held(fed, stops), (stops, chunks)
            assert emitted + fed[len(fed) - m.held :] == fed
            assert m.held < max(max_len, 1)
    if matched:
        assert m.flush() == b""
    else:
        emitted += m.flush()
        assert m.held == 0
    assert m.flush() == b""  # a second flush has nothing left
    return emitted, m.matched_index


def run_utf8(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """Feed chunks through a holdback; return (pieces, flushed tail). Checks
    that `pending` is always exactly the unfinished tail of all bytes fed."""
    h = Utf8Holdback()
    pieces = []
    fed = b""
    for chunk in chunks:
        fed += chunk
        piece = h.feed(chunk)
        pieces.append(piece)
        assert 0 <= h.pending <= 3
        assert h.pending == len(fed) - utf8_complete_len(fed), (chunks, fed)
        assert b"".join(pieces) + fed[len(fed) - h.pending :] == fed
    tail = h.flush()
    assert h.pending == 0
    assert h.flush() == b""
    return pieces, tail


# --------------------------------------------------------------------------
# reference model self-checks (a wrong oracle would make everything moot)
# --------------------------------------------------------------------------

def test_reference_model_itself():
    assert ref_stop(b"hello", []) == (b"hello", None)
    assert ref_stop(b"a\n\nb", [b"\n\n", b"\n"]) == (b"a", 1)
    assert ref_stop(b"xab", [b"b", b"ab"]) == (b"x", 1)
    assert ref_stop(b"aaab", [b"aab"]) == (b"a", 0)
    assert ref_held(b"xx<|en", [b"<|end|>"]) == 4
    assert ref_held(b"aaa", [b"aaa"]) == 2  # proper prefix only


# --------------------------------------------------------------------------
# stop matcher: randomized comparison with the reference
# --------------------------------------------------------------------------

def _random_stops(rng: random.Random, text: bytes, alphabet: list[bytes]) -> list[bytes]:
    stops = []
    for _ in range(rng.randint(1, 4)):
        if text and rng.random() < 0.5:
            # a substring of the text, so matches (and near-matches) are common
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 5)])
        else:
            stops.append(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
    return stops


@pytest.mark.parametrize(
    "alphabet",
    [
        [b"a", b"b"],
        [b"a", b"b", b"c"],
        [b"a", b"\n"],
        ["é".encode(), "日".encode(), "本".encode(), "😀".encode(), b"a"],
    ],
    ids=["ab", "abc", "a-newline", "utf8"],
)
def test_stop_matcher_random_vs_reference(alphabet):
    rng = random.Random(0x5EED + len(alphabet))
    matches = 0
    for _ in range(700):
        text = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        stops = _random_stops(rng, text, alphabet)
        expected_out, expected_idx = ref_stop(text, stops)
        matches += expected_idx is not None
        results = {
            "whole": run_stop(stops, [text]),
            "bytewise": run_stop(stops, [text[i : i + 1] for i in range(len(text))]),
            "random": run_stop(stops, random_split(rng, text)),
        }
        for how, (out, idx) in results.items():
            # same answer as the reference, whatever the split
            assert (out, idx) == (expected_out, expected_idx), (how, text, stops)
    # the generator must actually exercise both outcomes
    assert 150 < matches < 650


def test_stop_matcher_random_overlapping_stop_families():
    # stops built to overlap each other and themselves ("aab", "abab", "aaa", ...)
    rng = random.Random(1234)
    family = [b"a", b"aa", b"aaa", b"aab", b"ab", b"abab", b"aba", b"ba", b"bab", b"abaab", b"b"]
    for _ in range(1500):
        stops = rng.sample(family[:-1], rng.randint(1, 3))  # usually without "b" so text can run
        text = bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 30)))
        expected = ref_stop(text, stops)
        assert run_stop(stops, random_split(rng, text)) == expected, (text, stops)
        assert run_stop(stops, [text[i : i + 1] for i in range(len(text))]) == expected


# --------------------------------------------------------------------------
# stop matcher: edge cases
# --------------------------------------------------------------------------

def test_no_stops_is_pass_through():
    m = StopMatcher([])
    assert m.feed(b"hello ") == (b"hello ", False)
    assert m.feed(b"") == (b"", False)
    assert m.feed(b"\x00\xff world") == (b"\x00\xff world", False)
    assert m.held == 0
    assert m.matched_index is None
    assert m.flush() == b""


@pytest.mark.parametrize("stops", [[b""], [b"a", b""], [b"", b"b"]])
def test_empty_stop_raises(stops):
    with pytest.raises(ValueError):
        StopMatcher(stops)


def test_stop_equal_to_whole_text():
    m = StopMatcher([b"STOP"])
    assert m.feed(b"STOP") == (b"", True)
    assert m.matched_index == 0
    assert m.flush() == b""


def test_stop_at_very_start():
    m = StopMatcher([b"\n"])
    assert m.feed(b"\nhello") == (b"", True)
    assert m.matched_index == 0


def test_text_after_stop_in_same_feed_is_dropped():
    m = StopMatcher([b"END"])
    assert m.feed(b"abcENDdef") == (b"abc", True)
    assert m.feed(b"more") == (b"", True)


def test_stop_split_across_two_feeds():
    m = StopMatcher([b"END"])
    assert m.feed(b"hello EN") == (b"hello ", False)
    assert m.held == 2
    assert m.feed(b"D world") == (b"", True)
    assert m.matched_index == 0


def test_stop_split_across_three_feeds():
    m = StopMatcher([b"<|end|>"])
    assert m.feed(b"xx<") == (b"xx", False)
    assert m.held == 1
    assert m.feed(b"|e") == (b"", False)
    assert m.held == 3
    assert m.feed(b"nd|>yy") == (b"", True)


def test_stop_split_byte_by_byte():
    stop = b"<|im_end|>"
    m = StopMatcher([stop])
    out = b""
    for i, b in enumerate(b"answer" + stop + b"tail"):
        piece, matched = m.feed(bytes([b]))
        out += piece
        if matched:
            break
    assert out == b"answer"
    assert i == len(b"answer" + stop) - 1  # matched on the last byte of the stop


def test_false_start_is_released():
    # "<|en" looked like the start of the stop; "x" proves it was not
    m = StopMatcher([b"<|end|>"])
    assert m.feed(b"a<|en") == (b"a", False)
    assert m.feed(b"x") == (b"<|enx", False)
    assert m.held == 0


def test_false_start_releases_only_what_cannot_restart():
    # "<|<|" : the second "<|" may still start the stop
    m = StopMatcher([b"<|end|>"])
    assert m.feed(b"<|") == (b"", False)
    assert m.feed(b"<|") == (b"<|", False)
    assert m.held == 2
    assert m.feed(b"end|>") == (b"", True)


@pytest.mark.parametrize("order", [0, 1])
def test_prefix_stop_wins_when_it_ends_first(order):
    # "\n" ends before "\n\n" can: the shorter stop fires, no waiting for "\n\n"
    stops = [b"\n", b"\n\n"] if order == 0 else [b"\n\n", b"\n"]
    m = StopMatcher(stops)
    assert m.feed(b"a\n") == (b"a", True)
    assert stops[m.matched_index] == b"\n"
    m2 = StopMatcher(stops)
    assert m2.feed(b"a\n\nb") == (b"a", True)
    assert stops[m2.matched_index] == b"\n"


def test_longest_stop_wins_when_ending_at_same_byte():
    stops = [b"b", b"ab"]
    m = StopMatcher(stops)
    assert m.feed(b"xab") == (b"x", True)
    assert m.matched_index == 1
    m = StopMatcher(stops)
    assert m.feed(b"xa") == (b"x", False)
    assert m.feed(b"b") == (b"", True)
    assert m.matched_index == 1


def test_duplicate_stops_report_first_index():
    m = StopMatcher([b"zz", b"ab", b"ab"])
    assert m.feed(b"cab") == (b"c", True)
    assert m.matched_index == 1


def test_held_prefix_rebuilt_from_another_stop():
    # held "ab" is a prefix of stop 0, but the match is stop 1 ("bY")
    m = StopMatcher([b"abX", b"bY"])
    assert m.feed(b"ab") == (b"", False)
    assert m.held == 2
    assert m.feed(b"Y") == (b"a", True)
    assert m.matched_index == 1


@pytest.mark.parametrize(
    "stop, text, expected",
    [
        (b"aaa", b"aabaaab", b"aab"),
        (b"aaa", b"aaaa", b""),
        (b"aab", b"aaab", b"a"),
        (b"aab", b"aaaaab", b"aaa"),
        (b"abab", b"ababab", b""),
        (b"abab", b"abaabab", b"aba"),
        (b"abaab", b"abaabaab", b""),
        (b"abaab", b"ababaab", b"ab"),
    ],
)
def test_repeated_and_self_overlapping_stops(stop, text, expected):
    for chunks in ([text], [text[i : i + 1] for i in range(len(text))]):
        m = StopMatcher([stop])
        out = b""
        matched = False
        for c in chunks:
            piece, matched = m.feed(c)
            out += piece
        assert matched
        assert out == expected


def test_repeated_char_stop_holds_at_most_len_minus_one():
    m = StopMatcher([b"aaa"])
    assert m.feed(b"aa") == (b"", False)
    assert m.held == 2
    assert m.feed(b"b") == (b"aab", False)
    assert m.feed(b"aa") == (b"", False)
    assert m.feed(b"a") == (b"", True)


def test_empty_feeds_are_harmless():
    m = StopMatcher([b"END"])
    assert m.feed(b"") == (b"", False)
    assert m.feed(b"xE") == (b"x", False)
    assert m.feed(b"") == (b"", False)
    assert m.held == 1
    assert m.feed(b"ND") == (b"", True)
    assert m.feed(b"") == (b"", True)


def test_feeding_after_match():
    m = StopMatcher([b"!"])
    assert m.feed(b"hi!") == (b"hi", True)
    for data in (b"", b"more", b"!", b"x" * 100):
        assert m.feed(data) == (b"", True)
    assert m.matched_index == 0
    assert m.held == 0
    assert m.flush() == b""


def test_reset_then_reuse():
    m = StopMatcher([b"END", b"STOP"])
    assert m.feed(b"aSTOPb") == (b"a", True)
    assert m.matched_index == 1
    m.reset()
    assert m.matched_index is None
    assert m.held == 0
    assert m.feed(b"new EN") == (b"new ", False)
    assert m.feed(b"D") == (b"", True)
    assert m.matched_index == 0


def test_reset_discards_held_prefix():
    m = StopMatcher([b"END"])
    assert m.feed(b"xEN") == (b"x", False)
    m.reset()
    assert m.held == 0
    assert m.flush() == b""
    # the old "EN" must not combine with a new "D"
    assert m.feed(b"D") == (b"D", False)


def test_flush_returns_held_partial_prefix():
    m = StopMatcher([b"<|end|>"])
    assert m.feed(b"abc<|en") == (b"abc", False)
    assert m.flush() == b"<|en"
    assert m.held == 0
    assert m.flush() == b""
    assert m.matched_index is None


def test_flush_of_prefix_of_second_stop():
    m = StopMatcher([b"xyz", b"abc"])
    assert m.feed(b"--ab") == (b"--", False)
    assert m.flush() == b"ab"


def test_nul_and_high_bytes_are_ordinary_bytes():
    # stop strings are lengths + pointers, not C strings; bytes >= 0x80 compare fine
    m = StopMatcher([b"a\x00b"])
    assert m.feed(b"x\x00a\x00") == (b"x\x00", False)
    assert m.feed(b"b") == (b"", True)
    m = StopMatcher([b"\xff\xfe"])
    assert m.feed(b"\x80\xff\xfe\x01") == (b"\x80", True)
    m = StopMatcher([b"\xff\xfe"])
    assert m.feed(b"\xfe\xff\xff") == (b"\xfe\xff", False)
    assert m.flush() == b"\xff"


def test_long_input_without_match():
    data = bytes(random.Random(7).choice(b"abc") for _ in range(100_000))
    m = StopMatcher([b"abcabcabcx", b"ccccccccq"])
    out, matched = m.feed(data)
    assert not matched
    assert out + m.flush() == data


# --------------------------------------------------------------------------
# UTF-8 holdback
# --------------------------------------------------------------------------

# one character per length class, plus the boundaries of each class
CODE_POINT_SAMPLES = "A\x00\x7f\x80é\u07ff\u0800日€\ud7ff\ue000\uffff\U00010000😀\U0010ffff"


def test_samples_cover_every_length_class():
    assert {len(c.encode()) for c in CODE_POINT_SAMPLES} == {1, 2, 3, 4}


@pytest.mark.parametrize("ch", list(CODE_POINT_SAMPLES), ids=lambda c: f"U+{ord(c):04X}")
def test_each_character_split_at_every_boundary(ch):
    data = b"x" + ch.encode() + b"y"
    n = len(data)
    for i in range(n + 1):
        for j in range(i, n + 1):
            pieces, tail = run_utf8([data[:i], data[i:j], data[j:]])
            assert tail == b""
            for p in pieces:
                p.decode("utf-8")  # strict: raises on a split character
            assert b"".join(pieces) == data


def test_text_of_all_classes_byte_by_byte_and_pending():
    text = CODE_POINT_SAMPLES * 2
    data = text.encode()
    h = Utf8Holdback()
    out = b""
    boundaries = {len(text[:k].encode()) for k in range(len(text) + 1)}
    for i in range(len(data)):
        piece = h.feed(data[i : i + 1])
        piece.decode("utf-8")
        out += piece
        # pending = bytes since the last character boundary, and nothing else
        last_boundary = max(b for b in boundaries if b <= i + 1)
        assert h.pending == i + 1 - last_boundary
        assert out == data[:last_boundary]
    assert out == data
    assert h.flush() == b""


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xf5", b"\xf8", b"a\x80\x80\x80\x80\x80"],
)
def test_bytes_that_can_never_be_valid_are_emitted_at_once(data):
    h = Utf8Holdback()
    assert h.feed(data) == data
    assert h.pending == 0


def test_truncated_sequence_released_by_following_ascii():
    h = Utf8Holdback()
    assert h.feed(b"\xe6\xad") == b""
    assert h.pending == 2
    assert h.feed(b"a") == b"\xe6\xada"
    assert h.pending == 0


def test_truncated_sequence_released_by_following_lead():
    h = Utf8Holdback()
    assert h.feed(b"\xe6") == b""
    assert h.feed(b"\xe6") == b"\xe6"  # the first can no longer be finished
    assert h.pending == 1
    assert h.feed(b"\x97\xa5") == "日".encode()


def test_stray_continuation_after_complete_character():
    h = Utf8Holdback()
    assert h.feed("é".encode() + b"\x80") == "é".encode() + b"\x80"
    assert h.pending == 0


@pytest.mark.parametrize(
    "prefix", [b"\xc3", b"\xe6", b"\xe6\x97", b"\xf0", b"\xf0\x9f", b"\xf0\x9f\x98"]
)
def test_flush_returns_unfinished_tail(prefix):
    h = Utf8Holdback()
    assert h.feed(b"ok" + prefix) == b"ok"
    assert h.pending == len(prefix)
    assert h.flush() == prefix
    assert h.pending == 0
    assert h.flush() == b""


def test_flush_on_complete_text_is_empty():
    h = Utf8Holdback()
    assert h.feed("日本😀".encode()) == "日本😀".encode()
    assert h.flush() == b""


def test_holdback_usable_after_flush():
    h = Utf8Holdback()
    h.feed(b"\xe6")
    assert h.flush() == b"\xe6"
    assert h.feed("é".encode()) == "é".encode()


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", 0),
        (b"abc", 3),
        (b"\xc3", 0),
        (b"a\xc3", 1),
        (b"a\xc3\xa9", 3),
        (b"\xe6\x97", 0),
        (b"x\xe6\x97", 1),
        (b"x\xe6\x97\xa5", 4),
        (b"\xf0\x9f\x98", 0),
        (b"\xf0\x9f\x98\x80", 4),
        (b"ab\xf0", 2),
        (b"\x80", 1),
        (b"\x80\x80\x80\x80\x80", 5),
        (b"\xff", 1),
        (b"a\xff", 2),
        (b"\xc0", 1),
        (b"\xc1", 1),
        (b"\xf5", 1),
        (b"\xe6\xada", 3),
        (b"\xc3\xa9\x80", 3),
        (b"\xe6\xe6", 1),
        (b"\xf0\x9f\x98\x80\xf0\x9f", 4),
    ],
)
def test_utf8_complete_len(data, expected):
    assert utf8_complete_len(data) == expected


def test_utf8_complete_len_accepts_bytearray():
    assert utf8_complete_len(bytearray(b"a\xe6\x97")) == 1


def test_random_emoji_cjk_text_random_splits():
    rng = random.Random(2024)
    chars = "aZ é ü 日本語 中文 €😀🎉👍🏽 \U0010ffff\n"
    for _ in range(400):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        data = text.encode()
        pieces, tail = run_utf8(random_split(rng, data))
        assert tail == b""
        assert "".join(p.decode("utf-8") for p in pieces) == text


def test_random_invalid_bytes_never_lost_nor_held_forever():
    # interesting bytes: ASCII, continuations, every lead class, never-valid bytes
    rng = random.Random(99)
    alphabet = [0x41, 0x80, 0xA9, 0xBF, 0xC0, 0xC3, 0xE6, 0xED, 0xF0, 0xF4, 0xF5, 0xFF]
    for _ in range(600):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        pieces, tail = run_utf8(random_split(rng, data))
        assert b"".join(pieces) + tail == data
        assert len(tail) <= 3
        # holding only unfinished tails means per-piece decoding matches the
        # unstreamed decode (U+FFFD in the same places)
        streamed = "".join(p.decode("utf-8", "replace") for p in pieces + [tail])
        assert streamed == data.decode("utf-8", "replace"), data


# --------------------------------------------------------------------------
# the engine pipeline: bytes -> Utf8Holdback -> StopMatcher
# --------------------------------------------------------------------------

def run_pipeline(stops: list[bytes], chunks: list[bytes]):
    """Mirror of the generation loop: each token's bytes go through the UTF-8
    holdback, then the stop matcher; at the end flush the matcher, then the
    holdback (the order mll__finish uses)."""
    u = Utf8Holdback()
    m = StopMatcher(stops)
    pieces = []
    matched = False
    for chunk in chunks:
        out, matched = m.feed(u.feed(chunk))
        pieces.append(out)
        if matched:
            break
    if not matched:
        pieces.append(m.flush())
        pieces.append(u.flush())
    return pieces, m.matched_index


def _check_pipeline(stops, data, chunks):
    pieces, idx = run_pipeline(stops, chunks)
    emitted = b""
    for p in pieces:
        p.decode("utf-8")  # every piece is whole UTF-8, never a split character
        emitted += p
        for s in stops:
            assert s not in emitted  # the stop never leaks
    assert (emitted, idx) == ref_stop(data, stops), (data, stops, chunks)


def test_pipeline_multibyte_stops_hand_picked():
    cases = [
        ("今日本当に", ["日本"], "今"),
        ("café é", ["é"], "caf"),
        ("ab😀cd", ["😀"], "ab"),
        ("ab😀cd", ["😀c", "😀"], "ab"),
        ("x日y日本", ["日本", "本"], "x日y"),
        ("no stop here ü", ["日本"], "no stop here ü"),
        ("a\n\nb", ["\n\n", "\n"], "a"),
        ("<|終わり|>ok", ["<|終わり|>"], ""),
    ]
    for text, stops, expected in cases:
        data = text.encode()
        bstops = [s.encode() for s in stops]
        assert ref_stop(data, bstops)[0] == expected.encode()
        for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
            _check_pipeline(bstops, data, chunks)


def test_pipeline_partial_multibyte_stop_at_end_is_flushed_whole():
    # text ends with "日", a prefix of the stop "日本": held, then flushed as whole UTF-8
    data = "abc日".encode()
    pieces, idx = run_pipeline(["日本".encode()], [data[i : i + 1] for i in range(len(data))])
    assert idx is None
    assert b"".join(pieces) == data
    assert pieces[-2] == "日".encode()  # came out of the stop matcher's flush
    for p in pieces:
        p.decode("utf-8")


def test_pipeline_random():
    rng = random.Random(31337)
    chars = ["a", "b", "é", "日", "本", "😀", "\n", "€"]
    for _ in range(600):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 24)))
        stops = []
        for _ in range(rng.randint(1, 3)):
            if text and rng.random() < 0.6:
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 3)])
            else:
                stops.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 3))))
        data = text.encode()
        bstops = [s.encode() for s in stops]
        _check_pipeline(bstops, data, random_split(rng, data))
        _check_pipeline(bstops, data, [data[i : i + 1] for i in range(len(data))])


# ---------------------------------------------------------------- logits reductions

@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 33, 100, 4096, 262144])
def test_logits_argmax_matches_numpy(n):
    import numpy as np

    from mullama._engine._text import logits_argmax, logits_logsumexp

    rng = np.random.default_rng(n)
    for _ in range(5):
        x = rng.normal(size=n).astype(np.float32)
        assert logits_argmax(x) == int(np.argmax(x))
        assert logits_logsumexp(x) == pytest.approx(float(np.log(np.exp(x.astype(np.float64)).sum())), rel=1e-6)
    # ties: the first index wins, wherever the ties sit relative to the 16 lanes
    x = np.zeros(n, dtype=np.float32)
    for first in sorted({0, n // 3, n - 1}):
        y = x.copy()
        y[first:] = 1.0
        assert logits_argmax(y) == first
    y = np.full(n, -np.inf, dtype=np.float32)
    y[-1] = -1e30
    assert logits_argmax(y) == n - 1
