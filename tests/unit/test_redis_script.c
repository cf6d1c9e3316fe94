/* test_redis_script.c — the Redis store's Lua script (src/store/redis_script.lua) against the
 * library's own decisions.
 *
 * A private redis-server (redis_fixture.c) runs the script as the library loads it: a Redis
 * Function library (sl_rs_script), called with FCALL. The reference is an
 * sl_limiter with the in-memory store, given the same policy as a client rule and the same
 * explicit `now`. Thousands of seeded random sequences of take / peek / release / policy
 * change (costs up to the whole limit; time steps of 0, a few ns, exact retry / reset /
 * window / expiry boundaries +-1, backwards a little and now and then by up to 2^61 ns,
 * idles of days and up to 2^55 ns; absolute times from 0 to 2^62 - 1; one to four stacked
 * limits of every algorithm, spans up to 2^52 ns; op "status" against a take of cost 0
 * whose allowed and retry_after are a peek's of cost 1) must give identical answers:
 * allowed, limit index, remaining, reset_after, retry_after, delay, tokens and reserve
 * (the same double: compared as "%.17g"), and leases mapped id to id. After every write
 * the key's PTTL must be the script's documented TTL computed from the C state (then the
 * test PERSISTs the key, so that Redis's own clock, which does not follow the test's
 * `now`, never expires it); a peek must leave the value untouched and create no
 * key. Then the exact-arithmetic helpers at their edges (op "selftest"), Redis's clock (TIME),
 * real expiry, unreadable values and malformed arguments.
 *
 * Environment, for exploring: SL_TEST_SEED=n (other random sequences), SL_TEST_SEQUENCES=n,
 * SL_TRACE_SEQ=n (print every step of sequence n), SL_TEST_SCRIPT=file (another script).
 */
#include <math.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "rng.h"

#include <hiredis/hiredis.h>

#include "algo.h"
#include "limiter_int.h"
#include "memory.h"
#include "policy.h"
#include "redis.h"
#include "redis_fixture.h"
#include "sluice.h"

typedef __int128 i128;
typedef unsigned __int128 u128;

#define S INT64_C(1000000000)
#define DAY (86400 * S)
#define TMAX ((INT64_C(1) << 62) - 1)
#define SPAN_MAX (INT64_C(1) << 52) /* the Redis store's longest span */
#define P53 (INT64_C(1) << 53)

#define SEQUENCES 2400 /* random sequences in the differential test */
#define STEPS 40       /* decisions per sequence (on average) */

static redis_fixture fx;
static redisContext *rc;
static char fname[64]; /* the function FCALL calls */

/* ---- deterministic random numbers ---------------------------------------------------------- */

static uint64_t bits(unsigned max_bits) /* a number of random magnitude below 2^max_bits */
{
    unsigned b = (unsigned)range(0, max_bits);
    return b == 0 ? 0 : b >= 64 ? rnd() : rnd() & ((UINT64_C(1) << b) - 1);
}

/* ---- talking to Redis ------------------------------------------------------------------------ */

static redisReply *read_reply(void)
{
    void *r = NULL;
    assert_int_equal(redisGetReply(rc, &r), REDIS_OK);
    assert_non_null(r);
    return r;
}

static void expect_ok(redisReply *r)
{
    assert_true(r->type != REDIS_REPLY_ERROR);
    freeReplyObject(r);
}

/* A write and the PTTL / PERSIST that follow it go in one MULTI/EXEC: Redis evaluates expiry
 * against one time for the whole transaction, so a key given a TTL of a millisecond (by the
 * test's `now`) cannot expire before the PERSIST on a loaded machine. get_reply hands out
 * the EXEC's replies one by one, as if they had come on their own. */
static int tx_queued;  /* commands queued since MULTI, not read yet */
static redisReply *tx; /* the EXEC reply being handed out */
static size_t tx_next;

static void tx_begin(void)
{
    assert_int_equal(redisAppendCommand(rc, "MULTI"), REDIS_OK);
}

static void tx_end(int queued)
{
    assert_int_equal(redisAppendCommand(rc, "EXEC"), REDIS_OK);
    tx_queued = queued;
}

static redisReply *get_reply(void)
{
    if (tx_queued) { /* +OK to MULTI, +QUEUED to each command, then EXEC's array */
        for (int i = 0; i <= tx_queued; i++)
            expect_ok(read_reply());
        tx = read_reply();
        assert_int_equal(tx->type, REDIS_REPLY_ARRAY);
        assert_int_equal(tx->elements, (size_t)tx_queued);
        tx_next = 0;
        tx_queued = 0;
    }
    if (!tx)
        return read_reply();
    redisReply *r = tx->element[tx_next];
    tx->element[tx_next++] = NULL; /* now the caller's */
    if (tx_next == tx->elements) {
        freeReplyObject(tx);
        tx = NULL;
    }
    return r;
}

/* Queue an FCALL of the script deciding keys[0..nk) (pipelined; get_reply reads the answer).
 * `now` < 0 sends "" (Redis's clock). Limits come from the compiled policy (NULL: none). */
#define GROUP_KEYS_MAX 70
static void append_group(const char *const *keys, int nk, int64_t now, const char *op,
                         uint64_t cost, const sl_cpolicy *cp)
{
    enum { MAXARG = 8 + GROUP_KEYS_MAX + 6 * SL_MAX_LIMITS };
    char nums[MAXARG][24];
    const char *argv[MAXARG];
    size_t lens[MAXARG];
    unsigned n = cp ? cp->nlimits : 0, k = 0;
    assert_true(nk <= GROUP_KEYS_MAX);
    argv[k++] = "FCALL";
    argv[k++] = fname;
    snprintf(nums[k], 24, "%d", nk), argv[k] = nums[k], k++;
    for (int i = 0; i < nk; i++)
        argv[k++] = keys[i];
    if (now < 0)
        argv[k++] = "";
    else
        snprintf(nums[k], 24, "%lld", (long long)now), argv[k] = nums[k], k++;
    argv[k++] = op;
    snprintf(nums[k], 24, "%llu", (unsigned long long)cost), argv[k] = nums[k], k++;
    snprintf(nums[k], 24, "%u", n), argv[k] = nums[k], k++;
    for (unsigned i = 0; i < n; i++) {
        const sl_climit *c = &cp->lim[i];
        long long v[6] = {c->algorithm, (long long)c->limit, c->interval, c->window,
                          c->rinterval, (long long)c->rcap};
        for (int j = 0; j < 6; j++)
            snprintf(nums[k], 24, "%lld", v[j]), argv[k] = nums[k], k++;
    }
    for (unsigned i = 0; i < k; i++)
        lens[i] = strlen(argv[i]);
    assert_int_equal(redisAppendCommandArgv(rc, (int)k, argv, lens), REDIS_OK);
}

static void append_call(const char *key, int64_t now, const char *op, uint64_t cost,
                        const sl_cpolicy *cp)
{
    append_group(&key, 1, now, op, cost, cp);
}

typedef struct sdec {
    int allowed;
    unsigned index;
    uint64_t remaining, lease;
    int64_t reset_after, retry_after, delay;
    char tokens[40], reserve[40];
    int64_t now; /* ns the script decided at */
} sdec;

static void parse_decision(redisReply *r, sdec *d, const sl_cpolicy *cp)
{
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("script error: %s", r->str);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    sl_rs_reply x;
    if (!sl_rs_decode(r->str, r->len, cp->nlimits, &x))
        fail_msg("malformed reply of %zu bytes", r->len);
    d->allowed = x.allowed;
    d->index = x.index;
    d->remaining = (uint64_t)x.remaining;
    d->reset_after = x.reset_after;
    d->retry_after = x.retry_after;
    d->delay = x.delay;
    snprintf(d->tokens, sizeof d->tokens, "%.17g", x.tokens);
    snprintf(d->reserve, sizeof d->reserve, "%.17g", x.reserve);
    d->lease = (uint64_t)x.lease;
    d->now = x.now;
    freeReplyObject(r);
}

