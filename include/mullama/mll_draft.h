/* mll_draft.h - drafts for speculative decoding from the sequence itself
 * (n-gram / prompt lookup), and how many of them are worth verifying.
 *
 * A draft is the continuation of the most recent earlier occurrence of the
 * sequence's last `ngram` tokens. Verifying k drafted tokens costs one pass
 * with 1 + k logits rows, and that cost is not linear in the rows (the CPU
 * kernels work on row tiles; an odd count can cost more than the next even
 * one). The engine keeps a table of measured pass costs by row count and
 * each stream's acceptance rate; `mll_draft_plan` picks the draft lengths
 * that maximise the expected tokens per second of the whole pass, so drafting
 * stops by itself where it does not pay.
 *
 * Pure C on caller-owned buffers; no llama.cpp calls.
 */
#ifndef MLL_DRAFT_H
#define MLL_DRAFT_H

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MLL_DRAFT_MAX 32      /* drafted tokens per stream and pass, at most */
#define MLL_COST_ROWS 128     /* logits rows per pass the cost table covers */

/* The draft for seq[0..n): the tokens that followed the latest earlier
 * occurrence of its last `ngram` tokens, at most `max` of them, into `out`.
 * Returns how many (0: no earlier occurrence). */
static inline int32_t mll_ngram_draft(const int32_t *seq, int32_t n, int32_t ngram, int32_t max,
                                      int32_t *out) {
    const int32_t *tail;
    int32_t end, k;
    if (ngram < 1 || max < 1 || n <= ngram) return 0;
    tail = seq + n - ngram;
    /* `end` is one past a candidate occurrence; the latest one that is not the tail itself */
    for (end = n - 1; end >= ngram; --end) {
        if (seq[end - 1] != tail[ngram - 1]) continue;
        if (memcmp(seq + end - ngram, tail, (size_t)ngram * sizeof(int32_t)) != 0) continue;
        k = n - end;
        if (k > max) k = max;
        memcpy(out, seq + end, (size_t)k * sizeof(int32_t));
        return k;
    }
    return 0;
}

/* Expected tokens one pass yields with k drafted tokens when each is accepted
 * with probability a (until the first rejection): 1 + a + ... + a^k. */
static inline double mll_draft_yield(double a, int32_t k) {
    double s = 1.0, p = 1.0;
    int32_t i;
    for (i = 0; i < k; ++i) {
        p *= a;
        s += p;
    }
    return s;
}

/* Measured seconds (any unit) of a decode pass by logits rows; 0: not measured. */
typedef struct mll_costs {
    double c[MLL_COST_ROWS + 1];
} mll_costs;

/* The prior shape of the cost curve, relative to one row: each extra row ~0.35 of
 * the first, and an odd count >= 3 costs what the next even one does. */
static inline double mll__cost_prior(int32_t rows) {
    int32_t r = (rows >= 3 && rows % 2 == 1) ? rows + 1 : rows;
    return 1.0 + 0.35 * (double)(r - 1);
}

/* mll_cost without the cap below. */
static inline double mll__cost_est(const mll_costs *t, int32_t rows) {
    int32_t lo, hi;
    double unit;
    if (rows < 1) return 0.0;
    if (rows > MLL_COST_ROWS) rows = MLL_COST_ROWS;
    if (t->c[rows] > 0.0) return t->c[rows];
    for (lo = rows - 1; lo >= 1 && !(t->c[lo] > 0.0); --lo) {
    }
    for (hi = rows + 1; hi <= MLL_COST_ROWS && !(t->c[hi] > 0.0); ++hi) {
    }
    if (lo >= 1 && hi <= MLL_COST_ROWS)     /* between two measured counts: on the line joining them */
        return t->c[lo] + (t->c[hi] - t->c[lo]) * (double)(rows - lo) / (double)(hi - lo);
    if (hi <= MLL_COST_ROWS)                /* below all measured counts: the prior's shape */
        return t->c[hi] * mll__cost_prior(rows) / mll__cost_prior(hi);
    if (lo < 1) return 0.0;
    /* above them: the prior's cost per extra row added on. (Scaling instead would carry a
     * bump of the curve, such as 5-8 rows costing about as much as 8, into every count.) */
    unit = t->c[1] > 0.0 ? t->c[1] : t->c[lo] / mll__cost_prior(lo);
    return t->c[lo] + unit * (mll__cost_prior(rows) - mll__cost_prior(lo));
}

/* Cost of a pass with `rows` rows: measured, else interpolated between the nearest
 * measured counts below and above it, else extended from the nearest one by the prior,
 * else 0 (nothing measured yet); and never more than a measured pass with more rows
 * cost. That cap keeps one noisy-high
 * figure from hiding the counts past it, which would then never be tried. */
static inline double mll_cost(const mll_costs *t, int32_t rows) {
    double v = mll__cost_est(t, rows);
    int32_t m;
    for (m = rows + 1; v > 0.0 && m <= MLL_COST_ROWS; ++m)
        if (t->c[m] > 0.0 && t->c[m] < v) v = t->c[m];
    return v;
}

