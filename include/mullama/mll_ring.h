/* mll_ring.h - bounded single-producer / single-consumer hand-off of tokens.
 *
 * The producer is a native thread running the decode loop without the GIL;
 * the consumer is an event loop. When the ring is full the producer blocks
 * (backpressure: no decoding happens until the consumer reads); when the
 * consumer wants to stop it cancels the ring and the producer's wait returns
 * at once. The consumer never blocks on the ring: it waits for `wake_fd` (an
 * eventfd) to become readable, which happens whenever a record is committed
 * while it was waiting, or when the producer closes the ring.
 *
 * Everything is guarded by one mutex: it is held for a few instructions per
 * token, so contention costs nothing next to a decode step.
 * Linux only (eventfd). Caller owns the record storage.
 */
#ifndef MLL_RING_H
#define MLL_RING_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MLL_REC_INLINE 48
/* most alternatives a record carries (OpenAI allows up to 20) */
#define MLL_REC_TOP 64

typedef struct mll_tok_rec {
    int32_t token;
    int32_t finish;       /* 0 while generation goes on, else the finish code */
    float logprob;
    uint32_t text_len;
    char text[MLL_REC_INLINE];
    char *heap_text;      /* used when text_len > MLL_REC_INLINE; freed on release */
    int32_t n_top;        /* alternatives filled in below, best first */
    int32_t top_ids[MLL_REC_TOP];
    float top_logprobs[MLL_REC_TOP];
} mll_tok_rec;

typedef struct mll_ring {
    mll_tok_rec *recs;
    uint32_t cap;
    uint64_t head;        /* next record to read */
    uint64_t tail;        /* next record to write */
    pthread_mutex_t mu;
    pthread_cond_t not_full;
    int wake_fd;
    int closed;           /* the producer has finished */
    int cancelled;        /* the consumer wants no more records */
    int consumer_waiting; /* the consumer sleeps on wake_fd */
    int32_t error;        /* producer-side error code, 0 if none */
    uint64_t full_waits;  /* how often the producer blocked on a full ring */
    /* called (outside the lock) after the consumer frees a slot or cancels, so a
     * producer that serves many rings can sleep on one signal of its own */
    void (*on_space)(void *arg);
    void *on_space_arg;
} mll_ring;

/* A doorbell: a producer that has nothing to do sleeps until someone rings.
 * `mll_bell_wait(b, seen)` returns as soon as the count differs from `seen`,
 * so a ring between taking `seen` and waiting is never lost. */
typedef struct mll_bell {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t count;
} mll_bell;

static inline void mll_bell_init(mll_bell *b) {
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    b->count = 0;
}

static inline void mll_bell_destroy(mll_bell *b) {
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
}

static inline void mll_bell_ring(void *arg) {
    mll_bell *b = (mll_bell *)arg;
    pthread_mutex_lock(&b->mu);
    b->count++;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static inline uint64_t mll_bell_seen(mll_bell *b) {
    uint64_t c;
    pthread_mutex_lock(&b->mu);
    c = b->count;
    pthread_mutex_unlock(&b->mu);
    return c;
}

static inline void mll_bell_wait(mll_bell *b, uint64_t seen) {
    pthread_mutex_lock(&b->mu);
    while (b->count == seen) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

static inline int mll_ring_init(mll_ring *r, mll_tok_rec *storage, uint32_t cap) {
    memset(r, 0, sizeof(*r));
    r->recs = storage;
    r->cap = cap;
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0) return -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->not_full, NULL);
    return 0;
}

static inline void mll__ring_wake(mll_ring *r) {
    uint64_t one = 1;
    ssize_t n;
    do { n = write(r->wake_fd, &one, sizeof one); } while (n < 0 && errno == EINTR);
}

/* Free heap text of unread records and the eventfd. The producer must be gone. */
static inline void mll_ring_destroy(mll_ring *r) {
    for (uint64_t i = r->head; i < r->tail; ++i) {
        mll_tok_rec *rec = &r->recs[i % r->cap];
        free(rec->heap_text);
        rec->heap_text = NULL;
    }
    r->head = r->tail;
    if (r->wake_fd >= 0) close(r->wake_fd);
    r->wake_fd = -1;
    pthread_cond_destroy(&r->not_full);
    pthread_mutex_destroy(&r->mu);
}

/* Producer: note that the producer skipped this ring because it was full. */
static inline void mll_ring_note_full(mll_ring *r) {
    pthread_mutex_lock(&r->mu);
    r->full_waits++;
    pthread_mutex_unlock(&r->mu);
}

