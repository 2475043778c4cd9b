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
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

static inline float mll_max(const float *x, int32_t n) {
    float lane[16];
    int32_t b, i, blocks = n / 16;
    float v = x[0];
    for (int j = 0; j < 16; ++j) lane[j] = x[0];
    for (b = 0; b < blocks; ++b) {          /* 16 independent lanes: vectorises */
        const float *row = x + (size_t)b * 16;
        for (int j = 0; j < 16; ++j) lane[j] = row[j] > lane[j] ? row[j] : lane[j];
    }
    for (int j = 0; j < 16; ++j) v = lane[j] > v ? lane[j] : v;
    for (i = blocks * 16; i < n; ++i) v = x[i] > v ? x[i] : v;
    return v;
}

/* Index of the largest entry, first one on ties (0 when n < 1 or only NaNs),
 * in one pass: 16 lanes keep their best value and its index, so the loop
 * vectorises and the row (1 MiB for Gemma 3) is read once, not twice. */
static inline int32_t mll_argmax(const float *x, int32_t n) {
    float lv[16];
    int32_t li[16];
    int32_t b, i, best = 0, blocks = n / 16;
    float v;
    if (n < 1) return 0;
    if (blocks == 0) {
        v = x[0];
        for (i = 1; i < n; ++i) if (x[i] > v) { v = x[i]; best = i; }
        return best;
    }
    for (int j = 0; j < 16; ++j) { lv[j] = x[j]; li[j] = j; }
    for (b = 1; b < blocks; ++b) {
        const float *row = x + (size_t)b * 16;
        for (int j = 0; j < 16; ++j) {
            int gt = row[j] > lv[j];
            lv[j] = gt ? row[j] : lv[j];
            li[j] = gt ? b * 16 + j : li[j];
        }
    }
    v = lv[0];
    best = li[0];
    for (int j = 1; j < 16; ++j) {
        if (lv[j] > v || (lv[j] == v && li[j] < best) || (v != v && lv[j] == lv[j])) { v = lv[j]; best = li[j]; }
    }
    for (i = blocks * 16; i < n; ++i) if (x[i] > v) { v = x[i]; best = i; }
    return best;
}

/* exp(x) for x <= 0 to about 1e-7 relative: x = n*ln2 + r with |r| <= ln2/2,
 * then 2^n * P(r) with a degree-6 polynomial. Plain arithmetic, no libm call,
 * so the compiler vectorises the loops that use it: a log-probability over a
 * 262,144-token vocabulary costs tens of microseconds instead of hundreds. */
static inline float mll__exp_nonpos(float x) {
    const float log2e = 1.44269504088896341f;
    float n, r, p, scale;
    int32_t bits;
    x = x < -87.0f ? -87.0f : x;            /* exp(-87) ~ 1.6e-38: still a normal float */
    n = floorf(x * log2e + 0.5f);
    r = x - n * 0.693359375f - n * -2.12194440e-4f;   /* ln2 in two parts, for precision */
    p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    bits = ((int32_t)n + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log(sum(exp(x))) computed around `m`, the maximum of x (callers that also
 * need the argmax compute the maximum once), so nothing overflows. */
static inline double mll_logsumexp_from(const float *x, int32_t n, float m) {
    float acc[16] = {0};
    int32_t b, i, blocks = n / 16;
    double sum = 0.0;
    if (isinf(m)) return (double)m;
    for (b = 0; b < blocks; ++b) {          /* 16 independent partial sums: vectorises */
        const float *row = x + (size_t)b * 16;
        for (int j = 0; j < 16; ++j) acc[j] += mll__exp_nonpos(row[j] - m);
    }
    for (int j = 0; j < 16; ++j) sum += acc[j];
    for (i = blocks * 16; i < n; ++i) sum += mll__exp_nonpos(x[i] - m);
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
