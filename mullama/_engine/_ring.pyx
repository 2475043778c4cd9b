# cython: language_level=3
"""The consumer side of the token hand-off (mll_ring.h) for the async streams.

The producer side is the engine step (``_core.pyx``), which fills the ring
without the GIL.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport calloc, free

from mullama._engine._mll cimport *

EMPTY = 0          # nothing to read yet: wait for fileno() to become readable
CLOSED = -1        # nothing to read and nothing more will come


cdef class TokenRing:
    """A bounded hand-off of at most ``capacity`` unread tokens."""

    def __cinit__(self, unsigned int capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.ready = False
        self.storage = <mll_tok_rec *> calloc(capacity, sizeof(mll_tok_rec))
        if self.storage == NULL:
            raise MemoryError()
        if mll_ring_init(&self.r, self.storage, capacity) != 0:
            free(self.storage)
            self.storage = NULL
            raise OSError("eventfd() failed")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            mll_ring_destroy(&self.r)
            self.ready = False
        free(self.storage)
        self.storage = NULL

    def fileno(self) -> int:
        """An fd that becomes readable when a token arrives or the producer finishes."""
        return self.r.wake_fd

    def pop(self, bint will_wait=False):
        """(token_id, text_bytes, finish_code, logprob, top), or EMPTY, or CLOSED.

        ``top`` is a tuple of ``(token_id, logprob)`` alternatives, or None.

        With ``will_wait`` an EMPTY answer also asks the producer to signal
        ``fileno()`` when the next token is committed.
        """
        cdef mll_tok_rec * rec = NULL
        cdef int rc = mll_ring_peek(&self.r, &rec, will_wait)
        if rc == 0:
            return EMPTY
        if rc < 0:
            return CLOSED
        if rec.text_len > MLL_REC_INLINE:
            text = PyBytes_FromStringAndSize(rec.heap_text, rec.text_len)
        else:
            text = PyBytes_FromStringAndSize(rec.text, rec.text_len)
        top = None
        if rec.n_top > 0:
            top = tuple([(rec.top_ids[i], rec.top_logprobs[i]) for i in range(rec.n_top)])
        out = (rec.token, text, rec.finish, rec.logprob, top)
        mll_ring_release(&self.r)
        return out

    def drain_wake(self):
        mll_ring_drain_wake(&self.r)

    def close(self, int error=0):
        """End the stream from the producer's side (when no engine will fill it again)."""
        mll_ring_close(&self.r, error)

    def cancel(self):
        """Stop the producer: its wait for a free slot returns at once."""
        mll_ring_cancel(&self.r)

    @property
    def capacity(self) -> int:
        return self.r.cap

    @property
    def size(self) -> int:
        """Tokens waiting unread."""
        return mll_ring_size(&self.r)

    @property
    def closed(self) -> bool:
        return self.r.closed != 0

    @property
    def cancelled(self) -> bool:
        return self.r.cancelled != 0

    @property
    def error(self) -> int:
        return self.r.error

    @property
    def full_waits(self) -> int:
        """How often the producer paused on a full ring (backpressure)."""
        return self.r.full_waits
