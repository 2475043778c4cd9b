from mullama._engine._mll cimport mll_stop


cdef class StopSet:
    """Stop strings kept alive, with the pointer/length arrays and the KMP workspace
    that a C matcher (mll_stop) works on."""
    cdef list _keep
    cdef const char ** _ptrs
    cdef size_t * _lens
    cdef size_t * _work
    cdef size_t n

    cdef int bind(self, mll_stop * m) except -1
