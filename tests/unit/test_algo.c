/* test_algo.c — exact boundary tests of the seven algorithms (src/lib/algo.c).
 *
 * Every expectation is an exact integer (ns, units) worked out by hand from the algorithm's
 * definition; a one-ns or one-unit error anywhere fails. Time is passed explicitly. */
#include <math.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "algo.h"

#define S INT64_C(1000000000)
#define MS INT64_C(1000000)
#define US INT64_C(1000)
#define HOUR (3600 * S)
#define DAY (86400 * S)

typedef struct tkey {
    sl_climit c;
    void *st;
} tkey;

static sl_limit lim(sl_algorithm a, double limit, double rate, double window, double rcap)
{
    sl_limit l = {a, limit, rate, window, rcap};
    return l;
}

static void *state_alloc(uint32_t size)
{
    void *p = aligned_alloc(8, size);
    assert_non_null(p);
    memset(p, 0xa5, size); /* init must overwrite everything that matters */
    return p;
}

static tkey key_new(sl_limit l, int64_t now)
{
    tkey k;
    memset(&k, 0, sizeof k);
    assert_int_equal(sl_climit_compile(&l, &k.c), SL_OK);
    k.st = state_alloc(k.c.state_size);
    sl_algo_init(&k.c, k.st, now);
    return k;
}

static void key_free(tkey *k) { free(k->st); }

/* What the limiter does with a one-limit policy: check, then commit or touch. */
static sl_check take_lease(tkey *k, uint64_t cost, int64_t now, uint64_t lease)
{
    sl_check ck;
    sl_algo_check(&k->c, k->st, cost, now, &ck);
    if (ck.allowed)
        sl_algo_commit(&k->c, k->st, cost, now, &ck, lease);
    else
        sl_algo_touch(&k->c, k->st, now);
    return ck;
}
static sl_check take(tkey *k, uint64_t cost, int64_t now) { return take_lease(k, cost, now, 0); }

/* allowed, remaining, reset_after, retry_after — exact */
#define EXPECT(ck, al, rem, reset, retry)                                \
    do {                                                                 \
        sl_check ck_ = (ck);                                             \
        assert_int_equal(ck_.allowed, (al));                             \
        assert_int_equal(ck_.remaining, (uint64_t)(rem));                \
        assert_int_equal(ck_.reset_after, (int64_t)(reset));             \
        assert_int_equal(ck_.retry_after, (int64_t)(retry));             \
    } while (0)

#define TAKE(k, cost, now, al, rem, reset, retry) EXPECT(take(&(k), (cost), (now)), al, rem, reset, retry)

/* ---- compile -------------------------------------------------------------------------- */

static void compile_rc(sl_limit l, int want)
{
    sl_climit out;
    memset(&out, 0x5a, sizeof out);
    sl_climit before = out;
    int rc = sl_climit_compile(&l, &out);
    if (rc != want)
        fail_msg("algorithm %d limit %g rate %g window %g cap %g: got %d want %d",
                 (int)l.algorithm, l.limit, l.rate, l.window, l.reserve_cap, rc, want);
    if (rc != SL_OK)
        assert_memory_equal(&out, &before, sizeof out); /* untouched on error */
}

static void test_compile_errors(void **st)
{
    (void)st;
    const double nan = NAN, inf = INFINITY;
    /* limit: every algorithm */
    for (int a = SL_TOKEN_BUCKET; a <= SL_CONCURRENCY; a++) {
        double bad[] = {0, -1, -0.0, 0.5, 1.5, 1e9 + 1, 2e9, nan, inf, -inf};
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
            compile_rc(lim((sl_algorithm)a, bad[i], 1, 1, 1), SL_ECAPACITY);
    }
    compile_rc(lim(SL_TOKEN_BUCKET, 1e9, 1, 0, 0), SL_OK);
    compile_rc(lim(SL_TOKEN_BUCKET, 1, 1, 0, 0), SL_OK);
    /* unknown algorithm */
    compile_rc(lim((sl_algorithm)0, 1, 1, 1, 1), SL_EALGORITHM);
    compile_rc(lim((sl_algorithm)8, 1, 1, 1, 1), SL_EALGORITHM);
    compile_rc(lim((sl_algorithm)-1, 1, 1, 1, 1), SL_EALGORITHM);
    /* rates */
    sl_algorithm rated[] = {SL_TOKEN_BUCKET, SL_LEAKY_BUCKET};
    for (size_t i = 0; i < 2; i++) {
        double bad[] = {0, -1, -0.0, nan, inf, -inf, 1e9 * 1.0000001, 2e9, 3e-8, 1e-12,
                        1.0 / (366.0 * 86400.0) * 0.999999};
        for (size_t j = 0; j < sizeof bad / sizeof bad[0]; j++)
            compile_rc(lim(rated[i], 5, bad[j], 0, 0), SL_ERATE);
        compile_rc(lim(rated[i], 5, 1e9, 0, 0), SL_OK);
        compile_rc(lim(rated[i], 1, 1.0 / 31622400.0, 0, 0), SL_OK); /* 366 days - 2 ns */
        /* limit * interval > 2^62 */
        compile_rc(lim(rated[i], 1e9, 0.1, 0, 0), SL_ERATE);
        compile_rc(lim(rated[i], 1e9, 1, 0, 0), SL_OK);
        compile_rc(lim(rated[i], 5, 1, 0.0, 0), SL_OK); /* window ignored */
        compile_rc(lim(rated[i], 5, 1, nan, nan), SL_OK);
    }
    /* windows */
    sl_algorithm windowed[] = {SL_FIXED_WINDOW, SL_SLIDING_WINDOW, SL_SLIDING_LOG,
                               SL_CONCURRENCY};
    for (size_t i = 0; i < 4; i++) {
        double bad[] = {0, -1, nan, inf, -inf, 0.000999, 0.0009999999, 366.0 * 86400 + 0.001,
                        1e12};
        for (size_t j = 0; j < sizeof bad / sizeof bad[0]; j++)
            compile_rc(lim(windowed[i], 10, 0, bad[j], 0), SL_EWINDOW);
        compile_rc(lim(windowed[i], 10, 0, 0.001, 0), SL_OK);
        compile_rc(lim(windowed[i], 10, 0, 366.0 * 86400, 0), SL_OK);
        compile_rc(lim(windowed[i], 10, nan, 1, nan), SL_OK); /* rate, cap ignored */
    }
    /* log / concurrency size */
    compile_rc(lim(SL_SLIDING_LOG, 100000, 0, 1, 0), SL_OK);
    compile_rc(lim(SL_SLIDING_LOG, 100001, 0, 1, 0), SL_ELOGSIZE);
    compile_rc(lim(SL_CONCURRENCY, 100000, 0, 1, 0), SL_OK);
    compile_rc(lim(SL_CONCURRENCY, 100001, 0, 1, 0), SL_ELOGSIZE);
    compile_rc(lim(SL_SLIDING_LOG, 1e9, 0, 1, 0), SL_ELOGSIZE);
    compile_rc(lim(SL_FIXED_WINDOW, 1e9, 0, 1, 0), SL_OK);
    compile_rc(lim(SL_SLIDING_WINDOW, 1e9, 0, 1, 0), SL_OK);
    /* burst_reserve */
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, 100), SL_OK);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, 0), SL_OK);
    compile_rc(lim(SL_BURST_RESERVE, 1e9, 1e9, 0, 1e9), SL_OK);
    compile_rc(lim(SL_BURST_RESERVE, 50, 0, 0, 100), SL_ERATE);
    compile_rc(lim(SL_BURST_RESERVE, 50, nan, 0, 100), SL_ERATE);
    compile_rc(lim(SL_BURST_RESERVE, 50, 2e9, 0, 100), SL_ERATE);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, -1), SL_ECAPACITY);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, 1.5), SL_ECAPACITY);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, nan), SL_ECAPACITY);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, inf), SL_ECAPACITY);
    compile_rc(lim(SL_BURST_RESERVE, 50, 1, 0, 1e9 + 1), SL_ECAPACITY);
    compile_rc(lim(SL_BURST_RESERVE, 50, 0.001, 0, 1e9), SL_ERATE); /* cap*rint > 2^62 */
    compile_rc(lim(SL_BURST_RESERVE, 0, 1, 0, 100), SL_ECAPACITY);
    /* first bad field wins, in the documented order */
    compile_rc(lim((sl_algorithm)9, 0, 0, 0, 0), SL_EALGORITHM);
    compile_rc(lim(SL_SLIDING_LOG, 0.5, 0, 0, 0), SL_ECAPACITY);
    compile_rc(lim(SL_SLIDING_LOG, 200000, 0, 0, 0), SL_ELOGSIZE);
    compile_rc(lim(SL_TOKEN_BUCKET, 0, 0, 0, 0), SL_ECAPACITY);
    /* NULL */
    sl_climit c;
    assert_int_equal(sl_climit_compile(NULL, &c), SL_EINVAL);
}