static void call_decision(const char *key, int64_t now, const char *op, uint64_t cost,
                          const sl_cpolicy *cp, sdec *d)
{
    append_call(key, now, op, cost, cp);
    parse_decision(get_reply(), d, cp);
}

static char *get_value(const char *key, size_t *len) /* NULL when the key does not exist */
{
    redisReply *r = redisCommand(rc, "GET %s", key);
    assert_non_null(r);
    char *v = NULL;
    *len = 0;
    if (r->type == REDIS_REPLY_STRING) {
        v = malloc(r->len + 1);
        memcpy(v, r->str, r->len);
        *len = r->len;
    } else {
        assert_int_equal(r->type, REDIS_REPLY_NIL);
    }
    freeReplyObject(r);
    return v;
}

/* Run a command that must not fail. */
static void cmd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(rc, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    expect_ok(r);
}

/* ---- the C reference ------------------------------------------------------------------------- */

static int spans_ok(const sl_cpolicy *cp)
{
    for (unsigned i = 0; i < cp->nlimits; i++) {
        const sl_climit *c = &cp->lim[i];
        if (c->interval > SPAN_MAX || c->tau > SPAN_MAX || c->window > SPAN_MAX ||
            c->rinterval > SPAN_MAX || c->rtau > SPAN_MAX)
            return 0;
    }
    return 1;
}

static const double rates[] = {1e4, 1000, 100, 10, 5, 3, 1, 0.5, 0.1, 1.0 / 60, 1.0 / 3600,
                               1e-6, 1e9, 7.3, 1.0 / 3, 2.5e-7};
static const double windows[] = {0.001, 0.0015, 0.01, 0.1, 1, 1.5, 60, 3600, 86400,
                                 4503599.627370496, 4503599.627370495, 2.5, 7 * 86400.0};
static const double limits[] = {1, 2, 3, 5, 10, 100, 1000, 1e6, 1e9};
static const double small_limits[] = {1, 2, 3, 5, 10, 100, 1000};
static const double caps[] = {0, 1, 5, 100, 1e6, 1e9};
#define PICK(a) ((a)[below(sizeof(a) / sizeof((a)[0]))])

static double rand_rate(void)
{
    return chance(85) ? PICK(rates) : (double)range(1, 1000000) / (double)range(1, 100000);
}
static double rand_window(void)
{
    return chance(85) ? PICK(windows) : 0.001 + (double)below(UINT64_C(1) << 52) / 1e9;
}

static sl_limit rand_limit(sl_algorithm a)
{
    sl_limit l = {a, 0, 0, 0, 0};
    switch (a) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        l.limit = PICK(limits);
        l.rate = rand_rate();
        break;
    case SL_FIXED_WINDOW:
    case SL_SLIDING_WINDOW:
        l.limit = chance(20) ? (double)range(1, 1000000000) : PICK(limits);
        l.window = rand_window();
        break;
    case SL_SLIDING_LOG:
    case SL_CONCURRENCY:
        l.limit = chance(3) ? 100000 : PICK(small_limits);
        l.window = rand_window();
        break;
    case SL_BURST_RESERVE:
        l.limit = chance(80) ? PICK(small_limits) : PICK(limits);
        l.rate = rand_rate();
        l.reserve_cap = PICK(caps);
        break;
    }
    return l;
}

/* A random policy the Redis store accepts (spans <= 2^52). `like`: same shape as this one. */
static void rand_policy(sl_policy *p, sl_cpolicy *cp, const sl_policy *like, int alg_only)
{
    for (;;) {
        memset(p, 0, sizeof *p);
        p->nlimits = like ? like->nlimits : (unsigned)(chance(50) ? 1 : range(2, 4));
        for (unsigned i = 0; i < p->nlimits; i++) {
            sl_algorithm a = like ? like->limits[i].algorithm
                             : alg_only ? (sl_algorithm)alg_only
                                        : (sl_algorithm)range(1, 7);
            p->limits[i] = rand_limit(a);
        }
        if (sl_policy_compile(p, NULL, cp) == SL_OK && spans_ok(cp))
            return;
    }
}

/* The TTL the script documents, from the C state: max over limits of full_at - now
 * (burst_reserve: base and reserve full), and the last lease id's microsecond passed. */
typedef struct ttl_ctx {
    int64_t now;
    uint64_t last_sid;
    int found;
    int has_lease; /* the key's state has a concurrency limit */
    int64_t ms;
} ttl_ctx;

static int64_t ceil_ms(i128 ns)
{
    i128 q = ns / 1000000;
    if (q * 1000000 < ns)
        q++;
    return (int64_t)q;
}

static int ttl_visit(void *vctx, const char *key, size_t klen, const sl_policy *p,
                     const void *state, size_t size)
{
    (void)key, (void)klen, (void)size;
    ttl_ctx *t = vctx;
    sl_cpolicy cp;
    assert_int_equal(sl_policy_compile(p, NULL, &cp), SL_OK);
    int64_t ms = 1;
    for (unsigned i = 0; i < cp.nlimits; i++) {
        const char *st = (const char *)state + cp.offs[i];
        i128 f;
        t->has_lease |= cp.lim[i].algorithm == SL_CONCURRENCY;
        if (cp.lim[i].algorithm == SL_BURST_RESERVE) {
            int64_t tz[2]; /* br_st: tat, z, last */
            memcpy(tz, st, sizeof tz);
            f = tz[0] > (i128)tz[1] + cp.lim[i].rtau ? tz[0] : (i128)tz[1] + cp.lim[i].rtau;
        } else {
            f = sl_algo_full_at(&cp.lim[i], st);
        }
        int64_t m = ceil_ms(f - t->now);
        if (m > ms)
            ms = m;
    }
    if (t->last_sid) {
        int64_t m = ceil_ms((i128)(t->last_sid + 1) * 1000 - t->now);
        if (m > ms)
            ms = m;
    }
    t->ms = ms;
    t->found++;
    return 0;
}

/* -1 when the limiter holds no key (it holds one key at most: one shard, one key). */
static int64_t expected_ttl(sl_limiter *l, int64_t now, uint64_t last_sid, int *has_lease)
{
    ttl_ctx t = {now, last_sid, 0, 0, 0};
    sl_slice c = {0};
    int fnrc, first = 1, st;
    do {
        st = sl_limiter_visit_slice(l, 0, &c, first, UINT32_MAX, ttl_visit, &t, &fnrc);
        first = 0;
    } while (st == SL_SLICE_MORE);
    assert_true(t.found <= 1);
    if (has_lease)
        *has_lease = t.has_lease;
    return t.found ? t.ms : -1;
}

/* ---- one random sequence --------------------------------------------------------------------- */

typedef struct lease_pair {
    uint64_t c, s; /* the C id and the script's id for one acquisition */
} lease_pair;

typedef struct seq {
    sl_limiter *l;
    sl_key key;
    char client[32], rkey[48];
    sl_policy pol;
    sl_cpolicy cp;
    int64_t now;
    int64_t retry, reset, delay; /* of the last decision: boundaries worth hitting */
    lease_pair *leases;
    size_t nleases, cap;
    uint64_t last_sid;
    unsigned step;
    unsigned long long id; /* for messages */
    int64_t sent;          /* monotonic ns when the last writing call was sent */
} seq;

