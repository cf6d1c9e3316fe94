/*
 * test_snapshot.c — bucket-state snapshots: exact round trips for every algorithm, corrupt
 * inputs change nothing, failed saves leave the old file.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "limiter_int.h"
#include "memory.h"
#include "sluice.h"

#define S SL_SECOND
#define T0 (INT64_C(1000) * S)

static int64_t g_now;
static int64_t clock_fn(void *ctx)
{
    (void)ctx;
    return g_now;
}

static sl_limiter *open_lim(void)
{
    sl_options o;
    sl_options_init(&o);
    o.clock = clock_fn;
    sl_limiter *l;
    assert_int_equal(sl_open(&l, &o), SL_OK);
    return l;
}

static char g_dir[] = "/tmp/sluice-snap-XXXXXX";
static char g_path[256];

static int setup(void **st)
{
    (void)st;
    assert_non_null(mkdtemp(g_dir));
    snprintf(g_path, sizeof g_path, "%s/state.snap", g_dir);
    return 0;
}

static int teardown(void **st)
{
    (void)st;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd);
}

/* One rule per algorithm (and a stacked one); each key driven to a boundary state. */
static const char *const k_actions[] = {"tb", "lb", "fw", "sw", "log", "br", "conc", "stack"};
static void rules(sl_limiter *l)
{
    sl_policy p[8] = {
        SL_POLICY_TOKEN_BUCKET(5, 0.5),
        {1, {{SL_LEAKY_BUCKET, 4, 1, 0, 0}}},
        SL_POLICY_WINDOW(SL_FIXED_WINDOW, 5, 60),
        SL_POLICY_WINDOW(SL_SLIDING_WINDOW, 5, 60),
        SL_POLICY_WINDOW(SL_SLIDING_LOG, 5, 60),
        {1, {{SL_BURST_RESERVE, 3, 1, 0, 10}}},
        {1, {{SL_CONCURRENCY, 3, 0, 3600, 0}}},
        {2, {{SL_TOKEN_BUCKET, 10, 1, 0, 0}, {SL_FIXED_WINDOW, 4, 0, 3600, 0}}},
    };
    for (int i = 0; i < 8; i++) {
        sl_key k = SL_KEY("t", k_actions[i], NULL);
        assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p[i]), SL_OK);
    }
}

static sl_decision take(sl_limiter *l, const char *a, const char *c)
{
    sl_decision d;
    sl_key k = SL_KEY("t", a, c);
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    return d;
}

static void test_round_trip_every_algorithm(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    uint64_t lease = 0;
    for (int i = 0; i < 8; i++)
        for (int n = 0; n < 3 + i % 3; n++) {
            sl_decision d = take(a, k_actions[i], "c");
            if (i == 6 && !lease)
                lease = d.lease;
        }
    g_now = T0 + S / 3; /* a moment later: fractional refills, window positions */
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);

    sl_limiter *b = open_lim();
    rules(b);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    sl_stats sa, sb;
    sl_stats_get(a, NULL, 0, &sa);
    sl_stats_get(b, NULL, 0, &sb);
    assert_int_equal(sa.keys, sb.keys);
    /* Both limiters now decide identically, request after request. */
    for (int round = 0; round < 6; round++) {
        g_now += S / 4;
        for (int i = 0; i < 8; i++) {
            sl_decision x = take(a, k_actions[i], "c"), y = take(b, k_actions[i], "c");
            assert_int_equal(x.allowed, y.allowed);
            assert_int_equal(x.remaining, y.remaining);
            assert_int_equal(x.retry_after, y.retry_after);
            assert_int_equal(x.reset_after, y.reset_after);
            assert_true(x.reserve == y.reserve);
        }
    }
    /* A lease taken before the save can be released after the load. */
    sl_key kc = SL_KEY("t", "conc", "c");
    assert_int_equal(sl_release(b, &kc, lease, SL_NOW), SL_OK);
    sl_close(a);
    sl_close(b);
}

static void test_rule_changed_between_save_and_load(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    take(a, "tb", "c"); /* 4 of 5 left */
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    sl_limiter *b = open_lim();
    sl_policy small = SL_POLICY_TOKEN_BUCKET(2, 0.5);
    sl_key k = SL_KEY("t", "tb", NULL);
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &k, &small), SL_OK);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    /* carried over at the next decision: 4 left, clamped to the new capacity of 2 */
    sl_decision d = take(b, "tb", "c");
    assert_int_equal(d.limit, 2);
    assert_int_equal(d.remaining, 1);
    sl_close(a);
    sl_close(b);
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(*n + 1);
    assert_int_equal(fread(p, 1, *n, f), *n);
    fclose(f);
    return p;
}

