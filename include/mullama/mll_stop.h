/* mll_stop.h - incremental stop-sequence matcher over a byte stream.
 *
 * Each stop sequence runs a Knuth-Morris-Pratt automaton, so every input byte
 * costs O(number of stop sequences), whatever has been generated before. The
 * matcher never emits a byte that may still turn out to begin a stop
 * sequence: it holds back the longest suffix of the text that is a proper
 * prefix of some stop sequence. That suffix is by construction a prefix of one
 * of the stop strings, so it is rebuilt from that string instead of being
 * stored.
 *
 * When a stop sequence completes, the bytes before it are emitted and the
 * stop sequence itself (and anything after it in the same feed) is dropped.
 * Among sequences ending at the same byte the longest wins, so the result does
 * not depend on how the text was split into tokens.
 *
 * Pure C, no allocation: the caller provides the workspace.
 */
#ifndef MLL_STOP_H
#define MLL_STOP_H

#include <stddef.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mll_stop {
    const char *const *stops;   /* the stop strings (caller keeps them alive) */
    const size_t *lens;         /* their lengths, each >= 1 */
    size_t n_stops;
    size_t max_len;
    size_t *fail;               /* KMP failure tables, concatenated */
    size_t *state;              /* per stop: bytes of it matched so far */
    size_t held;                /* bytes held back */
    size_t held_from;           /* index of the stop whose prefix is held */
    int matched;                /* a stop sequence has been seen */
    size_t matched_index;
} mll_stop;

/* Number of size_t slots the workspace needs. */
static inline size_t mll_stop_workspace_len(const size_t *lens, size_t n_stops) {
    size_t total = n_stops;
    for (size_t i = 0; i < n_stops; ++i) total += lens[i];
    return total;
}

/* Prepare the matcher. Returns 0, or -1 when a stop string is empty. */
static inline int mll_stop_init(mll_stop *m, const char *const *stops, const size_t *lens,
                                size_t n_stops, size_t *workspace) {
    size_t offset = 0;
    m->stops = stops;
    m->lens = lens;
    m->n_stops = n_stops;
    m->max_len = 0;
    m->state = workspace;
    m->fail = workspace + n_stops;
    m->held = 0;
    m->held_from = 0;
    m->matched = 0;
    m->matched_index = 0;
    for (size_t i = 0; i < n_stops; ++i) {
        const char *s = stops[i];
        size_t len = lens[i];
        size_t *f = m->fail + offset;
        size_t k = 0;
        if (len == 0) return -1;
        if (len > m->max_len) m->max_len = len;
        m->state[i] = 0;
        f[0] = 0;
        for (size_t q = 1; q < len; ++q) {
            while (k > 0 && s[q] != s[k]) k = f[k - 1];
            if (s[q] == s[k]) ++k;
            f[q] = k;
        }
        offset += len;
    }
    return 0;
}

/* Forget the text seen so far (a new generation), keeping the stop strings. */
static inline void mll_stop_reset(mll_stop *m) {
    for (size_t i = 0; i < m->n_stops; ++i) m->state[i] = 0;
    m->held = 0;
    m->held_from = 0;
    m->matched = 0;
    m->matched_index = 0;
}

/* Copy virtual-buffer bytes [0, count) to out: the held prefix, then input. */
static inline void mll__stop_emit(const mll_stop *m, size_t held, size_t held_from,
                                  const char *in, size_t count, char *out) {
    size_t from_held = count < held ? count : held;
    if (from_held) memcpy(out, m->stops[held_from], from_held);
    if (count > from_held) memcpy(out + from_held, in, count - from_held);
}

/* Feed `n` bytes. Writes the bytes that are now safe to emit to `out` (which
 * must hold m->max_len + n bytes) and stores their count in *out_len.
 * Returns 1 when a stop sequence completed (out then holds the text before
 * it; further feeds emit nothing), else 0. */
static inline int mll_stop_feed(mll_stop *m, const char *in, size_t n, char *out, size_t *out_len) {
    size_t held0 = m->held, from0 = m->held_from;
    *out_len = 0;
    if (m->matched) return 1;
    if (m->n_stops == 0) {
        if (n) memcpy(out, in, n);
        *out_len = n;
        return 0;
    }
    for (size_t t = 0; t < n; ++t) {
        const char c = in[t];
        size_t best = 0, best_i = 0;
        size_t offset = 0;
        for (size_t i = 0; i < m->n_stops; ++i) {
            const char *s = m->stops[i];
            const size_t len = m->lens[i];
            const size_t *f = m->fail + offset;
            size_t q = m->state[i];
            if (q == len) q = f[len - 1];
            while (q > 0 && s[q] != c) q = f[q - 1];
            if (s[q] == c) ++q;
            m->state[i] = q;
            if (q == len && len > best) { best = len; best_i = i; }
            offset += len;
        }
        if (best) {
            size_t end = held0 + t + 1;       /* virtual position after this byte */
            size_t start = end - best;
            mll__stop_emit(m, held0, from0, in, start, out);
            *out_len = start;
            m->matched = 1;
            m->matched_index = best_i;
            m->held = 0;
            return 1;
        }
    }
    {
        size_t held = 0, from = 0;
        for (size_t i = 0; i < m->n_stops; ++i) {
            if (m->state[i] > held) { held = m->state[i]; from = i; }
        }
        size_t total = held0 + n;
        size_t count = total - held;
        mll__stop_emit(m, held0, from0, in, count, out);
        *out_len = count;
        m->held = held;
        m->held_from = from;
    }
    return 0;
}

/* End of the stream without a match: emit the held bytes (at most max_len - 1). */
static inline size_t mll_stop_flush(mll_stop *m, char *out) {
    size_t n = m->matched ? 0 : m->held;
    if (n) memcpy(out, m->stops[m->held_from], n);
    m->held = 0;
    for (size_t i = 0; i < m->n_stops; ++i) m->state[i] = 0;
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_STOP_H */