static void fmt_ns(char *buf, size_t n, int64_t v) { snprintf(buf, n, "%lld", (long long)v); }

static void set_policy(seq *q)
{
    assert_int_equal(sl_rule_set(q->l, SL_SCOPE_CLIENT, &q->key, &q->pol), SL_OK);
}

static int64_t clamp_time(i128 t) { return t < 0 ? 0 : t > TMAX ? TMAX : (int64_t)t; }

/* Move `now`: mostly forward, to the interesting instants. */
static void step_time(seq *q)
{
    i128 t = q->now;
    const sl_climit *c = &q->cp.lim[below(q->cp.nlimits)];
    int64_t span = c->window ? c->window : c->interval ? c->interval : S;
    int64_t eps = (int64_t)range(0, 2) - 1;
    switch (below(13)) {
    case 0:
        break;
    case 1:
        t += below(2000);
        break;
    case 2:
        t += q->retry + eps;
        break;
    case 3:
        t += q->reset + eps;
        break;
    case 4:
        t += q->delay + eps;
        break;
    case 5: /* the next aligned window edge of a window limit (or the span ahead) */
        t = t - t % span + span * (int64_t)range(1, 2) + eps;
        break;
    case 6:
        t += (i128)span * (int64_t)range(1, 3) / (int64_t)range(1, 4) + eps;
        break;
    case 7:
        t -= (i128)below((uint64_t)span + 2);
        break;
    case 8:
        t += chance(70) ? (i128)range(1, 100) * DAY + below(S)
                        : (i128)(INT64_C(1) << range(52, 55)) + below(S);
        break;
    case 9:
        t += (i128)c->tau + eps;
        break;
    case 10: /* now and then, far back: the key's `last` stays ahead (2^53 ns is 104 days) */
        if (chance(10))
            t -= chance(50) ? (i128)(INT64_C(1) << range(53, 61)) : (i128)below((uint64_t)t + 1);
        else
            t += below(1000);
        break;
    default:
        t += below((uint64_t)S);
        break;
    }
    q->now = clamp_time(t);
}

static uint64_t rand_cost(const seq *q)
{
    uint64_t m = q->cp.max_cost;
    if (chance(50))
        return 1;
    if (chance(30))
        return m;
    return range(1, m > 5 && chance(50) ? 5 : m);
}

/* The rest of a failure's first line: the policy as the script's six integers. */
static void print_policy(const seq *q)
{
    for (unsigned i = 0; i < q->cp.nlimits; i++) {
        const sl_climit *c = &q->cp.lim[i];
        fprintf(stderr, " [%d %llu %lld %lld %lld %llu]", c->algorithm,
                (unsigned long long)c->limit, (long long)c->interval, (long long)c->window,
                (long long)c->rinterval, (unsigned long long)c->rcap);
    }
    fprintf(stderr, ")\n");
}

static struct {
    unsigned long takes, peeks, statuses, releases, changes, allowed, leases;
} counts;

static long long trace_seq = -1; /* SL_TRACE_SEQ=n prints every step of sequence n */
static unsigned long long seed;   /* SL_TEST_SEED */

static void compare(const seq *q, const char *op, uint64_t cost, const sl_decision *d,
                    const sdec *s)
{
    if ((long long)q->id == trace_seq)
        fprintf(stderr, "%u: %s %llu at %lld: allowed %d remaining %llu reset %lld retry %lld "
                        "lease %llu/%llu\n",
                q->step, op, (unsigned long long)cost, (long long)q->now, s->allowed,
                (unsigned long long)s->remaining, (long long)s->reset_after,
                (long long)s->retry_after, (unsigned long long)d->lease,
                (unsigned long long)s->lease);
    char tok[40], res[40], now[24];
    snprintf(tok, sizeof tok, "%.17g", d->tokens);
    snprintf(res, sizeof res, "%.17g", d->reserve);
    fmt_ns(now, sizeof now, q->now);
    if (d->allowed != s->allowed || d->limit_index != s->index ||
        d->remaining != s->remaining || d->reset_after != s->reset_after ||
        d->retry_after != s->retry_after || d->delay != s->delay ||
        strcmp(tok, s->tokens) != 0 || strcmp(res, s->reserve) != 0 ||
        q->now != s->now || (d->lease != 0) != (s->lease != 0)) {
        fprintf(stderr, "sequence %llu step %u: %s cost %llu at %s (policy:", q->id, q->step,
                op, (unsigned long long)cost, now);
        print_policy(q);
        fprintf(stderr, "  C:      allowed %d index %u remaining %llu reset %lld retry %lld "
                        "delay %lld tokens %s reserve %s lease %llu\n",
                d->allowed, d->limit_index, (unsigned long long)d->remaining,
                (long long)d->reset_after, (long long)d->retry_after, (long long)d->delay, tok,
                res, (unsigned long long)d->lease);
        fprintf(stderr, "  script: allowed %d index %u remaining %llu reset %lld retry %lld "
                        "delay %lld tokens %s reserve %s lease %llu now %lld\n",
                s->allowed, s->index, (unsigned long long)s->remaining,
                (long long)s->reset_after, (long long)s->retry_after, (long long)s->delay,
                s->tokens, s->reserve, (unsigned long long)s->lease, (long long)s->now);
        fail_msg("the script and the library disagree");
    }
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * S + ts.tv_nsec;
}

/* Queued right after a writing call, in its transaction: PTTL, then PERSIST (the key must
 * not expire by Redis's clock, which does not follow the test's `now`). */
static void append_pttl_persist(const seq *q)
{
    assert_int_equal(redisAppendCommand(rc, "PTTL %s", q->rkey), REDIS_OK);
    assert_int_equal(redisAppendCommand(rc, "PERSIST %s", q->rkey), REDIS_OK);
}

/* Read those two replies: the PTTL must be the documented TTL, less the ms Redis's clock
 * moved between the SET and the PTTL (at most the round trip, plus one for the tick).
 * `wrote` 0: nothing was written (the key kept no TTL); -1: a release, which writes when the
 * key's state has a concurrency limit. */
static void check_ttl(seq *q, int wrote)
{
    redisReply *r = get_reply();
    int64_t slack = (mono_ns() - q->sent) / 1000000 + 1;
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    long long got = r->integer;
    freeReplyObject(r);
    expect_ok(get_reply());
    int has_lease;
    int64_t want = expected_ttl(q->l, q->now, q->last_sid, &has_lease);
    if (wrote < 0)
        wrote = has_lease;
    if (want < 0 || !wrote) {
        assert_int_equal(got, want < 0 ? -2 : -1); /* no key, or left as it was */
        return;
    }
    if (got > want || got < want - slack) {
        fprintf(stderr, "sequence %llu step %u: PTTL %lld, expected %lld at %lld (policy:",
                q->id, q->step, got, (long long)want, (long long)q->now);
        print_policy(q);
        fail_msg("wrong TTL");
    }
}

