"""Token-level records: ids, log-probabilities and the most likely alternatives."""

import math

from _common import cap, model_path

from mullama import Context, Model, SamplerParams

with Model.load(model_path()) as model, Context(model, n_ctx=1024) as ctx:
    prompt = "The three primary colours are"
    for tok in ctx.stream_tokens(prompt, max_tokens=cap(12), params=SamplerParams(temperature=0),
                                 top_logprobs=3):
        alts = ", ".join(f"{model.detokenize([t])!r}:{math.exp(lp):.2f}" for t, lp in tok.top_logprobs)
        print(f"{tok.token_id:>7} {tok.text!r:<14} p={math.exp(tok.logprob):.3f}  [{alts}]")
