"""Speculative decoding from the sequence's own n-grams: same output, fewer passes."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import mullama
from mullama import AsyncModel, SamplerParams, StreamConfig

from greedy_check import assert_own_greedy_continuation, assert_same_greedy_up_to_a_near_tie

PASSAGE = ("The river town of Aldermere grew up around a stone bridge built in the twelfth century. "
           "Merchants crossed it with wool and salt, and the toll they paid funded the first school, "
           "a chapel, and later a market hall with a clock that still strikes every quarter hour.")


def grounded(passage: str = PASSAGE) -> str:
    return f"<start_of_turn>user\nRepeat this text:\n{passage}<end_of_turn>\n<start_of_turn>model\n"


GREEDY = SamplerParams(temperature=0.0)
# Draft lengths come from measured pass costs, so whether the planner drafts at all depends
# on the machine and its load; tests that need drafts to happen set a floor (draft_min).
SPEC = SamplerParams(temperature=0.0, speculative="ngram", draft_min=4)


def tokens(ctx: mullama.Context, prompt, n: int, params: SamplerParams, stop=None) -> tuple[list, str | None]:
    it = ctx.stream_tokens(prompt, n, params, stop, logprobs=False)
    out = list(it)
    return out, it.finish_reason


@pytest.fixture(scope="module")
def reference(model):
    """The grounded prompt's greedy continuation without speculation."""
    with mullama.Context(model, n_ctx=1024) as ctx:
        out, reason = tokens(ctx, grounded(), 80, GREEDY)
    return out, reason


def test_params_validation():
    for bad in ({"speculative": "medusa"}, {"speculative": "ngram", "draft_max": 0},
                {"speculative": "ngram", "draft_max": 33}, {"speculative": "ngram", "ngram": 0},
                {"speculative": "ngram", "draft_min": 5, "draft_max": 4}):
        with pytest.raises(ValueError):
            SamplerParams(**bad)
    with pytest.raises(TypeError):
        SamplerParams(speculative="ngram", draft_max=2.5)
    with pytest.raises(ValueError):
        StreamConfig(speculative="lookahead")
    assert StreamConfig(speculative="ngram").sampler_params().speculative == "ngram"
    assert SamplerParams().native(10, 0)[11] == (0, 0, 0)


def test_greedy_text_is_unchanged_and_own_argmax(model, reference):
    ref, ref_reason = reference
    with mullama.Context(model, n_ctx=1024) as ctx:
        out, reason = tokens(ctx, grounded(), 80, SPEC)
        stats = ctx.last_stats
        calls = ctx.n_decode_calls
    ids = [t.token_id for t in out]
    # speculation happened, and paid: fewer passes than tokens
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0
    assert calls < len(ids)
    # the teacher-forced check: every token is the argmax of the verifier at its position
    assert_own_greedy_continuation(model, grounded(), [t for t in ids if not model.is_eog(t)])
    # and the tokens are the plain greedy ones; they may part only at a near tie of the
    # plain run, where a pass with more rows can round the other way (one measured at 0.23)
    ref_ids = [t.token_id for t in ref]
    parted = assert_same_greedy_up_to_a_near_tie(model, grounded(), ids, ref_ids)
    if parted == len(ref_ids):
        assert reason == ref_reason
        assert "".join(t.text for t in out) == "".join(t.text for t in ref)
    assert [t.index for t in out] == list(range(len(out)))