static void do_take(seq *q, int peek)
{
    uint64_t cost = rand_cost(q);
    const char *op = peek ? "peek" : "take";
    sl_decision d;
    int status = peek && chance(15);
    if (peek && !status && chance(20))
        cost = 0;
    if (status) {
        /* op "status" (sluiced's GET /api/status): a take of cost 0, with allowed and
         * retry_after of a peek of cost 1 at the same time */
        sl_decision next;
        cost = 1;
        op = "status";
        assert_int_equal(sl_take(q->l, &q->key, 0, q->now, &d), SL_OK);
        assert_int_equal(sl_peek(q->l, &q->key, q->now, &next), SL_OK);
        d.allowed = next.allowed;
        d.retry_after = next.retry_after;
    } else if (!peek)
        assert_int_equal(sl_take(q->l, &q->key, cost, q->now, &d), SL_OK);
    else if (cost == 1)
        assert_int_equal(sl_peek(q->l, &q->key, q->now, &d), SL_OK);
    else if (cost == 0)
        assert_int_equal(sl_take(q->l, &q->key, 0, q->now, &d), SL_OK);
    else {
        sl_request rq = {q->key, cost, NULL, 1};
        assert_int_equal(sl_take_batch(q->l, &rq, 1, q->now, &d), SL_OK);
        assert_int_equal(d.err, SL_OK);
    }
    if (cost == 0 && chance(50))
        op = "take"; /* take of cost 0 is a peek too */
    if (status)
        counts.statuses++;
    sdec s;
    int writes = !peek && cost > 0;
    if (!writes) /* a peek: the value before and after must be the same bytes (or none) */
        assert_int_equal(redisAppendCommand(rc, "GET %s", q->rkey), REDIS_OK);
    q->sent = mono_ns();
    if (writes)
        tx_begin();
    append_call(q->rkey, q->now, op, cost, &q->cp);
    if (writes) {
        append_pttl_persist(q);
        tx_end(3);
    } else {
        assert_int_equal(redisAppendCommand(rc, "GET %s", q->rkey), REDIS_OK);
    }
    redisReply *before = writes ? NULL : get_reply();
    parse_decision(get_reply(), &s, &q->cp);
    compare(q, op, cost, &d, &s);
    if (writes)
        counts.takes++, counts.allowed += (unsigned long)d.allowed;
    else
        counts.peeks++;
    q->retry = d.retry_after;
    q->reset = d.reset_after;
    q->delay = d.delay;
    if (!writes) {
        redisReply *after = get_reply();
        assert_int_equal(before->type, after->type);
        if (before->type == REDIS_REPLY_STRING) {
            assert_int_equal(before->len, after->len);
            assert_memory_equal(before->str, after->str, before->len);
        } else {
            assert_int_equal(before->type, REDIS_REPLY_NIL);
        }
        freeReplyObject(before);
        freeReplyObject(after);
        return;
    }
    if (d.lease) {
        /* per key, increasing, never below the clock in microseconds */
        assert_true(s.lease > q->last_sid);
        assert_true(s.lease >= (uint64_t)(q->now / 1000));
        q->last_sid = s.lease;
        if (q->nleases == q->cap) {
            q->cap = q->cap ? 2 * q->cap : 16;
            q->leases = realloc(q->leases, q->cap * sizeof *q->leases);
            assert_non_null(q->leases);
        }
        q->leases[q->nleases++] = (lease_pair){d.lease, s.lease};
        counts.leases++;
    }
    check_ttl(q, 1);
}

static void do_release(seq *q)
{
    uint64_t cid, sid;
    if (q->nleases && chance(80)) {
        lease_pair p = q->leases[below(q->nleases)];
        cid = p.c, sid = p.s;
    } else { /* ids neither side issued */
        cid = UINT64_C(1) << 40 | below(1000000);
        sid = chance(10) ? 0 : range(1, (uint64_t)P53 - 1);
        for (size_t i = 0; i < q->nleases; i++)
            if (q->leases[i].s == sid)
                sid = 0;
        if (sid == 0)
            cid = 0;
    }
    int crc = sl_release(q->l, &q->key, cid, q->now);
    counts.releases++;
    if ((long long)q->id == trace_seq)
        fprintf(stderr, "%u: release %llu/%llu at %lld: %d\n", q->step, (unsigned long long)cid,
                (unsigned long long)sid, (long long)q->now, crc);
    q->sent = mono_ns();
    tx_begin();
    append_call(q->rkey, q->now, "release", sid, &q->cp);
    append_pttl_persist(q);
    tx_end(3);
    redisReply *r = get_reply();
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("script error: %s", r->str);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    if ((crc == SL_OK) != (r->integer == 1)) {
        fprintf(stderr, "sequence %llu step %u: release at %lld: C %d, script %lld\n", q->id,
                q->step, (long long)q->now, crc, r->integer);
        fail_msg("release disagrees");
    }
    freeReplyObject(r);
    check_ttl(q, sid == 0 ? 0 : -1);
}

static void run_sequence(unsigned long long id, int alg_only)
{
    seq q;
    memset(&q, 0, sizeof q);
    q.id = id;
    rng_state = 0x9E3779B97F4A7C15ull * (id + 1) ^ seed * 0xD1B54A32D192ED03ull;
    if (!rng_state)
        rng_state = 1;
    sl_options o;
    sl_options_init(&o);
    o.shards = 1;
    assert_int_equal(sl_open(&q.l, &o), SL_OK);
    snprintf(q.client, sizeof q.client, "c%llu", id);
    snprintf(q.rkey, sizeof q.rkey, "sl:test:%llu", id);
    q.key = SL_KEY("t", "a", q.client);
    rand_policy(&q.pol, &q.cp, NULL, alg_only);
    set_policy(&q);
    switch (below(4)) {
    case 0:
        q.now = (int64_t)below(1000000);
        break;
    case 1:
        q.now = TMAX - (int64_t)below((uint64_t)(200 * DAY));
        break;
    default:
        q.now = (int64_t)range(1, (uint64_t)TMAX);
        break;
    }
    unsigned steps = (unsigned)range(STEPS / 2, STEPS * 3 / 2);
    for (q.step = 0; q.step < steps; q.step++) {
        step_time(&q);
        unsigned r = (unsigned)below(100);
        if (r < 6) { /* policy change: the next decision carries the state over */
            sl_policy np;
            sl_cpolicy ncp;
            if (chance(50)) {
                rand_policy(&np, &ncp, &q.pol, 0);
            } else if (chance(40)) {
                /* as many limits, each of any algorithm: limits whose algorithm the old
                 * policy lacks carry over from old limits of other algorithms */
                sl_policy shape = q.pol;
                for (unsigned i = 0; i < shape.nlimits; i++)
                    shape.limits[i].algorithm = (sl_algorithm)range(1, 7);
                rand_policy(&np, &ncp, &shape, 0);
            } else {
                rand_policy(&np, &ncp, NULL, chance(50) ? alg_only : 0);
            }
            q.pol = np;
            q.cp = ncp;
            set_policy(&q);
            counts.changes++;
            if ((long long)id == trace_seq) {
                fprintf(stderr, "%u: policy (", q.step);
                print_policy(&q);
            }
            continue;
        }
        if (r < 18 && q.cp.has_lease)
            do_release(&q);
        else if (r < 34)
            do_take(&q, 1);
        else
            do_take(&q, 0);
    }
    cmd("DEL %s", q.rkey);
    free(q.leases);
    sl_close(q.l);
}

