/* test_limiter.c — the public API end to end: errors, resolution order, rules, tiers,
 * carry-over on policy change, stacked limits, leases, counters, eviction, reclaim, batch.
 *
 * Compiled twice: as itself (the in-memory store) and by test_redis_limiter.c with
 * SL_TEST_REDIS defined, when every limiter it opens uses the Redis store on a private
 * redis-server (each with a key prefix of its own), so the same semantics are checked
 * against both stores. Tests of what only the in-memory table has (max_keys eviction,
 * reclaiming idle keys) run only there. */
#include <math.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "limiter_int.h"
#include "sluice.h"

#define S SL_SECOND
#define T0 (1000 * S) /* an arbitrary start time */

#ifdef SL_TEST_REDIS
#include "redis_fixture.h"
static redis_fixture g_redis;
#define STORE_KEYS(n) 0 /* keys live in Redis: sl_stats.keys counts the local table */

static int group_setup(void **st)
{
    (void)st;
    return redis_fixture_start(&g_redis, NULL);
}

static int group_teardown(void **st)
{
    (void)st;
    redis_fixture_stop(&g_redis);
    return 0;
}

/* sl_open on the Redis store, keys prefixed "t<n>:" so that limiters never share a key. */
static int store_open(sl_limiter **l, sl_options *o)
{
    static unsigned n;
    char prefix[32];
    snprintf(prefix, sizeof prefix, "t%u:", ++n);
    sl_redis_options ro;
    sl_redis_options_init(&ro);
    ro.servers = g_redis.addr;
    ro.key_prefix = prefix;
    o->redis = &ro;
    int rc = sl_open(l, o); /* copies ro and its strings */
    o->redis = NULL;
    return rc;
}
#else
#define STORE_KEYS(n) (n)
#define group_setup NULL
#define group_teardown NULL
static int store_open(sl_limiter **l, sl_options *o) { return sl_open(l, o); }
#endif

static sl_limiter *open_default(size_t max_keys)
{
    sl_limiter *l = NULL;
    sl_options o;
    sl_options_init(&o);
    o.max_keys = max_keys;
    assert_int_equal(store_open(&l, &o), SL_OK);
    return l;
}

static sl_decision take(sl_limiter *l, const char *t, const char *a, const char *c,
                        uint64_t cost, int64_t now)
{
    sl_key k = SL_KEY(t, a, c);
    sl_decision d;
    assert_int_equal(sl_take(l, &k, cost, now, &d), SL_OK);
    return d;
}

static void test_version_and_errors(void **st)
{
    (void)st;
    assert_int_equal(sl_version(), SLUICE_VERSION_HEX);
    assert_string_equal(sl_version_string(), "0.2.0");
    assert_non_null(strstr(sl_strerror(SL_ECOST), "cost"));
    assert_string_equal(sl_strerror(SL_OK), "success");
    assert_string_equal(sl_strerror(12345), "unknown error");
    assert_string_equal(sl_err_name(SL_EKEYLONG), "SL_EKEYLONG");
    /* every code has its own message */
    for (int a = SL_ETOOMANY; a <= SL_EINVAL; a++)
        for (int b = a + 1; b <= SL_EINVAL; b++)
            assert_string_not_equal(sl_strerror(a), sl_strerror(b));
}

static void test_global_default_token_bucket(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    for (int i = 0; i < 5; i++) {
        sl_decision d = take(l, "t", "a", "c", 1, T0);
        assert_true(d.allowed);
        assert_int_equal(d.limit, 5);
        assert_int_equal(d.remaining, (uint64_t)(4 - i));
        assert_int_equal(d.retry_after, 0);
        assert_int_equal(d.reset_after, (int64_t)(i + 1) * S);
    }
    sl_decision d = take(l, "t", "a", "c", 1, T0);
    assert_false(d.allowed);
    assert_int_equal(d.remaining, 0);
    assert_int_equal(d.retry_after, S);
    assert_int_equal(d.reset_after, 5 * S);
    d = take(l, "t", "a", "c", 1, T0 + S - 1); /* one ns short of the next token */
    assert_false(d.allowed);
    assert_int_equal(d.retry_after, 1);
    d = take(l, "t", "a", "c", 1, T0 + S);
    assert_true(d.allowed);
    sl_policy p;
    assert_int_equal(sl_default_get(l, &p), SL_OK);
    assert_int_equal(p.nlimits, 1);
    assert_int_equal(p.limits[0].algorithm, SL_TOKEN_BUCKET);
    assert_true(p.limits[0].limit == 5 && p.limits[0].rate == 1.0);
    sl_close(l);
}