static int load_bytes(sl_limiter *l, const unsigned char *p, size_t n)
{
    char path[300];
    snprintf(path, sizeof path, "%s/bad.snap", g_dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
    return sl_snapshot_load(l, path);
}

static void test_corrupt_inputs_change_nothing(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    for (int i = 0; i < 8; i++)
        take(a, k_actions[i], "c");
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    size_t n;
    unsigned char *good = slurp(g_path, &n);

    sl_limiter *b = open_lim();
    rules(b);
    take(b, "fw", "z"); /* the only key b has: must stay exactly as it is */
    unsigned char *bad = malloc(n);
    for (size_t cut = 0; cut < n; cut++) /* every truncation */
        assert_int_equal(load_bytes(b, good, cut), SL_ESNAPSHOT);
    for (size_t bit = 0; bit < n * 8; bit += 7) { /* bit flips across the whole file */
        memcpy(bad, good, n);
        bad[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    }
    memcpy(bad, good, n);
    memcpy(bad, "NOTSLUIC", 8);
    assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    sl_stats s;
    sl_stats_get(b, NULL, 0, &s);
    assert_int_equal(s.keys, 1);
    assert_int_equal(take(b, "fw", "z").remaining, 3);
    assert_int_equal(sl_snapshot_load(b, "/nonexistent/dir/x"), SL_EIO);
    assert_int_equal(errno, ENOENT);
    free(bad);
    free(good);
    sl_close(a);
    sl_close(b);
}

static void test_failed_save_keeps_old_file(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    take(a, "x", "c");
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    size_t n1, n2;
    unsigned char *before = slurp(g_path, &n1);
    take(a, "x", "d");
    assert_int_equal(sl_snapshot_save(a, "/nonexistent/dir/state.snap"), SL_EIO);
    assert_int_equal(errno, ENOENT);
    /* a write error: /dev/full */
    int fd = open("/dev/full", O_WRONLY);
    if (fd >= 0) {
        assert_int_equal(sl_snapshot_write(a, fd), SL_EIO);
        assert_int_equal(errno, ENOSPC);
        close(fd);
    }
    unsigned char *after = slurp(g_path, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(before, after, n1);
    free(before);
    free(after);
    sl_close(a);
}

static int count_key(void *ctx, const char *key, size_t klen, const sl_policy *p,
                     const void *state, size_t ss)
{
    (void)key, (void)klen, (void)p, (void)state, (void)ss;
    ++*(int *)ctx;
    return 0;
}

/* Snapshots copy a shard a slice at a time; a removal between slices moves entries, so the
 * slice visit must say so (and the snapshot then copies the shard again). */
static void test_slices_detect_removals(void **st)
{
    (void)st;
    g_now = T0;
    sl_options o;
    sl_options_init(&o);
    o.clock = clock_fn;
    o.shards = 1;
    sl_limiter *l;
    assert_int_equal(sl_open(&l, &o), SL_OK);
    char id[16];
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof id, "c%d", i);
        take(l, "x", id);
    }
    uint32_t pos, stamp;
    int n = 0, rc;
    assert_int_equal(sl_limiter_visit_slice(l, 0, &pos, &stamp, 1, 32, count_key, &n, &rc),
                     SL_SLICE_MORE);
    assert_int_equal(n, 32);
    assert_int_equal(sl_limiter_visit_slice(l, 0, &pos, &stamp, 0, 32, count_key, &n, &rc),
                     SL_SLICE_MORE);
    assert_int_equal(n, 64);
    g_now = T0 + 3600 * S;                  /* every key idle and full again */
    assert_true(sl_sweep(l, SL_NOW, 10) > 0); /* removals: entries move */
    assert_int_equal(sl_limiter_visit_slice(l, 0, &pos, &stamp, 0, 32, count_key, &n, &rc),
                     SL_SLICE_MOVED);
    assert_int_equal(n, 64); /* nothing visited */
    /* and a snapshot taken now holds exactly the keys left */
    assert_int_equal(sl_snapshot_save(l, g_path), SL_OK);
    sl_limiter *b = open_lim();
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    sl_stats sa, sb;
    sl_stats_get(l, NULL, 0, &sa);
    sl_stats_get(b, NULL, 0, &sb);
    /* (loading at the same `now` may at once reclaim restored keys that are idle and full) */
    assert_int_equal(sa.keys, sb.keys + sb.reclaimed);
    sl_close(l);
    sl_close(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_every_algorithm),
        cmocka_unit_test(test_rule_changed_between_save_and_load),
        cmocka_unit_test(test_corrupt_inputs_change_nothing),
        cmocka_unit_test(test_failed_save_keeps_old_file),
        cmocka_unit_test(test_slices_detect_removals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
