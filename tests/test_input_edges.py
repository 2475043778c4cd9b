"""Groups D and G of the test catalogue: tokenizer input edges and context limits.

Every bad input ends in a documented Python exception (``UnicodeEncodeError``,
``IndexError``, ``TypeError``, ``ContextOverflowError``), never an abort; the
context-limit cases check the exact boundary: a prompt of ``n_ctx - 1`` tokens
still gets one token, ``n_ctx`` tokens do not fit, and a long generation ends
with ``finish_reason == "length"`` exactly at the end of the context.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mullama
from load_worker import CRASH_MARKERS, REPO_ROOT

N_CTX = 64


@pytest.fixture(scope="module")
def small_ctx(model: mullama.Model):
    ctx = mullama.Context(model, n_ctx=N_CTX, n_batch=32)
    yield ctx
    ctx.close()


def forced(model: mullama.Model, text: str = "a") -> mullama.SamplerParams:
    """Greedy decoding that always picks the token of ``text``: never an end-of-generation token."""
    (tok,) = model.tokenize(text, add_special=False)
    return mullama.SamplerParams(temperature=0.0, logit_bias={tok: 100.0})


# ---------------------------------------------------------------- tokenizer


def test_empty_text(model: mullama.Model) -> None:
    assert model.tokenize("", add_special=False) == []
    assert model.tokenize(b"", add_special=False) == []
    assert model.tokenize("") == [model.bos_token_id]
    assert model.detokenize([]) == "" and model.detokenize_bytes(np.array([], np.int64)) == b""


def test_ten_megabytes_of_text(model: mullama.Model) -> None:
    # 10 MB of mostly 2- and 3-byte characters with few spaces: linear time in llama.cpp (~2 s).
    # Runs of whitespace or many newlines are quadratic there: see test_whitespace_runs_are_quadratic.
    rnd = random.Random(0)
    # U+2581 is SentencePiece's space marker: it reads back as " ", so it is left out
    text = "".join(map(chr, rnd.choices(range(0x20, 0x3000), k=3_600_000))).replace("\u2581", "_")
    data = text.encode()
    assert len(data) >= 10_000_000
    ids = model.tokenize(data, add_special=False)
    assert len(ids) > 1_000_000
    assert model.detokenize_bytes(ids) == data


def test_nul_bytes_round_trip(model: mullama.Model) -> None:
    for text in ("\x00", "a\x00b", "\x00" * 100, "x\x00\x00\x00y"):
        ids = model.tokenize(text, add_special=False)
        assert ids and model.detokenize(ids) == text


def test_lone_surrogates_raise_a_clean_error(model: mullama.Model) -> None:
    for text in ("\ud800", "ok\udfffok", "\udc80" * 10):
        with pytest.raises(UnicodeEncodeError):
            model.tokenize(text)
    with pytest.raises(TypeError):
        model.tokenize(["not", "text"])  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"\xff", b"\xe6\xad", b"\xc0\x80", b"abc\xffdef", b"\xed\xa0\x80",
                                  b"\xf4\x90\x80\x80", bytes(range(256))])
def test_invalid_utf8_bytes_tokenize_by_bytes(model: mullama.Model, data: bytes) -> None:
    ids = model.tokenize(data, add_special=False)
    assert ids and all(0 <= i < model.n_vocab for i in ids)
    assert model.detokenize_bytes(ids) == data  # byte fallback keeps every byte
    assert "\ufffd" in model.detokenize(ids) or data.isascii()


def test_special_token_text_with_and_without_parse_special(model: mullama.Model) -> None:
    text = "<start_of_turn>user\nhi<end_of_turn>"
    plain = model.tokenize(text, add_special=False, parse_special=False)
    special = model.tokenize(text, add_special=False, parse_special=True)
    assert plain != special and len(special) < len(plain)
    start = model.tokenize("<start_of_turn>", add_special=False, parse_special=True)
    assert len(start) == 1 and start[0] not in plain
    assert model.detokenize(plain) == text  # as plain text it round-trips
    assert model.detokenize(special, special=True) == text
    assert model.detokenize(special) == "user\nhi"  # special tokens are not rendered by default


@pytest.mark.parametrize("bad", [-1, -2**31, -2**63, 262144, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, 10**30])
def test_out_of_range_ids_raise_index_error(model: mullama.Model, bad: int) -> None:
    assert model.n_vocab == 262144
    with pytest.raises(IndexError):
        model.detokenize([bad])
    with pytest.raises(IndexError):
        model.detokenize([1, 2, bad])
    with pytest.raises(IndexError):
        model.token_to_piece(bad)
    with pytest.raises(IndexError):
        model.is_eog(bad)


def test_wrong_id_types_raise_type_error(model: mullama.Model) -> None:
    for bad in (["1"], [1.5], "abc", b"abc", [[1, 2]], [None]):
        with pytest.raises((TypeError, ValueError)):
            model.detokenize(bad)  # type: ignore[arg-type]


def _run_slow(request: pytest.FixtureRequest, code: str, timeout: float) -> str:
    """Run ``code`` in a child (a C call that runs long cannot be interrupted in-process)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0 and not any(m in proc.stderr for m in CRASH_MARKERS), proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_ten_megabytes_of_words(request: pytest.FixtureRequest) -> None:
    """10 MB of short random words separated by single spaces (~9 s, linear)."""
    out = _run_slow(request, """
        import random, mullama
        model = mullama.Model.load(str(mullama.default_model_path()))
        rnd = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyz\u00e9\u00fc\u00df\u4e1c\u4eac\U0001f642"
        text = " ".join("".join(rnd.choices(letters, k=rnd.randint(1, 8))) for _ in range(2_200_000))
        data = text.encode()[:10_000_000].decode("utf-8", "ignore").encode()
        ids = model.tokenize(data, add_special=False)
        print("OK", len(ids), model.detokenize_bytes(ids) == data)
    """, timeout=280)
    assert out.startswith("OK ") and out.split()[2] == "True", out


