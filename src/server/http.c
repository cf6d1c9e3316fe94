/*
 * http.c — the HTTP/1.1 protocol of sluiced: llhttp over the connection's input, keep-alive,
 * pipelining, Content-Length and chunked bodies, Expect: 100-continue, size limits, framing
 * of responses. What the requests mean is http_api.c's business.
 *
 * The parser state lives with the connection (c->state) and `feed` hands it every byte it
 * got, so a request may arrive in any number of pieces; what a request needs later (target,
 * Authorization, body) is copied as it streams past. llhttp is paused after the headers and
 * after each message: the first pause measures the head and answers 413 or `100 Continue`
 * before the body, the second dispatches one request and makes the next begin cleanly.
 *
 * Errors at this level (malformed request 400, head over HTTP_MAX_HEAD 431, body over
 * HTTP_MAX_BODY 413) are answered after every earlier response, with Connection: close, and
 * the connection closes once they are written: after such an error the position of the next
 * request in the stream is unknown.
 *
 * Parsing stops between two requests while SD_PIPELINE_MAX of the connection's decisions are
 * undecided; the rest of the input stays unconsumed until the scheduler catches up.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "http_api.h"
#include "llhttp.h"

_Static_assert((int)HTTP_DELETE == SD_HTTP_DELETE && (int)HTTP_GET == SD_HTTP_GET &&
                   (int)HTTP_HEAD == SD_HTTP_HEAD && (int)HTTP_POST == SD_HTTP_POST &&
                   (int)HTTP_PUT == SD_HTTP_PUT,
               "sd_http method numbers are llhttp's");

enum { EV_NONE, EV_HEADERS, EV_MESSAGE };          /* why llhttp paused */
enum { H_OTHER, H_AUTHORIZATION, H_EXPECT };        /* the header being read */

/* A growable buffer with a hard bound. */
typedef struct hbuf {
    char *p;
    size_t len, cap;
} hbuf;

typedef struct http_state {
    llhttp_t parser;
    int event;         /* set by the callback that paused */
    int deferred;      /* a complete request waits for earlier decisions (after_decisions) */
    int in_body;       /* between the headers and the end of the message */
    int closing;       /* a reply that closes was queued: ignore any further input */
    int fail_status;   /* 413/431/503 when a callback stopped the parser */
    size_t head_bytes; /* bytes of the current request's head so far */
    /* the current request */
    hbuf target, body, auth;
    int have_auth, auth_bad; /* auth_bad: too long or sent twice: never matches */
    char field[16];          /* the header name being read (only short names matter) */
    size_t field_len;
    int header;              /* H_* of the value being read */
    char expect[16];
    size_t expect_len;
    int hosts;               /* Host header fields seen */
} http_state;

/* ---- buffers ---- */

