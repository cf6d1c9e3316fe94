/*
 * resp.c — RESP2 command parsing and reply encoding (see resp.h).
 */
#include "resp.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NUM_LINE_MAX 32 /* "*<count>\r\n" / "$<len>\r\n": longer is an error, not a wait */

/* Position of "\r\n" in p[0..n), or -1. */
static long find_crlf(const char *p, size_t n)
{
    const char *r = n ? memchr(p, '\r', n) : NULL;
    while (r) {
        size_t i = (size_t)(r - p);
        if (i + 1 >= n)
            return -1;
        if (r[1] == '\n')
            return (long)i;
        r = memchr(r + 1, '\r', n - i - 1);
    }
    return -1;
}

/* Parse the decimal integer in p[0..n); 0 on success. No sign unless `neg_ok`. */
static int parse_ll(const char *p, size_t n, int neg_ok, long long *out)
{
    size_t i = 0;
    int neg = 0;
    if (n && p[0] == '-' && neg_ok) {
        neg = 1;
        i = 1;
    }
    if (i >= n || n - i > 18)
        return -1;
    long long v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    *out = neg ? -v : v;
    return 0;
}

/* "*<n>\r\n" or "$<n>\r\n" at buf[*pos]: the number, with *pos moved past the line.
 * Returns 1 parsed, 0 need more, -1 malformed. */
static int num_line(const char *buf, size_t len, size_t *pos, long long *n)
{
    size_t avail = len - *pos;
    long e = find_crlf(buf + *pos + 1, avail - 1 < NUM_LINE_MAX ? avail - 1 : NUM_LINE_MAX);
    if (e < 0)
        return avail - 1 < NUM_LINE_MAX ? 0 : -1;
    if (parse_ll(buf + *pos + 1, (size_t)e, 1, n) != 0)
        return -1;
    *pos += 1 + (size_t)e + 2;
    return 1;
}

static long parse_multibulk(const char *buf, size_t len, resp_cmd *cmd, const char **err)
{
    size_t pos = 0;
    long long n;
    int r = num_line(buf, len, &pos, &n);
    if (r <= 0) {
        *err = "Protocol error: invalid multibulk length";
        return r == 0 ? RESP_NEED_MORE : RESP_ERROR;
    }
    if (n > RESP_MAX_ARGS) {
        *err = "Protocol error: too many arguments in one command (at most 256)";
        return RESP_ERROR;
    }
    cmd->argc = 0;
    for (long long i = 0; i < n; i++) {
        if (pos >= len)
            return RESP_NEED_MORE;
        if (buf[pos] != '$') {
            *err = "Protocol error: expected '$' before a bulk string";
            return RESP_ERROR;
        }
        long long bl;
        r = num_line(buf, len, &pos, &bl);
        if (r == 0)
            return RESP_NEED_MORE;
        if (r < 0 || bl < 0 || bl > RESP_MAX_BULK) {
            *err = "Protocol error: invalid bulk length";
            return RESP_ERROR;
        }
        if (pos + (size_t)bl + 2 > RESP_MAX_COMMAND) {
            *err = "Protocol error: command larger than 1048576 bytes";
            return RESP_ERROR;
        }
        if (len - pos < (size_t)bl + 2)
            return RESP_NEED_MORE;
        if (buf[pos + (size_t)bl] != '\r' || buf[pos + (size_t)bl + 1] != '\n') {
            *err = "Protocol error: bulk string not followed by CRLF";
            return RESP_ERROR;
        }
        cmd->argv[cmd->argc].p = buf + pos;
        cmd->argv[cmd->argc].len = (size_t)bl;
        cmd->argc++;
        pos += (size_t)bl + 2;
    }
    return (long)pos;
}

/* An inline command: words separated by spaces or tabs, each optionally in "double" or
 * 'single' quotes (which may contain spaces; there are no escape sequences). */
static long parse_inline(const char *buf, size_t len, resp_cmd *cmd, const char **err)
{
    const char *nl = memchr(buf, '\n', len < RESP_MAX_INLINE ? len : RESP_MAX_INLINE);
    if (!nl) {
        if (len >= RESP_MAX_INLINE) {
            *err = "Protocol error: too big inline request";
            return RESP_ERROR;
        }
        return RESP_NEED_MORE;
    }
    size_t end = (size_t)(nl - buf);
    size_t stop = end && buf[end - 1] == '\r' ? end - 1 : end;
    cmd->argc = 0;
    size_t i = 0;
    for (;;) {
        while (i < stop && (buf[i] == ' ' || buf[i] == '\t'))
            i++;
        if (i >= stop)
            break;
        if (cmd->argc == RESP_MAX_ARGS) {
            *err = "Protocol error: too many arguments in one command (at most 256)";
            return RESP_ERROR;
        }
        resp_arg *a = &cmd->argv[cmd->argc++];
        if (buf[i] == '"' || buf[i] == '\'') {
            char q = buf[i++];
            const char *close = memchr(buf + i, q, stop - i);
            if (!close) {
                *err = "Protocol error: unbalanced quotes in request";
                return RESP_ERROR;
            }
            a->p = buf + i;
            a->len = (size_t)(close - (buf + i));
            i = (size_t)(close - buf) + 1;
            if (i < stop && buf[i] != ' ' && buf[i] != '\t') {
                *err = "Protocol error: unbalanced quotes in request";
                return RESP_ERROR;
            }
        } else {
            a->p = buf + i;
            while (i < stop && buf[i] != ' ' && buf[i] != '\t')
                i++;
            a->len = (size_t)(buf + i - a->p);
        }
    }
    return (long)end + 1;
}

