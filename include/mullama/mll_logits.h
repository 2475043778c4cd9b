/* mll_logits.h - small reductions over a logits row.
 *
 * Used once per generated token on a row of n_vocab floats (262,144 for
 * Gemma 3), so each is a single linear pass written to vectorise.
 * Pure C, no allocation.
 */
#ifndef MLL_LOGITS_H
#define MLL_LOGITS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Index of the largest finite-or-not value; the first one on ties. */
static inline int32_t mll_argmax(const float *x, int32_t n) {
    int32_t best = 0;
    float v = x[0];
    for (int32_t i = 1; i < n; ++i) {
        if (x[i] > v) { v = x[i]; best = i; }
    }
    return best;
}

static inline float mll_max(const float *x, int32_t n) {
    float v = x[0];
    for (int32_t i = 1; i < n; ++i) v = x[i] > v ? x[i] : v;
    return v;
}

/* log(sum(exp(x))) computed around the maximum so nothing overflows. */
static inline double mll_logsumexp(const float *x, int32_t n) {
    const float m = mll_max(x, n);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t i = 0;
    if (isinf(m)) return (double)m;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) acc[j] += expf(x[i + j] - m);
    }
    double sum = 0.0;
    for (int j = 0; j < 8; ++j) sum += acc[j];
    for (; i < n; ++i) sum += expf(x[i] - m);
    return (double)m + log(sum);
}

/* The k largest entries (k <= n), best first, by insertion into a sorted
 * array of k: O(n) for the small k that callers use (top-20 at most). */
static inline int32_t mll_topk(const float *x, int32_t n, int32_t k, int32_t *ids, float *vals) {
    int32_t have = 0;
    if (k > n) k = n;
    if (k <= 0) return 0;
    for (int32_t i = 0; i < n; ++i) {
        const float v = x[i];
        if (have == k && !(v > vals[k - 1])) continue;
        int32_t pos = have < k ? have : k - 1;
        while (pos > 0 && v > vals[pos - 1]) {
            vals[pos] = vals[pos - 1];
            ids[pos] = ids[pos - 1];
            --pos;
        }
        vals[pos] = v;
        ids[pos] = i;
        if (have < k) ++have;
    }
    return have;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_LOGITS_H */