def test_eos_inside_a_draft_ends_the_stream(model):
    """A grammar holds the output to the passage, which the prompt follows with
    <end_of_turn>: the last draft ends in that token, and the end of generation is chosen
    in a verified row (no decode between it and the token before), ending the stream
    exactly like without drafts."""
    grammar = f'root ::= "{PASSAGE}"'
    plain = SamplerParams(temperature=0.0, grammar=grammar)
    with mullama.Context(model, n_ctx=1024) as ctx:
        ref, ref_reason = tokens(ctx, grounded(), 120, plain)
        # drafts of exactly 8 (or to the end of the match): where passes end must not depend on
        # the planner, whose lengths follow measured costs
        it = ctx.stream_tokens(grounded(), 120, plain.replace(speculative="ngram", draft_min=8, draft_max=8),
                               logprobs=False)
        out, calls = [], []
        for tok in it:
            out.append(tok)
            calls.append(ctx.n_decode_calls)
        reason = it.finish_reason
    assert ref_reason == "stop" and model.is_eog(ref[-1].token_id)
    assert reason == "stop" and [t.token_id for t in out] == [t.token_id for t in ref]
    assert out[-1].is_final and sum(t.is_final for t in out) == 1
    assert calls[-1] == calls[-2]       # the end came from a draft's row, in the same pass


def test_max_tokens_is_never_exceeded(model, reference):
    ref, _ = reference
    with mullama.Context(model, n_ctx=1024) as ctx:
        for n in (1, 2, 5, 17, 30):
            out, reason = tokens(ctx, grounded(), n, SPEC.replace(draft_min=8))
            assert len(out) == n and reason == "length"
            assert [t.token_id for t in out] == [t.token_id for t in ref[:n]]


def test_stop_string_inside_a_draft(model, reference):
    ref, _ = reference
    text = "".join(t.text for t in ref)
    stop = "market hall"
    assert stop in text
    with mullama.Context(model, n_ctx=1024) as ctx:
        out, reason = tokens(ctx, grounded(), 80, SPEC.replace(draft_min=8), stop=stop)
        assert ctx.last_stats.accepted_tokens > 0
    got = "".join(t.text for t in out)
    assert reason == "stop" and got == text[:text.index(stop)]


def test_kv_cells_follow_the_accepted_tokens(model):
    """After every step the sequence holds exactly its prompt and accepted tokens: the
    rejected tail's cells are gone (the last token handed out is decoded next step)."""
    prompt = grounded("one two three four, one two five six, one two seven eight, one two three nine")
    with mullama.Context(model, n_ctx=1024) as ctx:
        n_prompt = len(model.tokenize(prompt, add_special=True, parse_special=True))
        it = ctx.stream_tokens(prompt, 60, SamplerParams(temperature=0.0, speculative="ngram", ngram=1,
                                                           draft_min=4), logprobs=False)
        seen = 0
        for tok in it:
            seen += 1
            request = ctx._current
            if not request.done:
                assert ctx.kv_positions() == [n_prompt + request.n_generated - 2]
        stats = ctx.last_stats
        assert stats.draft_tokens > stats.accepted_tokens > 0   # rejections happened
        assert seen == stats.completion_tokens
        assert ctx.kv_positions() == [-1]


def test_grammar_with_speculation(model):
    grammar = 'root ::= ("one two three " | "four five six ")+'
    prompt = grounded("one two three four five six one two three four five six")
    plain = SamplerParams(temperature=0.0, grammar=grammar)
    with mullama.Context(model, n_ctx=1024) as ctx:
        ref = ctx.generate(prompt, 40, plain)
        got = ctx.generate(prompt, 40, plain.replace(speculative="ngram", ngram=2, draft_min=4))
        stats = ctx.last_stats
    assert got == ref and stats.accepted_tokens > 0


# ---------------------------------------------------------------- the sampled accept rule


@pytest.fixture(scope="module")
def peaked_tiny(tmp_path_factory):
    """A tiny generated model whose output layer is scaled up: peaked distributions over a
    300-token vocabulary, so that drafts are accepted often but not always."""
    import gguf_factory as gf

    rng = np.random.default_rng(3)
    out = (rng.standard_normal((gf.N_VOCAB, gf.N_EMBD)) * 1.0).astype(np.float32)
    path = tmp_path_factory.mktemp("spec") / "peaked.gguf"
    path.write_bytes(gf.tiny_model_bytes(extra_tensors={"output.weight": out}))
    m = mullama.Model.load(str(path))
    yield m
    m.close()


