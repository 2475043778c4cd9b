# cython: language_level=3
"""Sampler chains for the engine: one ``llama_sampler`` chain per sequence."""

from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport malloc, free

from mullama._engine._llama cimport *
from mullama._engine._guard cimport mll_sampler_accept, mll_guard_error
from mullama import errors


cdef llama_sampler * make_sampler(tuple cfg, int32_t n_vocab, int32_t n_ctx, const int[:] prompt) except? NULL:
    """The sampler chain for ``cfg``, or NULL for plain greedy (argmax, no candidate array).

    ``cfg`` is (temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
    repeat_last_n, frequency_penalty, presence_penalty, seed, logit_bias items);
    ``prompt`` counts as history for the penalties."""
    (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
     frequency_penalty, presence_penalty, seed, logit_bias) = cfg
    cdef bint penalties = (repeat_penalty != 1.0 or frequency_penalty != 0.0
                           or presence_penalty != 0.0) and repeat_last_n != 0
    cdef llama_sampler * chain
    cdef llama_logit_bias * biases
    cdef Py_ssize_t i, n_bias = len(logit_bias)
    cdef int32_t last_n
    if temperature <= 0.0 and not penalties and n_bias == 0:
        return NULL     # plain greedy: argmax over the logits, no candidate array
    chain = llama_sampler_chain_init(llama_sampler_chain_default_params())
    if chain == NULL:
        raise MemoryError()
    if n_bias:
        biases = <llama_logit_bias *> malloc(n_bias * sizeof(llama_logit_bias))
        if biases == NULL:
            llama_sampler_free(chain)
            raise MemoryError()
        for i, (tok, bias) in enumerate(logit_bias):
            biases[i].token = tok
            biases[i].bias = bias
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, n_bias, biases))
        free(biases)
    if penalties:
        last_n = repeat_last_n if repeat_last_n > 0 else n_ctx
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
            n_vocab, last_n, repeat_penalty, frequency_penalty, presence_penalty))
        # the prompt counts as history for the penalties, as in llama.cpp's own tools
        for i in range(max(0, prompt.shape[0] - last_n), prompt.shape[0]):
            if mll_sampler_accept(chain, prompt[i]) < 0:
                detail = mll_guard_error().decode("utf-8", "replace")
                llama_sampler_free(chain)
                raise errors.cxx_exception("setting up the sampler", detail, errors.GenerationError)
    if temperature <= 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k))
    if typical_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_typical(typical_p, 1))
    if top_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 1))
    llama_sampler_chain_add(chain, llama_sampler_init_temp(temperature))
    llama_sampler_chain_add(chain, llama_sampler_init_dist(<uint32_t> seed))
    return chain
