# The text pipeline and per-row helpers of the engine step (_core.pyx):
# token -> bytes -> UTF-8 holdback -> stop-sequence matcher -> printable bytes.
# Everything here is nogil C on caller-owned buffers.

from libc.stdlib cimport realloc, free

from libc.stdint cimport int32_t

from libc.string cimport strncpy

from mullama._engine._llama cimport llama_vocab, llama_token, llama_context, llama_sampler
from mullama._engine._guard cimport mll_token_to_piece, mll_sampler_sample, mll_guard_error, MLL_CXX_ERROR
from mullama._engine._mll cimport (mll_utf8_hold, mll_utf8_reset, mll_utf8_feed, mll_utf8_flush,
                           mll_stop, mll_stop_feed, mll_stop_flush, mll_row_job)


# how a generation ended (0 while it runs) and what went wrong; mullama/_generation.py and
# mullama/stream.py map the finish codes to finish_reason strings
cdef enum:
    FIN_NONE = 0
    FIN_EOS = 1
    FIN_STOP = 2
    FIN_MAX_TOKENS = 3
    FIN_CONTEXT = 4
    FIN_CANCELLED = 5

    ERR_NONE = 0
    ERR_DECODE = 1
    ERR_NO_LOGITS = 2
    ERR_NOMEM = 3
    ERR_CXX = 4                   # llama.cpp threw; the guard caught it (message kept in the request)


cdef inline void row_job(mll_row_job * job, const float * logits, llama_sampler * smpl, bint want_logprob,
                         int32_t n_top, int32_t * top_ids, float * top_vals) noexcept nogil:
    """Describe the reductions a token needs from its logits row: the argmax when ``smpl``
    is NULL (plain greedy), log(sum(exp)) for its log-probability, the top ``n_top``
    alternatives into ``top_ids``/``top_vals``. ``mll_row_run`` (or a pool) fills it in."""
    job.logits = logits
    job.greedy = smpl == NULL
    job.want_lse = want_logprob
    job.n_top = n_top if want_logprob else 0
    job.top_ids = top_ids
    job.top_vals = top_vals


cdef inline llama_token choose_token(llama_context * ctx, int32_t idx, llama_sampler * smpl,
                                     const mll_row_job * job) noexcept nogil:
    """The next token from batch row ``idx``: the job's argmax for plain greedy, else the
    sampler chain's choice (which reads the row, never changes it). -1 when the sampler
    threw (``mll_guard_error()`` says what)."""
    if smpl == NULL:
        return job.argmax
    return mll_sampler_sample(smpl, ctx, idx)


cdef inline int32_t token_logprobs(const mll_row_job * job, llama_token tok, float * logprob) noexcept nogil:
    """``tok``'s log-probability into ``logprob``; the job's top-k logits become
    log-probabilities in place. Returns how many alternatives there are."""
    cdef int32_t i
    logprob[0] = <float> (job.logits[tok] - job.lse)
    for i in range(job.got_top):
        job.top_vals[i] = <float> (job.top_vals[i] - job.lse)
    return job.got_top


cdef struct TextPipe:
    mll_utf8_hold utf8
    mll_stop stop
    char * piece
    size_t piece_cap
    char * work
    char * out
    size_t out_cap
    size_t out_len


cdef inline int pipe_reserve(TextPipe * p, size_t piece_len) noexcept nogil:
    """Grow the work/out buffers for a piece of ``piece_len`` bytes; -1 when out of memory."""
    cdef size_t need = piece_len + p.stop.max_len + 16
    cdef char * w
    cdef char * o
    if p.piece == NULL:
        p.piece = <char *> realloc(NULL, 256)
        if p.piece == NULL:
            return -1
        p.piece_cap = 256
    if need <= p.out_cap:
        return 0
    w = <char *> realloc(p.work, need)
    if w == NULL:
        return -1
    p.work = w
    o = <char *> realloc(p.out, need)
    if o == NULL:
        return -1
    p.out = o
    p.out_cap = need
    return 0


cdef inline void pipe_start(TextPipe * p) noexcept nogil:
    """A new generation: nothing held back (the stop matcher is set up by the caller)."""
    mll_utf8_reset(&p.utf8)
    p.out_len = 0


cdef inline void pipe_flush(TextPipe * p) noexcept nogil:
    """End of generation: append the held stop prefix, then an unfinished UTF-8 tail."""
    p.out_len += mll_stop_flush(&p.stop, p.out + p.out_len)
    p.out_len += mll_utf8_flush(&p.utf8, p.out + p.out_len)


cdef inline int pipe_push(TextPipe * p, const llama_vocab * vocab, llama_token tok) noexcept nogil:
    """Run one token through the pipeline into ``out``/``out_len``.

    Returns 1 when a stop sequence completed, 0 otherwise, -1 when out of memory, -2 when
    llama.cpp threw (``mll_guard_error()`` says what)."""
    cdef int n = mll_token_to_piece(vocab, tok, p.piece, <int> p.piece_cap, 0, False)
    cdef char * grown
    cdef size_t k
    p.out_len = 0
    if n == MLL_CXX_ERROR:
        return -2
    if n < 0:
        grown = <char *> realloc(p.piece, -n)
        if grown == NULL:
            return -1
        p.piece = grown
        p.piece_cap = -n
        n = mll_token_to_piece(vocab, tok, p.piece, <int> p.piece_cap, 0, False)
        if n == MLL_CXX_ERROR:
            return -2
        if n < 0:
            n = 0
    if pipe_reserve(p, <size_t> n) < 0:
        return -1
    k = mll_utf8_feed(&p.utf8, p.piece, <size_t> n, p.work)
    return 1 if mll_stop_feed(&p.stop, p.work, k, p.out, &p.out_len) else 0


cdef inline void pipe_free(TextPipe * p) noexcept nogil:
    free(p.piece)
    free(p.work)
    free(p.out)
    p.piece = NULL
    p.work = NULL
    p.out = NULL
    p.piece_cap = 0
    p.out_cap = 0


cdef inline void keep_guard_error(char * dst, size_t cap) noexcept nogil:
    """Copy the caught C++ exception's text (this thread's) into ``dst``."""
    strncpy(dst, mll_guard_error(), cap - 1)
    dst[cap - 1] = 0
