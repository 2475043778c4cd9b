"""Grammar-constrained generation in the one engine: every path, laziness, logprobs, bad input."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import mullama
from mullama import AsyncModel, Context, GrammarError, SamplerParams, StreamConfig

pytestmark = pytest.mark.anyio

# a JSON-ish record: a small model left to itself writes prose here
RECORD = r'''
root ::= "{" ws "\"name\":" ws "\"" [a-z]{1,12} "\"," ws "\"age\":" ws [1-9] [0-9]? ws "}"
ws ::= " "?
'''
RECORD_RE = re.compile(r'\{ ?"name": ?"[a-z]{1,12}", ?"age": ?[1-9][0-9]? ?\}')
YES_NO = 'root ::= "yes" | "no"'
DIGITS = 'root ::= [0-9]{3} "."'
PROMPT = "Here is a person, as a JSON record:"


def text_of(tokens) -> str:
    return "".join(t.text for t in tokens)


@pytest.fixture(scope="module")
def amodel(model_path):
    m = AsyncModel(mullama.Model.load(model_path), n_ctx=1024, n_parallel=4)
    yield m
    m.close()


# ------------------------------------------------------------------ sync Context


@pytest.mark.parametrize("params", [
    SamplerParams(temperature=0.0),
    SamplerParams(temperature=0.9, seed=7),
    SamplerParams(temperature=0.0, repeat_penalty=1.3, logit_bias={1: -5.0}),
], ids=["greedy", "sampled", "greedy-chain"])
def test_generation_follows_grammar(ctx, model, params):
    it = ctx.stream_tokens(PROMPT, 64, params.replace(grammar=RECORD))
    tokens = list(it)
    assert RECORD_RE.fullmatch(text_of(tokens)), text_of(tokens)
    # it ended because the grammar was complete, not by running out of tokens
    assert it.finish_reason == "stop"
    assert model.compile_grammar(RECORD).accepts([t.token_id for t in tokens if not model.is_eog(t.token_id)])


@pytest.mark.parametrize("base", [SamplerParams(temperature=0.0), SamplerParams(temperature=0.9, seed=7)],
                         ids=["greedy", "sampled"])
def test_shortlist_choice_equals_the_whole_vocabulary_pass(ctx, base):
    # a neutral logit bias makes the engine judge the whole vocabulary on every rejection;
    # without it, the best-scoring tokens are tried first: the tokens must not differ
    def run(params):
        before = ctx.grammar_stats
        tokens = [t.token_id for t in ctx.stream_tokens(PROMPT, 64, params.replace(grammar=RECORD))]
        after = ctx.grammar_stats
        return tokens, {k: after[k] - before[k] for k in after}

    fast, fast_stats = run(base)
    full, full_stats = run(base.replace(logit_bias={5: 0.0}))
    assert fast == full
    assert full_stats["rejected"] == full_stats["full_passes"] > 0
    assert fast_stats["rejected"] == full_stats["rejected"]
    if base.is_greedy:
        assert fast_stats["full_passes"] < fast_stats["rejected"]


def test_grammar_ends_generation_only_where_it_may_end(ctx, model):
    # three digits and a dot: no end before the dot, and nothing after it
    for seed in range(3):
        out = ctx.generate("Count:", 32, SamplerParams(temperature=1.0, seed=seed, grammar=DIGITS))
        assert re.fullmatch(r"[0-9]{3}\.", out), out


def test_unconstrained_output_is_unchanged_without_a_grammar(ctx, greedy):
    a = ctx.generate(PROMPT, 12, greedy)
    b = ctx.generate(PROMPT, 12, greedy.replace(grammar=None))
    assert a == b


def test_logprobs_stay_unconstrained(ctx, greedy):
    # the model would not say "zebra" here; its real log-probability is reported, not 0
    free = list(ctx.stream_tokens("The capital of France is", 1, greedy, top_logprobs=1))
    forced = list(ctx.stream_tokens("The capital of France is", 1, greedy.replace(grammar='root ::= " zebra"'),
                                    top_logprobs=1))
    assert forced[0].token_id != free[0].token_id
    assert forced[0].logprob < free[0].logprob - 1.0
    # the alternatives are the model's own best tokens, unaffected by the grammar
    assert forced[0].top_logprobs[0][0] == free[0].token_id
    assert math.isclose(forced[0].top_logprobs[0][1], free[0].logprob, abs_tol=1e-3)


def test_lazy_grammar_is_free_until_its_trigger(ctx, model, greedy):
    free = list(ctx.stream_tokens(PROMPT, 8, greedy))
    # a trigger that never fires leaves the text as it was
    never = list(ctx.stream_tokens(PROMPT, 8, greedy.replace(grammar=YES_NO, grammar_triggers=(r"(@@@@)",))))
    assert [t.token_id for t in never] == [t.token_id for t in free]
    # a trigger on the first word: from there the grammar holds and ends the text
    k = next(i for i, t in enumerate(free) if t.text.strip())
    lead, word = text_of(free[:k]), free[k].text
    lazy = f'root ::= {_literal(word)} " 42"'
    out = ctx.generate(PROMPT, 16, greedy.replace(grammar=lazy, grammar_triggers=(f"({re.escape(word)})",)))
    assert out == lead + word + " 42"


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def test_a_grammar_that_allows_nothing_is_a_generation_error(ctx, model):
    # every token the grammar allows first is banned by the logit bias
    banned = {t: -math.inf for t in range(model.n_vocab)
              if model.token_to_piece(t) in (b"y", b"ye", b"yes")}
    assert banned
    params = SamplerParams(temperature=0.5, seed=1, logit_bias=banned, grammar='root ::= "yes"')
    with pytest.raises(mullama.GenerationError, match="grammar allows no token"):
        ctx.generate("Say yes:", 4, params)
    # the context is still usable
    assert ctx.generate("Say yes:", 2, SamplerParams(temperature=0.0))


# ------------------------------------------------------------------ async engine


async def test_concurrent_streams_each_follow_their_own_grammar(amodel):
    configs = [
        StreamConfig(max_tokens=48, temperature=0.0, grammar=RECORD, timeout_ms=300_000),
        StreamConfig(max_tokens=8, temperature=0.7, grammar=YES_NO, timeout_ms=300_000,
                     sampler=SamplerParams(seed=5)),
        StreamConfig(max_tokens=8, temperature=0.0, grammar=DIGITS, timeout_ms=300_000),
        StreamConfig(max_tokens=8, temperature=0.0, timeout_ms=300_000),
    ]
    results: list[str] = [""] * len(configs)

    async def run(i: int) -> None:
        stream = await amodel.generate_stream(PROMPT, configs[i])
        async with stream:
            results[i] = text_of([t async for t in stream])

    async with anyio.create_task_group() as tg:
        for i in range(len(configs)):
            tg.start_soon(run, i)
    assert RECORD_RE.fullmatch(results[0]), results[0]
    assert results[1] in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}\.", results[2]), results[2]
    assert results[3]
    stats = amodel.grammar_stats()
    assert stats["tokens"] >= stats["rejected"] >= stats["full_passes"]
    assert stats["rejected"] > 0


async def test_async_model_paths_follow_grammar(async_model):
    config = StreamConfig(max_tokens=48, temperature=0.0, grammar=RECORD, timeout_ms=300_000)
    stream = await async_model.generate_stream(PROMPT, config)
    async with stream:
        out = text_of([t async for t in stream])
    assert RECORD_RE.fullmatch(out), out


async def test_every_branch_of_n_follows_the_grammar(amodel):
    config = StreamConfig(max_tokens=48, temperature=1.0, grammar=RECORD, timeout_ms=300_000,
                          sampler=SamplerParams(seed=11))
    streams = await amodel.generate_stream(PROMPT, config, n=3)
    for stream in streams:
        async with stream:
            out = text_of([t async for t in stream])
        assert RECORD_RE.fullmatch(out), out


async def test_a_fork_continues_its_parents_sentence(amodel):
    config = StreamConfig(max_tokens=48, temperature=0.0, grammar=RECORD, timeout_ms=300_000, buffer_size=1)
    stream = await amodel.generate_stream(PROMPT, config)
    async with stream:
        head = [await stream.next() for _ in range(4)]
        branch = await stream.fork(config.replace(temperature=1.0, sampler=SamplerParams(seed=3)))
        rest = [t async for t in stream]
    async with branch:
        tail = [t async for t in branch]
    assert RECORD_RE.fullmatch(text_of(head + rest)), text_of(head + rest)
    # the branch did not start a new record: it finished the parent's, from where the parent
    # had got to (its read tokens and those still buffered)
    parent = head + rest
    joined = [text_of(parent[:m] + tail) for m in range(len(head), len(parent) + 1)]
    assert any(RECORD_RE.fullmatch(j) for j in joined), (text_of(parent), text_of(tail))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("gbnf, message", [
    ("root ::= foo", "invalid grammar"),
    ('root ::= "a" (', "invalid grammar"),
    ("", "empty"),
    ("   \n", "empty"),
    ('root ::= "a\0"', "NUL"),
    ("root ::= " + "(" * 500 + '"a"' + ")" * 500, "nests parentheses"),
    ("x ::= [a-", "invalid grammar"),
])
def test_invalid_grammars_are_refused(model, ctx, gbnf, message):
    with pytest.raises(GrammarError, match=message):
        model.compile_grammar(gbnf)
    if gbnf.strip():
        with pytest.raises(GrammarError):
            ctx.stream_tokens("x", 4, SamplerParams(grammar=gbnf))


def test_constraint_arguments_are_checked():
    with pytest.raises(ValueError, match="not both"):
        SamplerParams(grammar=YES_NO, json_schema={"type": "object"})
    with pytest.raises(ValueError, match="needs a grammar"):
        SamplerParams(grammar_triggers=("x",))
    with pytest.raises(TypeError):
        SamplerParams(grammar=b"root ::= \"a\"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SamplerParams(grammar=YES_NO, grammar_triggers="(x)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set twice"):
        StreamConfig(grammar=YES_NO, sampler=SamplerParams(grammar=DIGITS))


def test_bad_triggers_are_refused(model):
    with pytest.raises(GrammarError, match="not a valid regex"):
        model.compile_grammar(YES_NO, triggers=("(unclosed",))
    with pytest.raises(GrammarError, match="non-empty"):
        model.compile_grammar(YES_NO, triggers=("",))


def test_a_grammar_is_bound_to_its_model(model_path, model):
    other = mullama.Model.load(model_path)
    try:
        grammar = other.compile_grammar(YES_NO)
        from mullama._engine._engine import Request
        from mullama._engine._ring import TokenRing
        import numpy as np

        req = Request(np.array([2, 100], dtype=np.int32), 4, SamplerParams(temperature=0).native(model.n_vocab, 0),
                      [], False, 64, TokenRing(4), model.n_vocab, grammar=grammar)
        with Context(model, n_ctx=128) as c:
            with pytest.raises(ValueError, match="another model"):
                c._live_engine().submit(req)
    finally:
        other.close()


def test_compiled_grammars_are_reused(model):
    assert model.compile_grammar(YES_NO) is model.compile_grammar(YES_NO)
    assert model.compile_grammar(YES_NO) is not model.compile_grammar(YES_NO, triggers=("(x)",))


def test_the_parser_survives_malformed_grammars_in_a_child(model_path):
    # a failure that reached C++ unguarded would kill the process, and a parser stuck on a
    # repetition would never return: run them where either shows
    code = textwrap.dedent(f"""
        import mullama
        m = mullama.Model.load({model_path!r})
        bad = ['root ::= "', 'root ::= [', 'root ::= "\\\\x"', 'root ::= "\\\\u12"', 'root ::= a{{2,1}}',
               'root ::= x', 'root ::= root "a"', '::= "a"', 'root ::= "a"{{999999999999}}',
               'root ::= [\\\\', 'root ::= ( "a" | )*', 'root ::= "a" b\\nb ::= b "c"', 'ro ot ::= "a"',
               'root ::= ( "" )*', 'root ::= {{2}}', 'root ::= "a"{{1,', 'root ::= "a"{{x}}']
        for g in bad:
            try:
                m.compile_grammar(g)
            except mullama.GrammarError as exc:
                print("refused:", exc)
            else:
                print("accepted:", repr(g))
    """)
    # run beside the tests, not the source tree: the package is the installed (built) one
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 17 and all(ln.startswith("refused: invalid grammar: ") for ln in lines), proc.stdout
    assert "Undefined rule identifier 'x'" in proc.stdout
    assert "maximum below its minimum" in proc.stdout and "over the limit" in proc.stdout
    # the parser's own report was turned into the exceptions, not printed
    assert "error parsing grammar" not in proc.stderr