static void test_compile_values(void **st)
{
    (void)st;
    struct {
        double rate;
        int64_t interval;
    } r[] = {
        {3, 333333334},          {7, 142857143},      {10000, 100000},  {1e9, 1},
        {2.5, 400000000},        {0.1, 10000000000},  {1, 1000000000},
        /* These doubles fall a hair below the intended rate; the quotient lands within
         * 2^-50 above a whole ns and is taken as that (not whole + 1 ns). */
        {1.0 / 3, 3000000000},   {1.0 / 60, 60000000000}, {1.0 / 86400, 86400000000000},
        {30.0 / 60, 2000000000},
        /* Exact whole quotients of 2^50 ns and more stay exact: the snapping above must not
         * take them 1 ns short (it did: 2^50 - 1, over-admitting). */
        {0x1.dcd65p-21 /* 1e9 / 2^50 */, INT64_C(1125899906842624)},
        {0x1.dcd65p-22 /* 1e9 / 2^51 */, INT64_C(2251799813685248)},
    };
    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++) {
        sl_limit l = lim(SL_TOKEN_BUCKET, 2, r[i].rate, 0, 0);
        sl_climit c;
        assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
        assert_int_equal(c.interval, r[i].interval);
        assert_int_equal(c.tau, 2 * r[i].interval);
        assert_int_equal(c.limit, 2);
        assert_int_equal(c.state_size, 16);
    }
    struct {
        double w;
        int64_t ns;
    } w[] = {{0.001, 1000000}, {0.1, 100000000}, {1.5, 1500000000}, {3600, 3600 * S},
             {0.0123456789, 12345679}, {366.0 * 86400, 366 * DAY}};
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) {
        sl_limit l = lim(SL_FIXED_WINDOW, 2, 0, w[i].w, 0);
        sl_climit c;
        assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
        assert_int_equal(c.window, w[i].ns);
    }
    sl_climit c;
    sl_limit l = lim(SL_SLIDING_WINDOW, 5, 0, 1, 0);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.state_size, 16);
    l = lim(SL_SLIDING_LOG, 100, 0, 1, 0);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.state_size, 16 + 8 * 100);
    l = lim(SL_LEAKY_BUCKET, 5, 1, 0, 0);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.state_size, 16);
    l = lim(SL_BURST_RESERVE, 50, 1, 0, 100);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.state_size, 24);
    assert_int_equal(c.limit, 50);
    assert_int_equal(c.interval, 20000000);
    assert_int_equal(c.tau, S);
    assert_int_equal(c.rinterval, S);
    assert_int_equal(c.rcap, 100);
    assert_int_equal(c.rtau, 100 * S);
    l = lim(SL_BURST_RESERVE, 3, 1, 0, 0);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.interval, 333333334);
    l = lim(SL_CONCURRENCY, 7, 0, 30, 0);
    assert_int_equal(sl_climit_compile(&l, &c), SL_OK);
    assert_int_equal(c.window, 30 * S);
    assert_int_equal(c.state_size % 8, 0);
    assert_true(c.state_size >= 7 * 24);
}

static void test_names(void **st)
{
    (void)st;
    const char *names[] = {NULL,           "token_bucket", "leaky_bucket", "fixed_window",
                           "sliding_window", "sliding_log", "burst_reserve", "concurrency"};
    for (int a = 1; a <= 7; a++) {
        assert_string_equal(sl_algorithm_name((sl_algorithm)a), names[a]);
        sl_algorithm out = 0;
        assert_int_equal(sl_algorithm_parse(names[a], strlen(names[a]), &out), SL_OK);
        assert_int_equal(out, a);
    }
    assert_string_equal(sl_algorithm_name((sl_algorithm)0), "unknown");
    assert_string_equal(sl_algorithm_name((sl_algorithm)8), "unknown");
    sl_algorithm out = SL_CONCURRENCY;
    assert_int_equal(sl_algorithm_parse("Token_Bucket", 12, &out), SL_OK);
    assert_int_equal(out, SL_TOKEN_BUCKET);
    out = SL_CONCURRENCY;
    assert_int_equal(sl_algorithm_parse("token_bucketX", 13, &out), SL_EALGORITHM);
    assert_int_equal(sl_algorithm_parse("token_bucketX", 12, &out), SL_OK); /* len counts */
    assert_int_equal(out, SL_TOKEN_BUCKET);
    assert_int_equal(sl_algorithm_parse("token_bucke", 11, &out), SL_EALGORITHM);
    assert_int_equal(sl_algorithm_parse("", 0, &out), SL_EALGORITHM);
    assert_int_equal(sl_algorithm_parse("gcra", 4, &out), SL_EALGORITHM);
    assert_int_equal(sl_algorithm_parse("token_bucket\0", 13, &out), SL_EALGORITHM);
    assert_int_equal(sl_algorithm_parse(NULL, 3, &out), SL_EINVAL);
    assert_int_equal(sl_algorithm_parse("concurrency", 11, NULL), SL_EINVAL);
}

/* ---- token bucket ------------------------------------------------------------------------ */

/* Capacity 2, rate 3/s: T = 333333334 ns. The exact ns a token reappears. */
static void test_tb_fractional_refill(void **st)
{
    (void)st;
    const int64_t T = 333333334, t0 = 1000 * S;
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 2, 3, 0, 0), t0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0);
    sl_check ck = take(&k, 1, t0);
    EXPECT(ck, 1, 1, T, 0);
    assert_true(ck.tokens == 1.0);
    TAKE(k, 1, t0, 1, 0, 2 * T, 0);
    ck = take(&k, 1, t0);
    EXPECT(ck, 0, 0, 2 * T, T);
    assert_true(ck.tokens == 0.0);
    assert_int_equal(ck.delay, 0);
    TAKE(k, 1, t0 + T - 1, 0, 0, T + 1, 1); /* one ns early */
    ck = take(&k, 0, t0 + T - 1);            /* peek: 0 whole, almost one */
    EXPECT(ck, 1, 0, T + 1, 0);
    assert_true(ck.tokens == (double)(T - 1) / (double)T);
    TAKE(k, 1, t0 + T, 1, 0, 2 * T, 0); /* exactly when it appears */
    TAKE(k, 1, t0 + T, 0, 0, 2 * T, T);
    /* half a token: 1.5 T later there is 1.5 tokens */
    ck = take(&k, 0, t0 + T + 3 * T / 2);
    EXPECT(ck, 1, 1, T / 2, 0);
    assert_true(ck.tokens == 1.5);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0 + 3 * T);
    TAKE(k, 2, t0 + T + 3 * T / 2, 0, 1, T / 2, T / 2); /* cost 2 with 1.5: wait 0.5 T */
    TAKE(k, 2, t0 + 3 * T - 1, 0, 1, 1, 1);
    TAKE(k, 2, t0 + 3 * T, 1, 0, 2 * T, 0);
    key_free(&k);
}

static void test_tb_cost_and_peek(void **st)
{
    (void)st;
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 5, 1, 0, 0), 0);
    TAKE(k, 0, 0, 1, 5, 0, 0); /* peek on a full bucket */
    TAKE(k, 0, 0, 1, 5, 0, 0); /* and nothing consumed */
    TAKE(k, 5, 0, 1, 0, 5 * S, 0);
    TAKE(k, 0, 0, 1, 0, 5 * S, 0); /* peek on an empty bucket is still allowed */
    TAKE(k, 3, 2 * S, 0, 2, 3 * S, S); /* 2 left, want 3 */
    TAKE(k, 3, 2 * S, 0, 2, 3 * S, S); /* nothing consumed by the denial */
    TAKE(k, 2, 2 * S, 1, 0, 5 * S, 0);
    TAKE(k, 5, 2 * S, 0, 0, 5 * S, 5 * S);
    TAKE(k, 5, 7 * S, 1, 0, 5 * S, 0);
    /* a cost above the limit never passes (the limiter rejects it first) */
    sl_check ck;
    sl_algo_check(&k.c, k.st, 6, 100 * S, &ck);
    assert_int_equal(ck.allowed, 0);
    assert_int_equal(ck.remaining, 5);
    assert_int_equal(ck.retry_after, INT64_MAX);
    sl_algo_commit(&k.c, k.st, 6, 100 * S, &ck, 0); /* misuse: consumes nothing */
    TAKE(k, 5, 100 * S, 1, 0, 5 * S, 0);
    key_free(&k);
}

