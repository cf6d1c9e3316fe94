/*
 * test_snapshot.c — bucket-state snapshots: exact round trips for every algorithm at its
 * boundaries, corrupt inputs change nothing, failed saves leave the old file, sliced copies
 * never miss a key.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "limiter_int.h"
#include "memory.h"
#include "policy.h"
#include "snapshot_int.h"
#include "sluice.h"

#define S SL_SECOND
#define T0 (INT64_C(1000) * S)
#define HEADER 32
#define TRAILER 16

static int64_t g_now;
static int64_t clock_fn(void *ctx)
{
    (void)ctx;
    return g_now;
}

static sl_limiter *open_opts(unsigned shards, size_t max_keys)
{
    sl_options o;
    sl_options_init(&o);
    o.clock = clock_fn;
    o.shards = shards;
    o.max_keys = max_keys;
    sl_limiter *l;
    assert_int_equal(sl_open(&l, &o), SL_OK);
    return l;
}

static sl_limiter *open_lim(void)
{
    return open_opts(0, 0);
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
    snprintf(cmd, sizeof cmd, "chmod -R u+w %s; rm -rf %s", g_dir, g_dir);
    return system(cmd);
}

/* One rule per algorithm (and a stacked one). */
static const char *const k_actions[] = {"tb", "lb", "fw", "sw", "log", "br", "conc", "stack"};
#define NALG 8
static void rules(sl_limiter *l)
{
    sl_policy p[NALG] = {
        SL_POLICY_TOKEN_BUCKET(5, 0.5),
        {1, {{SL_LEAKY_BUCKET, 4, 1, 0, 0}}},
        SL_POLICY_WINDOW(SL_FIXED_WINDOW, 5, 60),
        SL_POLICY_WINDOW(SL_SLIDING_WINDOW, 5, 60),
        SL_POLICY_WINDOW(SL_SLIDING_LOG, 5, 60),
        {1, {{SL_BURST_RESERVE, 3, 1, 0, 10}}},
        {1, {{SL_CONCURRENCY, 3, 0, 3600, 0}}},
        {2, {{SL_TOKEN_BUCKET, 10, 1, 0, 0}, {SL_FIXED_WINDOW, 4, 0, 3600, 0}}},
    };
    for (int i = 0; i < NALG; i++) {
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

static sl_decision peek(sl_limiter *l, const char *a, const char *c)
{
    sl_decision d;
    sl_key k = SL_KEY("t", a, c);
    assert_int_equal(sl_peek(l, &k, SL_NOW, &d), SL_OK);
    return d;
}

static void same_decision(sl_decision x, sl_decision y)
{
    assert_int_equal(x.allowed, y.allowed);
    assert_int_equal(x.limit, y.limit);
    assert_int_equal(x.remaining, y.remaining);
    assert_int_equal(x.retry_after, y.retry_after);
    assert_int_equal(x.reset_after, y.reset_after);
    assert_int_equal(x.delay, y.delay);
    assert_true(x.tokens == y.tokens);
    assert_true(x.reserve == y.reserve);
    assert_int_equal(x.limit_index, y.limit_index);
}

static sl_limiter *save_and_load_into_new(sl_limiter *a)
{
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    sl_limiter *b = open_lim();
    rules(b);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    return b;
}

/* A caller with a time base of its own (explicit `now`, the internal clock unused): loading
 * must not reclaim anything against the internal clock, which is far ahead of the caller's
 * timestamps and would make every loaded key look full. Every key stays exhausted. */
static void test_load_with_caller_timestamps(void **st)
{
    (void)st;
    sl_options o;
    sl_options_init(&o);
    o.shards = 1; /* every load's insert sees every key */
    sl_limiter *a, *b;
    assert_int_equal(sl_open(&a, &o), SL_OK);
    assert_int_equal(sl_open(&b, &o), SL_OK);
    sl_policy p = SL_POLICY_TOKEN_BUCKET(5, 1);
    sl_key r = SL_KEY("t", "own", NULL);
    assert_int_equal(sl_rule_set(a, SL_SCOPE_ACTION, &r, &p), SL_OK);
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &r, &p), SL_OK);
    char id[16];
    sl_decision d;
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof id, "c%d", i);
        sl_key k = SL_KEY("t", "own", id);
        assert_int_equal(sl_take(a, &k, 5, T0, &d), SL_OK);
        assert_true(d.allowed);
    }
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    sl_stats sa, sb;
    assert_int_equal(sl_stats_get(b, NULL, 0, &sb), SL_OK);
    assert_int_equal(sb.keys, 100);
    assert_int_equal(sb.reclaimed, 0);
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof id, "c%d", i);
        sl_key k = SL_KEY("t", "own", id);
        sl_decision da, db;
        assert_int_equal(sl_peek(a, &k, T0, &da), SL_OK);
        assert_int_equal(sl_peek(b, &k, T0, &db), SL_OK);
        assert_false(db.allowed);
        same_decision(da, db);
    }
    assert_int_equal(sl_stats_get(a, NULL, 0, &sa), SL_OK);
    assert_int_equal(sa.reclaimed, 0);
    sl_close(a);
    sl_close(b);
}

