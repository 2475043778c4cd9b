# Declarations of mullama's own C helpers (include/mullama/*.h). No logic here.

from libc.stdint cimport int32_t

from mullama._engine._llama cimport ggml_threadpool

cdef extern from "mullama/mll_utf8.h" nogil:
    ctypedef struct mll_utf8_hold:
        unsigned char tail[4]
        size_t tail_len
    int mll_utf8_seq_len(unsigned char b)
    size_t mll_utf8_complete_len(const unsigned char * buf, size_t length)
    void mll_utf8_reset(mll_utf8_hold * h)
    size_t mll_utf8_feed(mll_utf8_hold * h, const char * data, size_t n, char * out)
    size_t mll_utf8_flush(mll_utf8_hold * h, char * out)

cdef extern from "mullama/mll_stop.h" nogil:
    ctypedef struct mll_stop:
        size_t n_stops
        size_t max_len
        size_t held
        int matched
        size_t matched_index
        size_t * state
        size_t held_from
    size_t mll_stop_workspace_len(const size_t * lens, size_t n_stops)
    int mll_stop_init(mll_stop * m, const char * const * stops, const size_t * lens,
                      size_t n_stops, size_t * workspace)
    void mll_stop_reset(mll_stop * m)
    int mll_stop_feed(mll_stop * m, const char * data, size_t n, char * out, size_t * out_len)
    size_t mll_stop_flush(mll_stop * m, char * out)

cdef extern from "mullama/mll_logits.h" nogil:
    float mll_max(const float * x, int32_t n)
    int32_t mll_argmax(const float * x, int32_t n)
    double mll_logsumexp_from(const float * x, int32_t n, float m)
    int32_t mll_topk(const float * x, int32_t n, int32_t k, int32_t * ids, float * vals)

cdef extern from "mullama/mll_rows.h" nogil:
    ctypedef struct mll_row_job:
        const float * logits
        int32_t greedy
        int32_t want_lse
        int32_t n_top
        int32_t * top_ids
        float * top_vals
        int32_t argmax
        int32_t got_top
        double lse
    ctypedef struct mll_rows:
        pass
    void mll_row_run(mll_row_job * j, int32_t n_vocab)
    int mll_rows_init(mll_rows * r, mll_row_job * jobs, int32_t n_vocab, int n_threads, ggml_threadpool * pool)
    void mll_rows_compute(mll_rows * r, int32_t n_jobs)
    void mll_rows_free(mll_rows * r)

cdef extern from "mullama/mll_draft.h" nogil:
    enum: MLL_DRAFT_MAX
    enum: MLL_COST_ROWS
    ctypedef struct mll_costs:
        pass
    int32_t mll_ngram_draft(const int32_t * seq, int32_t n, int32_t ngram, int32_t max, int32_t * out)
    double mll_draft_yield(double a, int32_t k)
    double mll_cost(const mll_costs * t, int32_t rows)
    double mll_cost_measured(const mll_costs * t, int32_t rows)
    void mll_cost_note(mll_costs * t, int32_t rows, double cost)
    int32_t mll_draft_plan(const mll_costs * t, int32_t n, const int32_t * avail, const double * acc,
                           int32_t other_rows, int32_t max_rows, double margin, int32_t * k)
    void mll_ngram_fill(int32_t * seq, int32_t n, int32_t ngram, int32_t got, int32_t k, int32_t * out)
    int32_t mll_draft_plan_common(const mll_costs * t, int32_t n, const int32_t * avail, const double * acc,
                                  int32_t max_k, double margin)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_lock(pthread_mutex_t * m)
    int pthread_mutex_unlock(pthread_mutex_t * m)

cdef extern from "mullama/mll_ring.h" nogil:
    enum: MLL_REC_INLINE
    enum: MLL_REC_TOP
    ctypedef struct mll_tok_rec:
        int32_t token
        int32_t finish
        float logprob
        unsigned int text_len
        char text[MLL_REC_INLINE]
        char * heap_text
        int32_t n_top
        int32_t top_ids[MLL_REC_TOP]
        float top_logprobs[MLL_REC_TOP]
    ctypedef struct mll_ring:
        unsigned int cap
        int wake_fd
        int closed
        int cancelled
        int32_t error
        unsigned long long full_waits
        void (*on_space)(void * arg) noexcept nogil
        void * on_space_arg
    ctypedef struct mll_bell:
        pthread_mutex_t mu
        unsigned long long count
    void mll_bell_init(mll_bell * b)
    void mll_bell_destroy(mll_bell * b)
    void mll_bell_ring(void * b)
    unsigned long long mll_bell_seen(mll_bell * b)
    void mll_bell_wait(mll_bell * b, unsigned long long seen)
    unsigned int mll_ring_space(mll_ring * r)
    void mll_ring_note_full(mll_ring * r)
    int mll_ring_init(mll_ring * r, mll_tok_rec * storage, unsigned int cap)
    void mll_ring_destroy(mll_ring * r)
    int mll_ring_wait_slot(mll_ring * r)
    mll_tok_rec * mll_ring_slot(mll_ring * r)
    mll_tok_rec * mll_ring_slot_at(mll_ring * r, unsigned int k)
    int mll_ring_set_text(mll_tok_rec * rec, const char * text, unsigned int n)
    void mll_ring_commit(mll_ring * r)
    void mll_ring_close(mll_ring * r, int32_t error)
    int mll_ring_peek(mll_ring * r, mll_tok_rec ** out, int will_wait)
    void mll_ring_release(mll_ring * r)
    void mll_ring_cancel(mll_ring * r)
    void mll_ring_drain_wake(mll_ring * r)
    unsigned int mll_ring_size(mll_ring * r)
