# cython: language_level=3
"""Python access to mullama's C helpers (UTF-8 holdback, stop matcher, logits reductions).

The generation loop calls the same C functions directly without the GIL;
these wrappers exist so the helpers can be used and tested on their own.
"""

from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from mullama._engine._mll cimport (
    mll_utf8_hold, mll_utf8_reset, mll_utf8_feed, mll_utf8_flush, mll_utf8_complete_len,
    mll_stop, mll_stop_workspace_len, mll_stop_init, mll_stop_reset, mll_stop_feed,
    mll_stop_flush, mll_argmax, mll_max, mll_logsumexp_from,
)


def logits_argmax(const float[:] x not None):
    """Index of the largest value, first one on ties (the greedy pick)."""
    return mll_argmax(&x[0], x.shape[0]) if x.shape[0] else 0


def logits_logsumexp(const float[:] x not None):
    """log(sum(exp(x))), as the generation loop computes it for log-probabilities."""
    if x.shape[0] == 0:
        raise ValueError("empty row")
    return mll_logsumexp_from(&x[0], x.shape[0], mll_max(&x[0], x.shape[0]))


def utf8_complete_len(const unsigned char[:] data not None):
    """Number of leading bytes of ``data`` that do not end inside an unfinished character."""
    if data.shape[0] == 0:
        return 0
    return mll_utf8_complete_len(&data[0], data.shape[0])


cdef class Utf8Holdback:
    """Hold back an unfinished trailing UTF-8 character until it is complete."""

    cdef mll_utf8_hold _hold

    def __cinit__(self):
        mll_utf8_reset(&self._hold)

    def feed(self, bytes data not None) -> bytes:
        """Append bytes; return those that now form whole characters."""
        cdef Py_ssize_t n = len(data)
        cdef char * out = <char *> malloc(n + 4)
        if out == NULL:
            raise MemoryError()
        try:
            return out[:mll_utf8_feed(&self._hold, data, n, out)]
        finally:
            free(out)

    def flush(self) -> bytes:
        """End of stream: return the unfinished bytes still held (0 to 3)."""
        cdef char out[4]
        return out[:mll_utf8_flush(&self._hold, out)]

    @property
    def pending(self) -> int:
        return self._hold.tail_len


cdef class StopSet:
    """Validated stop strings and the C arrays a matcher needs; shared by the engines."""

    def __cinit__(self, stops):
        cdef Py_ssize_t i
        cdef bytes s
        self._keep = [bytes(s) for s in stops]
        self.n = len(self._keep)
        for s in self._keep:
            if len(s) == 0:
                raise ValueError("stop sequences must not be empty")
        self._ptrs = <const char **> malloc(max(self.n, 1) * sizeof(char *))
        self._lens = <size_t *> malloc(max(self.n, 1) * sizeof(size_t))
        if self._ptrs == NULL or self._lens == NULL:
            raise MemoryError()
        for i in range(self.n):
            s = self._keep[i]
            self._ptrs[i] = <const char *> s
            self._lens[i] = len(s)
        self._work = <size_t *> malloc(max(mll_stop_workspace_len(self._lens, self.n), 1) * sizeof(size_t))
        if self._work == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._ptrs)
        free(self._lens)
        free(self._work)

    cdef int bind(self, mll_stop * m) except -1:
        """Point ``m`` at these strings; the StopSet must outlive every use of ``m``."""
        if mll_stop_init(m, self._ptrs, self._lens, self.n, self._work) != 0:
            raise ValueError("stop sequences must not be empty")
        return 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self._keep[i]


cdef class StopMatcher:
    """Incremental stop-sequence matcher over a byte stream.

    ``feed`` returns ``(safe_bytes, matched)``: ``safe_bytes`` can no longer be
    part of a stop sequence; on a match it is the text before the stop sequence
    and the stop sequence itself is never returned.
    """

    cdef mll_stop _m
    cdef StopSet _set

    def __cinit__(self, stops):
        self._set = StopSet(stops)
        self._set.bind(&self._m)

    def feed(self, bytes data not None):
        cdef Py_ssize_t n = len(data)
        cdef size_t out_len = 0
        cdef int matched
        cdef char * out = <char *> malloc(self._m.max_len + n + 1)
        if out == NULL:
            raise MemoryError()
        try:
            matched = mll_stop_feed(&self._m, data, n, out, &out_len)
            return out[:out_len], bool(matched)
        finally:
            free(out)

    def flush(self) -> bytes:
        cdef char * out = <char *> malloc(self._m.max_len + 1)
        if out == NULL:
            raise MemoryError()
        try:
            return out[:mll_stop_flush(&self._m, out)]
        finally:
            free(out)

    def reset(self) -> None:
        mll_stop_reset(&self._m)

    @property
    def held(self) -> int:
        """Bytes currently held back as a possible start of a stop sequence."""
        return self._m.held

    @property
    def matched_index(self):
        """Index of the stop sequence that matched, or None."""
        return self._m.matched_index if self._m.matched else None