@pytest.mark.slow
def test_whitespace_runs_are_quadratic(request: pytest.FixtureRequest) -> None:
    """Known llama.cpp behaviour, measured here: user-defined tokens (Gemma's whitespace runs,
    newlines, tabs) are split out of the text in O(n^2): on 2 cores, 50 KB of "ab  cd\\n" took
    0.6 s and 200 KB 8.2 s (400 KB of "ab  cd " 14 s). Slow, never unsafe; 200 KB must finish."""
    out = _run_slow(request, """
        import time, mullama
        model = mullama.Model.load(str(mullama.default_model_path()))
        for n in (50_000, 200_000):
            start = time.perf_counter()
            ids = model.tokenize("ab  cd\\n" * (n // 7), add_special=False)
            print(n, len(ids), time.perf_counter() - start)
    """, timeout=280)
    rows = [line.split() for line in out.splitlines()]
    (small, _, t_small), (big, _, t_big) = [(int(a), int(b), float(c)) for a, b, c in rows]
    assert big == 4 * small and t_big > 0  # the timings are reported, not asserted
    print(f"\ntokenize: {small} bytes in {t_small:.2f} s, {big} bytes in {t_big:.2f} s")


# ---------------------------------------------------------------- context limits


def test_prompt_of_n_ctx_minus_one_gets_one_token(model: mullama.Model, small_ctx: mullama.Context) -> None:
    prompt = [model.bos_token_id] + model.tokenize("b", add_special=False) * (N_CTX - 2)
    assert len(prompt) == N_CTX - 1
    stream = small_ctx.stream_tokens(prompt, max_tokens=1, params=forced(model))
    tokens = list(stream)
    assert len(tokens) == 1 and tokens[0].is_final
    assert stream.finish_reason == "length"
    # asking for more cannot go past the context either
    stream = small_ctx.stream_tokens(prompt, max_tokens=50, params=forced(model))
    assert len(list(stream)) == 1 and stream.finish_reason == "length"


@pytest.mark.parametrize("n", [N_CTX, N_CTX + 1, 10 * N_CTX])
def test_prompt_of_n_ctx_or_more_overflows(model: mullama.Model, small_ctx: mullama.Context, n: int) -> None:
    prompt = [model.bos_token_id] * n
    with pytest.raises(mullama.ContextOverflowError) as info:
        small_ctx.generate(prompt, max_tokens=1)
    assert info.value.n_prompt == n and info.value.n_ctx == N_CTX
    with pytest.raises(mullama.ContextOverflowError):
        small_ctx.stream_tokens(prompt, max_tokens=0)
    text = "word " * (2 * n)
    with pytest.raises(mullama.ContextOverflowError):
        small_ctx.generate(text, max_tokens=1)
    # the context is still usable afterwards
    assert small_ctx.generate("Hi", max_tokens=2, params=forced(model))


def test_generation_ends_at_the_end_of_the_context(model: mullama.Model, small_ctx: mullama.Context) -> None:
    prompt = model.tokenize("Count to one hundred:")
    stream = small_ctx.generate_stream(prompt, max_tokens=10_000, params=forced(model))
    text = "".join(stream)
    assert stream.finish_reason == "length"
    assert stream.tokens_generated == N_CTX - len(prompt)
    assert stream.stats.prompt_tokens + stream.stats.completion_tokens == N_CTX
    assert text == "a" * (N_CTX - len(prompt))
    # the same again: nothing was left behind in the cache
    again = small_ctx.generate_stream(prompt, max_tokens=10_000, params=forced(model))
    assert "".join(again) == text and again.finish_reason == "length"


def test_max_tokens_zero_and_context_of_eight(model: mullama.Model, small_ctx: mullama.Context) -> None:
    stream = small_ctx.generate_stream("Hi", max_tokens=0)
    assert list(stream) == [] and stream.finish_reason == "length"
    with mullama.Context(model, n_ctx=8) as tiny_ctx:
        prompt = model.tokenize("Hi")
        stream = tiny_ctx.generate_stream(prompt, max_tokens=100, params=forced(model))
        assert "".join(stream) == "a" * (8 - len(prompt)) and stream.finish_reason == "length"
        with pytest.raises(mullama.ContextOverflowError):
            tiny_ctx.generate([model.bos_token_id] * 8)