/* Every algorithm driven to an in-between state, then both limiters decide identically,
 * request after request, at the same times (the first at the very `now` of the save). */
static void test_round_trip_every_algorithm(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    uint64_t lease = 0;
    for (int i = 0; i < NALG; i++)
        for (int n = 0; n < 2 + i % 3; n++) {
            sl_decision d = take(a, k_actions[i], "c");
            if (i == 6 && !lease)
                lease = d.lease;
        }
    g_now = T0 + S / 3; /* fractional refills, window positions */
    sl_limiter *b = save_and_load_into_new(a);
    sl_stats sa, sb;
    sl_stats_get(a, NULL, 0, &sa);
    sl_stats_get(b, NULL, 0, &sb);
    assert_int_equal(sa.keys, NALG);
    assert_int_equal(sb.keys, NALG);
    for (int round = 0; round < 12; round++) {
        for (int i = 0; i < NALG; i++) {
            same_decision(peek(a, k_actions[i], "c"), peek(b, k_actions[i], "c"));
            same_decision(take(a, k_actions[i], "c"), take(b, k_actions[i], "c"));
        }
        g_now += S / 4;
    }
    /* A lease taken before the save can be released after the load. */
    sl_key kc = SL_KEY("t", "conc", "c");
    assert_int_equal(sl_release(b, &kc, lease, SL_NOW), SL_OK);
    assert_int_equal(sl_release(b, &kc, lease, SL_NOW), SL_ELEASE);
    sl_close(a);
    sl_close(b);
}

/* Boundaries, stated plainly: exhausted stays exhausted, counts and leases and the reserve
 * are what they were, at the very `now` of the save. */
static void test_boundary_states(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    take(a, "br", "c"); /* burst_reserve: created now, its reserve grows 1/s from 0 */
    g_now = T0 + 7 * S;
    for (int n = 0; n < 3 + 2; n++)
        assert_true(take(a, "br", "c").allowed); /* 3 from the base, 2 from the reserve */
    sl_decision br = peek(a, "br", "c");
    assert_true(br.allowed && br.reserve > 3.9 && br.reserve < 4.1); /* 7 - 2 - 1 (peek) */
    for (int n = 0; n < 5; n++)
        assert_true(take(a, "tb", "c").allowed);
    assert_false(take(a, "tb", "c").allowed); /* exhausted */
    for (int n = 0; n < 3; n++)
        take(a, "fw", "c"), take(a, "sw", "c"), take(a, "log", "c");
    uint64_t leases[3];
    for (int n = 0; n < 3; n++)
        leases[n] = take(a, "conc", "c").lease;
    assert_false(take(a, "conc", "c").allowed);
    for (int n = 0; n < 4; n++) /* the stacked policy's window (4 per hour) is exhausted */
        assert_true(take(a, "stack", "c").allowed);
    assert_false(take(a, "stack", "c").allowed);

    sl_limiter *b = save_and_load_into_new(a);
    sl_decision d = take(b, "tb", "c");
    assert_false(d.allowed);
    assert_true(d.retry_after > 0);
    same_decision(d, take(a, "tb", "c"));
    assert_int_equal(peek(b, "fw", "c").remaining, 1);  /* 2 left: a peek of 1 leaves 1 */
    assert_int_equal(peek(b, "log", "c").remaining, 1);
    same_decision(peek(b, "sw", "c"), peek(a, "sw", "c"));
    same_decision(peek(b, "br", "c"), br);
    assert_false(take(b, "stack", "c").allowed);
    assert_int_equal(take(b, "stack", "c").limit_index, 1);
    /* leases: still full; releasing one frees a slot; new ids never repeat a restored one */
    assert_false(take(b, "conc", "c").allowed);
    sl_key kc = SL_KEY("t", "conc", "c");
    assert_int_equal(sl_release(b, &kc, leases[1], SL_NOW), SL_OK);
    d = take(b, "conc", "c");
    assert_true(d.allowed);
    for (int n = 0; n < 3; n++)
        assert_true(d.lease != leases[n]);
    assert_true(d.lease > leases[2]);
    assert_false(take(b, "conc", "c").allowed);
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
    for (int n = 0; n < 3; n++)
        take(a, "fw", "c"); /* 2 of 5 left */
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    sl_limiter *b = open_lim();
    rules(b);
    sl_policy small = SL_POLICY_TOKEN_BUCKET(2, 0.5), fw3 = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 3,
                                                                            60);
    sl_key k = SL_KEY("t", "tb", NULL), kf = SL_KEY("t", "fw", NULL);
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &k, &small), SL_OK);
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &kf, &fw3), SL_OK);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    /* carried over at the next decision: 4 left, clamped to the new capacity of 2 */
    sl_decision d = take(b, "tb", "c");
    assert_int_equal(d.limit, 2);
    assert_int_equal(d.remaining, 1);
    /* 2 left of 5 under the old window, at most 3 under the new one: 2 left, 1 after this */
    d = take(b, "fw", "c");
    assert_int_equal(d.limit, 3);
    assert_int_equal(d.remaining, 1);
    sl_close(a);
    sl_close(b);
}