static void test_differential(void **st)
{
    (void)st;
    struct timespec t0, t1;
    const char *tr = getenv("SL_TRACE_SEQ"), *sd = getenv("SL_TEST_SEED");
    const char *nseq = getenv("SL_TEST_SEQUENCES");
    unsigned long long total = nseq ? strtoull(nseq, NULL, 10) : SEQUENCES;
    if (tr)
        trace_seq = atoll(tr);
    if (sd)
        seed = strtoull(sd, NULL, 10);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* every algorithm alone first, then mixed policies */
    unsigned long long id = 0;
    for (int a = 1; a <= 7; a++)
        for (unsigned long long i = 0; i < total / 14; i++)
            run_sequence(id++, a);
    while (id < total)
        run_sequence(id++, 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("differential: %llu sequences, %lu takes (%lu allowed, %lu leases), %lu peeks "
           "(%lu statuses), %lu releases, %lu policy changes in %.1f s\n",
           id, counts.takes, counts.allowed, counts.leases, counts.peeks, counts.statuses,
           counts.releases,
           counts.changes,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
}

/* ---- the exact helpers at their edges ------------------------------------------------------ */

/* Call "selftest <name> <args>" and return its results as strings. */
static redisReply *selftest(const char *name, int n, const long long *v)
{
    char nums[8][24];
    const char *argv[16] = {"FCALL", fname, "0", "selftest", name};
    int k = 5;
    for (int i = 0; i < n; i++)
        snprintf(nums[i], 24, "%lld", v[i]), argv[k++] = nums[i];
    redisReply *r = redisCommandArgv(rc, k, argv, NULL);
    assert_non_null(r);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("selftest %s: %s", name, r->str);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    return r;
}

static void expect_str(redisReply *r, size_t i, const char *want, const char *what)
{
    assert_true(r->elements > i);
    if (strcmp(r->element[i]->str, want) != 0)
        fail_msg("%s: got %s, want %s", what, r->element[i]->str, want);
}

static void check_muldiv(u128 a, u128 b, u128 m)
{
    u128 p = a * b;
    char q[40], rem[40], what[160];
    snprintf(q, sizeof q, "%llu", (unsigned long long)(p / m));
    snprintf(rem, sizeof rem, "%llu", (unsigned long long)(p % m));
    snprintf(what, sizeof what, "muldiv(%llu, %llu, %llu)", (unsigned long long)a,
             (unsigned long long)b, (unsigned long long)m);
    long long v[3] = {(long long)a, (long long)b, (long long)m};
    redisReply *r = selftest("muldiv", 3, v);
    expect_str(r, 0, q, what);
    expect_str(r, 1, rem, what);
    freeReplyObject(r);
}

static void check_to_double(uint64_t x, uint64_t w, uint64_t e)
{
    char want[40], what[160];
    snprintf(want, sizeof want, "%.17g", (double)((u128)x * w + e));
    snprintf(what, sizeof what, "to_double(%llu, %llu, %llu)", (unsigned long long)x,
             (unsigned long long)w, (unsigned long long)e);
    long long v[3] = {(long long)x, (long long)w, (long long)e};
    redisReply *r = selftest("to_double", 3, v);
    expect_str(r, 0, want, what);
    freeReplyObject(r);
}

static void check_win_pos(int64_t W, int64_t O, int64_t t)
{
    i128 x = (i128)O * S + t, m = x % W;
    if (m < 0)
        m += W;
    char want[40], what[160];
    snprintf(want, sizeof want, "%lld", (long long)m);
    snprintf(what, sizeof what, "win_pos(W %lld, O %lld, t %lld)", (long long)W, (long long)O,
             (long long)t);
    long long v[3] = {W, O, t};
    redisReply *r = selftest("win_pos", 3, v);
    expect_str(r, 0, want, what);
    freeReplyObject(r);
}

static void check_ms_until(int64_t O, int64_t t, int64_t t2, int64_t osec, int64_t ons)
{
    i128 ns = ((i128)O - osec) * S + t + t2 - ons;
    i128 q = ns / 1000000;
    if (q * 1000000 < ns)
        q++;
    char want[40], what[160];
    snprintf(want, sizeof want, "%lld", (long long)q);
    snprintf(what, sizeof what, "ms_until(%lld, %lld, %lld, %lld, %lld)", (long long)O,
             (long long)t, (long long)t2, (long long)osec, (long long)ons);
    long long v[5] = {O, t, t2, osec, ons};
    redisReply *r = selftest("ms_until", 5, v);
    expect_str(r, 0, want, what);
    freeReplyObject(r);
}

static void check_carry_credit(int64_t have, int64_t t_old, int64_t t_new, int64_t cap)
{
    u128 h = (u128)(uint64_t)have * (uint64_t)t_new / (uint64_t)t_old;
    int64_t want = have <= 0 ? 0 : h > (u128)cap ? cap : (int64_t)h;
    char ws[40], what[160];
    snprintf(ws, sizeof ws, "%lld", (long long)want);
    snprintf(what, sizeof what, "carry_credit(%lld, %lld, %lld, %lld)", (long long)have,
             (long long)t_old, (long long)t_new, (long long)cap);
    long long v[4] = {have, t_old, t_new, cap};
    redisReply *r = selftest("carry_credit", 4, v);
    expect_str(r, 0, ws, what);
    freeReplyObject(r);
}

static void test_helpers(void **st)
{
    (void)st;
    const uint64_t P52 = UINT64_C(1) << 52;
    /* muldiv: the products sliding_window and the window phase need, at the edges */
    check_muldiv(0, 0, 1);
    check_muldiv(1, 0, 1);
    check_muldiv((uint64_t)P53, 1, 1);
    check_muldiv((uint64_t)P53 - 1, 1, P52);
    check_muldiv(1000000000, P52, P52);
    check_muldiv(999999999, P52 - 1, P52);
    check_muldiv(4611686018, 1000000000, P52);         /* the phase of the last second */
    check_muldiv(4611686018, 1000000000, P52 - 1);
    check_muldiv(4611686018, 1000000000, 1000000);     /* 1 ms windows */
    check_muldiv(4611686018, 1000000000, 1000000007);
    check_muldiv(1000000000, P52, 1000000000);         /* k = (L-cost-cur)*W/prev */
    check_muldiv((UINT64_C(1) << 31) - 1, P52, UINT64_C(1) << 30); /* to_double's split */
    check_muldiv(P52, P52, P52);                       /* carry_credit */
    check_muldiv(P52 - 1, P52, P52 - 1);
    check_muldiv(2, 500, 1000); /* the remainder reaches the divisor exactly */
    check_muldiv(2, P52 / 2, P52);
    check_muldiv(6, P52 / 3, P52 - 1);
    for (int i = 0; i < 400; i++) {
        uint64_t m = range(1, P52), a = bits(53), b = bits(53);
        if (a > (uint64_t)P53)
            a = (uint64_t)P53;
        if (b >= (uint64_t)P53)
            b = (uint64_t)P53 - 1;
        if ((u128)a * b / m >= (u128)P53)
            continue;
        check_muldiv(a, b, m);
    }
    /* to_double: exact, rounding, and ties to even around 2^53 and 2^81 */
    check_to_double(0, 0, 0);
    check_to_double(1, P52, P52 + 1);               /* 2^53 + 1: tie, down to even */
    check_to_double(1, P52, P52 + 3);               /* 2^53 + 3: tie, up to even */
    check_to_double(1, P52, P52 - 1);               /* 2^53 - 1: exact */
    check_to_double(UINT64_C(1) << 29, P52, UINT64_C(1) << 28);
    check_to_double(UINT64_C(1) << 29, P52, (UINT64_C(1) << 28) + (UINT64_C(1) << 29));
    check_to_double(UINT64_C(1) << 29, P52, (UINT64_C(1) << 28) + 1);
    check_to_double(UINT64_C(1) << 29, P52, (UINT64_C(1) << 28) - 1);
    check_to_double(1000000000, P52, (uint64_t)P53 - 1);
    check_to_double((UINT64_C(1) << 31) - 1, P52, (uint64_t)P53 - 1);
    for (int i = 0; i < 400; i++)
        check_to_double(bits(31), chance(20) ? P52 : bits(52), bits(53));
    /* carry_credit: capped or not, 128-bit products */
    check_carry_credit(0, 1, 1, 5);
    check_carry_credit((int64_t)P52, 1, (int64_t)P52, (int64_t)P52);
    check_carry_credit((int64_t)P52, (int64_t)P52, (int64_t)P52, (int64_t)P52);
    check_carry_credit((int64_t)P52 - 1, (int64_t)P52, (int64_t)P52 - 1, (int64_t)P52);
    check_carry_credit(999, 1000, 1, 1000);
    check_carry_credit(1000, 3, 2, 500); /* a smaller unit: the cap, past the shortcut */
    check_carry_credit(9000000000, 1000000000, 500000000, 1500000000);
    for (int i = 0; i < 300; i++) {
        int64_t have = (int64_t)bits(52), to = (int64_t)range(1, P52), tn = (int64_t)range(1, P52);
        u128 h = (u128)(uint64_t)have * (uint64_t)tn / (uint64_t)to;
        int64_t cap = chance(50) || h > P52 ? (int64_t)bits(52) /* around the result: */
                                            : (int64_t)h + (int64_t)range(0, 2) - 1;
        check_carry_credit(have, to, tn, cap < 0 ? 0 : cap);
    }
    /* win_pos: windows aligned to the epoch, times up to 2^53 below the origin */
    check_win_pos((int64_t)P52, 4611686018, 427387903);
    check_win_pos((int64_t)P52, 4611686018, -(int64_t)P53);
    check_win_pos(1, 4611686018, -(int64_t)P53);
    check_win_pos(1000000, 0, -(int64_t)P53);
    check_win_pos(86400 * S, 1700000000, 999999999);
    check_win_pos((int64_t)P52 - 1, 4503599, 627370496); /* (O*1e9 + t) = 2^52 exactly */
    for (int i = 0; i < 300; i++) {
        int64_t W = (int64_t)range(1, P52), O = (int64_t)below(4611686019);
        int64_t t = chance(50) ? (int64_t)below((uint64_t)S) : -(int64_t)below((uint64_t)P53 + 1);
        check_win_pos(W, O, t);
    }
    /* ms_until: rounding up, parts at +-2^53, origins far from now */
    check_ms_until(0, 0, 0, 0, 0);
    check_ms_until(0, 1, 0, 0, 0);
    check_ms_until(0, 1000000, 0, 0, 0);
    check_ms_until(0, 1000001, 0, 0, 1);
    check_ms_until(5, 0, 0, 4, 999999999);
    check_ms_until(4611686018, (int64_t)P52, (int64_t)P52, 0, 999999999);
    check_ms_until(100, -(int64_t)P53, (int64_t)P53, 100, 999999);
    check_ms_until(100, (int64_t)P53 - 1, (int64_t)P53 - 1, 100, 1);
    for (int i = 0; i < 300; i++) {
        int64_t osec = (int64_t)below(4611686019);
        int64_t O = osec + (int64_t)(chance(50) ? 0 : below(1000000));
        int64_t t = (int64_t)bits(53) * (chance(20) ? -1 : 1);
        int64_t t2 = chance(50) ? 0 : (int64_t)bits(53);
        check_ms_until(O, t, t2, osec, (int64_t)below((uint64_t)S));
    }
}

/* ---- targeted cases -------------------------------------------------------------------------- */

static sl_cpolicy compile1(sl_limit l)
{
    sl_policy p = {1, {l}};
    sl_cpolicy cp;
    assert_int_equal(sl_policy_compile(&p, NULL, &cp), SL_OK);
    return cp;
}

/* Redis's clock: a token bucket of 5 (refilling 1 per minute) allows exactly 5 quick takes,
 * the reported `now` is the wall clock, and the TTL is the time to refill. */
static void test_time_mode(void **st)
{
    (void)st;
    sl_cpolicy cp = compile1((sl_limit){SL_TOKEN_BUCKET, 5, 1.0 / 60, 0, 0});
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    sdec d;
    for (int i = 0; i < 6; i++) {
        call_decision("sl:time", -1, "take", 1, &cp, &d);
        assert_int_equal(d.allowed, i < 5);
        assert_int_equal(d.remaining, i < 5 ? 4 - i : 0);
    }
    long long now = d.now;
    long long wall_ns = (long long)wall.tv_sec * S + wall.tv_nsec;
    assert_true(now >= wall_ns - 5 * S && now <= wall_ns + 5 * S);
    redisReply *r = redisCommand(rc, "PTTL sl:time");
    assert_true(r->integer > 299000 && r->integer <= 300000); /* 5 units of 60 s */
    freeReplyObject(r);
    cmd("DEL sl:time");
}

/* A peek writes nothing, not even a new key; a key whose TTL has passed is a new key. */
static void test_peek_and_expiry(void **st)
{
    (void)st;
    sl_cpolicy cp = compile1((sl_limit){SL_TOKEN_BUCKET, 2, 1.0 / 60, 0, 0});
    int64_t now = 1700000000 * S;
    sdec d;
    call_decision("sl:exp", now, "peek", 2, &cp, &d);
    assert_int_equal(d.allowed, 1);
    assert_int_equal(d.remaining, 0);
    redisReply *r = redisCommand(rc, "EXISTS sl:exp");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    call_decision("sl:exp", now, "take", 2, &cp, &d);
    assert_int_equal(d.allowed, 1);
    call_decision("sl:exp", now + 1, "take", 1, &cp, &d);
    assert_int_equal(d.allowed, 0);
    assert_int_equal(d.retry_after, 60 * S - 1);
    cmd("PEXPIRE sl:exp 1");
    usleep(20000);
    call_decision("sl:exp", now + 2, "take", 1, &cp, &d);
    assert_int_equal(d.allowed, 1); /* new again: full */
    assert_int_equal(d.remaining, 1);
    cmd("DEL sl:exp");
}

/* An unreadable value is a new key (a peek answers as for one and leaves it; a take
 * overwrites it); a release on it finds nothing. */
static void test_garbage(void **st)
{
    (void)st;
    sl_cpolicy cp = compile1((sl_limit){SL_FIXED_WINDOW, 3, 0, 60, 0});
    int64_t now = 1700000000 * S;
    sdec d;
    /* a valid value, then the same cut short, with a new version, with a trailing byte */
    call_decision("sl:g", now, "take", 1, &cp, &d);
    size_t len;
    char *good = get_value("sl:g", &len);
    assert_non_null(good);
    assert_int_equal(good[0], 1);
    struct {
        const char *v;
        size_t len;
    } bad[] = {{"garbage", 7}, {"", 0}, {good, len - 1}, {good, len + 1}, {"\x02", 1},
               {"\x01\x00", 2}};
    char *longer = malloc(len + 1);
    memcpy(longer, good, len);
    longer[len] = 0;
    bad[3].v = longer;
    char *newver = malloc(len);
    memcpy(newver, good, len);
    newver[0] = 2;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0] + 1; i++) {
        const char *v = i < sizeof bad / sizeof bad[0] ? bad[i].v : newver;
        size_t vl = i < sizeof bad / sizeof bad[0] ? bad[i].len : len;
        redisReply *r = redisCommand(rc, "SET sl:g %b", v, vl);
        expect_ok(r);
        call_decision("sl:g", now, "peek", 1, &cp, &d);
        assert_int_equal(d.remaining, 2); /* as for a new key */
        size_t l2;
        char *still = get_value("sl:g", &l2);
        assert_int_equal(l2, vl);
        assert_memory_equal(still, v, vl);
        free(still);
        append_call("sl:g", now, "release", 5, &cp);
        r = get_reply();
        assert_int_equal(r->integer, 0);
        freeReplyObject(r);
        call_decision("sl:g", now, "take", 1, &cp, &d);
        assert_int_equal(d.allowed, 1);
        assert_int_equal(d.remaining, 2);
        size_t l3;
        char *fresh = get_value("sl:g", &l3);
        assert_int_equal(l3, len);
        assert_memory_equal(fresh, good, len);
        free(fresh);
    }
    free(good);
    free(longer);
    free(newver);
    cmd("DEL sl:g");
}