@pytest.mark.parametrize("runs", [80, pytest.param(600, marks=pytest.mark.slow)])
def test_sampled_distribution_is_unchanged(peaked_tiny, runs):
    """Every token handed out under speculation is distributed as the model says given
    its prefix: the randomised probability integral transform of each one is uniform
    (Kolmogorov-Smirnov over 6 tokens per run, at drafted and plain positions alike)."""
    from scipy import stats as st

    m = peaked_tiny
    base = SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with mullama.Context(m, n_ctx=128) as ctx:
        # the model's own greedy path in the prompt: drafts it accepts often, not always
        path = [t.token_id for t in ctx.stream_tokens([1, 260], 24, GREEDY, logprobs=False)]
    prompt = [1, 260] + path + [260]
    spec = base.replace(speculative="ngram", ngram=1, draft_min=4)
    rng = np.random.default_rng(11)
    pits, same = [], 0
    cache: dict[tuple, np.ndarray] = {}
    drafted = accepted = 0
    with mullama.Context(m, n_ctx=128) as ctx, mullama.Context(m, n_ctx=128, reuse_prefix=True) as ref:
        for seed in range(runs):
            out = [t.token_id for t in ctx.stream_tokens(prompt, 6, spec.replace(seed=seed), logprobs=False)]
            drafted += ctx.last_stats.draft_tokens
            accepted += ctx.last_stats.accepted_tokens
            plain = [t.token_id for t in ctx.stream_tokens(prompt, 6, base.replace(seed=seed), logprobs=False)]
            same += out == plain
            for j, tok in enumerate(out):
                key = tuple(out[:j])
                if key not in cache:
                    x = ref.logits(prompt + list(key)).astype(np.float64)
                    p = np.exp(x - x.max())
                    cache[key] = p / p.sum()
                p = cache[key]
                pits.append(p[:tok].sum() + rng.random() * p[tok])
    assert drafted > accepted > 0.2 * drafted            # both outcomes of the rule were exercised
    assert st.kstest(pits, "uniform").pvalue > 1e-3
    # the seeded draws follow the same rows in the same order: the same output, but for rare
    # rounding differences between a batched row and a single one
    assert same >= 0.95 * runs


@pytest.mark.anyio
async def test_sampled_streams_sharing_passes_keep_their_seeded_output(peaked_tiny):
    """Sampled streams decoded together verify one common count, with filler past a short
    draft: what each hands out is still its own seeded plain draw, as one stream alone
    without speculation gets it (filler is accepted only where the draw equals it), but
    for rare rounding differences of a batched row."""
    m = peaked_tiny
    base = SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with mullama.Context(m, n_ctx=128) as ctx:
        path = [t.token_id for t in ctx.stream_tokens([1, 260], 24, GREEDY, logprobs=False)]
    prompt = [1, 260] + path + [260]
    engine = AsyncModel(mullama.Model.load(m.path), n_ctx=128, n_parallel=4)   # closes its model
    seeds = range(24)

    async def run(seed: int, spec: bool, into: dict) -> None:
        sampler = base.replace(seed=seed)
        if spec:
            sampler = sampler.replace(speculative="ngram", ngram=1, draft_min=4)
        cfg = StreamConfig(max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, timeout_ms=300_000,
                           logprobs=False, sampler=sampler)   # (the config's three override the sampler's)
        async with await engine.generate_stream(prompt, cfg) as stream:
            into[seed] = [t.token_id async for t in stream]

    plain: dict[int, list] = {}
    spec: dict[int, list] = {}
    try:
        for seed in seeds:
            await run(seed, False, plain)
        for group in range(0, len(seeds), 4):
            async with anyio.create_task_group() as tg:
                for seed in seeds[group:group + 4]:
                    tg.start_soon(run, seed, True, spec)
        stats = engine.spec_stats()
    finally:
        engine.close()
    assert stats["drafted"] > stats["accepted"] > 0
    assert sum(spec[s] == plain[s] for s in seeds) >= 0.9 * len(seeds)