/* Loading replaces the keys it holds, leaves others alone, and obeys max_keys. */
static void test_load_replaces_only_its_keys(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    char id[16];
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "k%d", i);
        take(a, "fw", id);
    }
    take(a, "fw", "k0"); /* k0: 3 left */
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);

    sl_limiter *b = open_lim();
    rules(b);
    take(b, "fw", "mine");
    take(b, "fw", "mine");
    take(b, "fw", "mine"); /* not in the snapshot: 2 left */
    for (int n = 0; n < 5; n++)
        take(b, "fw", "k0"); /* in the snapshot, exhausted here: replaced by 3 left */
    sl_stats s0, s1;
    sl_stats_get(b, NULL, 0, &s0);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    sl_stats_get(b, NULL, 0, &s1);
    assert_int_equal(s1.keys, 11);
    assert_int_equal(s1.allowed, s0.allowed); /* counters are not part of a snapshot */
    assert_int_equal(s1.denied, s0.denied);
    assert_int_equal(peek(b, "fw", "mine").remaining, 1);
    assert_int_equal(peek(b, "fw", "k0").remaining, 2);
    assert_int_equal(peek(b, "fw", "k9").remaining, 3);

    /* a limiter bounded to 4 keys keeps 4 of the 10, evicting as inserts do */
    sl_limiter *c = open_opts(1, 4);
    rules(c);
    assert_int_equal(sl_snapshot_load(c, g_path), SL_OK);
    sl_stats_get(c, NULL, 0, &s1);
    assert_int_equal(s1.keys, 4);
    assert_int_equal(s1.evicted, 6);
    sl_close(a);
    sl_close(b);
    sl_close(c);
}

/* Large heap states (a 100,000-entry log is 800 KB) are copied whole, outside the slice
 * budget; a pipe (not a regular file) is read to its end. */
