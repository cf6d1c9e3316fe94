/* test_algo_diff.c — randomized differential tests of the seven algorithms.
 *
 * Each algorithm is checked against a deliberately simple reference model written another
 * way (token bucket as a credit counter refilled by elapsed ns; leaky bucket as a list of the
 * queued units' finish times; fixed window by division; sliding window and sliding log as a
 * plain list of admitted requests, with retry/reset found by binary search over time instead
 * of in closed form; burst_reserve as two credit counters; concurrency as an unsorted list of
 * leases). Thousands of seeded random sequences — costs including 0 and the whole limit, time
 * steps including 0, backwards, exact retry boundaries +-1 and jumps of days — must give
 * identical decisions (allowed, remaining, retry_after, reset_after, delay, reserve) at every
 * step. The state is moved to a fresh block now and then (it must be plain data). */
#include <stdarg.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "rng.h"

#include "algo.h"

typedef unsigned __int128 u128;

#define S INT64_C(1000000000)
#define DAY (86400 * S)
#define TMAX ((INT64_C(1) << 62) - 1)

/* ---- the reference model ------------------------------------------------------------------- */

typedef struct ev {
    int64_t t;
    uint64_t cost; /* sliding window / log: an admitted request; concurrency: weight */
    uint64_t id;
} ev;

typedef struct model {
    sl_algorithm alg;
    uint64_t L;        /* limit / capacity / queue depth / max in flight */
    int64_t T, tau;    /* ns per unit, L*T */
    int64_t W;         /* window / TTL */
    int64_t RT, rtau;  /* burst_reserve reserve */
    int64_t last;
    int64_t credit;    /* token bucket and burst base: credit in ns, 0..tau */
    int64_t rcredit;   /* burst reserve credit in ns, 0..rtau */
    int64_t *fin;      /* leaky: finish time of every queued unit, in order */
    size_t nfin;
    int64_t widx;      /* fixed window: index of the counted window */
    uint64_t wcount;
    ev *ev;            /* sliding window / log: admitted requests; concurrency: leases */
    size_t nev, evcap;
} model;

typedef struct mres {
    int allowed, via_reserve;
    uint64_t remaining;
    int64_t reset_after, retry_after, delay;
    int64_t rcredit_after; /* burst: reserve ns after */
} mres;

static void ev_push(model *m, int64_t t, uint64_t cost, uint64_t id)
{
    if (m->nev == m->evcap) {
        m->evcap = m->evcap ? 2 * m->evcap : 16;
        m->ev = realloc(m->ev, m->evcap * sizeof *m->ev);
        assert_non_null(m->ev);
    }
    m->ev[m->nev++] = (ev){t, cost, id};
}

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

/* Elapsed-time refill of a credit counter, capped (no overflow for huge gaps). */
static int64_t refill(int64_t credit, int64_t dt, int64_t cap)
{
    return dt >= cap - credit ? cap : credit + dt;
}

static int64_t advance(model *m, int64_t now)
{
    int64_t n = now > m->last ? now : m->last;
    int64_t dt = n - m->last;
    m->last = n;
    switch (m->alg) {
    case SL_TOKEN_BUCKET:
        m->credit = refill(m->credit, dt, m->tau);
        break;
    case SL_BURST_RESERVE:
        m->credit = refill(m->credit, dt, m->tau);
        m->rcredit = refill(m->rcredit, dt, m->rtau);
        break;
    case SL_LEAKY_BUCKET: {
        size_t k = 0; /* drop the units that have left */
        while (k < m->nfin && m->fin[k] <= n)
            k++;
        memmove(m->fin, m->fin + k, (m->nfin - k) * sizeof *m->fin);
        m->nfin -= k;
        break;
    }
    case SL_FIXED_WINDOW:
        if (n / m->W != m->widx) {
            m->widx = n / m->W;
            m->wcount = 0;
        }
        break;
    default:
        break;
    }
    return n;
}

