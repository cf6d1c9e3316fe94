/*
 * fuzz_resp_cmd.c — sluiced's RESP front end whole (src/server/resp_cmd.c over resp.c): what
 * each command does with its arguments (SL.TAKE, CL.THROTTLE, SL.RULE, SL.TIER, SL.DEFAULT,
 * SL.ADMISSION, SL.WEIGHT, HELLO, AUTH, CLIENT, ...). The input is what any client may send.
 *
 * The server is what a connection uses, without the network: a limiter, the admission
 * settings, the configuration (no data dir, so changes stay in memory) and one worker's
 * scheduler, which decides SL.TAKE & co. as net.c's loop does after each read. The input
 * arrives in two reads (split at a position taken from the first byte, whose low bit also
 * turns --requirepass on).
 *
 * Checked: every command, and a protocol error, gets exactly one reply, and the replies are
 * well-formed RESP2 (RESP3 maps and nulls after HELLO 3), in order; `feed` never claims more
 * than it was given; nothing leaks.
 */
#include <string.h>

#include "config.h"
#include "fuzz.h"
#include "fuzz_server.h"
#include "net.h"

#define NOW_MS 1000 /* the scheduler's clock: fixed, so no request waits too long */

typedef struct fixture {
    sd_server srv;
    sd_sched *sched;
    sd_conn c;
    char *buf;
} fixture;

static void on_ready(sd_conn *c)
{
    sd_conn_drain(c);
}

static void fixture_open(fixture *f, size_t cap, int requirepass)
{
    memset(f, 0, sizeof *f);
    if (requirepass)
        strcpy(f->srv.cfg.requirepass, "secret");
    sl_options o;
    sl_options_init(&o);
    o.shards = 1;
    o.max_keys = 256;
    FUZZ_CHECK(sl_open(&f->srv.lim, &o) == SL_OK);
    sd_admission_init(&f->srv.adm);
    char err[256];
    FUZZ_CHECK(sd_config_open(&f->srv, NULL, NULL, err, sizeof err) == 0);
    f->sched = sd_sched_new(&f->srv.adm, f->srv.lim);
    FUZZ_CHECK(f->sched);
    f->c.srv = &f->srv;
    f->c.proto = &sd_proto_resp;
    f->c.id = 1;
    f->c.sched = f->sched;
    f->c.last_active_ms = NOW_MS;
    f->buf = f->c.in = malloc(cap ? cap : 1);
    FUZZ_CHECK(f->buf);
    FUZZ_CHECK(sd_proto_resp.open(&f->c) == 0);
}

/* Bytes arrive (net.c's on_read and process_input), then the worker's loop decides. */
static void fixture_read(fixture *f, const char *p, size_t n)
{
    sd_conn *c = &f->c;
    if (c->close_after_write)
        return; /* net.c drops input after QUIT or a protocol error */
    memmove(f->buf, c->in, c->in_len);
    c->in = f->buf;
    memcpy(c->in + c->in_len, p, n);
    c->in_len += n;
    for (;;) {
        size_t used = c->proto->feed(c);
        FUZZ_CHECK(used <= c->in_len);
        c->in += used;
        c->in_len -= used;
        /* feed stopped for the scheduler: too much undecided, or a command that must follow
         * the decisions before it (c->ordered_wait) */
        int waits = c->items_waiting >= SD_PIPELINE_MAX || c->ordered_wait;
        sd_sched_run(f->sched, NOW_MS, on_ready);
        if (!waits || c->close_after_write || (c->in_len == 0 && !c->ordered_wait))
            break;
    }
}

/* ---- the replies ---- */

/* Offset of the "\r\n" ending the line that starts at p[i], or n. */
static size_t line_end(const char *p, size_t n, size_t i)
{
    for (; i + 1 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n')
            return i;
    return n;
}

static int number(const char *p, size_t len, long long *out)
{
    char tmp[24];
    if (len == 0 || len >= sizeof tmp)
        return 0;
    memcpy(tmp, p, len);
    tmp[len] = 0;
    char *end;
    *out = strtoll(tmp, &end, 10);
    return *end == 0;
}

/* One reply at p[*i..n), moving *i past it; 0 if it is not well-formed. */
static int reply(const char *p, size_t n, size_t *i, int depth)
{
    if (*i >= n || depth > 8)
        return 0;
    char type = p[*i];
    size_t start = *i + 1, end = line_end(p, n, start);
    if (end == n)
        return 0;
    const char *line = p + start;
    size_t len = end - start;
    long long v = 0;
    *i = end + 2;
    switch (type) {
    case '+':
    case '-':
        return !memchr(line, '\r', len) && !memchr(line, '\n', len);
    case ':':
        return number(line, len, &v);
    case '_':
        return len == 0;
    case '$':
        if (!number(line, len, &v) || v < -1)
            return 0;
        if (v == -1)
            return 1;
        if ((unsigned long long)v > n - *i || n - *i - (size_t)v < 2 ||
            p[*i + (size_t)v] != '\r' || p[*i + (size_t)v + 1] != '\n')
            return 0;
        *i += (size_t)v + 2;
        return 1;
    case '*':
    case '%':
        if (!number(line, len, &v) || v < (type == '*' ? -1 : 0) || v > 1000000)
            return 0;
        for (long long k = 0; k < (type == '%' ? 2 * v : v); k++)
            if (!reply(p, n, i, depth + 1))
                return 0;
        return 1;
    }
    return 0;
}

static void check_replies(const fixture *f)
{
    const resp_buf *o = &f->c.out;
    FUZZ_CHECK(!o->oom);
    uint64_t want = atomic_load(&f->srv.m.resp_commands) +
                    atomic_load(&f->srv.m.resp_protocol_errors);
    uint64_t got = 0;
    for (size_t i = 0; i < o->len; got++)
        FUZZ_CHECK(reply(o->p, o->len, &i, 0));
    FUZZ_CHECK(got == want);
}

static void fixture_close(fixture *f)
{
    f->c.proto->close(&f->c);
    sd_conn_forget(&f->c);
    resp_buf_free(&f->c.out);
    free(f->buf);
    sd_sched_free(f->sched);
    sd_config_close(&f->srv);
    fuzz_reset_weights(&f->srv.adm);
    sl_close(f->srv.lim);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    size_t split = size ? (size_t)data[0] * (size + 1) / 256 : 0;
    fixture *f = malloc(sizeof *f);
    FUZZ_CHECK(f);
    fixture_open(f, size, size && (data[0] & 1));
    fixture_read(f, in, split);
    fixture_read(f, in + split, size - split);
    for (int i = 0; i < 1000 && sd_sched_run(f->sched, NOW_MS, on_ready) > 0; i++)
        ;
    FUZZ_CHECK(f->c.items_waiting == 0);
    sd_conn_drain(&f->c);
    check_replies(f);
    fixture_close(f);
    free(f);
    return 0;
}