/* Producer: wait for a free slot. 0 when one is free, -1 when cancelled. */
static inline int mll_ring_wait_slot(mll_ring *r) {
    int rc;
    pthread_mutex_lock(&r->mu);
    if (!r->cancelled && r->tail - r->head >= r->cap) r->full_waits++;
    while (!r->cancelled && r->tail - r->head >= r->cap) pthread_cond_wait(&r->not_full, &r->mu);
    rc = r->cancelled ? -1 : 0;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* Producer: the slot to fill (valid after mll_ring_wait_slot returned 0). */
static inline mll_tok_rec *mll_ring_slot(mll_ring *r) { return &r->recs[r->tail % r->cap]; }

/* Producer: the record k places after the next one (k < the space left), for a
 * producer that prepares several records before committing them in order. */
static inline mll_tok_rec *mll_ring_slot_at(mll_ring *r, uint32_t k) { return &r->recs[(r->tail + k) % r->cap]; }

/* Producer: copy `n` text bytes into the slot; -1 when out of memory. */
static inline int mll_ring_set_text(mll_tok_rec *rec, const char *text, uint32_t n) {
    rec->text_len = n;
    rec->heap_text = NULL;
    if (n <= MLL_REC_INLINE) {
        if (n) memcpy(rec->text, text, n);
        return 0;
    }
    rec->heap_text = (char *)malloc(n);
    if (!rec->heap_text) { rec->text_len = 0; return -1; }
    memcpy(rec->heap_text, text, n);
    return 0;
}

/* Producer: publish the filled slot and wake a sleeping consumer. */
static inline void mll_ring_commit(mll_ring *r) {
    int wake;
    pthread_mutex_lock(&r->mu);
    r->tail++;
    wake = r->consumer_waiting;
    r->consumer_waiting = 0;
    pthread_mutex_unlock(&r->mu);
    if (wake) mll__ring_wake(r);
}

/* Producer: no more records will come (`error` is 0 or a failure code). */
static inline void mll_ring_close(mll_ring *r, int32_t error) {
    pthread_mutex_lock(&r->mu);
    r->closed = 1;
    r->error = error;
    r->consumer_waiting = 0;
    pthread_mutex_unlock(&r->mu);
    mll__ring_wake(r);
}

/* Consumer: 1 and *out set when a record is ready; 0 when empty (and, if
 * `will_wait`, the consumer is now registered to be woken through wake_fd);
 * -1 when empty and closed. */
static inline int mll_ring_peek(mll_ring *r, mll_tok_rec **out, int will_wait) {
    int rc;
    pthread_mutex_lock(&r->mu);
    if (r->tail != r->head) {
        *out = &r->recs[r->head % r->cap];
        rc = 1;
    } else if (r->closed) {
        rc = -1;
    } else {
        if (will_wait) r->consumer_waiting = 1;
        rc = 0;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* Consumer: done with the record returned by peek; frees a slot for the producer. */
static inline void mll_ring_release(mll_ring *r) {
    pthread_mutex_lock(&r->mu);
    if (r->tail != r->head) {
        mll_tok_rec *rec = &r->recs[r->head % r->cap];
        free(rec->heap_text);
        rec->heap_text = NULL;
        r->head++;
        pthread_cond_signal(&r->not_full);
    }
    pthread_mutex_unlock(&r->mu);
    if (r->on_space) r->on_space(r->on_space_arg);
}

/* Consumer: stop the producer; a blocked mll_ring_wait_slot returns -1 at once. */
static inline void mll_ring_cancel(mll_ring *r) {
    pthread_mutex_lock(&r->mu);
    r->cancelled = 1;
    pthread_cond_broadcast(&r->not_full);
    pthread_mutex_unlock(&r->mu);
    if (r->on_space) r->on_space(r->on_space_arg);
}

/* Producer: free slots right now (0 when full or cancelled). Never blocks. */
static inline uint32_t mll_ring_space(mll_ring *r) {
    uint32_t n;
    pthread_mutex_lock(&r->mu);
    n = r->cancelled ? 0 : r->cap - (uint32_t)(r->tail - r->head);
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Consumer: reset the eventfd counter after waking. */
static inline void mll_ring_drain_wake(mll_ring *r) {
    uint64_t value;
    ssize_t n;
    do { n = read(r->wake_fd, &value, sizeof value); } while (n < 0 && errno == EINTR);
}

static inline uint32_t mll_ring_size(mll_ring *r) {
    uint32_t n;
    pthread_mutex_lock(&r->mu);
    n = (uint32_t)(r->tail - r->head);
    pthread_mutex_unlock(&r->mu);
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_RING_H */