static void test_invalid_inputs_change_nothing(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_decision d;
    char big[300];
    memset(big, 'x', sizeof big);
    sl_key k = SL_KEY("t", "a", "c");
    assert_int_equal(sl_take(NULL, &k, 1, T0, &d), SL_EINVAL);
    assert_int_equal(sl_take(l, NULL, 1, T0, &d), SL_EINVAL);
    assert_int_equal(sl_take(l, &k, 1, T0, NULL), SL_EINVAL);
    assert_int_equal(sl_take(l, &k, 1, -5, &d), SL_EINVAL);
    sl_key e = SL_KEY("t", "a", "");
    assert_int_equal(sl_take(l, &e, 1, T0, &d), SL_EKEYEMPTY);
    sl_key lc = {"t", 1, "a", 1, big, 256};
    assert_int_equal(sl_take(l, &lc, 1, T0, &d), SL_EKEYLONG);
    lc.client_len = 255; /* the longest allowed id */
    assert_int_equal(sl_take(l, &lc, 1, T0, &d), SL_OK);
    sl_key lt = {big, 256, "a", 1, "c", 1};
    assert_int_equal(sl_take(l, &lt, 1, T0, &d), SL_EKEYLONG);
    sl_key la = {"t", 1, big, 256, "c", 1};
    assert_int_equal(sl_take(l, &la, 1, T0, &d), SL_EKEYLONG);
    /* cost above capacity is an error, not a denial, and consumes nothing */
    assert_int_equal(sl_take(l, &k, 6, T0, &d), SL_ECOST);
    d = take(l, "t", "a", "c", 5, T0);
    assert_true(d.allowed);

    sl_policy bad[] = {
        SL_POLICY_TOKEN_BUCKET(0, 1.0),      SL_POLICY_TOKEN_BUCKET(-1, 1.0),
        SL_POLICY_TOKEN_BUCKET(NAN, 1.0),    SL_POLICY_TOKEN_BUCKET(INFINITY, 1.0),
        SL_POLICY_TOKEN_BUCKET(2.5, 1.0),    SL_POLICY_TOKEN_BUCKET(5, 0),
        SL_POLICY_TOKEN_BUCKET(5, -1),       SL_POLICY_TOKEN_BUCKET(5, NAN),
        SL_POLICY_TOKEN_BUCKET(5, INFINITY), SL_POLICY_WINDOW(SL_FIXED_WINDOW, 5, 0),
        SL_POLICY_WINDOW(SL_SLIDING_WINDOW, 5, NAN),
        SL_POLICY_WINDOW(SL_SLIDING_LOG, 5, INFINITY),
    };
    int want[] = {SL_ECAPACITY, SL_ECAPACITY, SL_ECAPACITY, SL_ECAPACITY, SL_ECAPACITY,
                  SL_ERATE,     SL_ERATE,     SL_ERATE,     SL_ERATE,     SL_EWINDOW,
                  SL_EWINDOW,   SL_EWINDOW};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(sl_policy_validate(&bad[i]), want[i]);
        assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &bad[i]), want[i]);
        assert_int_equal(sl_default_set(l, &bad[i]), want[i]);
        assert_int_equal(sl_tier_set(l, "gold", &bad[i]), want[i]);
    }
    sl_policy unk = SL_POLICY_TOKEN_BUCKET(5, 1);
    unk.limits[0].algorithm = (sl_algorithm)99;
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &unk), SL_EALGORITHM);
    sl_policy none = {0, {{0}}};
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &none), SL_ELIMITS);
    none.nlimits = 5;
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &none), SL_ELIMITS);
    sl_policy good = SL_POLICY_TOKEN_BUCKET(10, 1);
    assert_int_equal(sl_rule_set(l, (sl_scope)9, &k, &good), SL_ESCOPE);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &e, &good), SL_EKEYEMPTY);
    assert_int_equal(sl_tier_assign(l, &k, "nope"), SL_ETIER);
    assert_int_equal(sl_tier_get(l, "nope", &good), SL_ETIER);
    assert_int_equal(sl_tier_del(l, "nope"), SL_ETIER);
    assert_int_equal(sl_rule_del(l, SL_SCOPE_ACTION, &k), SL_ENOTFOUND);

    /* nothing above changed the configuration */
    sl_policy got;
    assert_int_equal(sl_rule_get(l, SL_SCOPE_ACTION, &k, &got), SL_ENOTFOUND);
    assert_int_equal(sl_default_get(l, &got), SL_OK);
    assert_true(got.limits[0].limit == 5);
    sl_close(l);
}

static int count_assign(void *ctx, const sl_key *tc, const char *tier)
{
    (void)tc;
    assert_string_equal(tier, "gold");
    ++*(int *)ctx;
    return 0;
}

/* SL_ECOST answers with what is left (so CL.THROTTLE can answer redis-cell's "limited"), as
 * a take of cost 0 shows it: nothing consumed, no key created, counted nowhere; the capacity
 * that decides is the policy's in effect, a rule's over an inline one. */
static void test_cost_above_capacity_shows_what_is_left(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0); /* token bucket 5, 1/s */
    sl_key k = SL_KEY("t", "a", "c"), fresh = SL_KEY("t", "a", "fresh");
    sl_decision d;
    take(l, "t", "a", "c", 2, T0);
    memset(&d, 0x5a, sizeof d);
    assert_int_equal(sl_take(l, &k, 6, T0, &d), SL_ECOST);
    assert_int_equal(d.err, SL_ECOST);
    assert_false(d.allowed);
    assert_int_equal(d.limit, 5);
    assert_int_equal(d.remaining, 3);
    assert_int_equal(d.reset_after, 2 * S);
    assert_int_equal(d.retry_after, 0); /* no wait helps */
    assert_int_equal(d.lease, 0);
    assert_int_equal(d.delay, 0);
    assert_int_equal(sl_take(l, &k, 6, T0 + S, &d), SL_ECOST); /* refilled, nothing taken */
    assert_int_equal(d.remaining, 4);
    assert_int_equal(d.reset_after, S);
    assert_int_equal(sl_take(l, &fresh, 6, T0, &d), SL_ECOST); /* a new key: full, not kept */
    assert_int_equal(d.remaining, 5);
    assert_int_equal(d.reset_after, 0);
    sl_stats s;
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.allowed, 1);
    assert_int_equal(s.denied, 0);
    assert_int_equal(s.keys, STORE_KEYS(1));
    d = take(l, "t", "a", "c", 4, T0 + S);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 0);

    /* the batch form, beside requests that pass; an inline capacity of 2 gives way to a rule
     * of 10 (CL.THROTTLE's arguments and a rule for tenant "cl") */
    sl_policy two = SL_POLICY_TOKEN_BUCKET(2, 1.0), ten = SL_POLICY_TOKEN_BUCKET(10, 1.0);
    sl_key rk = SL_KEY("r", "a", "c");
    sl_request rq[] = {{.key = fresh, .cost = 6},
                       {.key = fresh, .cost = 1},
                       {.key = rk, .cost = 3, .inline_policy = &two}};
    sl_decision out[3];
    assert_int_equal(sl_take_batch(l, rq, 3, T0, out), SL_OK);
    assert_int_equal(out[0].err, SL_ECOST);
    assert_int_equal(out[0].remaining, 5);
    assert_int_equal(out[0].limit, 5);
    assert_int_equal(out[1].err, SL_OK);
    assert_int_equal(out[1].remaining, 4);
    assert_int_equal(out[2].err, SL_ECOST);
    assert_int_equal(out[2].limit, 2);
    assert_int_equal(out[2].remaining, 2);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_TENANT, &rk, &ten), SL_OK);
    assert_int_equal(sl_take_batch(l, &rq[2], 1, T0, out), SL_OK);
    assert_int_equal(out[0].err, SL_OK);
    assert_true(out[0].allowed);
    assert_int_equal(out[0].limit, 10);
    assert_int_equal(out[0].remaining, 7);
    rq[2].cost = 11;
    assert_int_equal(sl_take_batch(l, &rq[2], 1, T0, out), SL_OK);
    assert_int_equal(out[0].err, SL_ECOST);
    assert_int_equal(out[0].remaining, 7);
    sl_close(l);
}