/* sliding window: units admitted in aligned window k */
static uint64_t sw_count(const model *m, int64_t k)
{
    uint64_t c = 0;
    for (size_t i = 0; i < m->nev; i++)
        if (m->ev[i].t / m->W == k)
            c += m->ev[i].cost;
    return c;
}
/* estimate * W at time t */
static u128 sw_est(const model *m, int64_t t)
{
    int64_t k = t / m->W, e = t - k * m->W;
    return (u128)sw_count(m, k - 1) * (uint64_t)(m->W - e) + (u128)sw_count(m, k) * (uint64_t)m->W;
}
static int sw_pass(const model *m, int64_t t, uint64_t cost)
{
    return sw_est(m, t) + (u128)cost * (uint64_t)m->W <= (u128)m->L * (uint64_t)m->W;
}
/* sliding log: units in (t - W, t] */
static uint64_t log_count(const model *m, int64_t t)
{
    uint64_t c = 0;
    for (size_t i = 0; i < m->nev; i++)
        if (m->ev[i].t > t - m->W && m->ev[i].t <= t)
            c += m->ev[i].cost;
    return c;
}
/* concurrency: slots held at t */
static uint64_t cc_live(const model *m, int64_t t)
{
    uint64_t c = 0;
    for (size_t i = 0; i < m->nev; i++)
        if (m->ev[i].t > t)
            c += m->ev[i].cost;
    return c;
}
/* Smallest t in [lo, hi] with pred(t) true; pred monotone (false..true), pred(hi) true. */
typedef int (*tpred)(const model *m, int64_t t, uint64_t arg);
static int64_t search(const model *m, int64_t lo, int64_t hi, tpred pred, uint64_t arg)
{
    assert_true(pred(m, hi, arg));
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (pred(m, mid, arg))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}
static int p_sw_pass(const model *m, int64_t t, uint64_t c) { return sw_pass(m, t, c); }
static int p_sw_zero(const model *m, int64_t t, uint64_t c) { (void)c; return sw_est(m, t) == 0; }
static int p_log_pass(const model *m, int64_t t, uint64_t c) { return log_count(m, t) + c <= m->L; }
static int p_log_zero(const model *m, int64_t t, uint64_t c) { (void)c; return log_count(m, t) == 0; }
static int p_cc_pass(const model *m, int64_t t, uint64_t c) { return cc_live(m, t) + c <= m->L; }
static int p_cc_zero(const model *m, int64_t t, uint64_t c) { (void)c; return cc_live(m, t) == 0; }