# ---------------------------------------------------------------- concurrent streams


@pytest.fixture(scope="module")
def spec_engine(model_path):
    m = AsyncModel(mullama.Model.load(model_path), n_ctx=512, n_parallel=4)
    yield m
    m.close()


PASSAGES = [PASSAGE,
            "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
            "Alice met Bob at the station. Bob gave Alice a letter. Alice read the letter twice."]


@pytest.mark.anyio
async def test_concurrent_streams_each_draft_on_their_own(spec_engine):
    model = spec_engine.model
    cfg = StreamConfig(max_tokens=32, temperature=0.0, timeout_ms=300_000, sampler=SPEC)
    results: dict[int, list] = {}
    drafted: dict[int, dict] = {}

    async def run(i: int, p: str) -> None:
        async with await spec_engine.generate_stream(grounded(p), cfg) as stream:
            results[i] = [t async for t in stream]
            drafted[i] = stream.spec_stats

    async with anyio.create_task_group() as tg:
        for i, p in enumerate(PASSAGES):
            tg.start_soon(run, i, p)
    for i, p in enumerate(PASSAGES):
        ids = [t.token_id for t in results[i] if not model.is_eog(t.token_id)]
        assert_own_greedy_continuation(model, grounded(p), ids)
    assert sum(d["accepted"] for d in drafted.values()) > 0
    assert spec_engine.spec_stats()["accepted"] >= sum(d["accepted"] for d in drafted.values())
    assert max(spec_engine.kv_positions()) == -1


@pytest.mark.anyio
async def test_streams_sharing_passes_with_a_hole_and_a_plain_stream(spec_engine):
    """Streams decoded in one pass all verify the same count (llama.cpp would otherwise
    split the pass by sequence): a stream with a shorter draft verifies filler, a free
    slot between busy ones takes as many throw-away tokens, and a stream without
    speculation holds the count at 0. Every stream still gets its own greedy tokens and
    every cell is freed."""
    model = spec_engine.model
    spec = StreamConfig(max_tokens=40, temperature=0.0, timeout_ms=300_000, sampler=SPEC)
    plans = [(PASSAGES[0], spec), (PASSAGES[1], spec.replace(max_tokens=5)),   # ends early: a hole
             (PASSAGES[2], spec), (PASSAGES[1], spec.replace(sampler=GREEDY, max_tokens=12))]
    results: dict[int, list] = {}
    stats: dict[int, dict] = {}

    async def run(i: int, p: str, cfg: StreamConfig) -> None:
        async with await spec_engine.generate_stream(grounded(p), cfg) as stream:
            results[i] = [t.token_id async for t in stream]
            stats[i] = stream.spec_stats

    async with anyio.create_task_group() as tg:
        for i, (p, cfg) in enumerate(plans):
            tg.start_soon(run, i, p, cfg)
    for i, (p, cfg) in enumerate(plans):
        assert_own_greedy_continuation(model, grounded(p), [t for t in results[i] if not model.is_eog(t)])
        assert len(results[i]) <= cfg.max_tokens
    assert stats[3]["drafted"] == 0
    assert stats[0]["accepted"] > 0 and stats[2]["accepted"] > 0
    assert max(spec_engine.kv_positions()) == -1


