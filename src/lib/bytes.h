/*
 * bytes.h — copy and compare short byte strings without a call into libc.
 *
 * Keys, tenant names and client ids are mostly a few to a few dozen bytes. memcpy/memcmp of a
 * variable length is a call (and a dispatch on size) each time; up to 32 bytes these do it in
 * at most four overlapping word loads per side. Longer strings go to libc.
 */
#ifndef SL_BYTES_H
#define SL_BYTES_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static inline uint64_t sl_ld8(const void *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t sl_ld4(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void sl_st8(void *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static inline void sl_st4(void *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

/* memcpy(d, s, n) for non-overlapping buffers. */
static inline void sl_copy(void *d, const void *s, size_t n)
{
    char *dc = d;
    const char *sc = s;
    if (n >= 8) {
        if (n > 32) {
            memcpy(d, s, n);
        } else if (n > 16) {
            uint64_t a = sl_ld8(sc), b = sl_ld8(sc + 8), c = sl_ld8(sc + n - 16),
                     e = sl_ld8(sc + n - 8);
            sl_st8(dc, a);
            sl_st8(dc + 8, b);
            sl_st8(dc + n - 16, c);
            sl_st8(dc + n - 8, e);
        } else {
            uint64_t a = sl_ld8(sc), b = sl_ld8(sc + n - 8);
            sl_st8(dc, a);
            sl_st8(dc + n - 8, b);
        }
    } else if (n >= 4) {
        uint32_t a = sl_ld4(sc), b = sl_ld4(sc + n - 4);
        sl_st4(dc, a);
        sl_st4(dc + n - 4, b);
    } else if (n) {
        char a = sc[0], b = sc[n / 2], c = sc[n - 1];
        dc[0] = a;
        dc[n / 2] = b;
        dc[n - 1] = c;
    }
}

/* memcmp(a, b, n) == 0 */
static inline bool sl_equal(const void *a, const void *b, size_t n)
{
    const char *x = a, *y = b;
    if (n >= 8) {
        if (n > 32)
            return memcmp(a, b, n) == 0;
        if (n > 16)
            return ((sl_ld8(x) ^ sl_ld8(y)) | (sl_ld8(x + 8) ^ sl_ld8(y + 8)) |
                    (sl_ld8(x + n - 16) ^ sl_ld8(y + n - 16)) |
                    (sl_ld8(x + n - 8) ^ sl_ld8(y + n - 8))) == 0;
        return ((sl_ld8(x) ^ sl_ld8(y)) | (sl_ld8(x + n - 8) ^ sl_ld8(y + n - 8))) == 0;
    }
    if (n >= 4)
        return ((sl_ld4(x) ^ sl_ld4(y)) | (sl_ld4(x + n - 4) ^ sl_ld4(y + n - 4))) == 0;
    if (n)
        return x[0] == y[0] && x[n / 2] == y[n / 2] && x[n - 1] == y[n - 1];
    return true;
}

#endif