/* Malformed calls are refused with "ERR sluice: ..." and change nothing. */
static void test_bad_arguments(void **st)
{
    (void)st;
    cmd("SET sl:bad keep");
    const char *tb[] = {"1", "5", "200000000", "0", "0", "0"};
    struct {
        const char *now, *op, *cost, *n;
        const char *lim[6];
        int nargs; /* limits' strings sent (6 per limit) */
    } cases[] = {
        {"abc", "take", "1", "1", {0}, 6},
        {"-1", "take", "1", "1", {0}, 6},
        {"4611686018427387904", "take", "1", "1", {0}, 6}, /* 2^62 */
        {"1.5", "take", "1", "1", {0}, 6},
        {"1", "steal", "1", "1", {0}, 6},
        {"1", "take", "x", "1", {0}, 6},
        {"1", "take", "-1", "1", {0}, 6},
        {"1", "take", "6", "1", {0}, 6}, /* cost above the limit */
        {"1", "take", "1", "0", {0}, 0},
        {"1", "take", "1", "5", {0}, 6},
        {"1", "take", "1", "2", {0}, 6}, /* says 2, sends 1 */
        {"1", "take", "1", "1", {"8", "5", "1", "0", "0", "0"}, 6},
        {"1", "take", "1", "1", {"1", "0", "1", "0", "0", "0"}, 6},
        {"1", "take", "1", "1", {"1", "5", "0", "0", "0", "0"}, 6},
        {"1", "take", "1", "1", {"1", "5", "1", "7", "0", "0"}, 6},
        {"1", "take", "1", "1", {"1", "2", "2251799813685249", "0", "0", "0"}, 6}, /* tau > 2^52 */
        {"1", "take", "1", "1", {"3", "5", "0", "4503599627370497", "0", "0"}, 6},
        {"1", "take", "1", "1", {"5", "100001", "0", "1000", "0", "0"}, 6},
        {"1", "take", "1", "1", {"6", "5", "200000000", "0", "0", "1"}, 6}, /* rinterval 0 */
        {"1", "take", "1", "1", {"1", "1.5", "1", "0", "0", "0"}, 6},
        {"1", "take", "1", "1", {"1", "5", "1", "0", "0", "x"}, 6},
        /* joined with spaces, the same limit arguments as the valid call below, which the
         * script has just cached: a cache hit must not skip the argument count */
        {"1", "take", "1", "1 1", {"5", "200000000", "0", "0", "0"}, 5},
    };
    const char *valid[] = {"FCALL", fname, "1", "sl:bad2", "1", "peek", "1", "1",
                           tb[0], tb[1], tb[2], tb[3], tb[4], tb[5]};
    redisReply *ok = redisCommandArgv(rc, 14, valid, NULL);
    assert_non_null(ok);
    assert_int_equal(ok->type, REDIS_REPLY_STRING);
    freeReplyObject(ok);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *argv[16] = {"FCALL", fname, "1", "sl:bad", cases[i].now, cases[i].op,
                                cases[i].cost, cases[i].n};
        int k = 8;
        for (int j = 0; j < cases[i].nargs; j++)
            argv[k++] = cases[i].lim[0] ? cases[i].lim[j] : tb[j];
        redisReply *r = redisCommandArgv(rc, k, argv, NULL);
        assert_non_null(r);
        if (r->type != REDIS_REPLY_ERROR || strncmp(r->str, "ERR sluice: ", 12) != 0)
            fail_msg("case %zu: not refused (%d %s)", i, r->type, r->str ? r->str : "");
        freeReplyObject(r);
    }
    size_t len;
    char *v = get_value("sl:bad", &len);
    assert_int_equal(len, 4);
    assert_memory_equal(v, "keep", 4);
    free(v);
    cmd("DEL sl:bad");
}