static void test_tb_time_backwards(void **st)
{
    (void)st;
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 2, 1, 0, 0), 10 * S);
    TAKE(k, 1, 10 * S, 1, 1, S, 0);
    /* 1 s earlier: counts as 10 s — no drain (still one token), no refill */
    TAKE(k, 1, 9 * S, 1, 0, 2 * S, 0);
    TAKE(k, 1, 5 * S, 0, 0, 2 * S, S); /* times relative to now' = 10 s */
    TAKE(k, 1, 0, 0, 0, 2 * S, S);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), 12 * S);
    /* forwards again: exactly as if the backwards requests had happened at 10 s */
    TAKE(k, 1, 11 * S - 1, 0, 0, S + 1, 1);
    TAKE(k, 1, 11 * S, 1, 0, 2 * S, 0);
    /* a denial at a later time advances `last`: earlier times then count as that time */
    TAKE(k, 1, 11 * S + 500 * MS, 0, 0, 3 * S / 2, S / 2);
    TAKE(k, 1, 11 * S, 0, 0, 3 * S / 2, S / 2);
    TAKE(k, 1, 12 * S, 1, 0, 2 * S, 0);
    key_free(&k);
}

static void test_tb_idle_days(void **st)
{
    (void)st;
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    TAKE(k, 10, 0, 1, 0, 10 * S, 0);
    TAKE(k, 1, 5 * DAY, 1, 9, S, 0); /* full again, never more than full */
    TAKE(k, 10, 5 * DAY, 0, 9, S, S);
    /* far in the future (< 2^62) */
    const int64_t far = (INT64_C(1) << 62) - 1;
    TAKE(k, 10, far, 1, 0, 10 * S, 0);
    TAKE(k, 1, far, 0, 0, 10 * S, S);
    key_free(&k);
    /* the largest tau at the largest time: no overflow */
    tkey b = key_new(lim(SL_TOKEN_BUCKET, 1e9, 1, 0, 0), far - 1);
    TAKE(b, 1000000000, far, 1, 0, INT64_C(1000000000) * S, 0);
    TAKE(b, 1, far, 0, 0, INT64_C(1000000000) * S, S);
    assert_int_equal(sl_algo_full_at(&b.c, b.st), far + INT64_C(1000000000) * S);
    key_free(&b);
}

/* 10,000/s: T = 100 us exactly. */
static void test_tb_10k(void **st)
{
    (void)st;
    const int64_t T = 100 * US, t0 = 3 * S;
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 10000, 10000, 0, 0), t0);
    assert_int_equal(k.c.interval, T);
    int passed = 0;
    for (int i = 0; i < 10001; i++)
        passed += take(&k, 1, t0).allowed;
    assert_int_equal(passed, 10000);
    TAKE(k, 1, t0, 0, 0, 10000 * T, T);
    /* from empty, one take every 100 us passes, exactly on time; a second one does not */
    for (int64_t i = 1; i <= 10000; i++) {
        TAKE(k, 1, t0 + i * T - 1, 0, 0, 10000 * T - T + 1, 1);
        TAKE(k, 1, t0 + i * T, 1, 0, 10000 * T, 0);
        TAKE(k, 1, t0 + i * T, 0, 0, 10000 * T, T);
    }
    key_free(&k);
    /* a full bucket with takes spaced 100 us: all 10,000 pass, credit never runs low */
    tkey f = key_new(lim(SL_TOKEN_BUCKET, 10000, 10000, 0, 0), 0);
    for (int64_t i = 0; i < 10000; i++)
        TAKE(f, 1, i * T, 1, 9999, T, 0);
    key_free(&f);
}

/* Contract: admitted over any interval of length D starting full <= C + floor(D / T). */
static void test_tb_contract(void **st)
{
    (void)st;
    const int64_t T = 333333334; /* 3/s */
    tkey k = key_new(lim(SL_TOKEN_BUCKET, 4, 3, 0, 0), 0);
    int64_t admitted = 0;
    for (int64_t t = 0; t <= 10 * S; t += 1 * MS) {
        while (take(&k, 1, t).allowed)
            admitted++;
        assert_true(admitted <= 4 + t / T);
        assert_true(admitted >= 4 + t / T); /* and greedy takes get exactly that */
    }
    key_free(&k);
}

/* ---- leaky bucket ------------------------------------------------------------------------ */

static void test_leaky(void **st)
{
    (void)st;
    const int64_t T = 100 * MS, t0 = 50 * S; /* depth 3, leak 10/s */
    tkey k = key_new(lim(SL_LEAKY_BUCKET, 3, 10, 0, 0), t0);
    sl_check ck = take(&k, 1, t0);
    EXPECT(ck, 1, 2, T, 0);
    assert_int_equal(ck.delay, 0);
    ck = take(&k, 1, t0);
    EXPECT(ck, 1, 1, 2 * T, 0);
    assert_int_equal(ck.delay, T);
    ck = take(&k, 1, t0);
    EXPECT(ck, 1, 0, 3 * T, 0);
    assert_int_equal(ck.delay, 2 * T);
    ck = take(&k, 1, t0); /* queue full */
    EXPECT(ck, 0, 0, 3 * T, T);
    assert_int_equal(ck.delay, 0);
    TAKE(k, 1, t0 + T - 1, 0, 0, 2 * T + 1, 1);
    ck = take(&k, 1, t0 + T);
    EXPECT(ck, 1, 0, 3 * T, 0);
    assert_int_equal(ck.delay, 2 * T); /* proceeds at t0 + 3T: spaced T after the third */
    /* cost 2 with room for 1 at t0 + 2T: wait T more; nothing consumed */
    ck = take(&k, 2, t0 + 2 * T);
    EXPECT(ck, 0, 1, 2 * T, T);
    ck = take(&k, 0, t0 + 2 * T); /* peek: delay of a request now */
    EXPECT(ck, 1, 1, 2 * T, 0);
    assert_int_equal(ck.delay, 2 * T);
    ck = take(&k, 2, t0 + 3 * T);
    EXPECT(ck, 1, 0, 3 * T, 0);
    assert_int_equal(ck.delay, T);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0 + 6 * T);
    /* backwards: no drain */
    ck = take(&k, 1, t0);
    EXPECT(ck, 0, 0, 3 * T, T);
    /* drained after idling */
    ck = take(&k, 1, t0 + 6 * T);
    EXPECT(ck, 1, 2, T, 0);
    assert_int_equal(ck.delay, 0);
    key_free(&k);
}

/* Admitted requests proceed (now + delay) spaced at least T per unit apart. */
static void test_leaky_output_rate(void **st)
{
    (void)st;
    const int64_t T = 142857143; /* 7/s */
    tkey k = key_new(lim(SL_LEAKY_BUCKET, 5, 7, 0, 0), 0);
    int64_t prev_go = -1;
    uint64_t prev_cost = 0, ok = 0;
    srand(7);
    for (int64_t t = 0; t < 20 * S; t += rand() % (200 * MS)) {
        uint64_t cost = 1 + (uint64_t)(rand() % 2);
        sl_check ck = take(&k, cost, t);
        if (!ck.allowed)
            continue;
        int64_t go = t + ck.delay;
        if (prev_go >= 0)
            assert_true(go - prev_go >= (int64_t)prev_cost * T);
        prev_go = go;
        prev_cost = cost;
        ok++;
    }
    assert_true(ok > 50);
    key_free(&k);
}

/* ---- fixed window ------------------------------------------------------------------------ */

static void test_fixed_window_edges(void **st)
{
    (void)st;
    const int64_t W = HOUR, start = 7 * HOUR;
    tkey k = key_new(lim(SL_FIXED_WINDOW, 3, 0, 3600, 0), start - 5);
    TAKE(k, 0, start - 5, 1, 3, 0, 0);
    TAKE(k, 3, start - 1, 1, 0, 1, 0);  /* last ns of the previous window */
    TAKE(k, 1, start - 1, 0, 0, 1, 1);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), start);
    TAKE(k, 1, start, 1, 2, W, 0); /* a new window */
    TAKE(k, 3, start + 10, 0, 2, W - 10, W - 10); /* too much: nothing consumed */
    TAKE(k, 2, start + W - 1, 1, 0, 1, 0);
    TAKE(k, 1, start + W - 1, 0, 0, 1, 1);
    TAKE(k, 0, start + W - 1, 1, 0, 1, 0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), start + W);
    TAKE(k, 0, start + W, 1, 3, 0, 0);
    TAKE(k, 3, start + W, 1, 0, W, 0);
    /* backwards into the previous window: counts as the latest time (this window) */
    TAKE(k, 1, start + 5, 0, 0, W, W);
    TAKE(k, 0, start, 1, 0, W, 0);
    TAKE(k, 1, start + 2 * W, 1, 2, W, 0);
    /* two windows skipped */
    TAKE(k, 1, start + 5 * W + 17, 1, 2, W - 17, 0);
    key_free(&k);
}