static mres model_take(model *m, uint64_t cost, int64_t now, uint64_t lease)
{
    mres r;
    memset(&r, 0, sizeof r);
    int64_t n = advance(m, now);
    switch (m->alg) {
    case SL_TOKEN_BUCKET: {
        int64_t need = (int64_t)cost * m->T;
        if (m->credit >= need) {
            r.allowed = 1;
            m->credit -= need;
        } else {
            r.retry_after = need - m->credit;
        }
        r.remaining = (uint64_t)(m->credit / m->T);
        r.reset_after = m->tau - m->credit;
        break;
    }
    case SL_LEAKY_BUCKET: {
        int64_t work = 0; /* ns of service still owed to the queued units */
        for (size_t i = 0; i < m->nfin; i++)
            work += imin(m->T, m->fin[i] - n);
        int64_t need = (int64_t)cost * m->T, room = (int64_t)m->L * m->T;
        if (work + need <= room) {
            r.allowed = 1;
            r.delay = work;
            int64_t f = m->nfin ? m->fin[m->nfin - 1] : n;
            for (uint64_t u = 0; u < cost; u++) {
                f += m->T;
                m->fin[m->nfin++] = f;
            }
            work += need;
        } else {
            r.retry_after = work + need - room;
        }
        r.remaining = (uint64_t)((room - work) / m->T);
        r.reset_after = work;
        break;
    }
    case SL_FIXED_WINDOW: {
        int64_t end = (m->widx + 1) * m->W;
        if (m->wcount + cost <= m->L) {
            r.allowed = 1;
            m->wcount += cost;
        } else {
            r.retry_after = end - n;
        }
        r.remaining = m->L - m->wcount;
        r.reset_after = m->wcount ? end - n : 0;
        break;
    }
    case SL_SLIDING_WINDOW: {
        /* forget what can no longer weigh */
        size_t j = 0;
        for (size_t i = 0; i < m->nev; i++)
            if (m->ev[i].t / m->W >= n / m->W - 1)
                m->ev[j++] = m->ev[i];
        m->nev = j;
        u128 LW = (u128)m->L * (uint64_t)m->W;
        if (sw_pass(m, n, cost)) {
            r.allowed = 1;
            if (cost)
                ev_push(m, n, cost, 0);
        } else {
            r.retry_after = search(m, n, n + 2 * m->W, p_sw_pass, cost) - n;
        }
        u128 est = sw_est(m, n);
        r.remaining = est >= LW ? 0 : (uint64_t)((LW - est) / (uint64_t)m->W);
        r.reset_after = search(m, n, n + 2 * m->W, p_sw_zero, 0) - n;
        break;
    }
    case SL_SLIDING_LOG: {
        size_t j = 0;
        for (size_t i = 0; i < m->nev; i++)
            if (m->ev[i].t > n - m->W)
                m->ev[j++] = m->ev[i];
        m->nev = j;
        if (log_count(m, n) + cost <= m->L) {
            r.allowed = 1;
            if (cost)
                ev_push(m, n, cost, 0);
        } else {
            r.retry_after = search(m, n, n + m->W, p_log_pass, cost) - n;
        }
        r.remaining = m->L - log_count(m, n);
        r.reset_after = search(m, n, n + m->W, p_log_zero, 0) - n;
        break;
    }
    case SL_BURST_RESERVE: {
        int64_t need = (int64_t)cost * m->T;
        u128 rneed = (u128)cost * (uint64_t)m->RT;
        if (m->credit >= need) {
            r.allowed = 1;
            m->credit -= need;
        } else if ((u128)m->rcredit >= rneed) {
            r.allowed = 1;
            r.via_reserve = 1;
            m->rcredit -= (int64_t)rneed;
        } else {
            r.retry_after = need - m->credit;
            if (rneed <= (u128)m->rtau && (int64_t)rneed - m->rcredit < r.retry_after)
                r.retry_after = (int64_t)rneed - m->rcredit;
        }
        r.remaining = (uint64_t)(m->credit / m->T) + (uint64_t)(m->rcredit / m->RT);
        r.reset_after = m->tau - m->credit;
        r.rcredit_after = m->rcredit;
        break;
    }
    case SL_CONCURRENCY: {
        size_t j = 0;
        for (size_t i = 0; i < m->nev; i++)
            if (m->ev[i].t > n)
                m->ev[j++] = m->ev[i];
        m->nev = j;
        if (cc_live(m, n) + cost <= m->L) {
            r.allowed = 1;
            if (cost)
                ev_push(m, n + m->W, cost, lease);
        } else {
            r.retry_after = search(m, n, n + m->W, p_cc_pass, cost) - n;
        }
        r.remaining = m->L - cc_live(m, n);
        r.reset_after = search(m, n, n + m->W, p_cc_zero, 0) - n;
        break;
    }
    }
    return r;
}

static int model_release(model *m, uint64_t id, int64_t now)
{
    int64_t n = advance(m, now);
    for (size_t i = 0; i < m->nev; i++) {
        if (m->ev[i].id == id && m->ev[i].t > n) {
            m->ev[i] = m->ev[--m->nev];
            return SL_OK;
        }
    }
    return SL_ELEASE;
}

