/*
 * fuzz_http.c — sluiced's HTTP/1.1 layer (src/server/http.c: llhttp and our callbacks,
 * keep-alive, pipelining, Content-Length and chunked bodies, Expect: 100-continue, the size
 * limits). The input is what any client may send to the HTTP port.
 *
 * The input is fed to the protocol's `feed` on a connection of its own, as net.c does: all
 * at once, and again (on a second connection) in two pieces split at a position taken from
 * the first byte. Requests are not answered by http_api.c here: sd_api_dispatch below checks
 * each complete request, answers it with a small 200 and records it.
 *
 * Checked: `feed` never claims more bytes than it was given; every request it hands over is
 * within the limits (target, body, Authorization) and readable to its last byte; the same
 * requests come out, and the connection ends in the same state (open or closing, the same
 * protocol errors counted), however the input was split.
 */
#include <string.h>

#include "fuzz.h"
#include "http_api.h"
#include "net.h"

/* What one connection handed over: every request folded into a digest (FNV-1a). */
typedef struct seen {
    uint64_t digest;
    int requests;
} seen;

static seen *g_seen; /* the connection being fed */

static void fold(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        g_seen->digest = (g_seen->digest ^ b[i]) * UINT64_C(0x100000001b3);
}

void sd_api_dispatch(sd_conn *c, const sd_http_req *r)
{
    FUZZ_CHECK(r->method >= 0 && r->target && r->body);
    FUZZ_CHECK(r->target_len <= HTTP_MAX_HEAD && r->body_len <= HTTP_MAX_BODY);
    FUZZ_CHECK(!r->auth || r->auth_len <= HTTP_MAX_AUTH);
    FUZZ_CHECK(!r->tag.keep_alive_10 || !r->tag.close);
    int have_auth = r->auth != NULL;
    fold(&r->method, sizeof r->method);
    fold(&r->target_len, sizeof r->target_len);
    fold(r->target, r->target_len);
    fold(&r->body_len, sizeof r->body_len);
    fold(r->body, r->body_len);
    fold(&have_auth, sizeof have_auth);
    if (have_auth) {
        fold(&r->auth_len, sizeof r->auth_len);
        fold(r->auth, r->auth_len);
    }
    fold(&r->tag, sizeof r->tag);
    g_seen->requests++;
    sd_http_reply(sd_reply_buf(c), r->tag, SD_EP_OTHER, 200, NULL, NULL, 0, "{}", 2);
}

void sd_api_emit(sd_conn *c, sd_item *it, resp_buf *out)
{
    (void)c, (void)it, (void)out;
    FUZZ_CHECK(!"no request here waits for a decision");
}

typedef struct conn {
    sd_server srv;
    sd_conn c;
    char *buf;
    seen s;
} conn;

static void conn_open(conn *k, size_t cap)
{
    memset(k, 0, sizeof *k);
    k->c.srv = &k->srv;
    k->c.proto = &sd_proto_http;
    k->c.id = 1;
    k->buf = k->c.in = malloc(cap ? cap : 1);
    FUZZ_CHECK(k->buf);
    FUZZ_CHECK(sd_proto_http.open(&k->c) == 0);
}

/* Bytes arrive: appended to the unread input, which the protocol is given (net.c's
 * process_input). */
static void conn_read(conn *k, const char *p, size_t n)
{
    sd_conn *c = &k->c;
    if (c->close_after_write)
        return; /* net.c stops reading */
    memmove(k->buf, c->in, c->in_len);
    c->in = k->buf;
    memcpy(c->in + c->in_len, p, n);
    c->in_len += n;
    g_seen = &k->s;
    size_t used = c->proto->feed(c);
    FUZZ_CHECK(used <= c->in_len);
    c->in += used;
    c->in_len -= used;
    FUZZ_CHECK(!c->out.oom);
}

static void conn_close(conn *k)
{
    k->c.proto->close(&k->c);
    resp_buf_free(&k->c.out);
    free(k->buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    size_t split = size ? (size_t)data[0] * (size + 1) / 256 : 0;
    conn *whole = malloc(sizeof *whole), *pieces = malloc(sizeof *pieces);
    FUZZ_CHECK(whole && pieces);

    conn_open(whole, size);
    conn_read(whole, in, size);

    conn_open(pieces, size);
    conn_read(pieces, in, split);
    conn_read(pieces, in + split, size - split);

    FUZZ_CHECK(whole->s.requests == pieces->s.requests);
    FUZZ_CHECK(whole->s.digest == pieces->s.digest);
    FUZZ_CHECK(whole->c.close_after_write == pieces->c.close_after_write);
    FUZZ_CHECK(atomic_load(&whole->srv.m.http_protocol_errors) ==
               atomic_load(&pieces->srv.m.http_protocol_errors));

    conn_close(whole);
    conn_close(pieces);
    free(whole);
    free(pieces);
    return 0;
}