static void test_fixed_window_day(void **st)
{
    (void)st;
    const int64_t W = DAY, t0 = 19000 * DAY + 13 * HOUR; /* aligned to UTC days */
    tkey k = key_new(lim(SL_FIXED_WINDOW, 1000, 0, 86400, 0), t0);
    for (int i = 0; i < 1000; i++)
        TAKE(k, 1, t0 + i * S, 1, 999 - i, 11 * HOUR - i * S, 0);
    TAKE(k, 1, t0 + 1000 * S, 0, 0, 11 * HOUR - 1000 * S, 11 * HOUR - 1000 * S);
    TAKE(k, 1, 19001 * DAY - 1, 0, 0, 1, 1);
    TAKE(k, 1000, 19001 * DAY, 1, 0, W, 0);
    /* idle for 30 days */
    TAKE(k, 1, 19031 * DAY + 1, 1, 999, W - 1, 0);
    key_free(&k);
}

/* ---- sliding window ---------------------------------------------------------------------- */

static void test_sliding_window(void **st)
{
    (void)st;
    const int64_t W = 10 * S, s0 = 100 * S; /* L = 10, W = 10 s, windows at multiples of 10 s */
    tkey k = key_new(lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), s0);
    TAKE(k, 4, s0, 1, 6, 2 * W, 0);
    TAKE(k, 6, s0 + 5 * S, 1, 0, 2 * W - 5 * S, 0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), s0 + 2 * W);
    /* full: the next window starts with prev = 10 at full weight; it fades linearly and a
     * cost-1 request passes when 10*(W-e)/W <= 9, i.e. e >= 1 s */
    TAKE(k, 1, s0 + W - 1, 0, 0, W + 1, S + 1);
    TAKE(k, 1, s0 + W, 0, 0, W, S);
    TAKE(k, 1, s0 + W + S - 1, 0, 0, W - S + 1, 1);
    sl_check ck = take(&k, 0, s0 + W + S - 1); /* peek: 9 - 1e-9 ... left: 0 whole */
    EXPECT(ck, 1, 0, W - S + 1, 0);
    TAKE(k, 1, s0 + W + S, 1, 0, 2 * W - S, 0); /* est 9 + 1 = 10 */
    /* prev = 10, cur = 1: cost 1 needs 10(W-e) + 1W <= 9W -> W - e <= 0.8 W -> e >= 2 s */
    TAKE(k, 1, s0 + W + S, 0, 0, 2 * W - S, S);
    /* weighting: at e = 3 s the estimate is 10*0.7 + 1 = 8 -> 2 left */
    ck = take(&k, 0, s0 + W + 3 * S);
    EXPECT(ck, 1, 2, 2 * W - 3 * S, 0);
    assert_true(ck.tokens == 2.0);
    sl_algo_check(&k.c, k.st, 0, s0 + W + 3 * S + 250 * MS, &ck); /* 10*.675+1 = 7.75 */
    EXPECT(ck, 1, 2, 2 * W - 3 * S - 250 * MS, 0);
    assert_true(fabs(ck.tokens - 2.25) < 1e-12);
    /* cost 3 at e = 3 s: needs 10(W-e) <= 6W -> e >= 4 s */
    TAKE(k, 3, s0 + W + 3 * S, 0, 2, 2 * W - 3 * S, S);
    TAKE(k, 3, s0 + W + 4 * S, 1, 0, 2 * W - 4 * S, 0); /* 6 + 1 + 3 = 10 */
    /* prev = 10, cur = 4, L = 10: cost 5 needs 10(W-e) + 4W <= 5W -> e >= 9 s */
    TAKE(k, 5, s0 + W + 4 * S, 0, 0, 2 * W - 4 * S, 5 * S);
    /* cost 10 needs the estimate at 0: prev' = 4 must fade fully -> 2 windows on */
    TAKE(k, 10, s0 + W + 4 * S, 0, 0, 2 * W - 4 * S, W + 6 * S);
    /* at the next boundary: prev = 4 weighted fully, cur = 0 */
    TAKE(k, 0, s0 + 2 * W, 1, 6, W, 0);
    TAKE(k, 7, s0 + 2 * W, 0, 6, W, 2500 * MS); /* 4(W-e) <= 3W -> e >= 2.5 s */
    TAKE(k, 7, s0 + 2 * W + 2500 * MS - 1, 0, 6, W - 2500 * MS + 1, 1);
    TAKE(k, 7, s0 + 2 * W + 2500 * MS, 1, 0, 2 * W - 2500 * MS, 0);
    /* two windows later: both counts gone */
    TAKE(k, 10, s0 + 4 * W, 1, 0, 2 * W, 0);
    key_free(&k);
}

/* Odd W (not a multiple of the counts): the ceil in retry_after must be exact. */
static void test_sliding_window_retry_ceil(void **st)
{
    (void)st;
    const int64_t W = 7; /* ms: compile rounds 0.007 s to 7,000,000 ns */
    tkey k = key_new(lim(SL_SLIDING_WINDOW, 3, 0, 0.007, 0), 0);
    assert_int_equal(k.c.window, W * MS);
    TAKE(k, 3, 0, 1, 0, 2 * W * MS, 0);
    /* next window: prev = 3. cost 1 passes when 3(W - e) <= 2W: W - e <= floor(14e6/3) =
     * 4666666 -> e >= 2333334 */
    const int64_t w = W * MS;
    TAKE(k, 1, w, 0, 0, w, 2333334);
    TAKE(k, 1, w + 2333333, 0, 0, w - 2333333, 1);
    TAKE(k, 1, w + 2333334, 1, 0, 2 * w - 2333334, 0);
    key_free(&k);
}

static void test_sliding_window_backwards_and_bound(void **st)
{
    (void)st;
    tkey k = key_new(lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 0);
    TAKE(k, 10, 10 * S - 1, 1, 0, 2 * 10 * S - (10 * S - 1), 0);
    /* backwards across the window boundary: still the latest time */
    TAKE(k, 1, 5 * S, 0, 0, 10 * S + 1, S + 1);
    /* the 2L bound: 10 units at the very end of a window, then greedy in the next one */
    int admitted = 10;
    for (int64_t t = 10 * S; t < 20 * S - 1; t += 10 * MS)
        while (take(&k, 1, t).allowed)
            admitted++;
    while (take(&k, 1, 20 * S - 2).allowed)
        admitted++;
    /* interval (10s - 1 - W, 20s - 2]: the 10 at 10s-1 plus the window's 9 */
    assert_int_equal(admitted, 19);
    key_free(&k);
}

/* ---- sliding log ------------------------------------------------------------------------- */

static void test_sliding_log(void **st)
{
    (void)st;
    const int64_t W = S, t0 = 1000 * S;
    tkey k = key_new(lim(SL_SLIDING_LOG, 3, 0, 1, 0), t0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0);
    TAKE(k, 0, t0, 1, 3, 0, 0);
    TAKE(k, 1, t0, 1, 2, W, 0);
    TAKE(k, 1, t0 + 200 * MS, 1, 1, W, 0);
    TAKE(k, 1, t0 + 500 * MS, 1, 0, W, 0);
    TAKE(k, 1, t0 + 600 * MS, 0, 0, 900 * MS, 400 * MS);
    TAKE(k, 2, t0 + 600 * MS, 0, 0, 900 * MS, 600 * MS); /* two oldest: t0, t0+200ms */
    TAKE(k, 3, t0 + 600 * MS, 0, 0, 900 * MS, 900 * MS);
    TAKE(k, 0, t0 + 600 * MS, 1, 0, 900 * MS, 0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0 + 1500 * MS);
    TAKE(k, 1, t0 + W - 1, 0, 0, 500 * MS + 1, 1);
    TAKE(k, 1, t0 + W, 1, 0, W, 0); /* t0 no longer in (t0, t0 + W] */
    /* backwards: counts at the latest time */
    TAKE(k, 1, t0, 0, 0, W, 200 * MS);
    /* cost larger than left (t0+200ms no longer counts): nothing consumed */
    TAKE(k, 2, t0 + 1200 * MS, 0, 1, 800 * MS, 300 * MS);
    TAKE(k, 1, t0 + 1200 * MS, 1, 0, W, 0);
    TAKE(k, 1, t0 + 1200 * MS, 0, 0, W, 300 * MS);
    TAKE(k, 3, t0 + 2200 * MS - 1, 0, 2, 1, 1);
    TAKE(k, 3, t0 + 2200 * MS, 1, 0, W, 0);
    /* idle for days */
    TAKE(k, 0, t0 + 3 * DAY, 1, 3, 0, 0);
    TAKE(k, 2, t0 + 3 * DAY, 1, 1, W, 0);
    key_free(&k);
}