static void test_resolution_order(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_policy p1 = SL_POLICY_TOKEN_BUCKET(1, 1), p2 = SL_POLICY_TOKEN_BUCKET(2, 1),
              p3 = SL_POLICY_TOKEN_BUCKET(3, 1), p4 = SL_POLICY_TOKEN_BUCKET(4, 1),
              p7 = SL_POLICY_TOKEN_BUCKET(7, 1), p9 = SL_POLICY_TOKEN_BUCKET(9, 1);
    sl_key k = SL_KEY("acme", "login", "alice");
    assert_int_equal(sl_default_set(l, &p1), SL_OK);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_TENANT, &k, &p2), SL_OK);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p3), SL_OK);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &p4), SL_OK);
    assert_int_equal(sl_tier_set(l, "gold", &p7), SL_OK);
    sl_key tc = SL_KEY("other", NULL, "bob");
    assert_int_equal(sl_tier_assign(l, &tc, "gold"), SL_OK);
    sl_key tc2 = SL_KEY("acme", NULL, "bob");
    assert_int_equal(sl_tier_assign(l, &tc2, "gold"), SL_OK);

    assert_int_equal(take(l, "acme", "login", "alice", 1, T0).limit, 4);  /* client override */
    assert_int_equal(take(l, "acme", "login", "carol", 1, T0).limit, 3);  /* tenant+action */
    assert_int_equal(take(l, "acme", "search", "alice", 1, T0).limit, 2); /* tenant default */
    assert_int_equal(take(l, "acme", "search", "bob", 1, T0).limit, 2);   /* beats the tier */
    assert_int_equal(take(l, "other", "x", "bob", 1, T0).limit, 7);       /* tier */
    assert_int_equal(take(l, "other", "x", "carol", 1, T0).limit, 1);     /* global */

    /* inline limits: used only when nothing above matches */
    sl_request r[2] = {{.key = SL_KEY("other", "x", "dave"), .cost = 1, .inline_policy = &p9},
                       {.key = SL_KEY("acme", "y", "dave"), .cost = 1, .inline_policy = &p9}};
    sl_decision d[2];
    assert_int_equal(sl_take_batch(l, r, 2, T0, d), SL_OK);
    assert_int_equal(d[0].err, SL_OK);
    assert_int_equal(d[0].limit, 9);
    assert_int_equal(d[1].limit, 2);

    /* the tier cannot go while assigned; deleting rules falls through to the next level */
    assert_int_equal(sl_tier_del(l, "gold"), SL_ETIERINUSE);
    assert_int_equal(sl_rule_del(l, SL_SCOPE_CLIENT, &k), SL_OK);
    assert_int_equal(take(l, "acme", "login", "alice", 1, T0).limit, 3);
    assert_int_equal(sl_rule_del(l, SL_SCOPE_ACTION, &k), SL_OK);
    assert_int_equal(take(l, "acme", "login", "alice", 1, T0).limit, 2);
    assert_int_equal(sl_rule_del(l, SL_SCOPE_TENANT, &k), SL_OK);
    assert_int_equal(take(l, "acme", "login", "bob", 1, T0).limit, 7);
    char tn[SL_MAX_ID_LEN + 1];
    assert_int_equal(sl_tier_assignment(l, &tc, tn, sizeof tn), SL_OK);
    assert_string_equal(tn, "gold");
    int na = 0;
    assert_int_equal(sl_tier_assignments(l, count_assign, &na), SL_OK);
    assert_int_equal(na, 2);
    assert_int_equal(sl_tier_assignment(l, &tc, tn, SL_MAX_ID_LEN), SL_EINVAL); /* too small */
    assert_int_equal(sl_tier_assign(l, &tc, NULL), SL_OK);
    assert_int_equal(sl_tier_assign(l, &tc2, NULL), SL_OK);
    assert_int_equal(sl_tier_assign(l, &tc2, NULL), SL_ENOTFOUND); /* nothing to remove */
    assert_int_equal(sl_tier_assignment(l, &tc, tn, sizeof tn), SL_ENOTFOUND);
    na = 0;
    assert_int_equal(sl_tier_assignments(l, count_assign, &na), SL_OK);
    assert_int_equal(na, 0);
    assert_int_equal(sl_tier_del(l, "gold"), SL_OK);
    assert_int_equal(take(l, "acme", "login", "bob", 1, T0).limit, 1);
    sl_close(l);
}

static int count_rules(void *ctx, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    int *n = ctx;
    (void)scope, (void)k;
    assert_int_equal(p->nlimits, 1);
    (*n)++;
    return 0;
}

static int count_tiers(void *ctx, const char *name, const sl_policy *p)
{
    (void)p;
    assert_true(strcmp(name, "gold") == 0 || strcmp(name, "free") == 0);
    (*(int *)ctx)++;
    return 0;
}