/* Append; -1 if the result would be longer than `max` (413/431) or memory ran out (503). */
static int hbuf_add(hbuf *b, const char *s, size_t n, size_t max, int *fail_status,
                    int too_big)
{
    if (n > max - b->len) {
        *fail_status = too_big;
        return -1;
    }
    if (n == 0) /* llhttp reports empty spans ("Authorization: "): b->p may still be NULL */
        return 0;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        if (cap > max)
            cap = max;
        char *p = realloc(b->p, cap);
        if (!p) {
            *fail_status = 503;
            return -1;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* Empty the buffer; give memory back if a large request took some. */
static void hbuf_clear(hbuf *b)
{
    b->len = 0;
    if (b->cap > 64 * 1024) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}

static void hbuf_free(hbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- responses ---- */

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 507: return "Insufficient Storage";
    default: return "Unknown";
    }
}

/* "Date: Mon, 23 Nov 2026 02:40:01 GMT\r\n", formatted once per second per thread. */
static void date_line(resp_buf *out)
{
    static _Thread_local time_t t_sec = -1;
    static _Thread_local char t_line[64];
    static _Thread_local size_t t_len;
    time_t now = time(NULL);
    if (now != t_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        t_len = strftime(t_line, sizeof t_line, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        t_sec = now;
    }
    resp_raw(out, t_line, t_len);
}

void sd_http_reply(resp_buf *out, sd_http_tag tag, sd_endpoint ep, int status,
                   const char *content_type, const char *headers, size_t headers_len,
                   const char *body, size_t body_len)
{
    resp_str(out, "HTTP/1.1 ");
    resp_dec(out, status);
    resp_raw(out, " ", 1);
    resp_str(out, reason(status));
    resp_raw(out, "\r\n", 2);
    date_line(out);
    resp_str(out, "Content-Type: ");
    resp_str(out, content_type ? content_type : "application/json");
    resp_str(out, "\r\nContent-Length: ");
    resp_dec(out, (int64_t)body_len);
    resp_raw(out, "\r\n", 2);
    if (tag.close)
        resp_str(out, "Connection: close\r\n");
    else if (tag.keep_alive_10)
        resp_str(out, "Connection: keep-alive\r\n");
    if (headers_len)
        resp_raw(out, headers, headers_len);
    resp_raw(out, "\r\n", 2);
    if (!tag.head && body_len)
        resp_raw(out, body, body_len);
    sd_metrics_http(ep, status);
}

/* An error found by this layer: answer after everything before it, then close. The message
 * is plain text without quotes or backslashes. */
static void fail(sd_conn *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(sd_conn *c, int status, const char *fmt, ...)
{
    http_state *st = c->state;
    char msg[200], body[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int n = snprintf(body, sizeof body, "{\"error\": \"%s\"}", msg);
    sd_http_tag tag = {1, 0, 0};
    sd_http_reply(sd_reply_buf(c), tag, SD_EP_OTHER, status, NULL, NULL, 0, body, (size_t)n);
    atomic_fetch_add(&c->srv->m.http_protocol_errors, 1);
    sd_info("conn %llu %s: HTTP %d (%s); closing", (unsigned long long)c->id, c->peer, status,
            msg);
    st->closing = 1;
    c->close_after_write = 1;
}

/* ---- llhttp callbacks ---- */

static http_state *state_of(llhttp_t *p)
{
    return p->data;
}

static int on_message_begin(llhttp_t *p)
{
    http_state *st = state_of(p);
    hbuf_clear(&st->target);
    hbuf_clear(&st->body);
    hbuf_clear(&st->auth);
    st->have_auth = st->auth_bad = 0;
    st->field_len = 0;
    st->header = H_OTHER;
    st->expect_len = 0;
    st->hosts = 0;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    http_state *st = state_of(p);
    if (hbuf_add(&st->target, at, n, HTTP_MAX_HEAD, &st->fail_status, 431) != 0) {
        llhttp_set_error_reason(p, "request target too long");
        return HPE_USER;
    }
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    http_state *st = state_of(p);
    if (n > sizeof st->field - st->field_len) { /* longer than any name we look at */
        st->field_len = sizeof st->field;
        return 0;
    }
    memcpy(st->field + st->field_len, at, n);
    st->field_len += n;
    return 0;
}

static int field_is(const http_state *st, const char *name)
{
    size_t n = strlen(name);
    return st->field_len == n && strncasecmp(st->field, name, n) == 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    http_state *st = state_of(p);
    st->header = field_is(st, "authorization") ? H_AUTHORIZATION
                 : field_is(st, "expect")      ? H_EXPECT
                                               : H_OTHER;
    st->hosts += field_is(st, "host");
    st->field_len = 0;
    if (st->header == H_AUTHORIZATION) {
        st->auth_bad |= st->have_auth; /* two Authorization headers: accept neither */
        st->have_auth = 1;
    }
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    http_state *st = state_of(p);
    if (st->header == H_AUTHORIZATION && !st->auth_bad) {
        int ignored;
        if (hbuf_add(&st->auth, at, n, HTTP_MAX_AUTH, &ignored, 0) != 0)
            st->auth_bad = 1;
    } else if (st->header == H_EXPECT) {
        size_t room = sizeof st->expect - st->expect_len;
        size_t k = n < room ? n : room;
        memcpy(st->expect + st->expect_len, at, k);
        st->expect_len += k;
    }
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    state_of(p)->event = EV_HEADERS;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    http_state *st = state_of(p);
    if (hbuf_add(&st->body, at, n, HTTP_MAX_BODY, &st->fail_status, 413) != 0) {
        llhttp_set_error_reason(p, "request body too large");
        return HPE_USER;
    }
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    state_of(p)->event = EV_MESSAGE;
    return HPE_PAUSED;
}

static const llhttp_settings_t k_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- the request cycle ---- */

static int expects_continue(const http_state *st)
{
    return st->expect_len == 12 && strncasecmp(st->expect, "100-continue", 12) == 0;
}

/* The head of a request is complete; `rest` bytes of input follow it. Returns -1 when the
 * request was refused (the connection closes). */
static int headers_done(sd_conn *c, size_t rest)
{
    http_state *st = c->state;
    llhttp_t *p = &st->parser;
    st->in_body = 1;
    if (st->head_bytes > HTTP_MAX_HEAD) {
        fail(c, 431, "request headers larger than %d bytes", HTTP_MAX_HEAD);
        return -1;
    }
    int has_length = (p->flags & F_CONTENT_LENGTH) != 0;
    if (has_length && p->content_length > HTTP_MAX_BODY) {
        fail(c, 413, "request body larger than %d bytes", HTTP_MAX_BODY);
        return -1;
    }
    int has_body = (p->flags & F_CHUNKED) || (has_length && p->content_length > 0);
    int http11 = p->http_major > 1 || (p->http_major == 1 && p->http_minor >= 1);
    /* RFC 9112 3.2: an HTTP/1.1 request without a Host header field, and any request with
     * more than one, gets a 400 */
    if (st->hosts > 1 || (http11 && st->hosts == 0)) {
        fail(c, 400, "%s",
             st->hosts ? "more than one Host header" : "HTTP/1.1 request without a Host header");
        return -1;
    }
    if (has_body && rest == 0 && http11 && expects_continue(st)) /* after earlier replies */
        resp_raw(sd_reply_buf(c), "HTTP/1.1 100 Continue\r\n\r\n", 25);
    return 0;
}

/* A complete request: hand it over. Returns -1 when the connection is to close after it. */
static int message_done(sd_conn *c)
{
    http_state *st = c->state;
    llhttp_t *p = &st->parser;
    st->in_body = 0;
    st->head_bytes = 0;
    int keep = llhttp_should_keep_alive(p) && !p->upgrade && !atomic_load(&c->srv->stopping);
    sd_http_req r;
    r.method = p->method;
    r.target = st->target.p ? st->target.p : "";
    r.target_len = st->target.len;
    r.body = st->body.p ? st->body.p : "";
    r.body_len = st->body.len;
    r.auth = st->have_auth ? (st->auth_bad ? "" : st->auth.p ? st->auth.p : "") : NULL;
    r.auth_len = st->have_auth && !st->auth_bad ? st->auth.len : 0;
    r.tag.close = !keep;
    r.tag.keep_alive_10 = keep && p->http_major == 1 && p->http_minor == 0;
    r.tag.head = p->method == HTTP_HEAD;
    atomic_fetch_add_explicit(&c->srv->m.http_requests, 1, memory_order_relaxed);
    sd_api_dispatch(c, &r);
    if (!keep) {
        st->closing = 1;
        c->close_after_write = 1;
        return -1;
    }
    return 0;
}

/* llhttp stopped with an error: say why. */
static void parse_error(sd_conn *c, llhttp_errno_t e)
{
    http_state *st = c->state;
    if (e == HPE_USER && st->fail_status == 413)
        return fail(c, 413, "request body larger than %d bytes", HTTP_MAX_BODY);
    if (e == HPE_USER && st->fail_status == 431)
        return fail(c, 431, "request headers larger than %d bytes", HTTP_MAX_HEAD);
    if (e == HPE_USER && st->fail_status == 503)
        return fail(c, 503, "out of memory");
    char msg[160];
    const char *why = llhttp_get_error_reason(&st->parser);
    size_t k = 0;
    for (; why && why[k] && k < 100; k++) /* llhttp's reasons are plain ASCII; keep it so */
        msg[k] = (why[k] == '"' || why[k] == '\\' || (unsigned char)why[k] < 0x20) ? ' ' : why[k];
    msg[k] = 0;
    fail(c, 400, "malformed HTTP request: %s (%s)", msg, llhttp_errno_name(e));
}

/* A configuration change runs after the decisions that this connection asked for before it
 * (as SL.RULE does on RESP). Every PUT and DELETE waits, whatever its target: the router
 * takes the absolute form and percent-encoded segments, so no test of the raw target's
 * spelling can tell a change from something else (and waiting costs the others nothing
 * but order). */
static int after_decisions(const http_state *st)
{
    int method = st->parser.method;
    return method == HTTP_PUT || method == HTTP_DELETE;
}

static size_t http_feed(sd_conn *c)
{
    http_state *st = c->state;
    size_t pos = 0;
    int paused = 0, done = 0; /* done: requests completed in this call */
    c->ordered_wait = 0;
    if (st->deferred) { /* a complete request that waited for earlier decisions */
        if (c->items_waiting) {
            c->ordered_wait = 1;
            return 0;
        }
        st->deferred = 0;
        if (message_done(c) != 0)
            return c->in_len;
    }
    while (!st->closing && (pos < c->in_len || paused)) {
        int between = !st->in_body && st->head_bytes == 0; /* no request begun */
        if (between && (c->items_waiting >= SD_PIPELINE_MAX ||
                        sd_conn_reply_bytes(c) >= SD_REPLY_HIGH))
            break;
        const char *at = c->in + pos;
        size_t avail = c->in_len - pos;
        st->event = EV_NONE;
        paused = 0;
        llhttp_errno_t e = llhttp_execute(&st->parser, at, avail);
        size_t used = e == HPE_OK ? avail : (size_t)(llhttp_get_error_pos(&st->parser) - at);
        if (!st->in_body)
            st->head_bytes += used;
        pos += used;
        if (e == HPE_PAUSED) {
            llhttp_resume(&st->parser);
            paused = 1; /* run again even with no input left: the message may end here */
            if (st->event == EV_HEADERS && headers_done(c, c->in_len - pos) != 0)
                break;
            if (st->event == EV_MESSAGE) {
                done++;
                if (c->items_waiting && after_decisions(st)) {
                    st->deferred = 1; /* its head and body stay in st until message_done */
                    c->ordered_wait = 1;
                    break;
                }
                if (message_done(c) != 0)
                    break;
            }
            if (c->ordered_wait) /* the request asked to be alone (a scrape being built) */
                break;
        } else if (e == HPE_OK) {
            if (!st->in_body && st->head_bytes > HTTP_MAX_HEAD)
                fail(c, 431, "request headers larger than %d bytes", HTTP_MAX_HEAD);
            break;
        } else if (e == HPE_PAUSED_UPGRADE) { /* answered already; no protocol to switch to */
            st->closing = 1;
            c->close_after_write = 1;
        } else {
            parse_error(c, e);
        }
    }
    sd_conn_request_timer(c, done > 0, st->in_body || st->head_bytes > 0);
    return st->closing ? c->in_len : pos;
}

static int http_open(sd_conn *c)
{
    http_state *st = calloc(1, sizeof *st);
    if (!st)
        return -1;
    llhttp_init(&st->parser, HTTP_REQUEST, &k_settings);
    st->parser.data = st;
    c->state = st;
    return 0;
}

static void http_close(sd_conn *c)
{
    http_state *st = c->state;
    if (!st)
        return;
    hbuf_free(&st->target);
    hbuf_free(&st->body);
    hbuf_free(&st->auth);
    free(st);
    c->state = NULL;
}

const sd_proto sd_proto_http = {
    "http", http_open, http_feed, http_close, sd_api_emit,
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    "Content-Length: 47\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    "{\"error\": \"max number of connections reached\"}\n"};
