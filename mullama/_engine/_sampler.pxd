from libc.stdint cimport int32_t

from mullama._engine._llama cimport llama_sampler
from mullama._engine._model cimport ModelHandle

cdef llama_sampler * make_sampler(tuple cfg, int32_t n_vocab, int32_t n_ctx, const int[:] prompt) except? NULL


cdef class Grammar:
    cdef llama_sampler * proto
    cdef readonly ModelHandle model
    cdef readonly str text
    cdef readonly tuple triggers

    cdef llama_sampler * clone(self) except NULL
