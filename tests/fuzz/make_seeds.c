/*
 * make_seeds.c — writes the binary seeds of the fuzz corpus, made by the library itself:
 *
 *   fuzz_make_seeds tests/fuzz/corpus
 *
 * corpus/snapshot/NAME.snap     snapshots (sl_snapshot_save) of limiters holding keys of
 *                               every algorithm in interesting states: exhausted, half full,
 *                               a wrapped sliding log, leases held, stacked limits, odd ids
 * corpus/redis_reply/NAME.resp  the Redis function's 74-byte reply (redis_script.lua, REPLY)
 *                               as Redis sends it, alone and pipelined with other replies
 *
 * The files are checked in; run this again when a format changes. The limiters use a fixed
 * clock (FUZZ_T0, as fuzz_snapshot.c does), so the same library writes the same states.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice.h"

#define FUZZ_T0 INT64_C(1700000000000000000) /* 2023-11-14, ns: the fuzz targets' clock */
#define MS INT64_C(1000000)

static const char *g_dir;

static void fail(const char *what, int rc)
{
    fprintf(stderr, "make_seeds: %s: %s\n", what, sl_strerror(rc));
    exit(1);
}

static sl_limiter *open_limiter(void)
{
    sl_limiter *l;
    sl_options o;
    sl_options_init(&o);
    o.shards = 4;
    int rc = sl_open(&l, &o);
    if (rc != SL_OK)
        fail("sl_open", rc);
    return l;
}

static void rule(sl_limiter *l, const char *tenant, const char *action, sl_policy p)
{
    sl_key k = SL_KEY(tenant, action, NULL);
    int rc = sl_rule_set(l, SL_SCOPE_ACTION, &k, &p);
    if (rc != SL_OK)
        fail("sl_rule_set", rc);
}

/* `n` takes of `cost` on key (t, a, c), one every `step` ns from `at`. */
static void takes(sl_limiter *l, sl_key k, int n, uint64_t cost, int64_t at, int64_t step)
{
    for (int i = 0; i < n; i++) {
        sl_decision d;
        int rc = sl_take(l, &k, cost, at + i * step, &d);
        if (rc != SL_OK)
            fail("sl_take", rc);
    }
}

static void save(sl_limiter *l, const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/snapshot/%s.snap", g_dir, name);
    int rc = sl_snapshot_save(l, path);
    if (rc != SL_OK)
        fail(path, rc);
    sl_close(l);
}

static sl_policy limit1(sl_algorithm a, double limit, double rate, double window, double cap)
{
    return (sl_policy){1, {{a, limit, rate, window, cap}}};
}