static void test_rule_get_list_and_default_names(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_policy p = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 10, 60), got;
    sl_key k = SL_KEY("default", "default", "c");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p), SL_OK);
    sl_key k2 = SL_KEY("", "", "c"); /* "default" and "" name the same tenant and action */
    assert_int_equal(sl_rule_get(l, SL_SCOPE_ACTION, &k2, &got), SL_OK);
    assert_int_equal(got.limits[0].algorithm, SL_FIXED_WINDOW);
    assert_true(got.limits[0].limit == 10 && got.limits[0].window == 60);
    assert_int_equal(take(l, NULL, NULL, "c", 1, T0).limit, 10);
    take(l, "default", "default", "c", 9, T0);
    assert_false(take(l, "", "", "c", 1, T0).allowed); /* one key, two spellings */

    sl_key k3 = SL_KEY("t", "a", "z");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k3, &p), SL_OK);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_TENANT, &k3, &p), SL_OK);
    int n = 0;
    assert_int_equal(sl_rule_list(l, count_rules, &n), SL_OK);
    assert_int_equal(n, 3);
    assert_int_equal(sl_tier_set(l, "gold", &p), SL_OK);
    assert_int_equal(sl_tier_set(l, "free", &p), SL_OK);
    assert_int_equal(sl_tier_set(l, "free", &p), SL_OK); /* replace, not add */
    n = 0;
    assert_int_equal(sl_tier_list(l, count_tiers, &n), SL_OK);
    assert_int_equal(n, 2);
    sl_close(l);
}

static void test_policy_change_keeps_tokens(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_key k = SL_KEY("t", "a", "c");
    sl_policy p10 = SL_POLICY_TOKEN_BUCKET(10, 1), p20 = SL_POLICY_TOKEN_BUCKET(20, 1),
              p3 = SL_POLICY_TOKEN_BUCKET(3, 1);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p10), SL_OK);
    assert_int_equal(take(l, "t", "a", "c", 4, T0).remaining, 6);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p20), SL_OK);
    sl_decision d;
    assert_int_equal(sl_peek(l, &k, T0, &d), SL_OK); /* peek sees the carried state ... */
    assert_int_equal(d.remaining, 5);
    d = take(l, "t", "a", "c", 1, T0); /* ... and so does the take: 6 kept, not 20 */
    assert_int_equal(d.limit, 20);
    assert_int_equal(d.remaining, 5);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p3), SL_OK);
    d = take(l, "t", "a", "c", 1, T0); /* 5 clamped to 3 */
    assert_int_equal(d.remaining, 2);
    /* a full key stays full */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p10), SL_OK);
    take(l, "t", "a", "fresh", 1, T0);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &p20), SL_OK);
    assert_int_equal(take(l, "t", "a", "fresh", 1, T0 + 10 * S).remaining, 19);
    /* a leaky bucket's queue deeper than the new policy allows (6 s queued, 4 s deep):
     * denied until the excess has drained too */
    sl_key q = SL_KEY("t", "lq", "c");
    sl_policy l10 = {1, {{SL_LEAKY_BUCKET, 10, 1, 0, 0}}},
              l4 = {1, {{SL_LEAKY_BUCKET, 4, 1, 0, 0}}};
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &q, &l10), SL_OK);
    assert_int_equal(take(l, "t", "lq", "c", 6, T0).allowed, 1);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &q, &l4), SL_OK);
    d = take(l, "t", "lq", "c", 1, T0);
    assert_int_equal(d.allowed, 0);
    assert_int_equal(d.retry_after, 3 * S);
    assert_int_equal(take(l, "t", "lq", "c", 1, T0 + 3 * S - 1).allowed, 0);
    assert_int_equal(take(l, "t", "lq", "c", 1, T0 + 3 * S).allowed, 1);
    /* another algorithm: the 2 units left under the bucket carry over (it used to start
     * anew, with 4) */
    sl_policy w = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 4, 10);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &w), SL_OK);
    assert_int_equal(take(l, "t", "a", "c", 1, T0).remaining, 1);
    sl_close(l);
}

/* A limit of capacity `cap` of algorithm `a`, slow enough that nothing refills within one
 * `now` (windows of an hour; a reserve that refills 1 unit in 1000 s). */
static sl_limit slow_limit(sl_algorithm a, double cap)
{
    switch (a) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        return (sl_limit){a, cap, 0.001, 0, 0};
    case SL_BURST_RESERVE:
        return (sl_limit){a, cap, 0.001, 0, 100};
    default:
        return (sl_limit){a, cap, 0, 3600, 0};
    }
}

/* Under `p` at `now`, the key has exactly `left` units: a peek says so, `left` takes of one
 * pass and the next is denied. */
static void expect_exactly(sl_limiter *l, const char *client, uint64_t cap, uint64_t left,
                           int64_t now, const char *what)
{
    sl_decision d = take(l, "t", "x", client, 0, now);
    if (d.remaining != left || d.limit != cap)
        fail_msg("%s: remaining %llu of %llu, expected %llu of %llu", what,
                 (unsigned long long)d.remaining, (unsigned long long)d.limit,
                 (unsigned long long)left, (unsigned long long)cap);
    for (uint64_t i = 0; i < left; i++) {
        d = take(l, "t", "x", client, 1, now);
        if (!d.allowed || d.remaining != left - 1 - i)
            fail_msg("%s: take %llu: allowed %d remaining %llu", what,
                     (unsigned long long)i, d.allowed, (unsigned long long)d.remaining);
    }
    d = take(l, "t", "x", client, 1, now);
    if (d.allowed)
        fail_msg("%s: take %llu passed", what, (unsigned long long)left);
}

/* A policy change to another algorithm carries the units left over: min(old remaining, new
 * capacity), exactly, for every pair of the six algorithms that count units; a full key
 * stays full. It used to start anew: an emptied token bucket switched to a fixed window
 * passed again at once (found by review). */
