"""Checks that generated tokens are a stream's own greedy continuation."""

from __future__ import annotations

import mullama


def assert_own_greedy_continuation(model, prompt: str, ids: list[int], tol: float = 0.5) -> None:
    """Each token is (up to float noise) the argmax given its own prompt and predecessors.

    Batched arithmetic may flip a near-tie, so exact equality with a solo run is
    too strict; a token taken from another stream, though, would be far from
    the argmax of this one.
    """
    with mullama.Context(model, n_ctx=512, reuse_prefix=True) as ctx:
        prefix = list(model.tokenize(prompt, add_special=True, parse_special=True))
        for tok in ids:
            logits = ctx.logits(prefix)
            assert logits[tok] >= logits.max() - tol, (prompt, model.detokenize(ids))
            prefix.append(tok)
