/* mll_rows.h - the per-row logits work of one batch step, on all CPU threads.
 *
 * After a batched decode each stream's row of logits needs its argmax (greedy
 * streams), its log-sum-exp (for log-probabilities) and maybe its top-k. Done
 * one row after another on the engine thread, that leaves the other cores
 * idle for about 0.2 ms per row on a 262,144-token vocabulary. Here the rows
 * are handed out to ggml's CPU thread pool - the same workers that just ran the
 * decode and are still polling for work - through a one-node graph whose
 * custom op takes rows from a shared counter until none are left.
 *
 * The results are exactly those of the single-row functions in mll_logits.h.
 */
#ifndef MLL_ROWS_H
#define MLL_ROWS_H

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "ggml.h"
#include "ggml-cpu.h"
#include "mll_logits.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mll_row_job {
    const float *logits;   /* the row, n_vocab floats */
    int32_t greedy;        /* compute the argmax */
    int32_t want_lse;      /* compute log(sum(exp(row))) */
    int32_t n_top;         /* compute the n_top largest entries into top_ids/top_vals */
    int32_t *top_ids;      /* caller's storage for n_top entries */
    float *top_vals;
    /* results */
    int32_t argmax;
    int32_t got_top;
    double lse;
} mll_row_job;

typedef struct mll_rows {
    struct ggml_context *gctx;
    struct ggml_cgraph *graph;
    struct ggml_cplan plan;
    mll_row_job *jobs;
    int32_t n_jobs;
    int32_t n_vocab;
    atomic_int next;
} mll_rows;

static inline void mll_row_run(mll_row_job *j, int32_t n_vocab) {
    float m = 0.0f;
    if (j->greedy) {
        j->argmax = mll_argmax(j->logits, n_vocab);   /* gives the maximum too */
        m = j->logits[j->argmax];
    } else if (j->want_lse) {
        m = mll_max(j->logits, n_vocab);
    }
    j->lse = j->want_lse ? mll_logsumexp_from(j->logits, n_vocab, m) : 0.0;
    j->got_top = j->n_top > 0 ? mll_topk(j->logits, n_vocab, j->n_top, j->top_ids, j->top_vals) : 0;
}

static void mll__rows_op(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    mll_rows *r = (mll_rows *)userdata;
    int i;
    (void)dst; (void)ith; (void)nth;
    while ((i = atomic_fetch_add_explicit(&r->next, 1, memory_order_relaxed)) < r->n_jobs) {
        mll_row_run(&r->jobs[i], r->n_vocab);
    }
}

/* Build the one-node graph for `n_threads` threads of `pool` (NULL: rows are
 * then always done on the calling thread). `jobs` must have room for every row
 * of a step. Returns 0, or -1 when ggml could not allocate the graph. */
static inline int mll_rows_init(mll_rows *r, mll_row_job *jobs, int32_t n_vocab, int n_threads,
                                struct ggml_threadpool *pool) {
    struct ggml_init_params ip;
    struct ggml_tensor *node;
    memset(r, 0, sizeof *r);
    r->jobs = jobs;
    r->n_vocab = n_vocab;
    atomic_init(&r->next, 0);
    if (pool == NULL || n_threads < 2) return 0;
    ip.mem_size = 4 * ggml_tensor_overhead() + ggml_graph_overhead_custom(4, false) + 1024;
    ip.mem_buffer = NULL;
    ip.no_alloc = false;
    r->gctx = ggml_init(ip);
    if (r->gctx == NULL) return -1;
    node = ggml_custom_4d(r->gctx, GGML_TYPE_F32, 1, 1, 1, 1, NULL, 0, mll__rows_op, GGML_N_TASKS_MAX, r);
    r->graph = ggml_new_graph_custom(r->gctx, 4, false);
    ggml_build_forward_expand(r->graph, node);
    r->plan = ggml_graph_plan(r->graph, n_threads, pool);
    if (r->plan.work_size > 0) {   /* a custom op asks for none; never expected */
        ggml_free(r->gctx);
        r->gctx = NULL;
        r->graph = NULL;
        return -1;
    }
    return 0;
}

/* Run the first n_jobs jobs: on the pool when there is more than one row,
 * else (or, redoing every row, when the pool run fails) on the calling thread. */
static inline void mll_rows_compute(mll_rows *r, int32_t n_jobs) {
    int32_t i;
    r->n_jobs = n_jobs;
    atomic_store_explicit(&r->next, 0, memory_order_relaxed);
    if (r->graph != NULL && n_jobs > 1 && ggml_graph_compute(r->graph, &r->plan) == GGML_STATUS_SUCCESS) {
        return;
    }
    for (i = 0; i < n_jobs; ++i) {
        mll_row_run(&r->jobs[i], r->n_vocab);
    }
}

static inline void mll_rows_free(mll_rows *r) {
    if (r->gctx != NULL) ggml_free(r->gctx);
    r->gctx = NULL;
    r->graph = NULL;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_ROWS_H */