static void test_policy_change_across_algorithms(void **st)
{
    (void)st;
    static const sl_algorithm algs[] = {SL_TOKEN_BUCKET,   SL_LEAKY_BUCKET, SL_FIXED_WINDOW,
                                        SL_SLIDING_WINDOW, SL_SLIDING_LOG,  SL_BURST_RESERVE};
    static const struct {
        uint64_t used, cap; /* of the old capacity 10; the new capacity */
    } cases[] = {{4, 8}, {4, 4}, {10, 8}, {9, 12}};
    sl_limiter *l = open_default(0);
    int64_t t = 1000 * 3600 * S; /* a window boundary */
    unsigned n = 0;
    for (size_t ia = 0; ia < 6; ia++) {
        for (size_t ib = 0; ib < 6; ib++) {
            if (ia == ib)
                continue;
            sl_algorithm a = algs[ia], b = algs[ib];
            for (size_t c = 0; c <= sizeof cases / sizeof cases[0]; c++) {
                char client[32], what[96];
                snprintf(client, sizeof client, "c%u", n++);
                sl_key k = SL_KEY("t", "x", client);
                sl_policy po = {1, {slow_limit(a, 10)}};
                assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &po), SL_OK);
                int full = c == sizeof cases / sizeof cases[0];
                uint64_t used = full ? 1 : cases[c].used, cap = full ? 12 : cases[c].cap;
                int64_t now = full ? t + 10 * 86400 * S : t; /* full again by then */
                assert_true(take(l, "t", "x", client, used, t).allowed);
                sl_policy pn = {1, {slow_limit(b, (double)cap)}};
                assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &pn), SL_OK);
                uint64_t left = full ? cap : 10 - used < cap ? 10 - used : cap;
                snprintf(what, sizeof what, "%s -> %s, %llu used of 10, new capacity %llu%s",
                         sl_algorithm_name(a), sl_algorithm_name(b), (unsigned long long)used,
                         (unsigned long long)cap, full ? " (full again)" : "");
                expect_exactly(l, client, cap, left, now, what);
            }
        }
    }
    /* concurrency holds leases, not units: to it and from it the limit starts fresh */
    sl_key k = SL_KEY("t", "x", "cc");
    sl_policy tb = {1, {slow_limit(SL_TOKEN_BUCKET, 10)}};
    sl_policy cc = {1, {{SL_CONCURRENCY, 5, 0, 3600, 0}}};
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &tb), SL_OK);
    assert_true(take(l, "t", "x", "cc", 8, t).allowed);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &cc), SL_OK);
    assert_int_equal(take(l, "t", "x", "cc", 1, t).remaining, 4);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k, &tb), SL_OK);
    assert_int_equal(take(l, "t", "x", "cc", 0, t).remaining, 10);
    /* stacked: a limit whose algorithm the old policy lacks takes the first old limit not
     * matched otherwise; with none left it starts fresh, and a concurrency limit keeps its
     * leases */
    sl_key k2 = SL_KEY("t", "x", "st");
    sl_policy o2 = {2, {{SL_CONCURRENCY, 5, 0, 3600, 0}, slow_limit(SL_TOKEN_BUCKET, 10)}};
    sl_policy n2 = {3,
                    {slow_limit(SL_FIXED_WINDOW, 8), {SL_CONCURRENCY, 5, 0, 3600, 0},
                     slow_limit(SL_SLIDING_WINDOW, 8)}};
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k2, &o2), SL_OK);
    assert_true(take(l, "t", "x", "st", 3, t).allowed); /* 7 left, 2 slots */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k2, &n2), SL_OK);
    sl_decision d = take(l, "t", "x", "st", 0, t);
    assert_int_equal(d.limit_index, 1); /* the leases: 2 slots left */
    assert_int_equal(d.remaining, 2);
    d = take(l, "t", "x", "st", 2, t);
    assert_true(d.allowed);
    /* the window took the bucket's 7 (5 now left), the sliding window is fresh (6 left):
     * seen by peeks under either alone (same parameters: each keeps its own state) */
    sl_policy w1 = {1, {slow_limit(SL_FIXED_WINDOW, 8)}};
    sl_policy s1 = {1, {slow_limit(SL_SLIDING_WINDOW, 8)}};
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k2, &w1), SL_OK);
    assert_int_equal(take(l, "t", "x", "st", 0, t).remaining, 5);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_CLIENT, &k2, &s1), SL_OK);
    assert_int_equal(take(l, "t", "x", "st", 0, t).remaining, 6);
    sl_close(l);
}

/* Adding, dropping or reordering the limits of a key's policy keeps the state of the limits
 * that stay (each carried from the old limit of its algorithm); only a limit left without an
 * old limit starts anew. It used to start the whole key anew. */