static void test_large_states_and_pipes(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    sl_policy big = SL_POLICY_WINDOW(SL_SLIDING_LOG, 100000, 3600);
    sl_key kr = SL_KEY("t", "big", NULL);
    assert_int_equal(sl_rule_set(a, SL_SCOPE_ACTION, &kr, &big), SL_OK);
    char id[16];
    for (int i = 0; i < 3; i++) {
        snprintf(id, sizeof id, "b%d", i);
        sl_key k = SL_KEY("t", "big", id);
        sl_decision d;
        assert_int_equal(sl_take(a, &k, 99990 + (uint64_t)i, SL_NOW, &d), SL_OK);
        assert_true(d.allowed);
    }
    for (int i = 0; i < 200; i++) {
        snprintf(id, sizeof id, "s%d", i);
        take(a, "small", id);
    }
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s/pipe.snap", g_dir);
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC, 0600);
    assert_int_equal(sl_snapshot_write(a, fd), SL_OK);
    sl_snapshot_info wi, ri;
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_WRITE, &wi), SL_OK);
    assert_int_equal(wi.keys, 203);
    assert_true(wi.bytes > 3 * 800000);
    assert_int_equal(lseek(fd, 0, SEEK_END), (off_t)wi.bytes);

    sl_limiter *b = open_lim();
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &kr, &big), SL_OK);
    /* feed the file through a pipe from a child process */
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        char buf[65536];
        ssize_t n;
        lseek(fd, 0, SEEK_SET);
        while ((n = read(fd, buf, sizeof buf)) > 0)
            if (write(fds[1], buf, (size_t)n) != n)
                _exit(1);
        _exit(0);
    }
    close(fds[1]);
    assert_int_equal(sl_snapshot_read(b, fds[0]), SL_OK);
    close(fds[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(fd);
    assert_int_equal(sl_snapshot_last(b, SL_SNAPSHOT_READ, &ri), SL_OK);
    assert_int_equal(ri.keys, 203);
    assert_int_equal(ri.bytes, wi.bytes);
    assert_int_equal(ri.written_at, wi.written_at);
    for (int i = 0; i < 3; i++) {
        snprintf(id, sizeof id, "b%d", i);
        sl_key k = SL_KEY("t", "big", id);
        sl_decision x, y;
        assert_int_equal(sl_peek(a, &k, SL_NOW, &x), SL_OK);
        assert_int_equal(sl_peek(b, &k, SL_NOW, &y), SL_OK);
        same_decision(x, y);
        assert_int_equal(y.remaining, 100000 - (99990 + (uint64_t)i) - 1);
    }
    sl_close(a);
    sl_close(b);
}

static void test_info(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    sl_snapshot_info info;
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_WRITE, &info), SL_ENOTFOUND);
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_READ, &info), SL_ENOTFOUND);
    assert_int_equal(sl_snapshot_last(a, (sl_snapshot_op)7, &info), SL_EINVAL);
    take(a, "x", "c");
    take(a, "x", "d");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t wall = (int64_t)ts.tv_sec * S + ts.tv_nsec;
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_WRITE, &info), SL_OK);
    struct stat sb;
    assert_int_equal(stat(g_path, &sb), 0);
    assert_int_equal(info.keys, 2);
    assert_int_equal(info.bytes, (uint64_t)sb.st_size);
    assert_true(info.written_at >= wall && info.written_at < wall + 60 * S);
    assert_true(info.duration > 0);
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_READ, &info), SL_ENOTFOUND);
    sl_close(a);
}

/* ---- corrupt inputs ---- */

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

/* Make a forged image whole again: the length and XXH64 of the trailer. */
static void reseal(unsigned char *p, size_t n)
{
    for (int i = 0; i < 8; i++)
        p[n - 16 + i] = (unsigned char)((uint64_t)n >> (8 * i));
    uint64_t h = XXH64(p, n - 8, 0);
    for (int i = 0; i < 8; i++)
        p[n - 8 + i] = (unsigned char)(h >> (8 * i));
}

/* Offset of the first record whose key is (t, action, client "c"): its key length field. */
static size_t find_record(const unsigned char *p, size_t n, const char *action)
{
    size_t al = strlen(action);
    for (size_t i = HEADER; i + 3 + al < n; i++)
        if (p[i] == 4 + al && p[i + 1] == 0 && p[i + 2] == 1 && p[i + 3] == al &&
            p[i + 4] == 't' && memcmp(p + i + 5, action, al) == 0 && p[i + 5 + al] == 'c')
            return i;
    fail_msg("record %s not found", action);
    return 0;
}

typedef struct view {
    sl_stats s;
    sl_decision d[NALG];
} view;

static view look(sl_limiter *l)
{
    view v;
    memset(&v, 0, sizeof v);
    sl_stats_get(l, NULL, 0, &v.s);
    for (int i = 0; i < NALG; i++)
        v.d[i] = peek(l, k_actions[i], "z");
    return v;
}

static void unchanged(sl_limiter *l, const view *before)
{
    view now = look(l);
    assert_int_equal(now.s.keys, before->s.keys);
    assert_int_equal(now.s.allowed, before->s.allowed);
    assert_int_equal(now.s.denied, before->s.denied);
    assert_int_equal(now.s.evicted, before->s.evicted);
    for (int i = 0; i < NALG; i++)
        same_decision(now.d[i], before->d[i]);
}

