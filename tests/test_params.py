"""Bad parameters raise ValueError/TypeError naming the parameter; nothing reaches llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mullama
from mullama import Context, SamplerParams


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("temperature", -0.1, ValueError),
        ("temperature", math.nan, ValueError),
        ("temperature", math.inf, ValueError),
        ("temperature", "hot", TypeError),
        ("top_k", -1, ValueError),
        ("top_k", 2.5, TypeError),
        ("top_p", 1.5, ValueError),
        ("top_p", -0.01, ValueError),
        ("top_p", math.nan, ValueError),
        ("min_p", 2.0, ValueError),
        ("typical_p", -1.0, ValueError),
        ("repeat_penalty", 0.0, ValueError),
        ("repeat_penalty", math.nan, ValueError),
        ("repeat_last_n", -2, ValueError),
        ("frequency_penalty", math.inf, ValueError),
        ("seed", -1, ValueError),
        ("seed", 2**32, ValueError),
        ("logit_bias", {5: math.nan}, ValueError),
        ("logit_bias", [1, 2], TypeError),
    ],
)
def test_sampler_params_are_validated(field, value, kind):
    with pytest.raises(kind, match=field.split("_")[0]):
        SamplerParams(**{field: value})


def test_sampler_params_are_frozen_and_replaceable():
    p = SamplerParams(temperature=0.5)
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    assert p.replace(top_k=7).top_k == 7 and p.top_k == 40
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=3)


@pytest.mark.parametrize("value, kind", [(-1, ValueError), (1.5, TypeError), ("5", TypeError), (2**40, ValueError)])
def test_max_tokens_is_validated(ctx, value, kind):
    with pytest.raises(kind, match="max_tokens"):
        ctx.generate("hi", max_tokens=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_ctx": 0}, "n_ctx"),
        ({"n_ctx": -5}, "n_ctx"),
        ({"n_ctx": 2.5}, "n_ctx"),
        ({"n_batch": 0}, "n_batch"),
        ({"n_threads": 0}, "n_threads"),
        ({"flash_attn": "maybe"}, "flash_attn"),
        ({"seed": -3}, "seed"),
    ],
)
def test_context_arguments_are_validated(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Context(model, **kwargs)


def test_bad_prompts_and_stops(ctx, model):
    with pytest.raises(ValueError, match="empty"):
        ctx.generate([], max_tokens=1)
    with pytest.raises(IndexError, match="vocabulary"):
        ctx.generate([1, 2, model.n_vocab], max_tokens=1)
    with pytest.raises(IndexError, match="vocabulary"):
        ctx.generate(np.array([-1], dtype=np.int64), max_tokens=1)
    with pytest.raises(TypeError):
        ctx.generate([1.5, 2.0], max_tokens=1)
    with pytest.raises(ValueError, match="stop"):
        ctx.generate("hi", max_tokens=1, stop=[""])
    with pytest.raises(ValueError, match="stop"):
        ctx.generate("hi", max_tokens=1, stop=[str(i) for i in range(1000)])
    with pytest.raises(ValueError, match="logit_bias"):
        ctx.generate("hi", max_tokens=1, params=SamplerParams(logit_bias={model.n_vocab: 1.0}))
    with pytest.raises(ValueError, match="top_logprobs"):
        ctx.stream_tokens("hi", top_logprobs=500)
    with pytest.raises(mullama.ContextOverflowError) as info:
        ctx.generate("word " * 2000, max_tokens=1)
    assert info.value.n_ctx == ctx.n_ctx and info.value.n_prompt > ctx.n_ctx
    # the context still works afterwards
    assert ctx.generate("The capital of France is", max_tokens=3, params=SamplerParams(temperature=0))


def test_tokenizer_edge_cases(model):
    assert model.tokenize("", add_special=False) == []
    assert model.tokenize("", add_special=True) == [model.bos_token_id]
    assert model.tokenize("a\x00b", add_special=False)
    with pytest.raises(UnicodeEncodeError):
        model.tokenize("\ud800")
    # invalid UTF-8 bytes are accepted as bytes
    assert model.tokenize(b"\xff\xfe", add_special=False)
    plain = model.tokenize("<start_of_turn>", add_special=False, parse_special=False)
    special = model.tokenize("<start_of_turn>", add_special=False, parse_special=True)
    assert len(special) == 1 and len(plain) > 1
    for bad in (-1, model.n_vocab, 2**31 - 1):
        with pytest.raises(IndexError):
            model.detokenize([bad])
    with pytest.raises(IndexError):
        model.token_to_piece(model.n_vocab)
    big = "lorem ipsum " * 100_000
    ids = model.tokenize(big, add_special=False)
    assert model.detokenize(ids) == big


def test_chat_template(model):
    prompt = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<start_of_turn>user\nHi<end_of_turn>" in prompt and prompt.endswith("<start_of_turn>model\n")
    with pytest.raises(TypeError):
        model.apply_chat_template([{"role": "user"}])
    with pytest.raises(mullama.TemplateError):
        model.apply_chat_template([{"role": "user", "content": "x"}], template="no-such-template{{")


def test_metadata(model):
    assert model.n_vocab == 262144
    assert model.n_ctx_train == 32768
    assert model.architecture == "gemma3"
    assert model.name
    assert model.metadata["general.architecture"] == "gemma3"
    assert "Q4_K" in model.description