/* The measured cost of a pass with `rows` rows (0: never measured). */
static inline double mll_cost_measured(const mll_costs *t, int32_t rows) {
    return rows >= 1 && rows <= MLL_COST_ROWS ? t->c[rows] : 0.0;
}

/* Fold a measured pass of `rows` rows into the table (moving average). A pass
 * that took more than twice the estimate counts as twice: on a shared machine a
 * descheduled pass says nothing about the row count. */
static inline void mll_cost_note(mll_costs *t, int32_t rows, double cost) {
    double old;
    if (rows < 1 || rows > MLL_COST_ROWS || !(cost > 0.0)) return;
    old = t->c[rows];
    if (old > 0.0 && cost > 2.0 * old) cost = 2.0 * old;
    t->c[rows] = old > 0.0 ? 0.8 * old + 0.2 * cost : cost;
}

/* Choose k[i] in [0, avail[i]] for the n streams of a pass that also carries
 * `other_rows` rows of its own (streams without drafts, scored rows), given
 * each stream's acceptance rate acc[i]: coordinate ascent on the expected
 * tokens per unit of pass cost. A draft is taken only when it beats the pass
 * without it by `margin` (e.g. 1.03). Returns the total rows of the pass. */
static inline int32_t mll_draft_plan(const mll_costs *t, int32_t n, const int32_t *avail, const double *acc,
                                     int32_t other_rows, int32_t max_rows, double margin, int32_t *k) {
    int32_t i, j, round, rows = other_rows + n, best_j;
    double tokens = (double)other_rows + (double)n, base, v, best_v, ti, c;
    for (i = 0; i < n; ++i) k[i] = 0;
    if (mll_cost(t, 1) <= 0.0) return rows;         /* no pass measured yet: no basis to choose */
    for (round = 0; round < 2; ++round) {
        for (i = 0; i < n; ++i) {
            if (avail[i] <= 0) continue;
            ti = tokens - mll_draft_yield(acc[i], k[i]);
            c = mll_cost(t, rows - k[i]);
            base = (ti + 1.0) / c;                  /* this stream without a draft */
            best_j = 0;
            best_v = base * margin;
            for (j = 1; j <= avail[i] && rows - k[i] + j <= max_rows; ++j) {
                v = (ti + mll_draft_yield(acc[i], j)) / mll_cost(t, rows - k[i] + j);
                if (v > best_v) {
                    best_v = v;
                    best_j = j;
                }
            }
            rows += best_j - k[i];
            tokens = ti + mll_draft_yield(acc[i], best_j);
            k[i] = best_j;
        }
    }
    return rows;
}

/* Extend the draft out[0..got) for seq[0..n) to exactly k tokens. The sequence with
 * the draft after it is looked up again with ngram, ngram - 1, ..., 1 tokens; where
 * nothing matches, the last token is repeated. `seq` must have room for n + k tokens:
 * the draft is written after the sequence. */
static inline void mll_ngram_fill(int32_t *seq, int32_t n, int32_t ngram, int32_t got, int32_t k, int32_t *out) {
    int32_t g, c;
    memcpy(seq + n, out, (size_t)got * sizeof(int32_t));
    while (got < k) {
        c = 0;
        for (g = ngram; g >= 1 && c == 0; --g) c = mll_ngram_draft(seq, n + got, g, k - got, out + got);
        if (c == 0) {
            out[got] = seq[n + got - 1];
            c = 1;
        }
        memcpy(seq + n + got, out + got, (size_t)c * sizeof(int32_t));
        got += c;
    }
}

/* One draft length for all n streams of a pass over several sequences: llama.cpp splits
 * such a pass into micro-batches with the same token count per sequence, so streams
 * verifying different counts would cost a second pass over the weights. Stream i has a
 * draft of avail[i] tokens (0: none) accepted with probability acc[i] per token; past it
 * a stream verifies filler, counted here as rejected. Returns the k in [0, max_k] with
 * the most expected tokens per unit of pass cost (n * (1 + k) logits rows), taken only
 * when it beats k = 0 by `margin`. */
static inline int32_t mll_draft_plan_common(const mll_costs *t, int32_t n, const int32_t *avail, const double *acc,
                                            int32_t max_k, double margin) {
    int32_t i, k, best_k = 0;
    double tokens, v, best_v;
    if (n < 1 || mll_cost(t, 1) <= 0.0) return 0;
    best_v = (double)n / mll_cost(t, n) * margin;
    for (k = 1; k <= max_k && n * (1 + k) <= MLL_COST_ROWS; ++k) {
        tokens = 0.0;
        for (i = 0; i < n; ++i) tokens += mll_draft_yield(acc[i], avail[i] < k ? avail[i] : k);
        v = tokens / mll_cost(t, n * (1 + k));
        if (v > best_v) {
            best_v = v;
            best_k = k;
        }
    }
    return best_k;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_DRAFT_H */
