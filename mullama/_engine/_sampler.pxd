from libc.stdint cimport int32_t

from mullama._engine._llama cimport llama_sampler

cdef llama_sampler * make_sampler(tuple cfg, int32_t n_vocab, int32_t n_ctx, const int[:] prompt) except? NULL
