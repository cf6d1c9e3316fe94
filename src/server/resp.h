/*
 * resp.h — the Redis protocol (RESP2) on the wire: parse commands, write replies.
 *
 * A command is either a multibulk array of bulk strings (`*2\r\n$4\r\nPING\r\n...`, what every
 * client library sends) or an inline line (`PING\r\n`, what a person types into telnet). The
 * parser is stateless: it is handed the unread bytes of a connection and either parses one
 * complete command, says it needs more bytes, or names the protocol error. Every size is
 * checked against its limit *before* anything is buffered for it, so a client cannot make the
 * server allocate by announcing a huge array or bulk string.
 *
 * Arguments point into the caller's buffer: they stay valid until the buffer is changed.
 */
#ifndef SL_RESP_H
#define SL_RESP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define RESP_MAX_ARGS 256          /* arguments per command */
#define RESP_MAX_BULK (64 * 1024)  /* bytes per argument */
#define RESP_MAX_INLINE (64 * 1024) /* bytes per inline command line */
#define RESP_MAX_COMMAND (1024 * 1024) /* bytes per multibulk command, all of it: always
                                          fits a connection's input buffer (SD_IN_MAX) */

typedef struct resp_arg {
    const char *p;
    size_t len;
} resp_arg;

typedef struct resp_cmd {
    int argc;
    resp_arg argv[RESP_MAX_ARGS];
} resp_cmd;

enum {
    RESP_NEED_MORE = 0, /* no complete command yet */
    RESP_ERROR = -1     /* protocol error: *err names it; the connection must be closed */
};

/* Parse one command from buf[0..len). Returns the number of bytes it took (> 0) and fills
 * `cmd` (argc may be 0 for an empty inline line, which the caller skips), or RESP_NEED_MORE,
 * or RESP_ERROR with *err set to a static message in Redis's wording. */
long resp_parse(const char *buf, size_t len, resp_cmd *cmd, const char **err);

/* ---- replies: appended to a growable buffer ---- */

typedef struct resp_buf {
    char *p;
    size_t len, cap;
    int oom; /* an append failed: the buffer is incomplete and the connection must close */
    int fixed; /* p is the caller's array of cap bytes: never grown (full = oom) */
} resp_buf;

void resp_buf_free(resp_buf *b);
void resp_buf_reset(resp_buf *b); /* len = 0, keeps the memory */
void resp_raw_slow(resp_buf *b, const char *s, size_t n); /* resp_raw when it must grow */
/* Append n bytes. Inline: a reply is built from many small pieces (and resp_str of a literal
 * then needs no strlen). Nothing is appended once oom is set. */
static inline void resp_raw(resp_buf *b, const char *s, size_t n)
{
    if (!b->oom && b->cap - b->len >= n) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    } else {
        resp_raw_slow(b, s, n);
    }
}
static inline void resp_str(resp_buf *b, const char *s) /* raw text, no framing */
{
    resp_raw(b, s, strlen(s));
}
void resp_simple(resp_buf *b, const char *s);          /* +s */
void resp_error(resp_buf *b, const char *fmt, ...)     /* -fmt (one line, no \r or \n) */
    __attribute__((format(printf, 2, 3)));
void resp_int(resp_buf *b, int64_t v);                 /* :v */
void resp_bulk(resp_buf *b, const char *s, size_t n);  /* $n s */
void resp_bulk_str(resp_buf *b, const char *s);
void resp_null(resp_buf *b);                           /* $-1 */
void resp_array(resp_buf *b, long n);                  /* *n (then n replies) */
void resp_dec(resp_buf *b, int64_t v);                 /* raw decimal, no framing */

/* Argument helpers */
/* ASCII case-insensitive equality. Inline: every command is looked up with a chain of these,
 * and a literal word's length is then known at compile time (most compares end there). */
static inline int resp_arg_is(const resp_arg *a, const char *word)
{
    size_t n = strlen(word);
    if (a->len != n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = a->p[i], w = word[i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (w >= 'a' && w <= 'z')
            w = (char)(w - 'a' + 'A');
        if (c != w)
            return 0;
    }
    return 1;
}
/* Parse a whole argument as a decimal integer (optional '-'); 0 on success. */
int resp_arg_int(const resp_arg *a, int64_t *out);
/* Parse a whole argument as a finite decimal number; 0 on success. */
int resp_arg_double(const resp_arg *a, double *out);

/* Length of the valid UTF-8 sequence at s[0..n) (n >= 1), or 0 if none starts there
 * (overlong forms, surrogates and code points above U+10FFFF are invalid too). Ids are
 * arbitrary bytes; JSON and Prometheus output need UTF-8. */
size_t sd_utf8_len(const unsigned char *s, size_t n);

#endif