static void test_corrupt_inputs_change_nothing(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    rules(a);
    for (int i = 0; i < NALG; i++) { /* keys "c" (saved) and "z" (b's own) */
        take(a, k_actions[i], "c");
        take(a, k_actions[i], "z");
    }
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    size_t n;
    unsigned char *good = slurp(g_path, &n);

    sl_limiter *b = open_lim();
    rules(b);
    for (int i = 0; i < NALG; i++) /* b's keys "z", each in a state of its own */
        for (int k = 0; k < 1 + i % 3; k++)
            take(b, k_actions[i], "z");
    g_now += S / 7;
    view before = look(b);
    unsigned char *bad = malloc(n);

    for (size_t cut = 0; cut < n; cut++) /* every truncation, the empty file included */
        assert_int_equal(load_bytes(b, good, cut), SL_ESNAPSHOT);
    for (size_t bit = 0; bit < n * 8; bit++) { /* every single bit flipped */
        memcpy(bad, good, n);
        bad[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    }
    unchanged(b, &before);

    memcpy(bad, good, n); /* wrong magic, even with a valid checksum */
    memcpy(bad, "NOTSLUIC", 8);
    assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    reseal(bad, n);
    assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    memcpy(bad, good, n); /* a whole file of a newer version, or with flags it can't read */
    bad[8] = 2;
    reseal(bad, n);
    assert_int_equal(load_bytes(b, bad, n), SL_EVERSION);
    memcpy(bad, good, n);
    bad[12] = 1;
    reseal(bad, n);
    assert_int_equal(load_bytes(b, bad, n), SL_EVERSION);
    memcpy(bad, good, n); /* version 0 never existed */
    bad[8] = 0;
    reseal(bad, n);
    assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);

    /* Whole files (valid checksum) with a bad record, as a buggy or hostile writer could
     * make: each is refused before anything is applied. */
    size_t log = find_record(good, n, "log"), conc = find_record(good, n, "conc");
    size_t log_state = log + 2 + 7 + 1 + 33 + 4, conc_state = conc + 2 + 8 + 1 + 33 + 4;
    size_t tb_state = find_record(good, n, "tb") + 2 + 6 + 1 + 33 + 4;
    struct {
        size_t at;
        unsigned char val;
        size_t len; /* bytes from `at` set to val */
    } forged[] = {
        {log_state + 8, 5, 1},      /* sliding_log ring head = 5, not below the limit 5 */
        {log_state + 12, 6, 1},     /* sliding_log holds 6 timestamps of at most 5 */
        {log_state + 7, 0x80, 1},   /* sliding_log `last` negative */
        {conc_state + 16, 9, 1},    /* concurrency: total weight does not match its leases */
        {conc_state + 24, 0, 8},    /* concurrency: lease id 0 */
        {conc_state + 31, 0x40, 1}, /* concurrency: lease id >= 2^62 (new ids would wrap) */
        {conc_state + 39, 0x01, 1}, /* concurrency: a lease 2.3 years on (windows <= 366 d) */
        {tb_state + 7, 0x01, 1},    /* token_bucket: tat 2.3 years past last (tau is 10 s) */
        {log + 2 + 7, 0, 1},        /* a policy of 0 limits */
        {log + 2 + 7 + 1, 42, 1},   /* an unknown algorithm */
        {log + 2 + 7 + 1 + 33, 0x40, 1}, /* a state length that is not the policy's (56) */
        {log + 2, 5, 1},            /* key: tenant and action longer than the key */
        {log + 3, 4, 1},            /* key: no client left */
    };
    for (size_t f = 0; f < sizeof forged / sizeof *forged; f++) {
        memcpy(bad, good, n);
        memset(bad + forged[f].at, forged[f].val, forged[f].len);
        reseal(bad, n);
        assert_int_equal(load_bytes(b, bad, n), SL_ESNAPSHOT);
    }
    unchanged(b, &before);

    sl_snapshot_info info;
    assert_int_equal(sl_snapshot_load(b, "/nonexistent/dir/x"), SL_EIO);
    assert_int_equal(errno, ENOENT);
    assert_int_equal(sl_snapshot_read(b, -1), SL_EINVAL);
    assert_int_equal(sl_snapshot_last(b, SL_SNAPSHOT_READ, &info), SL_ENOTFOUND);
    unchanged(b, &before);
    free(bad);
    free(good);
    sl_close(a);
    sl_close(b);
}

/* A key whose tenant is the literal "default" (the limiter stores "") is not one sl_take
 * could have made: refused. */