/* When the model is back to "like new" (for sl_algo_full_at); 0 when it is already. */
static int64_t model_full_in(model *m)
{
    int64_t n = m->last;
    switch (m->alg) {
    case SL_TOKEN_BUCKET:
        return m->tau - m->credit;
    case SL_LEAKY_BUCKET:
        return m->nfin ? m->fin[m->nfin - 1] - n : 0;
    case SL_FIXED_WINDOW:
        return m->wcount && m->widx == n / m->W ? (m->widx + 1) * m->W - n : 0;
    case SL_SLIDING_WINDOW:
        return search(m, n, n + 2 * m->W, p_sw_zero, 0) - n;
    case SL_SLIDING_LOG:
        return search(m, n, n + m->W, p_log_zero, 0) - n;
    case SL_CONCURRENCY:
        return search(m, n, n + m->W, p_cc_zero, 0) - n;
    default:
        return -1;
    }
}

/* ---- random parameters --------------------------------------------------------------------- */

/* A rate the reference can convert exactly: an integer, or m/8. Returns it and sets T. */
static double pick_rate(int64_t *T, int allow_slow)
{
    if (allow_slow && chance(30)) {
        uint64_t m8 = range(1, 40); /* 0.125 .. 5 per second */
        *T = (int64_t)((UINT64_C(8000000000) + m8 - 1) / m8);
        return (double)m8 / 8.0;
    }
    uint64_t r = chance(50) ? range(1, 20) : chance(70) ? range(1, 100000) : range(1, 1000000000);
    *T = (int64_t)((UINT64_C(1000000000) + r - 1) / r);
    return (double)r;
}

/* A window in whole microseconds (so the seconds value converts back exactly). */
static double pick_window(int64_t *W)
{
    static const int64_t fixed[] = {1000 * 1000, 7 * 1000 * 1000, S, 3600 * S, DAY, 366 * DAY};
    int64_t us = chance(40) ? fixed[below(6)] / 1000 : (int64_t)range(1000, 100000000);
    *W = us * 1000;
    return (double)us / 1e6;
}

static uint64_t pick_limit(uint64_t small, uint64_t big)
{
    if (chance(75))
        return range(1, small);
    return range(1, big);
}

static uint64_t pick_cost(uint64_t L)
{
    unsigned k = (unsigned)below(100);
    if (k < 20)
        return 0;
    if (k < 60)
        return 1;
    if (k < 70)
        return L;
    if (k < 85)
        return range(1, L < 4 ? L : 4);
    return range(0, L);
}

static void model_new(model *m, sl_algorithm alg, sl_limit *l)
{
    memset(m, 0, sizeof *m);
    memset(l, 0, sizeof *l);
    m->alg = alg;
    l->algorithm = alg;
    switch (alg) {
    case SL_TOKEN_BUCKET:
        do {
            m->L = pick_limit(20, chance(20) ? 1000000000 : 10000);
            l->rate = pick_rate(&m->T, 1);
        } while ((u128)m->L * (uint64_t)m->T > ((u128)1 << 62));
        break;
    case SL_LEAKY_BUCKET:
        m->L = pick_limit(10, 60);
        l->rate = pick_rate(&m->T, 1);
        m->fin = malloc(sizeof *m->fin * (m->L + 1));
        break;
    case SL_FIXED_WINDOW:
    case SL_SLIDING_WINDOW:
        m->L = pick_limit(20, chance(20) ? 1000000000 : 1000);
        l->window = pick_window(&m->W);
        break;
    case SL_SLIDING_LOG:
    case SL_CONCURRENCY:
        m->L = pick_limit(20, chance(10) ? 2000 : 100);
        l->window = pick_window(&m->W);
        break;
    case SL_BURST_RESERVE: {
        m->L = pick_limit(20, 200);
        m->T = (int64_t)((UINT64_C(1000000000) + m->L - 1) / m->L);
        l->rate = pick_rate(&m->RT, 1);
        uint64_t R = chance(15) ? 0 : pick_limit(20, 300);
        l->reserve_cap = (double)R;
        m->rtau = (int64_t)R * m->RT;
        break;
    }
    default:
        fail();
    }
    l->limit = (double)m->L;
    m->tau = (int64_t)m->L * m->T;
    m->credit = m->tau; /* a new token bucket / burst base is full; the reserve is empty */
}

/* ---- the driver ---------------------------------------------------------------------------- */

typedef struct impl {
    sl_climit c;
    void *st;
} impl;