static void test_policy_change_stacked_keeps_limits(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_key k = SL_KEY("t", "sk", "c");
    sl_policy one = SL_POLICY_TOKEN_BUCKET(10, 0.01); /* one unit per 100 s */
    sl_policy two = {2, {{SL_TOKEN_BUCKET, 10, 0.01, 0, 0}, {SL_FIXED_WINDOW, 1000, 0, 86400, 0}}};
    sl_policy rev = {2, {{SL_FIXED_WINDOW, 1000, 0, 86400, 0}, {SL_TOKEN_BUCKET, 10, 0.01, 0, 0}}};
    sl_policy day = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 1000, 86400);
    int64_t t = 86400 * S; /* a day boundary */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &one), SL_OK);
    assert_true(take(l, "t", "sk", "c", 10, t).allowed);
    /* "and 1000/day" added: the bucket stays empty */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &two), SL_OK);
    sl_decision d = take(l, "t", "sk", "c", 1, t);
    assert_false(d.allowed);
    assert_int_equal(d.limit_index, 0);
    assert_int_equal(d.retry_after, 100 * S);
    assert_false(take(l, "t", "sk", "c", 1, t + 100 * S - 1).allowed);
    d = take(l, "t", "sk", "c", 1, t + 100 * S);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 0); /* the bucket's; the day has 999 left */
    /* reordered: both limits keep their state */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &rev), SL_OK);
    d = take(l, "t", "sk", "c", 1, t + 100 * S);
    assert_false(d.allowed);
    assert_int_equal(d.limit_index, 1);
    assert_int_equal(d.retry_after, 100 * S);
    d = take(l, "t", "sk", "c", 0, t + 100 * S);
    assert_int_equal(d.limit_index, 1); /* fewest left: the bucket's 0 */
    assert_int_equal(d.remaining, 0);
    /* the bucket dropped: the day keeps its 1 used */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &day), SL_OK);
    d = take(l, "t", "sk", "c", 1, t + 100 * S);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 998);
    /* a second bucket of other parameters is new; the first keeps its state (same
     * parameters match first, whatever the position) */
    sl_policy b2 = {2, {{SL_TOKEN_BUCKET, 5, 1, 0, 0}, {SL_TOKEN_BUCKET, 10, 0.01, 0, 0}}};
    sl_key k2 = SL_KEY("t", "sk2", "c");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k2, &one), SL_OK);
    assert_true(take(l, "t", "sk2", "c", 8, t).allowed);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k2, &b2), SL_OK);
    d = take(l, "t", "sk2", "c", 3, t);
    assert_false(d.allowed);
    assert_int_equal(d.limit_index, 1);
    assert_int_equal(d.remaining, 2);
    d = take(l, "t", "sk2", "c", 2, t);
    assert_true(d.allowed);
    assert_int_equal(d.limit_index, 1);
    assert_int_equal(d.remaining, 0);
    sl_close(l);
}

static void test_stacked_limits_all_or_nothing(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_policy p = {2,
                   {{SL_FIXED_WINDOW, 3, 0, 1.0, 0},
                    {SL_TOKEN_BUCKET, 10, 0.001, 0, 0}}};
    assert_int_equal(sl_default_set(l, &p), SL_OK);
    int64_t t = 100 * S; /* a window boundary */
    int admitted = 0;
    for (int sec = 0; sec < 6; sec++) {
        for (int i = 0; i < 8; i++) {
            sl_decision d = take(l, "t", "a", "c", 1, t + sec * S);
            admitted += d.allowed;
            if (!d.allowed && sec < 3) {
                assert_int_equal(d.limit_index, 0); /* the window denies */
                assert_int_equal(d.retry_after, S);
            }
            if (!d.allowed && sec >= 4) {
                assert_int_equal(d.limit_index, 1); /* the bucket is empty */
                assert_true(d.retry_after > 900 * S);
            }
        }
    }
    /* 10 = the bucket's capacity: the window's denials consumed nothing from the bucket */
    assert_int_equal(admitted, 10);
    sl_close(l);
}

static void test_concurrency_leases(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_policy p = SL_POLICY_WINDOW(SL_CONCURRENCY, 2, 10);
    assert_int_equal(sl_default_set(l, &p), SL_OK);
    sl_decision a = take(l, "t", "a", "c", 1, T0), b = take(l, "t", "a", "c", 1, T0);
    assert_true(a.allowed && b.allowed);
    assert_true(a.lease && b.lease && a.lease != b.lease);
    assert_false(take(l, "t", "a", "c", 1, T0).allowed);
    sl_key k = SL_KEY("t", "a", "c");
    assert_int_equal(sl_release(l, &k, a.lease, T0), SL_OK);
    assert_int_equal(sl_release(l, &k, a.lease, T0), SL_ELEASE);
    assert_int_equal(sl_release(l, &k, 999999, T0), SL_ELEASE);
    sl_key other = SL_KEY("t", "a", "nobody");
    assert_int_equal(sl_release(l, &other, b.lease, T0), SL_ELEASE);
    assert_true(take(l, "t", "a", "c", 1, T0).allowed);
    assert_false(take(l, "t", "a", "c", 1, T0).allowed);
    assert_true(take(l, "t", "a", "c", 1, T0 + 10 * S).allowed); /* expiry frees */
    sl_close(l);
}

static void test_peek_and_cost_zero_create_nothing(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    sl_stats s;
    assert_int_equal(sl_peek(l, &k, T0, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 4); /* what a take of 1 would leave */
    assert_int_equal(sl_take(l, &k, 0, T0, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 5);
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.keys, 0);
    assert_int_equal(s.allowed + s.denied, 0);
    take(l, "t", "a", "c", 5, T0);
    assert_int_equal(sl_peek(l, &k, T0, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after, S);
    assert_int_equal(sl_peek(l, &k, T0, &d), SL_OK); /* peeking again changes nothing */
    assert_int_equal(d.retry_after, S);
    sl_close(l);
}

typedef struct seen {
    int n, found_acme;
} seen;

static int list_tenants(void *ctx, const char *t, size_t len, const sl_stats *s)
{
    seen *x = ctx;
    x->n++;
    if (len == 4 && memcmp(t, "acme", 4) == 0) {
        x->found_acme = 1;
        assert_int_equal(s->allowed, 5);
        assert_int_equal(s->denied, 2);
    }
    return 0;
}

static void test_counters(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    for (int i = 0; i < 7; i++)
        take(l, "acme", "a", "c", 1, T0);
    take(l, NULL, "a", "c", 1, T0);
    sl_stats s;
    assert_int_equal(sl_stats_get(l, "acme", 4, &s), SL_OK);
    assert_int_equal(s.allowed, 5);
    assert_int_equal(s.denied, 2);
    assert_int_equal(sl_stats_get(l, "default", 7, &s), SL_OK);
    assert_int_equal(s.allowed, 1);
    assert_int_equal(sl_stats_get(l, "never", 5, &s), SL_ENOTFOUND);
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.allowed, 6);
    assert_int_equal(s.denied, 2);
    assert_int_equal(s.keys, STORE_KEYS(2));
    seen x = {0, 0};
    assert_int_equal(sl_stats_list(l, list_tenants, &x), SL_OK);
    assert_true(x.found_acme);
    assert_true(x.n >= 2);
    sl_close(l);
}

#ifndef SL_TEST_REDIS /* the in-memory table's own bounds */
static void test_max_keys_evicts_and_counts(void **st)
{
    (void)st;
    sl_limiter *l = open_default(10);
    char c[32];
    for (int i = 0; i < 100; i++) {
        snprintf(c, sizeof c, "client-%d", i);
        assert_true(take(l, "acme", "a", c, 1, T0).allowed);
        sl_stats s;
        assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
        assert_true(s.keys <= 10);
    }
    sl_stats s;
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.evicted + s.keys, 100);
    assert_true(s.evicted >= 90);
    assert_int_equal(sl_stats_get(l, "acme", 4, &s), SL_OK);
    assert_true(s.evicted >= 90);
    sl_close(l);
}