static void test_unnormalised_key_refused(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_lim();
    sl_key k = SL_KEY("abcdefg", NULL, "c");
    sl_decision d;
    assert_int_equal(sl_take(a, &k, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    size_t n;
    unsigned char *p = slurp(g_path, &n);
    assert_memory_equal(p + HEADER + 4, "abcdefg", 7);
    memcpy(p + HEADER + 4, "default", 7);
    reseal(p, n);
    sl_limiter *b = open_lim();
    assert_int_equal(load_bytes(b, p, n), SL_ESNAPSHOT);
    free(p);
    sl_close(a);
    sl_close(b);
}

/* ---- failed saves ---- */

static int temp_files_left(void)
{
    DIR *d = opendir(g_dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strstr(e->d_name, ".tmp.") != NULL;
    closedir(d);
    return n;
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
    char id[32];
    for (int i = 0; i < 20000; i++) { /* > 1 MiB: the output goes out in several writes */
        snprintf(id, sizeof id, "client-%d", i);
        take(a, "x", id);
    }
    assert_int_equal(sl_snapshot_save(a, "/nonexistent/dir/state.snap"), SL_EIO);
    assert_int_equal(errno, ENOENT);
    char under_file[300];
    snprintf(under_file, sizeof under_file, "%s/state.snap", g_path); /* g_path is a file */
    assert_int_equal(sl_snapshot_save(a, under_file), SL_EIO);
    assert_int_equal(errno, ENOTDIR);

    /* injected write failures: on the first write, and on a later one */
    for (long k = 0; k < 2; k++) {
        sl_snapshot_fail_writes_after(k);
        assert_int_equal(sl_snapshot_save(a, g_path), SL_EIO);
        assert_int_equal(errno, ENOSPC);
        sl_snapshot_fail_writes_after(-1);
        assert_int_equal(temp_files_left(), 0);
    }
    /* a write error on a plain fd: /dev/full */
    int fd = open("/dev/full", O_WRONLY);
    if (fd >= 0) {
        assert_int_equal(sl_snapshot_write(a, fd), SL_EIO);
        assert_int_equal(errno, ENOSPC);
        close(fd);
    }
    /* an unwritable directory (root writes anyway: then the case does not apply) */
    if (geteuid() != 0) {
        assert_int_equal(chmod(g_dir, 0500), 0);
        assert_int_equal(sl_snapshot_save(a, g_path), SL_EIO);
        assert_int_equal(errno, EACCES);
        assert_int_equal(chmod(g_dir, 0700), 0);
    }
    sl_snapshot_info info;
    assert_int_equal(sl_snapshot_last(a, SL_SNAPSHOT_WRITE, &info), SL_OK);
    assert_int_equal(info.keys, 1); /* the one save that succeeded */
    unsigned char *after = slurp(g_path, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(before, after, n1);
    assert_int_equal(temp_files_left(), 0);
    /* and the old file still loads */
    sl_limiter *b = open_lim();
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    free(before);
    free(after);
    sl_close(a);
    sl_close(b);
}

/* ---- sliced copies ---- */

typedef struct seen {
    int count[1000];
} seen;

static int count_key(void *ctx, const char *key, size_t klen, const sl_policy *p,
                     const void *state, size_t ss)
{
    (void)p, (void)state, (void)ss;
    seen *s = ctx;
    sl_key k;
    sl_key_decode(key, klen, &k);
    char c[16] = {0};
    memcpy(c, k.client, k.client_len < 15 ? k.client_len : 15);
    if (c[0] == 's')
        s->count[atoi(c + 1)]++;
    return 0;
}

/* A shard is copied a slice at a time from its last entry down; removals between slices
 * move entries, but no key present throughout is ever missed (one moved below the scan
 * may be seen twice, and the last slice says so). Keys "s<i>" are slow (never full again
 * during the test, so never reclaimed); the others refill within a second and are
 * reclaimed by sweeps between slices, which moves entries around. */
static void test_slices_never_miss(void **st)
{
    (void)st;
    srand(7);
    int repeats = 0;
    for (int trial = 0; trial < 40; trial++) {
        g_now = T0;
        sl_limiter *l = open_opts(1, 0);
        sl_policy slow = SL_POLICY_TOKEN_BUCKET(5, 0.0001);
        sl_key kr = SL_KEY("t", "slow", NULL);
        assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &kr, &slow), SL_OK);
        char id[16];
        int nslow = 0, nfast = 0;
        for (int i = 0; i < 400; i++) {
            if (rand() % 3 == 0) {
                snprintf(id, sizeof id, "s%d", nslow++);
                take(l, "slow", id);
            } else {
                snprintf(id, sizeof id, "f%d", nfast++);
                take(l, "fast", id);
            }
        }
        seen s;
        memset(&s, 0, sizeof s);
        sl_slice c;
        int rc, st2 = SL_SLICE_MORE, removed = 0;
        for (int first = 1; st2 == SL_SLICE_MORE; first = 0) {
            st2 = sl_limiter_visit_slice(l, 0, &c, first, 1 + (uint32_t)(rand() % 40),
                                         count_key, &s, &rc);
            assert_int_equal(rc, 0);
            int op = rand() % 4;
            if (trial % 4 == 0) /* a quarter of the trials without removals */
                op = op % 2 ? 1 : 3;
            switch (op) { /* between slices: removals, inserts, both, or nothing */
            case 0:
                g_now += 2 * S;
                removed += (int)sl_sweep(l, SL_NOW, 1 + (size_t)(rand() % 60));
                break;
            case 1:
                for (int k = rand() % 20; k > 0; k--) {
                    snprintf(id, sizeof id, "f%d", nfast++);
                    take(l, "fast", id);
                }
                break;
            case 2:
                g_now += 2 * S;
                for (int k = rand() % 20; k > 0; k--) { /* inserts reclaim at the cursor */
                    snprintf(id, sizeof id, "f%d", nfast++);
                    take(l, "fast", id);
                }
                break;
            default:
                break;
            }
        }
        for (int i = 0; i < nslow; i++)
            assert_true(s.count[i] >= 1);
        if (st2 == SL_SLICE_DONE) /* no removal during the visit: each seen exactly once */
            for (int i = 0; i < nslow; i++)
                assert_int_equal(s.count[i], 1);
        repeats += st2 == SL_SLICE_REPEATS;
        (void)removed;
        sl_close(l);
    }
    assert_true(repeats > 0 && repeats < 40); /* both outcomes were exercised */
}

/* After removals have moved entries around, a snapshot still holds every key, exactly. */
static void test_snapshot_after_removals(void **st)
{
    (void)st;
    g_now = T0;
    sl_limiter *a = open_opts(4, 0);
    sl_policy slow = SL_POLICY_TOKEN_BUCKET(5, 0.001);
    sl_key kr = SL_KEY("t", "slow", NULL);
    assert_int_equal(sl_rule_set(a, SL_SCOPE_ACTION, &kr, &slow), SL_OK);
    char id[16];
    for (int i = 0; i < 500; i++) {
        snprintf(id, sizeof id, "s%d", i);
        take(a, "slow", id);
        if (i % 2)
            take(a, "slow", id);
        snprintf(id, sizeof id, "f%d", i);
        take(a, "fast", id);
    }
    g_now += 10 * S; /* every fast key is full again: a sweep now removes them */
    assert_true(sl_sweep(a, SL_NOW, 300) > 0);
    sl_limiter *b = open_lim();
    assert_int_equal(sl_rule_set(b, SL_SCOPE_ACTION, &kr, &slow), SL_OK);
    assert_int_equal(sl_snapshot_save(a, g_path), SL_OK);
    assert_int_equal(sl_snapshot_load(b, g_path), SL_OK);
    for (int i = 0; i < 500; i++) {
        snprintf(id, sizeof id, "s%d", i);
        same_decision(peek(a, "slow", id), peek(b, "slow", id));
        assert_int_equal(peek(b, "slow", id).remaining, i % 2 ? 2 : 3);
    }
    sl_close(a);
    sl_close(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_every_algorithm),
        cmocka_unit_test(test_load_with_caller_timestamps),
        cmocka_unit_test(test_boundary_states),
        cmocka_unit_test(test_rule_changed_between_save_and_load),
        cmocka_unit_test(test_load_replaces_only_its_keys),
        cmocka_unit_test(test_large_states_and_pipes),
        cmocka_unit_test(test_info),
        cmocka_unit_test(test_corrupt_inputs_change_nothing),
        cmocka_unit_test(test_unnormalised_key_refused),
        cmocka_unit_test(test_failed_save_keeps_old_file),
        cmocka_unit_test(test_slices_never_miss),
        cmocka_unit_test(test_snapshot_after_removals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