/* Exactly <= L in every interval (t - W, t], ring wrap-around included. */
static void test_sliding_log_exact(void **st)
{
    (void)st;
    const int64_t W = 24 * HOUR;
    tkey k = key_new(lim(SL_SLIDING_LOG, 5, 0, 86400, 0), 0);
    int64_t ts[4000];
    int n = 0;
    for (int64_t t = 0; t < 10 * W && n < 4000; t += 37 * 60 * S + 11) {
        uint64_t cost = (uint64_t)(t / S) % 3;
        sl_check ck = take(&k, cost, t);
        int live = 0;
        for (int i = 0; i < n; i++)
            live += ts[i] > t - W;
        assert_int_equal(ck.allowed, live + (int)cost <= 5);
        if (ck.allowed)
            for (uint64_t c = 0; c < cost; c++)
                ts[n++] = t;
    }
    key_free(&k);
}

/* ---- burst reserve ----------------------------------------------------------------------- */

/* The default: base 50/s, reserve +1/s up to 100. */
static void test_burst_reserve(void **st)
{
    (void)st;
    const int64_t T = 20 * MS, t0 = 10 * S;
    tkey k = key_new(lim(SL_BURST_RESERVE, 50, 1, 0, 100), t0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), INT64_MAX);
    sl_check ck = take(&k, 0, t0);
    EXPECT(ck, 1, 50, 0, 0);
    assert_true(ck.reserve == 0.0);
    for (int i = 0; i < 50; i++) {
        ck = take(&k, 1, t0);
        EXPECT(ck, 1, 49 - i, (i + 1) * T, 0);
        assert_int_equal(ck.via_reserve, 0);
        assert_true(ck.reserve == 0.0);
    }
    ck = take(&k, 1, t0); /* base empty, reserve 0: base refills first (20 ms < 1 s) */
    EXPECT(ck, 0, 0, 50 * T, T);
    assert_int_equal(ck.via_reserve, 0);
    ck = take(&k, 0, t0 + 500 * MS); /* reserve 0.5, base 25 */
    EXPECT(ck, 1, 25, 25 * T, 0);
    assert_true(ck.reserve == 0.5);
    /* one second later: base full again, reserve exactly 1 */
    ck = take(&k, 0, t0 + S);
    EXPECT(ck, 1, 51, 0, 0);
    assert_true(ck.reserve == 1.0);
    for (int i = 0; i < 50; i++) {
        ck = take(&k, 1, t0 + S);
        EXPECT(ck, 1, 49 - i + 1, (i + 1) * T, 0);
        assert_int_equal(ck.via_reserve, 0);
        assert_true(ck.reserve == 1.0); /* untouched while the base serves */
    }
    ck = take(&k, 1, t0 + S); /* base exhausted: served by the reserve */
    EXPECT(ck, 1, 0, 50 * T, 0);
    assert_int_equal(ck.via_reserve, 1);
    assert_true(ck.reserve == 0.0);
    ck = take(&k, 1, t0 + S); /* both exhausted */
    EXPECT(ck, 0, 0, 50 * T, T);
    /* cost 30 at t0 + S + 500 ms: base 25, reserve 0.5: base wait 5 T, reserve wait 29.5 s */
    ck = take(&k, 30, t0 + S + 500 * MS);
    EXPECT(ck, 0, 25, 25 * T, 5 * T);
    /* reserve grows +1/s up to the cap: 100 s later it is full (100), never more */
    ck = take(&k, 0, t0 + S + 99 * S);
    EXPECT(ck, 1, 50 + 99, 0, 0);
    assert_true(ck.reserve == 99.0);
    ck = take(&k, 0, t0 + S + 100 * S);
    EXPECT(ck, 1, 150, 0, 0);
    assert_true(ck.reserve == 100.0);
    const int64_t t1 = t0 + S + 5 * DAY;
    ck = take(&k, 0, t1);
    EXPECT(ck, 1, 150, 0, 0);
    assert_true(ck.reserve == 100.0);
    /* base 50 first, then 100 from the reserve, then denied */
    for (int i = 0; i < 50; i++)
        assert_int_equal(take(&k, 1, t1).via_reserve, 0);
    for (int i = 0; i < 100; i++) {
        ck = take(&k, 1, t1);
        EXPECT(ck, 1, 99 - i, 50 * T, 0);
        assert_int_equal(ck.via_reserve, 1);
        assert_true(ck.reserve == 99.0 - i);
    }
    EXPECT(take(&k, 1, t1), 0, 0, 50 * T, T);
    /* a request larger than the base's remainder is served wholly by the reserve */
    const int64_t t2 = t1 + 10 * S; /* base full (50), reserve 10 */
    TAKE(k, 45, t2, 1, 5 + 10, 45 * T, 0);
    ck = take(&k, 8, t2); /* base 5 < 8: reserve 10 serves it, base stays 5 */
    EXPECT(ck, 1, 5 + 2, 45 * T, 0);
    assert_int_equal(ck.via_reserve, 1);
    assert_true(ck.tokens == 5.0 && ck.reserve == 2.0);
    ck = take(&k, 8, t2); /* base 5, reserve 2: base needs 3 T, reserve 6 s */
    EXPECT(ck, 0, 7, 45 * T, 3 * T);
    /* backwards in time: no refill of either */
    ck = take(&k, 0, t0);
    EXPECT(ck, 1, 7, 45 * T, 0);
    assert_true(ck.reserve == 2.0);
    key_free(&k);
}

static void test_burst_reserve_no_reserve(void **st)
{
    (void)st;
    tkey k = key_new(lim(SL_BURST_RESERVE, 2, 1, 0, 0), 0); /* cap 0: never a reserve */
    TAKE(k, 2, 0, 1, 0, S, 0);
    sl_check ck = take(&k, 1, 100 * S - 1); /* base full again */
    EXPECT(ck, 1, 1, S / 2, 0);
    assert_true(ck.reserve == 0.0);
    TAKE(k, 1, 100 * S - 1, 1, 0, S, 0);
    TAKE(k, 1, 100 * S - 1, 0, 0, S, S / 2);
    /* reserve cap below the cost: only the base can serve */
    tkey r = key_new(lim(SL_BURST_RESERVE, 4, 1, 0, 2), 0);
    TAKE(r, 4, 100 * S, 1, 2, S, 0);
    TAKE(r, 3, 100 * S, 0, 2, S, 750 * MS);
    TAKE(r, 2, 100 * S, 1, 0, S, 0); /* via reserve */
    key_free(&k);
    key_free(&r);
    /* a reserve refilling faster than the base: the retry is the reserve's (0.1 s < 1 s) */
    tkey f = key_new(lim(SL_BURST_RESERVE, 1, 10, 0, 5), 0);
    TAKE(f, 1, 0, 1, 0, S, 0);
    sl_check ck2 = take(&f, 1, 0);
    EXPECT(ck2, 0, 0, S, 100 * MS);
    ck2 = take(&f, 1, 100 * MS);
    EXPECT(ck2, 1, 0, 900 * MS, 0);
    assert_int_equal(ck2.via_reserve, 1);
    TAKE(f, 1, 150 * MS, 0, 0, 850 * MS, 50 * MS);
    key_free(&f);
}

/* ---- concurrency ------------------------------------------------------------------------- */

static sl_check acquire(tkey *k, uint64_t cost, int64_t now, uint64_t id)
{
    return take_lease(k, cost, now, id);
}

