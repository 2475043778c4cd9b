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



def assert_same_greedy_up_to_a_near_tie(model, prompt: str, ids: list[int], ref: list[int],
                                        tol: float = 0.5) -> int:
    """``ids`` equals the greedy run ``ref`` until they part, and they part (if they do)
    only where ``ref``'s two best logits are within ``tol``: where a differently batched
    pass may round the other way. Returns where they part (``len`` when they don't)."""
    d = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
    if d < min(len(ids), len(ref)):
        with mullama.Context(model, n_ctx=512) as ctx:
            prefix = list(model.tokenize(prompt, add_special=True, parse_special=True)) + ref[:d]
            logits = ctx.logits(prefix)
        top2 = sorted(logits)[-2:]
        assert top2[1] - top2[0] < tol, f"the runs part at {d}, where the plain run has no near tie"
    return d