static void test_idle_full_keys_reclaimed(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    char c[32];
    for (int i = 0; i < 100; i++) {
        snprintf(c, sizeof c, "client-%d", i);
        take(l, "t", "a", c, 1, T0);
    }
    assert_int_equal(sl_sweep(l, T0 + S / 2, 1000), 0); /* not full yet: kept */
    /* full again at T0 + S; kept 1 s more for timestamps that arrive out of order */
    assert_int_equal(sl_sweep(l, T0 + 2 * S - 1, 1000), 0);
    assert_int_equal(sl_sweep(l, T0 + 2 * S, 1000), 100); /* nothing to lose */
    sl_stats s;
    assert_int_equal(sl_stats_get(l, NULL, 0, &s), SL_OK);
    assert_int_equal(s.keys, 0);
    assert_int_equal(s.reclaimed, 100);
    assert_int_equal(take(l, "t", "a", "client-3", 1, T0 + 2 * S).remaining, 4);
    sl_close(l);
}

/* Timestamps out of order across keys (a reclaim runs at one key's `now`, later than the
 * next request of another): within 1 s, decisions are exactly those of a table that never
 * reclaimed. And a far-future timestamp does not change how new keys are decided. */
static void test_out_of_order_timestamps_across_keys(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_key r = SL_KEY("t", "ooo", NULL);
    sl_policy one = SL_POLICY_TOKEN_BUCKET(1, 1); /* full 1 s after a take */
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &r, &one), SL_OK);
    assert_int_equal(take(l, "t", "ooo", "A", 1, T0).allowed, 1);
    /* another key's time, 1.5 s ahead, reclaims nothing yet */
    assert_int_equal(sl_sweep(l, T0 + 3 * S / 2, 1000), 0);
    sl_decision d = take(l, "t", "ooo", "A", 1, T0 + S / 2); /* half a token: denied */
    assert_int_equal(d.allowed, 0);
    assert_int_equal(d.retry_after, S / 2);
    /* a sweep far in the future reclaims A; a new key B keeps its own timeline */
    assert_true(sl_sweep(l, (INT64_C(1) << 61), 1000) >= 1);
    for (int i = 0; i < 10; i++) /* 1 per second, each allowed */
        assert_int_equal(take(l, "t", "ooo", "B", 1, T0 + 10 * S + (int64_t)i * S).allowed, 1);
    sl_close(l);
}

#endif

/* Every distinct policy is interned, inline ones too (a server's clients choose those), and
 * the ones nothing uses any more are collected: a stream of distinct inline policies neither
 * exhausts the limiter (it used to answer SL_ETOOMANY to everything new, rules included, for
 * good after 2^20) nor grows its memory without bound. Decisions stay those of each
 * request's own policy. */
static void test_unused_policies_collected(void **st)
{
    (void)st;
    sl_limiter *l = open_default(0);
    sl_key k = SL_KEY("t", "inl", "k"), other = SL_KEY("t", "inl", "peeked");
    const int n = 6000;
    for (int i = 0; i < n; i++) {
        sl_policy p = SL_POLICY_TOKEN_BUCKET(2 + i, 1), q = SL_POLICY_TOKEN_BUCKET(3 + n + i, 2);
        sl_request r[2] = {{k, 1, &p, 0}, {other, 1, &q, 1}};
        sl_decision d[2];
        assert_int_equal(sl_take_batch(l, r, 2, T0 + (int64_t)i * S, d), SL_OK);
        assert_int_equal(d[0].err, SL_OK);
        assert_int_equal(d[0].limit, 2 + i); /* decided under its own policy */
        assert_int_equal(d[0].allowed, 1);
        assert_int_equal(d[1].limit, 3 + n + i);
    }
    uint64_t runs, freed;
    size_t live = sl_limiter_policies(l, &runs, &freed);
    assert_true(runs >= 1);
    assert_true(live <= 2100);           /* at most twice what survived, 1024 at the least */
    assert_true(freed >= (uint64_t)(2 * n - 2100)); /* every inline policy but the recent */
    /* the key kept its state through the collections: 1 taken of 2 + n - 1, under the last
     * policy, and carried (tokens clamped) to a new one */
    sl_policy last = SL_POLICY_TOKEN_BUCKET(2 + n - 1, 1), tiny = SL_POLICY_TOKEN_BUCKET(1, 1);
    sl_request r = {k, 0, &last, 0};
    sl_decision d;
    assert_int_equal(sl_take_batch(l, &r, 1, T0 + (int64_t)(n - 1) * S, &d), SL_OK);
    assert_int_equal(d.remaining, (uint64_t)n); /* capacity n + 1, one taken */
    r.inline_policy = &tiny;
    r.cost = 1;
    assert_int_equal(sl_take_batch(l, &r, 1, T0 + (int64_t)(n - 1) * S, &d), SL_OK);
    assert_int_equal(d.allowed, 1);
    assert_int_equal(sl_take_batch(l, &r, 1, T0 + (int64_t)(n - 1) * S, &d), SL_OK);
    assert_int_equal(d.allowed, 0);
    /* rules still take new policies, and rules' policies are never collected */
    sl_key t = SL_KEY("acme", NULL, NULL);
    sl_policy rp = SL_POLICY_TOKEN_BUCKET(7, 0.125);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_TENANT, &t, &rp), SL_OK);
    for (int i = 0; i < 3000; i++) {
        sl_policy p = SL_POLICY_TOKEN_BUCKET(100000 + i, 1);
        r = (sl_request){other, 1, &p, 1};
        assert_int_equal(sl_take_batch(l, &r, 1, T0, &d), SL_OK);
    }
    sl_policy got;
    assert_int_equal(sl_rule_get(l, SL_SCOPE_TENANT, &t, &got), SL_OK);
    assert_true(got.limits[0].limit == 7 && got.limits[0].rate == 0.125);
    assert_int_equal(take(l, "acme", "x", "y", 1, T0).limit, 7);
    sl_close(l);
}