static void snapshots(void)
{
    sl_limiter *l = open_limiter();
    save(l, "empty");

    l = open_limiter();
    rule(l, "acme", "login", SL_POLICY_TOKEN_BUCKET(3, 0.1));
    takes(l, SL_KEY("acme", "login", "10.0.0.7"), 3, 1, FUZZ_T0, MS); /* exhausted */
    takes(l, SL_KEY("acme", "login", "10.0.0.8"), 1, 2, FUZZ_T0, 0);
    takes(l, SL_KEY(NULL, NULL, "anon"), 2, 1, FUZZ_T0, MS);            /* the default */
    save(l, "token_bucket");

    l = open_limiter();
    rule(l, "t", "shape", limit1(SL_LEAKY_BUCKET, 5, 2, 0, 0));
    takes(l, SL_KEY("t", "shape", "c"), 4, 1, FUZZ_T0, 10 * MS); /* queued: delays */
    save(l, "leaky_bucket");

    l = open_limiter();
    rule(l, "t", "fw", SL_POLICY_WINDOW(SL_FIXED_WINDOW, 10, 60));
    rule(l, "t", "sw", SL_POLICY_WINDOW(SL_SLIDING_WINDOW, 10, 1));
    takes(l, SL_KEY("t", "fw", "c"), 7, 1, FUZZ_T0, 1000 * MS);
    takes(l, SL_KEY("t", "sw", "c"), 12, 1, FUZZ_T0, 150 * MS); /* over a window boundary */
    save(l, "windows");

    l = open_limiter();
    rule(l, "t", "log", SL_POLICY_WINDOW(SL_SLIDING_LOG, 4, 1));
    takes(l, SL_KEY("t", "log", "full"), 4, 1, FUZZ_T0, 100 * MS);
    takes(l, SL_KEY("t", "log", "wrapped"), 7, 1, FUZZ_T0, 400 * MS); /* head moved on */
    save(l, "sliding_log");

    l = open_limiter();
    rule(l, "t", "br", limit1(SL_BURST_RESERVE, 2, 1, 0, 5));
    takes(l, SL_KEY("t", "br", "c"), 2, 1, FUZZ_T0, 0);
    takes(l, SL_KEY("t", "br", "c"), 3, 1, FUZZ_T0 + 4000 * MS, 0); /* into the reserve */
    save(l, "burst_reserve");

    l = open_limiter();
    rule(l, "t", "cc", limit1(SL_CONCURRENCY, 3, 0, 30, 0));
    takes(l, SL_KEY("t", "cc", "held"), 2, 1, FUZZ_T0, MS); /* two leases held */
    takes(l, SL_KEY("t", "cc", "heavy"), 1, 3, FUZZ_T0, 0);
    save(l, "concurrency");

    l = open_limiter();
    sl_policy four = {4,
                      {{SL_TOKEN_BUCKET, 10, 5, 0, 0},
                       {SL_SLIDING_LOG, 3, 0, 2, 0},
                       {SL_CONCURRENCY, 2, 0, 10, 0},
                       {SL_FIXED_WINDOW, 100, 0, 86400, 0}}};
    rule(l, "t", "stack", four);
    takes(l, SL_KEY("t", "stack", "c"), 3, 1, FUZZ_T0, 50 * MS);
    save(l, "stacked");

    /* ids: "default" (stored as ""), NUL and high bytes, the longest */
    l = open_limiter();
    char id[SL_MAX_ID_LEN];
    memset(id, 'x', sizeof id);
    takes(l, (sl_key){"default", 7, "a\0b", 3, "\xff\xfe", 2}, 1, 1, FUZZ_T0, 0);
    takes(l, (sl_key){id, sizeof id, id, sizeof id, id, sizeof id}, 2, 1, FUZZ_T0, MS);
    save(l, "odd_ids");
}

/* ---- Redis replies ---- */

static void put_le_double(unsigned char *p, double v)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(u >> (8 * i));
}

/* The function's reply: allowed, limit index, then remaining, reset_after, retry_after, delay,
 * tokens, reserve, lease, now's seconds and nanoseconds. */
static size_t script_reply(char *out, int allowed, int index, const double v[9])
{
    unsigned char r[74];
    r[0] = (unsigned char)allowed;
    r[1] = (unsigned char)index;
    for (int i = 0; i < 9; i++)
        put_le_double(r + 2 + 8 * i, v[i]);
    size_t n = (size_t)sprintf(out, "$74\r\n");
    memcpy(out + n, r, sizeof r);
    memcpy(out + n + sizeof r, "\r\n", 2);
    return n + sizeof r + 2;
}

static void write_file(const char *name, const char *p, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/redis_reply/%s.resp", g_dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "make_seeds: cannot write %s\n", path);
        exit(1);
    }
}

static void redis_replies(void)
{
    static const double allowed[9] = {4, 2e9, 0, 0, 4.5, 0, 0, 1700000000, 123456789};
    static const double denied[9] = {0, 9e9, 5e8, 0, 0.25, 0, 0, 1700000001, 999999999};
    static const double leased[9] = {1, 3e10, 0, 0, 1, 0, 7, 1700000002, 0};
    char buf[1024];
    size_t n = script_reply(buf, 1, 0, allowed);
    write_file("allowed", buf, n);
    n = script_reply(buf, 0, 1, denied);
    write_file("denied", buf, n);
    n = script_reply(buf, 1, 2, leased);
    write_file("lease", buf, n);
    /* pipelined: a redirection, a denial, a release's answer */
    n = (size_t)sprintf(buf, "-MOVED 3999 127.0.0.1:6381\r\n");
    n += script_reply(buf + n, 0, 0, denied);
    n += (size_t)sprintf(buf + n, ":1\r\n");
    write_file("pipeline", buf, n);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_make_seeds tests/fuzz/corpus\n");
        return 2;
    }
    g_dir = argv[1];
    snapshots();
    redis_replies();
    return 0;
}
