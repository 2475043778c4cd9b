from libc.stdint cimport int32_t

from mullama._engine._llama cimport llama_model, llama_vocab


cdef class ModelHandle:
    cdef llama_model * model
    cdef const llama_vocab * vocab
    cdef readonly int32_t n_vocab
    cdef readonly str path
    cdef object __weakref__

    cdef int check_open(self) except -1
    cdef int _check_id(self, long long token) except -1