static void test_concurrency(void **st)
{
    (void)st;
    const int64_t TTL = 30 * S, t0 = 77 * S;
    tkey k = key_new(lim(SL_CONCURRENCY, 3, 0, 30, 0), t0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0);
    EXPECT(acquire(&k, 0, t0, 0), 1, 3, 0, 0);
    EXPECT(acquire(&k, 1, t0, 1), 1, 2, TTL, 0);
    EXPECT(acquire(&k, 1, t0 + S, 2), 1, 1, TTL, 0);
    EXPECT(acquire(&k, 1, t0 + 2 * S, 3), 1, 0, TTL, 0);
    assert_int_equal(sl_algo_full_at(&k.c, k.st), t0 + 2 * S + TTL);
    /* full: lease 1 expires at t0 + 30 s */
    EXPECT(acquire(&k, 1, t0 + 3 * S, 4), 0, 0, TTL - S, TTL - 3 * S);
    EXPECT(acquire(&k, 2, t0 + 3 * S, 4), 0, 0, TTL - S, TTL - 2 * S); /* 1 and 2 */
    EXPECT(acquire(&k, 3, t0 + 3 * S, 4), 0, 0, TTL - S, TTL - S);
    /* release frees */
    assert_int_equal(sl_algo_release(&k.c, k.st, 2, t0 + 4 * S), SL_OK);
    assert_int_equal(sl_algo_release(&k.c, k.st, 2, t0 + 4 * S), SL_ELEASE);
    assert_int_equal(sl_algo_release(&k.c, k.st, 99, t0 + 4 * S), SL_ELEASE);
    assert_int_equal(sl_algo_release(&k.c, k.st, 0, t0 + 4 * S), SL_ELEASE);
    EXPECT(acquire(&k, 0, t0 + 4 * S, 0), 1, 1, TTL - 2 * S, 0);
    EXPECT(acquire(&k, 2, t0 + 4 * S, 5), 0, 1, TTL - 2 * S, TTL - 4 * S);
    EXPECT(acquire(&k, 1, t0 + 4 * S, 5), 1, 0, TTL, 0);
    /* expiry frees: lease 1 at t0 + 30 s exactly */
    EXPECT(acquire(&k, 1, t0 + TTL - 1, 6), 0, 0, 4 * S + 1, 1);
    assert_int_equal(sl_algo_release(&k.c, k.st, 1, t0 + TTL), SL_ELEASE); /* expired */
    EXPECT(acquire(&k, 1, t0 + TTL, 6), 1, 0, TTL, 0);
    /* backwards: still at t0 + TTL */
    EXPECT(acquire(&k, 1, t0, 7), 0, 0, TTL, 2 * S);
    assert_int_equal(sl_algo_release(&k.c, k.st, 3, t0), SL_OK);
    /* weighted leases: one lease of 2 */
    EXPECT(acquire(&k, 2, t0 + TTL + S, 8), 0, 1, TTL - S, 4 * S - S);
    EXPECT(acquire(&k, 1, t0 + TTL + S, 8), 1, 0, TTL, 0);
    /* all expire */
    EXPECT(acquire(&k, 0, t0 + 10 * TTL, 0), 1, 3, 0, 0);
    EXPECT(acquire(&k, 3, t0 + 10 * TTL, 9), 1, 0, TTL, 0);
    EXPECT(acquire(&k, 1, t0 + 10 * TTL, 10), 0, 0, TTL, TTL);
    assert_int_equal(sl_algo_release(&k.c, k.st, 9, t0 + 10 * TTL + 1), SL_OK);
    EXPECT(acquire(&k, 3, t0 + 10 * TTL + 1, 11), 1, 0, TTL, 0);
    /* release on another algorithm */
    tkey t = key_new(lim(SL_TOKEN_BUCKET, 3, 1, 0, 0), 0);
    assert_int_equal(sl_algo_release(&t.c, t.st, 1, 0), SL_ELEASE);
    key_free(&t);
    key_free(&k);
}

/* Many leases through the ring, released out of order. */
static void test_concurrency_ring(void **st)
{
    (void)st;
    const int64_t TTL = S;
    tkey k = key_new(lim(SL_CONCURRENCY, 5, 0, 1, 0), 0);
    uint64_t id = 1;
    for (int64_t round = 0; round < 200; round++) {
        int64_t t = round * 2 * TTL;
        for (int i = 0; i < 5; i++)
            EXPECT(acquire(&k, 1, t + i, id + (uint64_t)i), 1, 4 - (uint64_t)i, TTL, 0);
        EXPECT(acquire(&k, 1, t + 5, 999999), 0, 0, TTL - 1, TTL - 5);
        assert_int_equal(sl_algo_release(&k.c, k.st, id + (uint64_t)(round % 5), t + 6), SL_OK);
        EXPECT(acquire(&k, 1, t + 7, id + 5), 1, 0, TTL, 0);
        /* the lease taken at t + 0 (or t + 1 if that one was released) expires first */
        int64_t first = round % 5 == 0 ? 1 : 0;
        EXPECT(acquire(&k, 1, t + 8, 999999), 0, 0, TTL - 1, first + TTL - 8);
        id += 6;
    }
    key_free(&k);
}

/* ---- carry-over -------------------------------------------------------------------------- */

static tkey carried(tkey *old, sl_limit nl, int64_t now)
{
    tkey k;
    memset(&k, 0, sizeof k);
    assert_int_equal(sl_climit_compile(&nl, &k.c), SL_OK);
    k.st = state_alloc(k.c.state_size);
    sl_algo_carry(&old->c, old->st, &k.c, k.st, now);
    return k;
}