static void test_batch_matches_single_calls(void **st)
{
    (void)st;
    sl_limiter *a = open_default(0), *b = open_default(0);
    enum { N = 500 };
    static sl_request r[N];
    static sl_decision d[N];
    static char names[N][16];
    uint32_t x = 12345;
    for (int i = 0; i < N; i++) {
        x = x * 1103515245u + 12345u;
        snprintf(names[i], sizeof names[i], "c%u", (x >> 16) % 37);
        r[i].key = SL_KEY("t", "a", names[i]);
        r[i].cost = (x >> 8) % 4;
        if (i % 97 == 5)
            r[i].key.client_len = 0; /* an invalid one in the middle */
        if (i % 89 == 7)
            r[i].cost = 6;
        r[i].peek = i % 7 == 3 ? 1 : 0;
        if (r[i].peek)
            r[i].cost = 1; /* sl_peek asks about one unit */
    }
    assert_int_equal(sl_take_batch(a, r, N, T0, d), SL_OK);
    for (int i = 0; i < N; i++) {
        sl_decision e;
        int rc = r[i].peek ? sl_peek(b, &r[i].key, T0, &e)
                           : sl_take(b, &r[i].key, r[i].cost, T0, &e);
        assert_int_equal(d[i].err, rc);
        if (rc == SL_OK) {
            assert_int_equal(d[i].allowed, e.allowed);
            assert_int_equal(d[i].remaining, e.remaining);
            assert_int_equal(d[i].retry_after, e.retry_after);
        }
    }
    assert_int_equal(sl_take_batch(a, NULL, 0, T0, NULL), SL_OK);
    assert_int_equal(sl_take_batch(a, NULL, 1, T0, d), SL_EINVAL);
    sl_close(a);
    sl_close(b);
}

static int64_t fake_now;
static int64_t fake_clock(void *ctx)
{
    (void)ctx;
    return fake_now;
}

static void test_clock_injection_and_backwards_time(void **st)
{
    (void)st;
    sl_limiter *l = NULL;
    sl_options o;
    sl_options_init(&o);
    o.clock = fake_clock;
    fake_now = T0;
    assert_int_equal(store_open(&l, &o), SL_OK);
    assert_int_equal(sl_now(l), T0);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    for (int i = 0; i < 5; i++)
        assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    fake_now = T0 - 100 * S; /* the clock jumps back: no refill, no drain */
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after, S);
    fake_now = T0 + S;
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_true(d.allowed);
    sl_close(l);

    /* the internal clock is wall time, roughly */
    assert_int_equal(sl_open(&l, NULL), SL_OK);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t wall = (int64_t)ts.tv_sec * S + ts.tv_nsec;
    assert_true(llabs(sl_now(l) - wall) < S);
    sl_close(l);
}

static void test_open_options(void **st)
{
    (void)st;
    sl_limiter *l = NULL;
    sl_options o;
    sl_options_init(&o);
    o.shards = 3;
    assert_int_equal(sl_open(&l, &o), SL_EINVAL);
    assert_null(l);
    o.shards = 131072; /* a power of two, above the most the table takes: not "no memory" */
    assert_int_equal(sl_open(&l, &o), SL_EINVAL);
    assert_null(l);
    sl_policy bad = SL_POLICY_TOKEN_BUCKET(0, 1);
    o.shards = 0;
    o.default_policy = &bad;
    assert_int_equal(sl_open(&l, &o), SL_ECAPACITY);
    sl_policy good = SL_POLICY_WINDOW(SL_SLIDING_WINDOW, 3, 1);
    o.default_policy = &good;
    o.shards = 1;
    assert_int_equal(store_open(&l, &o), SL_OK);
    assert_int_equal(take(l, "t", "a", "c", 1, T0).limit, 3);
    sl_close(l);
    assert_int_equal(sl_open(NULL, NULL), SL_EINVAL);
    sl_close(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version_and_errors),
        cmocka_unit_test(test_global_default_token_bucket),
        cmocka_unit_test(test_invalid_inputs_change_nothing),
        cmocka_unit_test(test_cost_above_capacity_shows_what_is_left),
        cmocka_unit_test(test_resolution_order),
        cmocka_unit_test(test_rule_get_list_and_default_names),
        cmocka_unit_test(test_policy_change_keeps_tokens),
        cmocka_unit_test(test_policy_change_stacked_keeps_limits),
        cmocka_unit_test(test_policy_change_across_algorithms),
        cmocka_unit_test(test_stacked_limits_all_or_nothing),
        cmocka_unit_test(test_concurrency_leases),
        cmocka_unit_test(test_peek_and_cost_zero_create_nothing),
        cmocka_unit_test(test_counters),
#ifndef SL_TEST_REDIS
        cmocka_unit_test(test_max_keys_evicts_and_counts),
        cmocka_unit_test(test_idle_full_keys_reclaimed),
        cmocka_unit_test(test_out_of_order_timestamps_across_keys),
#endif
        cmocka_unit_test(test_unused_policies_collected),
        cmocka_unit_test(test_batch_matches_single_calls),
        cmocka_unit_test(test_clock_injection_and_backwards_time),
        cmocka_unit_test(test_open_options),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
