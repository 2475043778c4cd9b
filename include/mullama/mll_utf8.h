/* mll_utf8.h - UTF-8 holdback for streamed text.
 *
 * A token's bytes may end inside a multi-byte UTF-8 character (byte-fallback
 * tokens, emoji, CJK). The holdback keeps such an unfinished tail (at most 3
 * bytes) until the bytes that finish it arrive, so every emitted piece is
 * whole UTF-8. Bytes that can never become valid UTF-8 (0xFF, a stray
 * continuation byte) are emitted at once: holding them would stall the
 * stream, and the decoder turns them into U+FFFD as it would for the
 * unstreamed text.
 *
 * Pure C, no allocation: callers own every buffer.
 */
#ifndef MLL_UTF8_H
#define MLL_UTF8_H

#include <stddef.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Length of the sequence a lead byte starts: 1..4, or 0 for a byte that
 * cannot start a character (a continuation byte or 0xF8..0xFF, 0xC0, 0xC1). */
static inline int mll_utf8_seq_len(unsigned char b) {
    if (b < 0x80) return 1;
    if (b < 0xC2) return 0;
    if (b < 0xE0) return 2;
    if (b < 0xF0) return 3;
    if (b < 0xF5) return 4;
    return 0;
}

/* Number of leading bytes of buf[0..len) that may be emitted now: everything
 * but an unfinished character at the very end. */
static inline size_t mll_utf8_complete_len(const unsigned char *buf, size_t len) {
    size_t i = len;
    size_t back = 0;
    /* walk back over at most 3 continuation bytes to the candidate lead byte */
    while (i > 0 && back < 4) {
        unsigned char b = buf[i - 1];
        if ((b & 0xC0) != 0x80) {
            int need = mll_utf8_seq_len(b);
            size_t have = len - (i - 1);
            if (need > 1 && have < (size_t)need) return i - 1; /* unfinished: hold it */
            return len;
        }
        --i;
        ++back;
    }
    return len; /* only continuation bytes: invalid, never completable */
}

/* Holdback state between tokens. */
typedef struct mll_utf8_hold {
    unsigned char tail[4];
    size_t tail_len;
} mll_utf8_hold;

static inline void mll_utf8_reset(mll_utf8_hold *h) { h->tail_len = 0; }

/* Append `n` bytes; write the bytes that are now whole UTF-8 to `out` and
 * return how many. `out` must hold at least n + 3 bytes. */
static inline size_t mll_utf8_feed(mll_utf8_hold *h, const char *in, size_t n, char *out) {
    size_t total = h->tail_len + n;
    size_t emit, keep;
    memcpy(out, h->tail, h->tail_len);
    if (n) memcpy(out + h->tail_len, in, n);
    emit = mll_utf8_complete_len((const unsigned char *)out, total);
    keep = total - emit;
    memcpy(h->tail, out + emit, keep);
    h->tail_len = keep;
    return emit;
}

/* End of the stream: hand back whatever unfinished bytes are left (0..3). */
static inline size_t mll_utf8_flush(mll_utf8_hold *h, char *out) {
    size_t n = h->tail_len;
    memcpy(out, h->tail, n);
    h->tail_len = 0;
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* MLL_UTF8_H */