/* Several keys in one call (a server's group): each key's reply, stored value and TTL are
 * exactly those of one call per key in the same order at the same time, a key named twice
 * included; across algorithms, stacked limits, takes, peeks and costs. A key of another
 * type fails alone. Malformed groups (no key, more than 64, a release of two) are refused
 * and change nothing. */
static void test_group(void **st)
{
    (void)st;
    sl_limit tb = {SL_TOKEN_BUCKET, 3, 2, 0, 0}, sw = {SL_SLIDING_WINDOW, 4, 0, 1, 0},
             cc = {SL_CONCURRENCY, 2, 0, 30, 0}, lg = {SL_SLIDING_LOG, 3, 0, 0.5, 0},
             fw = {SL_FIXED_WINDOW, 5, 0, 2, 0};
    sl_policy pols[] = {{1, {tb}}, {1, {sw}}, {1, {cc}}, {1, {lg}}, {2, {tb, fw}}};
    const int pick[] = {0, 1, 2, 1, 3, 0, 4}; /* key 1 and key 0 twice */
    enum { NK = sizeof pick / sizeof pick[0] };
    for (size_t pi = 0; pi < sizeof pols / sizeof pols[0]; pi++) {
        sl_cpolicy cp;
        assert_int_equal(sl_policy_compile(&pols[pi], NULL, &cp), SL_OK);
        char gk[NK][32], sk[NK][32];
        const char *gkeys[NK];
        for (int i = 0; i < NK; i++) {
            snprintf(gk[i], sizeof gk[i], "sl:g%zu:%d", pi, pick[i]);
            snprintf(sk[i], sizeof sk[i], "sl:s%zu:%d", pi, pick[i]);
            gkeys[i] = gk[i];
        }
        int64_t now = 1700000000 * S;
        for (int round = 0; round < 12; round++) {
            const char *op = round % 4 == 3 ? "peek" : "take";
            uint64_t cost = round % 3 == 2 ? 2 : round == 5 ? 0 : 1;
            append_group(gkeys, NK, now, op, cost, &cp);
            redisReply *g = get_reply();
            assert_int_equal(g->type, REDIS_REPLY_ARRAY);
            assert_int_equal(g->elements, NK);
            for (int i = 0; i < NK; i++) {
                append_call(sk[i], now, op, cost, &cp);
                redisReply *one = get_reply();
                assert_int_equal(one->type, REDIS_REPLY_STRING);
                assert_int_equal(g->element[i]->type, REDIS_REPLY_STRING);
                if (one->len != g->element[i]->len ||
                    memcmp(one->str, g->element[i]->str, one->len) != 0)
                    fail_msg("policy %zu round %d key %d: the group's reply differs", pi,
                             round, i);
                freeReplyObject(one);
            }
            freeReplyObject(g);
            for (int i = 0; i < NK; i++) {
                size_t gl = 0, sl = 0;
                char *gv = get_value(gk[i], &gl), *sv = get_value(sk[i], &sl);
                assert_int_equal(gv == NULL, sv == NULL);
                if (gv && (gl != sl || memcmp(gv, sv, gl) != 0))
                    fail_msg("policy %zu round %d key %d: stored values differ", pi, round, i);
                free(gv);
                free(sv);
                redisReply *a = redisCommand(rc, "PTTL %s", gk[i]);
                redisReply *b = redisCommand(rc, "PTTL %s", sk[i]);
                assert_true(llabs(a->integer - b->integer) <= 50); /* read moments apart */
                freeReplyObject(a);
                freeReplyObject(b);
            }
            now += 150 * S / 1000;
        }
        for (int i = 0; i < NK; i++)
            cmd("DEL %s %s", gk[i], sk[i]);
    }

    sl_cpolicy cp = compile1(tb);
    const char *many[GROUP_KEYS_MAX];
    for (int i = 0; i < GROUP_KEYS_MAX; i++)
        many[i] = "sl:gbad";
    struct {
        int nk;
        const char *op;
    } bad[] = {{0, "take"}, {65, "take"}, {2, "release"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        append_group(many, bad[i].nk, 1700000000 * S, bad[i].op, 1, &cp);
        redisReply *r = get_reply();
        if (r->type != REDIS_REPLY_ERROR || strncmp(r->str, "ERR sluice: ", 12) != 0)
            fail_msg("bad group %zu: not refused (%d)", i, r->type);
        freeReplyObject(r);
    }
    /* a key of another type fails alone; the keys around it are decided once */
    cmd("HSET sl:gwt f v");
    const char *mixed[] = {"sl:gok1", "sl:gwt", "sl:gok2"};
    append_group(mixed, 3, 1700000000 * S, "take", 1, &cp);
    redisReply *m = get_reply();
    assert_int_equal(m->type, REDIS_REPLY_ARRAY);
    assert_int_equal(m->elements, 3);
    assert_int_equal(m->element[1]->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(m->element[1]->str, "WRONGTYPE"));
    for (int i = 0; i < 3; i += 2) {
        sl_rs_reply y;
        assert_int_equal(m->element[i]->type, REDIS_REPLY_STRING);
        assert_true(sl_rs_decode(m->element[i]->str, m->element[i]->len, 1, &y));
        assert_int_equal(y.allowed, 1);
        assert_int_equal(y.remaining, 2);
    }
    freeReplyObject(m);
    cmd("DEL sl:gwt sl:gok1 sl:gok2");

    append_group(many, 64, 1700000000 * S, "take", 1, &cp); /* the most: 64, here all one key */
    redisReply *r = get_reply();
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 64);
    sl_rs_reply x;
    assert_true(sl_rs_decode(r->element[2]->str, r->element[2]->len, 1, &x));
    assert_int_equal(x.allowed, 1);
    assert_int_equal(x.remaining, 0); /* the third of 3 */
    assert_true(sl_rs_decode(r->element[3]->str, r->element[3]->len, 1, &x));
    assert_int_equal(x.allowed, 0);
    freeReplyObject(r);
    cmd("DEL sl:gbad");
}

