/*
 * http_api.h — the HTTP front end, split in two:
 *
 *   http.c      the protocol: llhttp parsing, keep-alive, pipelining, limits, responses
 *   http_api.c  the endpoints: routing, JSON in and out, the batch of decisions
 *
 * http.c hands every complete request to sd_api_dispatch, in order. A decision (check,
 * status) becomes an item of the worker's admission scheduler (admission.h), which decides it
 * in a batch with others and hands it back to sd_api_emit; anything else is answered at once
 * into sd_reply_buf(c), which holds it behind undecided items. Responses therefore leave in
 * request order, including http.c's own (errors, `100 Continue`).
 */
#ifndef SD_HTTP_API_H
#define SD_HTTP_API_H

#include <stddef.h>

#include "metrics.h"
#include "net.h"

#define HTTP_MAX_HEAD (16 * 1024)  /* request line + headers, bytes (else 431 and close) */
#define HTTP_MAX_BODY (1024 * 1024) /* request body after de-chunking, bytes (else 413) */
#define HTTP_MAX_AUTH 1024          /* Authorization value kept; longer never matches */

/* How to frame the response to one request. Copied into the batch with the request. */
typedef struct sd_http_tag {
    unsigned char close;         /* send Connection: close; the connection closes after it */
    unsigned char keep_alive_10; /* HTTP/1.0 request with keep-alive: say Connection: keep-alive */
    unsigned char head;          /* HEAD: headers (with GET's Content-Length), no body */
} sd_http_tag;

enum { SD_HTTP_DELETE = 0, SD_HTTP_GET = 1, SD_HTTP_HEAD = 2, SD_HTTP_POST = 3, SD_HTTP_PUT = 4 };

/* One complete request. Every pointer is valid only during sd_api_dispatch. */
typedef struct sd_http_req {
    int method;              /* llhttp's method number (SD_HTTP_* for the ones used here) */
    const char *target;      /* request-target as sent (path and query, still encoded) */
    size_t target_len;
    const char *body;        /* de-chunked body, may be empty */
    size_t body_len;
    const char *auth;        /* Authorization value, or NULL if the header was absent */
    size_t auth_len;
    sd_http_tag tag;
} sd_http_req;

/* ---- http.c ---- */

/* Append one response to `out`: status line, Date, Content-Type (NULL: application/json),
 * Content-Length, Connection as the tag says, `headers` (complete lines, each ending in
 * CRLF; may be NULL), then the body (not for HEAD). Counts it in the metrics. */
void sd_http_reply(resp_buf *out, sd_http_tag tag, sd_endpoint ep, int status,
                   const char *content_type, const char *headers, size_t headers_len,
                   const char *body, size_t body_len);

/* ---- http_api.c ---- */

/* Answer one request, or submit it to admission control. */
void sd_api_dispatch(sd_conn *c, const sd_http_req *r);
/* Write the response of a decided or rejected item (the protocol's `emit`). */
void sd_api_emit(sd_conn *c, sd_item *it, resp_buf *out);

#endif