static void test_carry_token_bucket(void **st)
{
    (void)st;
    tkey o = key_new(lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    TAKE(o, 3, 0, 1, 7, 3 * S, 0);
    tkey n = carried(&o, lim(SL_TOKEN_BUCKET, 5, 1, 0, 0), 0); /* 7 clamped to 5 */
    TAKE(n, 0, 0, 1, 5, 0, 0);
    key_free(&n);
    n = carried(&o, lim(SL_TOKEN_BUCKET, 20, 1, 0, 0), 0); /* 7 kept, not refilled */
    TAKE(n, 0, 0, 1, 7, 13 * S, 0);
    key_free(&n);
    /* fractional credit kept in units across a rate change: 7.5 units at T = 500 ms */
    n = carried(&o, lim(SL_TOKEN_BUCKET, 10, 2, 0, 0), S / 2);
    sl_check ck = take(&n, 0, S / 2);
    EXPECT(ck, 1, 7, 2500 * MS / 2, 0);
    assert_true(ck.tokens == 7.5);
    key_free(&n);
    /* full under the old limit: full under the new (fresh) */
    n = carried(&o, lim(SL_TOKEN_BUCKET, 20, 1, 0, 0), 3 * S);
    TAKE(n, 0, 3 * S, 1, 20, 0, 0);
    key_free(&n);
    /* backwards `now`: counts as the key's latest time */
    TAKE(o, 1, 10 * S, 1, 9, S, 0);
    n = carried(&o, lim(SL_TOKEN_BUCKET, 20, 1, 0, 0), 0);
    TAKE(n, 0, 0, 1, 9, 11 * S, 0);
    key_free(&n);
    /* same parameters: an exact copy */
    n = carried(&o, lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    assert_memory_equal(n.st, o.st, 16);
    key_free(&n);
    key_free(&o);
    /* leaky: the queue keeps its drain time, so queued requests keep their departures and
     * new ones leave after them */
    tkey l = key_new(lim(SL_LEAKY_BUCKET, 10, 10, 0, 0), 0);
    TAKE(l, 4, 0, 1, 6, 400 * MS, 0);
    n = carried(&l, lim(SL_LEAKY_BUCKET, 8, 10, 0, 0), 0);
    ck = take(&n, 1, 0);
    EXPECT(ck, 1, 3, 500 * MS, 0);
    assert_int_equal(ck.delay, 400 * MS);
    key_free(&n);
    /* a faster leak with a shallower queue (400 ms deep): full until it drains 50 ms */
    n = carried(&l, lim(SL_LEAKY_BUCKET, 8, 20, 0, 0), 0);
    ck = take(&n, 1, 0);
    EXPECT(ck, 0, 0, 400 * MS, 50 * MS);
    ck = take(&n, 1, 50 * MS);
    EXPECT(ck, 1, 0, 400 * MS, 0);
    assert_int_equal(ck.delay, 350 * MS);
    key_free(&n);
    key_free(&l);
    /* a queue deeper than the new policy's (6 s queued, 4 s allowed): retry_after waits for
     * the excess to drain too, and is exact */
    l = key_new(lim(SL_LEAKY_BUCKET, 10, 1, 0, 0), 0);
    TAKE(l, 6, 0, 1, 4, 6 * S, 0);
    n = carried(&l, lim(SL_LEAKY_BUCKET, 4, 1, 0, 0), 0);
    TAKE(n, 1, 0, 0, 0, 6 * S, 3 * S);
    TAKE(n, 1, S, 0, 0, 5 * S, 2 * S);
    TAKE(n, 1, 3 * S - 1, 0, 0, 3 * S + 1, 1);
    ck = take(&n, 1, 3 * S);
    EXPECT(ck, 1, 0, 4 * S, 0);
    assert_int_equal(ck.delay, 3 * S);
    key_free(&n);
    key_free(&l);
}

static void test_carry_windows(void **st)
{
    (void)st;
    const int64_t W = 10 * S;
    tkey o = key_new(lim(SL_FIXED_WINDOW, 10, 0, 10, 0), 0);
    TAKE(o, 3, S, 1, 7, W - S, 0);
    tkey n = carried(&o, lim(SL_FIXED_WINDOW, 5, 0, 10, 0), 2 * S);
    TAKE(n, 0, 2 * S, 1, 5, 0, 0); /* 7 left, clamped to 5: nothing in use */
    TAKE(n, 5, 2 * S, 1, 0, W - 2 * S, 0);
    TAKE(n, 1, 2 * S, 0, 0, W - 2 * S, W - 2 * S);
    key_free(&n);
    n = carried(&o, lim(SL_FIXED_WINDOW, 20, 0, 10, 0), 2 * S);
    TAKE(n, 0, 2 * S, 1, 7, W - 2 * S, 0);
    key_free(&n);
    n = carried(&o, lim(SL_FIXED_WINDOW, 20, 0, 10, 0), W); /* next window: full -> fresh */
    TAKE(n, 0, W, 1, 20, 0, 0);
    key_free(&n);
    n = carried(&o, lim(SL_FIXED_WINDOW, 10, 0, 4, 0), 2 * S); /* new alignment */
    TAKE(n, 0, 2 * S, 1, 7, 2 * S, 0);
    TAKE(n, 10, 4 * S, 1, 0, 4 * S, 0);
    key_free(&n);
    key_free(&o);

    tkey s = key_new(lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 0);
    TAKE(s, 8, 0, 1, 2, 2 * W, 0);
    /* at 15 s: estimate 8 * 0.5 = 4 -> 6 left; new L = 5: 5 left */
    n = carried(&s, lim(SL_SLIDING_WINDOW, 5, 0, 10, 0), 15 * S);
    TAKE(n, 0, 15 * S, 1, 5, 0, 0);
    key_free(&n);
    /* new L = 20: 6 left -> 14 in use in the current window */
    n = carried(&s, lim(SL_SLIDING_WINDOW, 20, 0, 10, 0), 15 * S);
    TAKE(n, 0, 15 * S, 1, 6, 15 * S, 0);
    key_free(&n);
    n = carried(&s, lim(SL_SLIDING_WINDOW, 20, 0, 10, 0), 20 * S); /* faded: fresh */
    TAKE(n, 0, 20 * S, 1, 20, 0, 0);
    key_free(&n);
    key_free(&s);

    /* same parameters (another limit of the policy changed): the state is kept as it is */
    s = key_new(lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 0);
    TAKE(s, 6, 5 * S, 1, 4, 2 * W - 5 * S, 0);
    TAKE(s, 2, 12 * S, 1, 3, 2 * W - 2 * S, 0); /* prev 6, cur 2: est 6*0.8 + 2 = 6.8 */
    n = carried(&s, lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 12 * S);
    assert_memory_equal(n.st, s.st, 16);
    sl_check ck = take(&n, 0, 15 * S); /* 6*0.5 + 2 = 5 */
    EXPECT(ck, 1, 5, 15 * S, 0);
    key_free(&n);
    key_free(&s);

    tkey g = key_new(lim(SL_SLIDING_LOG, 5, 0, 10, 0), 0);
    TAKE(g, 1, 0, 1, 4, W, 0);
    TAKE(g, 2, S, 1, 2, W, 0);
    TAKE(g, 1, 2 * S, 1, 1, W, 0);
    n = carried(&g, lim(SL_SLIDING_LOG, 3, 0, 10, 0), 3 * S); /* keeps S, S, 2S */
    TAKE(n, 0, 3 * S, 1, 0, W - S, 0);
    TAKE(n, 1, 3 * S, 0, 0, W - S, 8 * S);
    key_free(&n);
    n = carried(&g, lim(SL_SLIDING_LOG, 8, 0, 10, 0), 3 * S); /* keeps all 4 */
    TAKE(n, 0, 3 * S, 1, 4, W - S, 0);
    TAKE(n, 5, 3 * S, 0, 4, W - S, 7 * S);
    key_free(&n);
    n = carried(&g, lim(SL_SLIDING_LOG, 8, 0, 1.5, 0), 3 * S); /* only 2S is recent */
    TAKE(n, 0, 3 * S, 1, 7, 500 * MS, 0);
    key_free(&n);
    n = carried(&g, lim(SL_SLIDING_LOG, 8, 0, 10, 0), 20 * S); /* all expired: fresh */
    TAKE(n, 0, 20 * S, 1, 8, 0, 0);
    key_free(&n);
    key_free(&g);
}

/* Another algorithm: the new limit keeps exactly min(whole units the old one leaves, new
 * capacity), built into its own state; a full old limit gives a full new one; concurrency
 * (leases, not units) starts fresh both ways. */
static tkey carried_across(tkey *old, sl_limit nl, int64_t now)
{
    tkey k = carried(old, nl, now);
    uint64_t max_lease = 0;
    assert_true(sl_algo_state_valid(&k.c, k.st, &max_lease)); /* as a snapshot would hold */
    return k;
}

static void test_carry_across_algorithms(void **st)
{
    (void)st;
    const int64_t W = 10 * S;
    /* token bucket: 7.5 units at 500 ms -> 7 (the half unit is dropped, never rounded up) */
    tkey o = key_new(lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    TAKE(o, 3, 0, 1, 7, 3 * S, 0);
    tkey n = carried_across(&o, lim(SL_FIXED_WINDOW, 20, 0, 10, 0), 500 * MS);
    TAKE(n, 0, 500 * MS, 1, 7, W - 500 * MS, 0); /* 13 of 20 used in this window */
    TAKE(n, 7, 500 * MS, 1, 0, W - 500 * MS, 0);
    TAKE(n, 1, 500 * MS, 0, 0, W - 500 * MS, W - 500 * MS);
    key_free(&n);
    /* to a leaky bucket: room for 7, so 3 s of queue ahead of the next request */
    n = carried_across(&o, lim(SL_LEAKY_BUCKET, 10, 1, 0, 0), 500 * MS);
    sl_check ck = take(&n, 1, 500 * MS);
    EXPECT(ck, 1, 6, 4 * S, 0);
    assert_int_equal(ck.delay, 3 * S);
    key_free(&n);
    /* full again (at 3 s): a full window of another capacity */
    n = carried_across(&o, lim(SL_SLIDING_WINDOW, 20, 0, 10, 0), 3 * S);
    TAKE(n, 0, 3 * S, 1, 20, 0, 0);
    key_free(&n);
    key_free(&o);

    /* leaky bucket: its remaining is queue room (4 queued of 10 -> 6) */
    o = key_new(lim(SL_LEAKY_BUCKET, 10, 1, 0, 0), 0);
    TAKE(o, 4, 0, 1, 6, 4 * S, 0);
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 8, 2, 0, 0), 0); /* 6 of 8, 500 ms each */
    TAKE(n, 0, 0, 1, 6, S, 0);
    TAKE(n, 6, 0, 1, 0, 4 * S, 0);
    TAKE(n, 1, 0, 0, 0, 4 * S, 500 * MS);
    key_free(&n);
    key_free(&o);

    /* burst_reserve: remaining counts the reserve (base 0 + reserve 60) */
    o = key_new(lim(SL_BURST_RESERVE, 50, 1, 0, 100), 0);
    TAKE(o, 50, 60 * S, 1, 60, S, 0);
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 100, 1, 0, 0), 60 * S);
    TAKE(n, 0, 60 * S, 1, 60, 40 * S, 0);
    key_free(&n);
    n = carried_across(&o, lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 60 * S); /* clamped: full */
    TAKE(n, 0, 60 * S, 1, 10, 0, 0);
    key_free(&n);
    key_free(&o);
    /* a base full is as full as a new key, whatever the reserve: the new limit is full */
    o = key_new(lim(SL_BURST_RESERVE, 50, 1, 0, 100), 0);
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 200, 1, 0, 0), 0);
    TAKE(n, 0, 0, 1, 200, 0, 0);
    key_free(&n);
    TAKE(o, 1, 0, 1, 49, 20 * MS, 0); /* one unit of the base used: 49, not full */
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 200, 1, 0, 0), 0);
    TAKE(n, 0, 0, 1, 49, 151 * S, 0);
    key_free(&n);
    key_free(&o);

    /* sliding window (estimate 8 * 0.5 = 4 at 15 s: 6 left) to a log: 4 timestamps now */
    o = key_new(lim(SL_SLIDING_WINDOW, 10, 0, 10, 0), 0);
    TAKE(o, 8, 0, 1, 2, 2 * W, 0);
    n = carried_across(&o, lim(SL_SLIDING_LOG, 10, 0, 10, 0), 15 * S);
    TAKE(n, 0, 15 * S, 1, 6, W, 0);
    TAKE(n, 7, 15 * S, 0, 6, W, W);
    TAKE(n, 6, 15 * S, 1, 0, W, 0);
    key_free(&n);
    key_free(&o);

    /* log (2 of 5 left) to burst_reserve: base 2 of 10, reserve 0 */
    o = key_new(lim(SL_SLIDING_LOG, 5, 0, 10, 0), 0);
    TAKE(o, 3, 0, 1, 2, W, 0);
    n = carried_across(&o, lim(SL_BURST_RESERVE, 10, 1, 0, 5), S);
    ck = take(&n, 0, S);
    EXPECT(ck, 1, 2, 800 * MS, 0);
    assert_true(ck.tokens == 2.0 && ck.reserve == 0.0);
    TAKE(n, 2, S, 1, 0, S, 0);
    TAKE(n, 1, S, 0, 0, S, 100 * MS);
    key_free(&n);
    key_free(&o);

    /* an emptied window to a slow bucket: nothing left, not a fresh bucket */
    o = key_new(lim(SL_FIXED_WINDOW, 5, 0, 10, 0), 0);
    TAKE(o, 5, 0, 1, 0, W, 0);
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 5, 1, 0, 0), 0);
    TAKE(n, 1, 0, 0, 0, 5 * S, S);
    key_free(&n);
    key_free(&o);

    /* concurrency: fresh both ways */
    o = key_new(lim(SL_CONCURRENCY, 5, 0, 30, 0), 0);
    acquire(&o, 2, 0, 1);
    n = carried_across(&o, lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    TAKE(n, 0, 0, 1, 10, 0, 0);
    key_free(&n);
    key_free(&o);
    o = key_new(lim(SL_TOKEN_BUCKET, 10, 1, 0, 0), 0);
    TAKE(o, 10, 0, 1, 0, 10 * S, 0);
    n = carried_across(&o, lim(SL_CONCURRENCY, 5, 0, 30, 0), 0);
    TAKE(n, 0, 0, 1, 5, 0, 0);
    key_free(&n);
    key_free(&o);
}