long resp_parse(const char *buf, size_t len, resp_cmd *cmd, const char **err)
{
    if (len == 0)
        return RESP_NEED_MORE;
    if (buf[0] == '*')
        return parse_multibulk(buf, len, cmd, err);
    return parse_inline(buf, len, cmd, err);
}

/* ---- replies ---- */

void resp_buf_free(resp_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

void resp_buf_reset(resp_buf *b)
{
    b->len = 0;
    b->oom = 0;
}

static int reserve(resp_buf *b, size_t n)
{
    if (b->oom)
        return -1;
    if (b->cap - b->len >= n)
        return 0;
    if (b->fixed) {
        b->oom = 1;
        return -1;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < n)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void resp_raw_slow(resp_buf *b, const char *s, size_t n)
{
    if (reserve(b, n) == 0) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static const char k_pairs[201] = "00010203040506070809101112131415161718192021222324252627282930"
                                 "31323334353637383940414243444546474849505152535455565758596061"
                                 "62636465666768697071727374757677787980818283848586878889909192"
                                 "93949596979899";

/* "<lead><decimal><tail>" built right to left in `end`'s buffer; returns its start. Two digits
 * per division. */
static char *fmt_dec(char *end, char lead, int64_t v, const char *tail, size_t tl)
{
    char *p = end - tl;
    memcpy(p, tail, tl);
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    while (u >= 100) {
        p -= 2;
        memcpy(p, k_pairs + 2 * (u % 100), 2);
        u /= 100;
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, k_pairs + 2 * u, 2);
    } else {
        *--p = (char)('0' + u);
    }
    if (v < 0)
        *--p = '-';
    if (lead)
        *--p = lead;
    return p;
}

/* Decimal digits without printf (replies are mostly numbers: this is on every reply). */
void resp_dec(resp_buf *b, int64_t v)
{
    char tmp[24], *p = fmt_dec(tmp + sizeof tmp, 0, v, "", 0);
    resp_raw(b, p, (size_t)(tmp + sizeof tmp - p));
}

static void prefixed_num(resp_buf *b, char type, long long v)
{
    char tmp[32], *p = fmt_dec(tmp + sizeof tmp, type, v, "\r\n", 2);
    resp_raw(b, p, (size_t)(tmp + sizeof tmp - p)); /* one append: this is every integer */
}

void resp_simple(resp_buf *b, const char *s)
{
    resp_raw(b, "+", 1);
    resp_raw(b, s, strlen(s));
    resp_raw(b, "\r\n", 2);
}

void resp_error(resp_buf *b, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    for (int i = 0; i < n; i++) /* an error is one line */
        if (msg[i] == '\r' || msg[i] == '\n')
            msg[i] = ' ';
    resp_raw(b, "-", 1);
    resp_raw(b, msg, (size_t)n);
    resp_raw(b, "\r\n", 2);
}

void resp_int(resp_buf *b, int64_t v)
{
    prefixed_num(b, ':', (long long)v);
}

void resp_bulk(resp_buf *b, const char *s, size_t n)
{
    prefixed_num(b, '$', (long long)n);
    resp_raw(b, s, n);
    resp_raw(b, "\r\n", 2);
}

void resp_bulk_str(resp_buf *b, const char *s)
{
    resp_bulk(b, s, strlen(s));
}

void resp_null(resp_buf *b)
{
    resp_raw(b, "$-1\r\n", 5);
}

void resp_array(resp_buf *b, long n)
{
    prefixed_num(b, '*', n);
}

/* ---- arguments ---- */

int resp_arg_int(const resp_arg *a, int64_t *out)
{
    long long v;
    if (parse_ll(a->p, a->len, 1, &v) != 0)
        return -1;
    *out = v;
    return 0;
}

int resp_arg_double(const resp_arg *a, double *out)
{
    char tmp[64];
    if (a->len == 0 || a->len >= sizeof tmp)
        return -1;
    /* a plain decimal: strtod would also take leading blanks, hex ("0x10"), "inf", "nan" */
    for (size_t i = 0; i < a->len; i++) {
        char ch = a->p[i];
        if (!((ch >= '0' && ch <= '9') || ch == '.' || ch == '-' || ch == '+' || ch == 'e' ||
              ch == 'E'))
            return -1;
    }
    memcpy(tmp, a->p, a->len);
    tmp[a->len] = 0;
    char *end;
    errno = 0;
    double v = strtod(tmp, &end);
    if (*end || errno || !isfinite(v))
        return -1;
    *out = v;
    return 0;
}

/* ---- text ---- */

size_t sd_utf8_len(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80)
        return 1;
    size_t len = s[0] >= 0xc2 && s[0] <= 0xdf ? 2 : s[0] >= 0xe0 && s[0] <= 0xef ? 3
                 : s[0] >= 0xf0 && s[0] <= 0xf4                                 ? 4
                                                                                 : 0;
    if (!len || len > n)
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] > 0x9f) ||
        (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] > 0x8f))
        return 0;
    return len;
}