static int64_t unit_of(const model *m)
{
    switch (m->alg) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        return m->T;
    case SL_BURST_RESERVE:
        return m->T < m->RT ? m->RT : m->T;
    default:
        return m->W;
    }
}

static int64_t next_time(int64_t t, const model *m, int64_t last_retry)
{
    int64_t u = unit_of(m);
    uint64_t span = (uint64_t)(u > 0 ? u : 1);
    int64_t nt = t;
    unsigned k = (unsigned)below(100);
    if (k < 25)
        nt = t;
    else if (k < 50)
        nt = t + (int64_t)range(1, 2 * span);
    else if (k < 60)
        nt = t - (int64_t)range(0, 2 * span);
    else if (k < 75 && last_retry > 0) /* the exact boundary of the last denial, or 1 ns off */
        nt = m->last + last_retry + (int64_t)range(0, 2) - 1;
    else if (k < 80)
        nt = t + (int64_t)range(1, 400) * DAY / (int64_t)range(1, 50);
    else if (k < 85 && m->W > 0) /* a window edge: start, start + W - 1 */
        nt = (m->last / m->W + 1) * m->W - (int64_t)range(0, 1);
    else
        nt = t + (int64_t)below(10 * span);
    if (nt < 0)
        nt = 0;
    if (nt > TMAX)
        nt = TMAX;
    return nt;
}

static void run_algorithm(sl_algorithm alg, int seqs, int steps, uint64_t seed)
{
    rng_state = seed;
    uint64_t decisions = 0, allowed = 0, denied = 0;
    for (int q = 0; q < seqs; q++) {
        model m;
        sl_limit l;
        model_new(&m, alg, &l);
        impl im;
        int rc = sl_climit_compile(&l, &im.c);
        if (rc != SL_OK)
            fail_msg("seq %d: compile %d (limit %g rate %g window %g cap %g)", q, rc, l.limit,
                     l.rate, l.window, l.reserve_cap);
        /* the compiled integers match the reference's own conversion */
        assert_int_equal(im.c.limit, m.L);
        if (alg == SL_TOKEN_BUCKET || alg == SL_LEAKY_BUCKET || alg == SL_BURST_RESERVE) {
            assert_int_equal(im.c.interval, m.T);
            assert_int_equal(im.c.tau, m.tau);
        } else {
            assert_int_equal(im.c.window, m.W);
        }
        if (alg == SL_BURST_RESERVE) {
            assert_int_equal(im.c.rinterval, m.RT);
            assert_int_equal(im.c.rtau, m.rtau);
        }
        int64_t t = (int64_t)below(INT64_C(1) << 60);
        if (chance(10))
            t = (int64_t)below(1000);
        m.last = t;
        im.st = aligned_alloc(8, im.c.state_size);
        memset(im.st, 0xee, im.c.state_size);
        sl_algo_init(&im.c, im.st, t);
        int64_t last_retry = 0;
        uint64_t next_id = 1;
        for (int i = 0; i < steps; i++) {
            t = next_time(t, &m, last_retry);
            if (alg == SL_CONCURRENCY && chance(15)) {
                /* release: a recent id (maybe expired or released already) or an unknown one */
                uint64_t id = chance(80) && next_id > 1 ? next_id - range(1, next_id - 1 < 8 ? next_id - 1 : 8)
                                                        : next_id + 1000;
                int want = model_release(&m, id, t);
                int got = sl_algo_release(&im.c, im.st, id, t);
                if (want != got)
                    fail_msg("seq %d step %d: release %llu at %lld: got %d want %d", q, i,
                             (unsigned long long)id, (long long)t, got, want);
                continue;
            }
            uint64_t cost = pick_cost(m.L);
            uint64_t lease = next_id++;
            sl_check ck;
            sl_algo_check(&im.c, im.st, cost, t, &ck);
            if (ck.allowed)
                sl_algo_commit(&im.c, im.st, cost, t, &ck, lease);
            else
                sl_algo_touch(&im.c, im.st, t);
            mres w = model_take(&m, cost, t, lease);
            decisions++;
            if (w.allowed)
                allowed++;
            else
                denied++;
            if (ck.allowed != w.allowed || ck.remaining != w.remaining ||
                ck.retry_after != w.retry_after || ck.reset_after != w.reset_after ||
                ck.delay != w.delay || ck.via_reserve != w.via_reserve)
                fail_msg("%s seq %d step %d (L %llu T %lld W %lld RT %lld rtau %lld) cost %llu "
                         "at %lld: got allowed %d remaining %llu retry %lld reset %lld delay %lld "
                         "via %d; want %d %llu %lld %lld %lld %d",
                         sl_algorithm_name(alg), q, i, (unsigned long long)m.L, (long long)m.T,
                         (long long)m.W, (long long)m.RT, (long long)m.rtau,
                         (unsigned long long)cost, (long long)t, ck.allowed,
                         (unsigned long long)ck.remaining, (long long)ck.retry_after,
                         (long long)ck.reset_after, (long long)ck.delay, ck.via_reserve,
                         w.allowed, (unsigned long long)w.remaining, (long long)w.retry_after,
                         (long long)w.reset_after, (long long)w.delay, w.via_reserve);
            if (alg == SL_BURST_RESERVE)
                assert_true(ck.reserve == (double)w.rcredit_after / (double)m.RT);
            last_retry = ck.retry_after;
            /* full_at agrees with the model: exactly when it is not yet full */
            int64_t in = model_full_in(&m), fa = sl_algo_full_at(&im.c, im.st);
            if (alg == SL_BURST_RESERVE)
                assert_int_equal(fa, INT64_MAX);
            else if (in > 0)
                assert_int_equal(fa, m.last + in);
            else
                assert_true(fa <= m.last);
            /* the state is plain data: move it now and then */
            if (chance(5)) {
                void *moved = aligned_alloc(8, im.c.state_size);
                memcpy(moved, im.st, im.c.state_size);
                memset(im.st, 0xdd, im.c.state_size);
                free(im.st);
                im.st = moved;
            }
        }
        free(im.st);
        free(m.fin);
        free(m.ev);
    }
    /* the sequences exercised both outcomes */
    assert_true(allowed > decisions / 10);
    assert_true(denied > decisions / 20);
    print_message("%s: %llu decisions (%llu allowed, %llu denied)\n", sl_algorithm_name(alg),
                  (unsigned long long)decisions, (unsigned long long)allowed,
                  (unsigned long long)denied);
}