@pytest.mark.anyio
async def test_cancel_during_verification_frees_the_cells(spec_engine):
    cfg = StreamConfig(max_tokens=200, temperature=0.0, timeout_ms=300_000, sampler=SPEC, buffer_size=64)
    async with await spec_engine.generate_stream(grounded(), cfg) as stream:
        n = 0
        async for _ in stream:
            n += 1
            if stream.spec_stats["accepted"] > 0 and n >= 10:
                stream.cancel()
                break
    with anyio.fail_after(60):
        while spec_engine.active_streams or max(spec_engine.kv_positions()) != -1:
            await anyio.sleep(0.01)
    # the engine serves the next stream exactly
    async with await spec_engine.generate_stream(grounded(), cfg.replace(max_tokens=24)) as stream:
        again = [t.token_id async for t in stream]
    with mullama.Context(spec_engine.model, n_ctx=512) as ctx:
        ref = [t.token_id for t in ctx.stream_tokens(grounded(), 24, GREEDY, logprobs=False)]
    assert assert_same_greedy_up_to_a_near_tie(spec_engine.model, grounded(), again, ref) > 0


@pytest.mark.anyio
async def test_n_branches_and_fork_with_speculation(spec_engine):
    model = spec_engine.model
    cfg = StreamConfig(max_tokens=20, temperature=0.0, timeout_ms=300_000, sampler=SPEC)
    streams = await spec_engine.generate_stream(grounded(), cfg, n=2)
    outs = []
    for s in streams:
        async with s:
            outs.append([t.token_id async for t in s])
    assert spec_engine.spec_stats()["accepted"] > 0
    for ids in outs:
        assert_own_greedy_continuation(model, grounded(), [t for t in ids if not model.is_eog(t)])
    async with await spec_engine.generate_stream(grounded(), cfg) as stream:
        head = [await stream.next() for _ in range(6)]
        branch = await stream.fork()
        # the branch starts after every token the parent had produced, read or buffered
        at_fork = branch.prompt_tokens - stream.prompt_tokens
        async with branch:
            tail_b = [t.token_id async for t in branch]
        tail_a = [t.token_id async for t in stream]
    parent = [t.token_id for t in head] + tail_a
    for ids in (parent, parent[:at_fork] + tail_b):
        assert_own_greedy_continuation(model, grounded(), [t for t in ids if not model.is_eog(t)])


def test_sampler_state_advances_only_with_handed_out_tokens(peaked_tiny):
    """Repetition penalties and the seeded draw are state: rejected draft tokens must not
    reach them. With the same seed, the output is the plain run's."""
    base = SamplerParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3,
                         presence_penalty=0.5)
    same = drafted = 0
    with mullama.Context(peaked_tiny, n_ctx=128) as ctx:
        path = [t.token_id for t in ctx.stream_tokens([1, 260], 24, GREEDY, logprobs=False)]
        prompt = [1, 260] + path + [260]
        for seed in range(30):
            params = base.replace(seed=seed)
            plain = [t.token_id for t in ctx.stream_tokens(prompt, 12, params, logprobs=False)]
            got = [t.token_id for t in ctx.stream_tokens(
                prompt, 12, params.replace(speculative="ngram", ngram=1, draft_min=4), logprobs=False)]
            drafted += ctx.last_stats.draft_tokens - ctx.last_stats.accepted_tokens
            same += got == plain
    assert drafted > 0 and same >= 29


def test_serve_speculative_flag_and_metrics(model_path):
    import json
    import signal
    import urllib.request

    from test_cli_serve import _serve, _stop

    proc, url, _ = _serve("--parallel", "1", "--n-ctx", "512", "--model", model_path, "--speculative", "ngram")
    try:
        req = urllib.request.Request(url + "/v1/completions", method="POST", data=json.dumps(
            {"prompt": grounded(), "max_tokens": 40, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = json.load(resp)
        assert body["choices"][0]["text"].startswith("The river town of Aldermere")
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = dict(line.split(" ", 1) for line in resp.read().decode().splitlines()
                           if line and not line.startswith("#"))
        assert 0 < float(metrics["mullama_spec_accepted_tokens"]) <= float(metrics["mullama_spec_drafted_tokens"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        _stop(proc)