static void test_carry_burst_and_concurrency(void **st)
{
    (void)st;
    tkey o = key_new(lim(SL_BURST_RESERVE, 50, 1, 0, 100), 0);
    TAKE(o, 50, 60 * S, 1, 60, S, 0); /* reserve 60 */
    TAKE(o, 20, 60 * S, 1, 40, S, 0); /* via reserve: 40 left */
    tkey n = carried(&o, lim(SL_BURST_RESERVE, 10, 1, 0, 30), 60 * S);
    sl_check ck = take(&n, 0, 60 * S);
    EXPECT(ck, 1, 0 + 30, S, 0); /* base empty (0 of 10), reserve clamped to 30 */
    assert_true(ck.reserve == 30.0 && ck.tokens == 0.0);
    key_free(&n);
    n = carried(&o, lim(SL_BURST_RESERVE, 10, 2, 0, 100), 60 * S + 500 * MS);
    ck = take(&n, 0, 60 * S + 500 * MS); /* base 25 of 50 -> 10; reserve 40.5 units kept */
    EXPECT(ck, 1, 10 + 40, 0, 0);
    assert_true(ck.reserve == 40.5);
    key_free(&n);
    key_free(&o);

    tkey c = key_new(lim(SL_CONCURRENCY, 5, 0, 30, 0), 0);
    acquire(&c, 2, 0, 1);
    acquire(&c, 1, S, 2);
    acquire(&c, 2, 2 * S, 3);
    n = carried(&c, lim(SL_CONCURRENCY, 4, 0, 30, 0), 3 * S); /* 3 (2), 2 (1), 1 (1 of 2) */
    EXPECT(acquire(&n, 0, 3 * S, 0), 1, 0, 29 * S, 0);
    assert_int_equal(sl_algo_release(&n.c, n.st, 1, 3 * S), SL_OK);
    EXPECT(acquire(&n, 1, 3 * S, 4), 1, 0, 30 * S, 0);
    assert_int_equal(sl_algo_release(&n.c, n.st, 3, 3 * S), SL_OK);
    EXPECT(acquire(&n, 0, 3 * S, 0), 1, 2, 30 * S, 0);
    key_free(&n);
    n = carried(&c, lim(SL_CONCURRENCY, 2, 0, 30, 0), 3 * S); /* only lease 3 */
    assert_int_equal(sl_algo_release(&n.c, n.st, 1, 3 * S), SL_ELEASE);
    assert_int_equal(sl_algo_release(&n.c, n.st, 3, 3 * S), SL_OK);
    EXPECT(acquire(&n, 0, 3 * S, 0), 1, 2, 0, 0);
    key_free(&n);
    n = carried(&c, lim(SL_CONCURRENCY, 10, 0, 5, 0), 3 * S); /* all kept, expiries too */
    EXPECT(acquire(&n, 0, 3 * S, 0), 1, 5, 29 * S, 0);
    EXPECT(acquire(&n, 1, 3 * S, 4), 1, 4, 29 * S, 0); /* latest is still lease 3 */
    EXPECT(acquire(&n, 5, 3 * S, 5), 0, 4, 29 * S, 5 * S); /* lease 4 (8 s) frees 1 */
    EXPECT(acquire(&n, 5, 8 * S, 5), 1, 0, 24 * S, 0);
    key_free(&n);
    n = carried(&c, lim(SL_CONCURRENCY, 10, 0, 30, 0), 40 * S); /* all expired: fresh */
    EXPECT(acquire(&n, 0, 40 * S, 0), 1, 10, 0, 0);
    key_free(&n);
    key_free(&c);
}

/* full_at: the key is then indistinguishable from a fresh one */
static void test_full_at(void **st)
{
    (void)st;
    tkey f = key_new(lim(SL_FIXED_WINDOW, 3, 0, 10, 0), 0);
    assert_int_equal(sl_algo_full_at(&f.c, f.st), 0);
    take(&f, 1, 12 * S);
    assert_int_equal(sl_algo_full_at(&f.c, f.st), 20 * S);
    sl_algo_touch(&f.c, f.st, 25 * S); /* a later window: the count is gone */
    assert_int_equal(sl_algo_full_at(&f.c, f.st), 20 * S);
    key_free(&f);
    tkey s = key_new(lim(SL_SLIDING_WINDOW, 3, 0, 10, 0), 0);
    take(&s, 1, 12 * S);
    assert_int_equal(sl_algo_full_at(&s.c, s.st), 30 * S);
    sl_algo_touch(&s.c, s.st, 25 * S);
    assert_int_equal(sl_algo_full_at(&s.c, s.st), 30 * S);
    sl_algo_touch(&s.c, s.st, 31 * S);
    assert_int_equal(sl_algo_full_at(&s.c, s.st), 30 * S);
    key_free(&s);
    tkey l = key_new(lim(SL_LEAKY_BUCKET, 3, 1, 0, 0), 5 * S);
    take(&l, 2, 5 * S);
    assert_int_equal(sl_algo_full_at(&l.c, l.st), 7 * S);
    key_free(&l);
    tkey g = key_new(lim(SL_SLIDING_LOG, 3, 0, 10, 0), 4 * S);
    take(&g, 1, 5 * S);
    sl_algo_touch(&g.c, g.st, 9 * S);
    assert_int_equal(sl_algo_full_at(&g.c, g.st), 15 * S);
    key_free(&g);
    tkey c = key_new(lim(SL_CONCURRENCY, 3, 0, 10, 0), 4 * S);
    acquire(&c, 1, 5 * S, 1);
    acquire(&c, 1, 6 * S, 2);
    assert_int_equal(sl_algo_full_at(&c.c, c.st), 16 * S);
    assert_int_equal(sl_algo_release(&c.c, c.st, 2, 7 * S), SL_OK);
    assert_int_equal(sl_algo_full_at(&c.c, c.st), 15 * S);
    assert_int_equal(sl_algo_release(&c.c, c.st, 1, 7 * S), SL_OK);
    assert_int_equal(sl_algo_full_at(&c.c, c.st), 7 * S);
    key_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compile_errors),
        cmocka_unit_test(test_compile_values),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_tb_fractional_refill),
        cmocka_unit_test(test_tb_cost_and_peek),
        cmocka_unit_test(test_tb_time_backwards),
        cmocka_unit_test(test_tb_idle_days),
        cmocka_unit_test(test_tb_10k),
        cmocka_unit_test(test_tb_contract),
        cmocka_unit_test(test_leaky),
        cmocka_unit_test(test_leaky_output_rate),
        cmocka_unit_test(test_fixed_window_edges),
        cmocka_unit_test(test_fixed_window_day),
        cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_sliding_window_retry_ceil),
        cmocka_unit_test(test_sliding_window_backwards_and_bound),
        cmocka_unit_test(test_sliding_log),
        cmocka_unit_test(test_sliding_log_exact),
        cmocka_unit_test(test_burst_reserve),
        cmocka_unit_test(test_burst_reserve_no_reserve),
        cmocka_unit_test(test_concurrency),
        cmocka_unit_test(test_concurrency_ring),
        cmocka_unit_test(test_carry_token_bucket),
        cmocka_unit_test(test_carry_windows),
        cmocka_unit_test(test_carry_burst_and_concurrency),
        cmocka_unit_test(test_carry_across_algorithms),
        cmocka_unit_test(test_full_at),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