#define SEQS 1000
#define STEPS 250

static void test_diff_token_bucket(void **st) { (void)st; run_algorithm(SL_TOKEN_BUCKET, SEQS, STEPS, 0x7b1d); }
static void test_diff_leaky_bucket(void **st) { (void)st; run_algorithm(SL_LEAKY_BUCKET, SEQS, STEPS, 0x1ea4); }
static void test_diff_fixed_window(void **st) { (void)st; run_algorithm(SL_FIXED_WINDOW, SEQS, STEPS, 0xf1c5); }
static void test_diff_sliding_window(void **st) { (void)st; run_algorithm(SL_SLIDING_WINDOW, SEQS, STEPS, 0x5115); }
static void test_diff_sliding_log(void **st) { (void)st; run_algorithm(SL_SLIDING_LOG, SEQS, STEPS, 0x5106); }
static void test_diff_burst_reserve(void **st) { (void)st; run_algorithm(SL_BURST_RESERVE, SEQS, STEPS, 0xb5e7); }
static void test_diff_concurrency(void **st) { (void)st; run_algorithm(SL_CONCURRENCY, SEQS, STEPS, 0xc0cc); }

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_diff_token_bucket),  cmocka_unit_test(test_diff_leaky_bucket),
        cmocka_unit_test(test_diff_fixed_window),  cmocka_unit_test(test_diff_sliding_window),
        cmocka_unit_test(test_diff_sliding_log),   cmocka_unit_test(test_diff_burst_reserve),
        cmocka_unit_test(test_diff_concurrency),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
