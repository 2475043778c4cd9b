"""lm-evaluation-harness against a loopback mullama server, offline.

The harness (the ``eval`` extra: ``pip install ".[test,eval]"``) runs in a
subprocess (tests/lm_eval_worker.py) with its ``local-completions`` model and
the remote tokenizer (/tokenize, /tokenizer_info), on a multiple-choice and a
generate_until task whose YAML and data ship in tests/data/lm_eval/. Its
per-item log-likelihoods must equal ``Context.loglikelihood`` on the same
inputs, up to LL_TOL: the server evaluates the same tokens, but in batches of
other shapes (a context cached by the prefix cache, several prompts per
decode), which llama.cpp's CPU kernels round differently.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mullama

HERE = Path(__file__).parent
TASKS = HERE / "data" / "lm_eval"
LL_TOL = 0.4          # nats per item; measured up to 0.2 (mean 0.025) with batch_size 8

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                       reason="lm-evaluation-harness is not installed (pip install '.[test,eval]')"),
    pytest.mark.timeout(1200),
]


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    """The harness's results for batch_size 1 and 8."""
    out = {}
    for bs in (1, 8):
        path = tmp_path_factory.mktemp("lm_eval") / f"bs{bs}.json"
        proc = subprocess.run([sys.executable, str(HERE / "lm_eval_worker.py"), server.url, str(TASKS), str(bs),
                               str(path)], capture_output=True, text=True, timeout=1100)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[bs] = json.loads(path.read_text(encoding="utf-8"))
    return out


def test_loglikelihoods_equal_context(runs, model):
    with mullama.Context(model, n_ctx=512) as ctx:
        for bs, run in runs.items():
            items = [(args, resp) for s in run["samples"]["mullama_mc"]
                     for args, resp in zip(s["arguments"], s["filtered_resps"])]
            assert len(items) == 48
            diffs = []
            for (context, continuation), (ll, _greedy) in items:
                want, _ = ctx.loglikelihood(context, continuation, add_bos=False)
                assert ll == pytest.approx(want, abs=LL_TOL), (bs, context, continuation)
                diffs.append(abs(ll - want))
            assert sum(diffs) / len(diffs) < LL_TOL / 4


def test_accuracy_stable_across_batch_sizes(runs):
    acc = {bs: run["results"]["mullama_mc"]["acc,none"] for bs, run in runs.items()}
    assert acc[1] == acc[8]
    assert acc[1] >= 0.5, "the model answers most of these questions"
    chosen = {bs: [max(range(4), key=lambda i: s["filtered_resps"][i][0]) for s in
                   sorted(run["samples"]["mullama_mc"], key=lambda s: s["doc_id"])] for bs, run in runs.items()}
    assert chosen[1] == chosen[8]


def test_generate_until(runs):
    """Greedy answers, stopped at the task's ``until`` strings. (A long answer may differ
    between batch sizes where two tokens nearly tie: batch rounding picks one or the other.)"""
    gen = {bs: [s["filtered_resps"][0] for s in sorted(run["samples"]["mullama_gen"], key=lambda s: s["doc_id"])]
           for bs, run in runs.items()}
    assert len(gen[1]) == len(gen[8]) == 6
    score = {bs: run["results"]["mullama_gen"]["exact_match,none"] for bs, run in runs.items()}
    assert score[1] == score[8] > 0
    assert gen[1][0] == gen[8][0] == " Paris"
    assert all("\n" not in text and "." not in text for text in gen[1] + gen[8])