/* The reply decoder takes what the script packs and refuses anything else: a wrong length,
 * flags out of range, a count that is not an integer in [0, 2^53] (NaN, negative, 0.5). */
static void put_le(char *p, double v)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    for (int i = 0; i < 8; i++)
        p[i] = (char)(u >> (8 * i));
}

static void test_reply_decode(void **st)
{
    (void)st;
    char ok[74] = {1, 1};
    double v[9] = {4, 5e8, 0, 0, 4.5, 0, 7, 1700000000, 999999999};
    for (int i = 0; i < 9; i++)
        put_le(ok + 2 + 8 * i, v[i]);
    sl_rs_reply r;
    assert_int_equal(sl_rs_decode(ok, 74, 2, &r), 1);
    assert_int_equal(r.allowed, 1);
    assert_int_equal(r.index, 1);
    assert_int_equal(r.remaining, 4);
    assert_int_equal(r.reset_after, 500000000);
    assert_true(r.tokens == 4.5);
    assert_int_equal(r.lease, 7);
    assert_int_equal(r.now, 1700000000 * S + 999999999);
    assert_int_equal(sl_rs_decode(ok, 73, 2, &r), 0);
    assert_int_equal(sl_rs_decode(ok, 74, 1, &r), 0); /* index 1 of a one-limit policy */
    struct {
        int at;
        double v;
    } bad[] = {{2, NAN}, {2, -1}, {10, 0.5}, {18, 1e300}, {58, -3}, {66, 1e9}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char b[74];
        memcpy(b, ok, 74);
        put_le(b + bad[i].at, bad[i].v);
        if (sl_rs_decode(b, 74, 2, &r) != 0)
            fail_msg("case %zu accepted", i);
    }
    ok[0] = 2;
    assert_int_equal(sl_rs_decode(ok, 74, 2, &r), 0);
}

/* A 100000-entry sliding log stays 8 bytes per entry and quick to decide on. */
static void test_big_log(void **st)
{
    (void)st;
    sl_cpolicy cp = compile1((sl_limit){SL_SLIDING_LOG, 100000, 0, 3600, 0});
    int64_t now = 1700000000 * S;
    sdec d;
    call_decision("sl:log", now, "take", 60000, &cp, &d);
    call_decision("sl:log", now + 1, "take", 40000, &cp, &d);
    assert_int_equal(d.allowed, 1);
    assert_int_equal(d.remaining, 0);
    size_t len;
    char *v = get_value("sl:log", &len);
    assert_true(len > 800000 && len < 800100);
    free(v);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 20; i++) {
        call_decision("sl:log", now + 2 + i, "take", 1, &cp, &d);
        assert_int_equal(d.allowed, 0);
        assert_int_equal(d.retry_after, 3600 * S - 2 - i);
    }
    /* a day later every entry has expired, and they move to a new base */
    call_decision("sl:log", now + 40 * DAY, "take", 1, &cp, &d);
    assert_int_equal(d.allowed, 1);
    assert_int_equal(d.remaining, 99999);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("big log: 21 decisions in %.1f ms\n",
           ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / 1e6);
    cmd("DEL sl:log");
}

/* ---- set-up ------------------------------------------------------------------------------- */

static int group_setup(void **st)
{
    (void)st;
    if (redis_fixture_start(&fx, NULL) != 0)
        return -1;
    rc = redis_fixture_connect(&fx);
    if (!rc)
        return -1;
    /* what the library loads; SL_TEST_SCRIPT=file: another copy of the script, wrapped the
       same way (CMakeLists.txt) under the name sluice_test */
    const char *path = getenv("SL_TEST_SCRIPT");
    size_t len;
    char *text = NULL;
    const char *lib = sl_rs_script(&len);
    snprintf(fname, sizeof fname, "%s", sl_rs_function());
    if (path) {
        size_t flen;
        char *file = redis_fixture_read_file(path, &flen);
        if (!file || !(text = malloc(flen + 128))) {
            fprintf(stderr, "cannot read %s\n", path);
            free(file);
            return -1;
        }
        snprintf(fname, sizeof fname, "sluice_test");
        len = (size_t)sprintf(text, "#!lua name=sluice_test\n%sredis.register_function('sluice_test', main)\n", file);
        free(file);
        lib = text;
    }
    redisReply *r = redisCommand(rc, "FUNCTION LOAD REPLACE %b", lib, len);
    free(text);
    if (!r || r->type != REDIS_REPLY_STRING) {
        fprintf(stderr, "FUNCTION LOAD failed: %s\n", r && r->str ? r->str : "no reply");
        if (r)
            freeReplyObject(r);
        return -1;
    }
    freeReplyObject(r);
    return 0;
}

static int group_teardown(void **st)
{
    (void)st;
    if (rc)
        redisFree(rc);
    redis_fixture_stop(&fx);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_helpers),      cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_garbage),      cmocka_unit_test(test_peek_and_expiry),
        cmocka_unit_test(test_time_mode),    cmocka_unit_test(test_big_log),
        cmocka_unit_test(test_differential), cmocka_unit_test(test_reply_decode),
        cmocka_unit_test(test_group),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
