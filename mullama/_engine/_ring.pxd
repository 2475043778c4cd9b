from mullama._engine._mll cimport mll_ring, mll_tok_rec


cdef class TokenRing:
    cdef mll_ring r
    cdef mll_tok_rec * storage
    cdef bint ready
