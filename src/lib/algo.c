/*
 * algo.c — the seven rate-limit algorithms over a key's few bytes of state (see algo.h).
 *
 * Conventions used throughout:
 *  - Time is int64 ns, 0 <= now < 2^62. Every state remembers the latest time it saw
 *    (`last`); the effective time of an operation is now' = max(now, last), so a timestamp
 *    earlier than the key's last one counts as zero elapsed time: never a refill, never a
 *    drain. All relative outputs (reset_after, retry_after, delay) are measured from now'.
 *  - check/commit use integer arithmetic only (128-bit where a product can exceed 64 bits);
 *    doubles only fill the `tokens` / `reserve` outputs.
 *  - Rates become `interval` = ceil(1e9 / rate) ns per unit, computed exactly from the binary
 *    value of the double, so rounding can only deny, never over-admit -- except that a
 *    quotient within 2^-50 (relative) above a whole number of ns is taken as that number:
 *    1/60 per second is 60 s per unit, not 60 s + 1 ns.
 *  - State is plain data in a caller-provided, 8-byte-aligned block. Fixed-size states are
 *    loaded and stored with memcpy (the block may be declared as uint64_t[]; memcpy keeps us
 *    clear of strict-aliasing trouble and compiles to plain loads/stores).
 *  - sl_algo_commit re-checks and consumes only if the request passes, so a caller mistake
 *    can never consume on a denial or overflow the state.
 */
#include "algo.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

typedef unsigned __int128 u128;

#define NS_PER_S INT64_C(1000000000)
#define MAX_SPAN_S (366.0 * 86400.0)                  /* longest interval / window */
#define MAX_SPAN_NS (INT64_C(366) * 86400 * NS_PER_S) /* the same in ns */
#define MAX_TAU (INT64_C(1) << 62)                     /* limit * interval */
#define MAX_UNITS 1e9                                  /* limits, capacities, reserve cap */
#define MAX_LOG 100000u                                /* sliding_log / concurrency limit */
#define MIN_WINDOW_S 0.001

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- names ------------------------------------------------------------------------------- */

static const char *const algo_names[] = {
    [SL_TOKEN_BUCKET] = "token_bucket",     [SL_LEAKY_BUCKET] = "leaky_bucket",
    [SL_FIXED_WINDOW] = "fixed_window",     [SL_SLIDING_WINDOW] = "sliding_window",
    [SL_SLIDING_LOG] = "sliding_log",       [SL_BURST_RESERVE] = "burst_reserve",
    [SL_CONCURRENCY] = "concurrency",
};
#define NALGO ((int)(sizeof algo_names / sizeof algo_names[0]))

const char *sl_algorithm_name(sl_algorithm a)
{
    if ((int)a <= 0 || (int)a >= NALGO)
        return "unknown";
    return algo_names[a];
}

/* Exact names, ASCII case-insensitive ("Token_Bucket" parses too). */
int sl_algorithm_parse(const char *name, size_t len, sl_algorithm *out)
{
    if ((!name && len) || !out)
        return SL_EINVAL;
    for (int a = 1; a < NALGO; a++) {
        const char *s = algo_names[a];
        size_t i = 0;
        for (; i < len && s[i]; i++) {
            char ch = name[i];
            if (ch >= 'A' && ch <= 'Z')
                ch = (char)(ch - 'A' + 'a');
            if (ch != s[i])
                break;
        }
        if (i == len && s[i] == '\0') {
            *out = (sl_algorithm)a;
            return SL_OK;
        }
    }
    return SL_EALGORITHM;
}

/* ---- compilation ------------------------------------------------------------------------- */

/* A whole number in [lo, 1e9]? (NaN and infinities fail.) */
static int whole_units(double x, double lo)
{
    return x >= lo && x <= MAX_UNITS && (double)(uint64_t)x == x;
}

/* Split a positive finite double into m * 2^-sh with m < 2^53 an integer (exact). */
static uint64_t split_double(double x, int *sh)
{
    int e;
    double fr = frexp(x, &e); /* x = fr * 2^e, 0.5 <= fr < 1 */
    *sh = 53 - e;
    return (uint64_t)ldexp(fr, 53);
}

/* interval = the smallest integer n with n * rate >= 1e9, i.e. ceil(1e9 / rate) computed
 * exactly for the binary value of `rate`. SL_ERATE unless 0 < rate <= 1e9 and the interval
 * is at most 366 days. */
static int rate_interval(double rate, int64_t *out)
{
    if (!(rate > 0) || !(rate <= 1e9))
        return SL_ERATE;
    if (rate < 3e-8) /* interval > 1e9 / 3e-8 ns > 366 days; also keeps the shift small */
        return SL_ERATE;
    int sh;
    uint64_t m = split_double(rate, &sh); /* rate = m / 2^sh, 23 <= sh <= 78 */
    u128 num = (u128)1000000000u << sh;    /* < 2^108 */
    u128 n = (num + m - 1) / m;
    /* A rate such as count/period = 1/60 is not exactly representable; its double may fall
     * a hair below the intended value, making 1e9/rate a hair above a whole number of ns
     * (60000000000.000004). Within 2^-50 relative -- far below the double's own precision
     * of the caller's intent -- take the whole number, not the next one. */
    /* num - (n - 1) * m is m exactly when the quotient is whole: then n is exact and must
     * stay (from 2^50 ns up, m <= num >> 50 would otherwise take it 1 ns short). */
    u128 excess = num - (n - 1) * m;
    if (n > 1 && excess < m && excess <= (num >> 50))
        n--;
    if (n > (u128)MAX_SPAN_NS)
        return SL_ERATE;
    *out = (int64_t)n;
    return SL_OK;
}

/* window seconds -> ns, rounded to the nearest ns (exactly). SL_EWINDOW unless
 * 1 ms <= w <= 366 days. */
static int window_ns(double w, int64_t *out)
{
    if (!(w >= MIN_WINDOW_S) || !(w <= MAX_SPAN_S))
        return SL_EWINDOW;
    int sh;
    uint64_t m = split_double(w, &sh); /* w = m / 2^sh, 28 <= sh <= 62 */
    u128 x = (u128)m * 1000000000u;    /* < 2^83 */
    *out = (int64_t)((x + ((u128)1 << (sh - 1))) >> sh);
    return SL_OK;
}

/* State layouts (all multiples of 8 bytes, no padding). They are part of the snapshot format
 * (snapshot.c, docs/design.md "Snapshots"): changing one needs a new snapshot version. */
typedef struct gcra_st { /* token_bucket, leaky_bucket */
    int64_t tat;         /* theoretical arrival time: full (TB) / empty (leaky) at tat */
    int64_t last;
} gcra_st;
typedef struct fw_st { /* fixed_window; the window start is last - last % W */
    int64_t last;
    uint64_t count;    /* units admitted in the window containing `last` */
} fw_st;
typedef struct sw_st { /* sliding_window; the current window start is last - last % W */
    int64_t last;
    uint32_t cur;      /* units admitted in the current window */
    uint32_t prev;     /* units admitted in the window before it */
} sw_st;
typedef struct log_hdr { /* sliding_log: header, then int64_t ts[L] (a ring, oldest first) */
    int64_t last;
    uint32_t head, n;
} log_hdr;
typedef struct br_st { /* burst_reserve */
    int64_t tat;       /* base GCRA (as token_bucket) */
    int64_t z;         /* reserve: time at which it was empty; reserve_ns = min(rtau, now-z) */
    int64_t last;
} br_st;
typedef struct cc_hdr { /* concurrency: header, then cc_lease[N] (a ring sorted by expiry) */
    int64_t last;
    uint32_t head, n;
    uint64_t used; /* total weight of the stored leases (expired ones included) */
} cc_hdr;
typedef struct cc_lease {
    uint64_t id;
    int64_t expiry; /* frees its slots at this time (expired when expiry <= now') */
    uint64_t weight;
} cc_lease;

_Static_assert(sizeof(gcra_st) == 16 && sizeof(fw_st) == 16 && sizeof(sw_st) == 16,
               "the first four algorithms fit inline in 16 bytes");
_Static_assert(sizeof(br_st) == 24 && sizeof(log_hdr) == 16 && sizeof(cc_hdr) == 24 &&
                   sizeof(cc_lease) == 24,
               "state layouts");

/* Validation order: algorithm, limit (SL_ECAPACITY), log size (SL_ELOGSIZE), rate (SL_ERATE) /
 * window (SL_EWINDOW), reserve cap (SL_ECAPACITY), reserve cap * reserve interval (SL_ERATE). */
int sl_climit_compile(const sl_limit *in, sl_climit *out)
{
    if (!in || !out)
        return SL_EINVAL;
    sl_climit c;
    memset(&c, 0, sizeof c);
    c.algorithm = in->algorithm;
    switch (in->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
    case SL_FIXED_WINDOW:
    case SL_SLIDING_WINDOW:
    case SL_SLIDING_LOG:
    case SL_BURST_RESERVE:
    case SL_CONCURRENCY:
        break;
    default:
        return SL_EALGORITHM;
    }
    if (!whole_units(in->limit, 1))
        return SL_ECAPACITY;
    c.limit = (uint64_t)in->limit;
    int rc;
    switch (in->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        if ((rc = rate_interval(in->rate, &c.interval)) != SL_OK)
            return rc;
        if ((u128)c.limit * (uint64_t)c.interval > (u128)MAX_TAU)
            return SL_ERATE;
        c.tau = (int64_t)c.limit * c.interval;
        c.state_size = sizeof(gcra_st);
        break;
    case SL_FIXED_WINDOW:
    case SL_SLIDING_WINDOW:
        if ((rc = window_ns(in->window, &c.window)) != SL_OK)
            return rc;
        c.state_size = 16;
        break;
    case SL_SLIDING_LOG:
    case SL_CONCURRENCY:
        if (c.limit > MAX_LOG)
            return SL_ELOGSIZE;
        if ((rc = window_ns(in->window, &c.window)) != SL_OK)
            return rc;
        c.state_size = in->algorithm == SL_SLIDING_LOG
                           ? (uint32_t)(sizeof(log_hdr) + 8 * c.limit)
                           : (uint32_t)(sizeof(cc_hdr) + sizeof(cc_lease) * c.limit);
        break;
    case SL_BURST_RESERVE:
        /* base: a token bucket of B refilling B per second */
        if ((rc = rate_interval((double)c.limit, &c.interval)) != SL_OK)
            return rc; /* cannot happen for 1 <= B <= 1e9 */
        c.tau = (int64_t)c.limit * c.interval; /* <= 2e9 */
        if ((rc = rate_interval(in->rate, &c.rinterval)) != SL_OK)
            return rc;
        if (!whole_units(in->reserve_cap, 0))
            return SL_ECAPACITY;
        c.rcap = (uint64_t)in->reserve_cap;
        if ((u128)c.rcap * (uint64_t)c.rinterval > (u128)MAX_TAU)
            return SL_ERATE;
        c.rtau = (int64_t)c.rcap * c.rinterval;
        c.state_size = sizeof(br_st);
        break;
    default:
        return SL_EALGORITHM;
    }
    *out = c;
    return SL_OK;
}

/* ---- token_bucket / leaky_bucket (GCRA) ---------------------------------------------------
 * token_bucket: C = limit, T = interval, tau = C*T. tat = the time at which the bucket is
 * full. Credit in ns: have = tau - max(0, tat - now'). Admit iff cost*T <= have; then
 * tat = max(tat, now') + cost*T. Invariant tat <= now' + tau (so tat < 2^63).
 * leaky_bucket: the same arithmetic read as a queue: backlog = max(0, tat - now') ns of work
 * ahead, N*T of room. An admitted request may proceed after `delay` = backlog, so admitted
 * units proceed spaced >= T apart: output never exceeds the leak rate. */

static void gcra_check(const sl_climit *c, const gcra_st *s, uint64_t cost, int64_t now,
                       sl_check *o)
{
    int64_t n = max64(now, s->last);
    int64_t T = c->interval;
    int64_t backlog = s->tat > n ? s->tat - n : 0;
    int64_t have = backlog >= c->tau ? 0 : c->tau - backlog;
    int64_t need = (int64_t)cost * T; /* cost <= limit, so need <= tau */
    if (need <= have) {
        o->allowed = 1;
        o->remaining = (uint64_t)((have - need) / T);
        o->reset_after = backlog + need;
        o->tokens = (double)(have - need) / (double)T;
        if (c->algorithm == SL_LEAKY_BUCKET)
            o->delay = backlog;
    } else {
        o->remaining = (uint64_t)(have / T);
        o->reset_after = backlog;
        /* backlog may exceed tau after a change to a shallower policy: wait for all of it */
        o->retry_after = backlog + need - c->tau;
        o->tokens = (double)have / (double)T;
    }
}

static void gcra_commit(const sl_climit *c, gcra_st *s, uint64_t cost, int64_t now)
{
    int64_t n = max64(now, s->last);
    s->tat = max64(s->tat, n) + (int64_t)cost * c->interval;
    s->last = n;
}

/* Credit carried from (oc, have ns) to nc: floor(have * T_new / T_old), at most tau_new. */
static int64_t carry_credit(int64_t have, int64_t t_old, int64_t t_new, int64_t cap)
{
    if (have <= 0)
        return 0;
    u128 h = (u128)(uint64_t)have * (uint64_t)t_new / (uint64_t)t_old;
    return h > (u128)cap ? cap : (int64_t)h;
}

/* ---- fixed_window -------------------------------------------------------------------------
 * Windows [k*W, (k+1)*W). The window start is derived from `last` (start = last - last % W),
 * which keeps the state at 16 bytes while remembering the latest time seen. */

static void fw_roll(const sl_climit *c, fw_st *s, int64_t now)
{
    int64_t n = max64(now, s->last), W = c->window;
    if (n - n % W != s->last - s->last % W)
        s->count = 0;
    s->last = n;
}

static void fw_check(const sl_climit *c, fw_st s, uint64_t cost, int64_t now, sl_check *o)
{
    fw_roll(c, &s, now);
    int64_t n = s.last, W = c->window, L = (int64_t)c->limit;
    int64_t to_end = W - n % W; /* start + W - now' */
    uint64_t used = s.count > (uint64_t)L ? (uint64_t)L : s.count;
    if (used + cost <= (uint64_t)L) {
        o->allowed = 1;
        o->remaining = (uint64_t)L - used - cost;
        o->reset_after = used + cost > 0 ? to_end : 0;
    } else {
        o->remaining = (uint64_t)L - used;
        o->reset_after = used > 0 ? to_end : 0;
        o->retry_after = to_end;
    }
    o->tokens = (double)o->remaining;
}

/* ---- sliding_window -----------------------------------------------------------------------
 * Weighted two-window counter. Windows are aligned to multiples of W; the state holds the
 * count of the current window (cur) and of the one before (prev). At now' = start + e
 * (0 <= e < W) the estimate of units in (now' - W, now'] is
 *     estimate = prev * (W - e) / W + cur,
 * i.e. prev's units are assumed evenly spread over their window. A request passes iff
 * estimate + cost <= L, evaluated exactly as  prev*(W-e) + cur*W + cost*W <= L*W  in 128 bits.
 *
 * Error bound (copied to docs): the estimate is never below cur, so the units admitted in
 * one aligned window never exceed L. Any interval (t-W, t] with t = start + e overlaps the
 * previous aligned window and the current one; every admission in the current window at
 * e' <= e kept prev*(W-e')/W + cur <= L, so cur <= L - prev*(W-e)/W, and the interval holds
 * at most prev + cur <= L + prev*e/W <= L + L*(W-1)/W < 2L units: never more than 2L (in
 * whole units at most 2L-1). The worst case needs the previous window's units bunched at its
 * very end (the estimate assumes them spread evenly over it); for traffic spread evenly the
 * estimate is close to the true count. O(1) state: 16 bytes. */

static void sw_roll(const sl_climit *c, sw_st *s, int64_t now)
{
    int64_t n = max64(now, s->last), W = c->window;
    int64_t ns = n - n % W, os = s->last - s->last % W;
    if (ns != os) { /* next window: cur becomes prev; two or more later: both gone */
        s->prev = ns - os == W ? s->cur : 0;
        s->cur = 0;
    }
    s->last = n;
}

static void sw_check(const sl_climit *c, sw_st s, uint64_t cost, int64_t now, sl_check *o)
{
    sw_roll(c, &s, now);
    int64_t n = s.last, W = c->window;
    int64_t e = n % W, start = n - e;
    u128 uW = (u128)(uint64_t)W;
    u128 est = (u128)s.prev * (uint64_t)(W - e) + (u128)s.cur * uW;
    u128 LW = (u128)c->limit * uW, cW = (u128)cost * uW;
    uint64_t cur_after = s.cur;
    if (est + cW <= LW) {
        o->allowed = 1;
        o->remaining = (uint64_t)((LW - est - cW) / uW);
        o->tokens = (double)(LW - est - cW) / (double)W;
        cur_after += cost;
    } else {
        o->remaining = est >= LW ? 0 : (uint64_t)((LW - est) / uW);
        o->tokens = est >= LW ? 0 : (double)(LW - est) / (double)W;
        /* Smallest t >= now' at which it passes. D = room needed for the estimate. */
        u128 D = LW - cW; /* cost <= L */
        u128 curW = (u128)s.cur * uW;
        int64_t t = -1;
        if (s.prev > 0 && curW <= D) {
            /* this window: prev*(W - e_t) <= D - cur*W  <=>  W - e_t <= k */
            u128 k = (D - curW) / s.prev; /* k < W - e since denied now */
            if (k >= 1)
                t = start + W - (int64_t)k;
        }
        if (t < 0) {
            /* next window: prev' = cur, cur' = 0: cur*(W - e') <= D  <=>  W - e' <= k2 */
            int64_t wait = 0;
            if (s.cur > 0) {
                u128 k2 = D / s.cur;
                wait = k2 >= uW ? 0 : W - (int64_t)k2;
            }
            t = start + W + wait;
        }
        o->retry_after = t - n;
    }
    if (cur_after > 0)
        o->reset_after = start + 2 * W - n;
    else if (s.prev > 0)
        o->reset_after = start + W - n;
}

/* ---- sliding_log --------------------------------------------------------------------------
 * A ring of up to L timestamps, oldest first (nondecreasing, since now' never goes back).
 * A timestamp ts counts in (now' - W, now'] and stops counting at ts + W. */

static inline int64_t *log_ring(void *state) { return (int64_t *)((char *)state + sizeof(log_hdr)); }
static inline const int64_t *log_cring(const void *state)
{
    return (const int64_t *)((const char *)state + sizeof(log_hdr));
}
static inline int64_t log_at(const int64_t *r, const log_hdr *h, uint64_t L, uint32_t i)
{
    uint64_t j = (uint64_t)h->head + i;
    return r[j >= L ? j - L : j];
}
/* Index (0 = oldest) of the first timestamp > cut. */
static uint32_t log_first_after(const int64_t *r, const log_hdr *h, uint64_t L, int64_t cut)
{
    uint32_t lo = 0, hi = h->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (log_at(r, h, L, mid) > cut)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void log_check(const sl_climit *c, const void *state, uint64_t cost, int64_t now,
                      sl_check *o)
{
    log_hdr h;
    memcpy(&h, state, sizeof h);
    const int64_t *r = log_cring(state);
    uint64_t L = c->limit;
    int64_t n = max64(now, h.last), W = c->window;
    uint32_t i = log_first_after(r, &h, L, n - W);
    uint64_t live = h.n - i;
    if (live + cost <= L) {
        o->allowed = 1;
        o->remaining = L - live - cost;
        if (cost > 0)
            o->reset_after = W;
        else if (live > 0)
            o->reset_after = log_at(r, &h, L, h.n - 1) + W - n;
    } else {
        o->remaining = L - live;
        o->reset_after = log_at(r, &h, L, h.n - 1) + W - n; /* live > 0 here */
        uint64_t k = live + cost - L;                       /* oldest k must expire */
        o->retry_after = log_at(r, &h, L, (uint32_t)(i + k - 1)) + W - n;
    }
    o->tokens = (double)o->remaining;
}

static void log_commit(const sl_climit *c, void *state, uint64_t cost, int64_t now)
{
    log_hdr h;
    memcpy(&h, state, sizeof h);
    int64_t *r = log_ring(state);
    uint64_t L = c->limit;
    int64_t n = max64(now, h.last);
    uint32_t i = log_first_after(r, &h, L, n - c->window);
    h.head = (uint32_t)(((uint64_t)h.head + i) % L);
    h.n -= i;
    for (uint64_t k = 0; k < cost && h.n < L; k++) {
        uint64_t j = (uint64_t)h.head + h.n;
        r[j >= L ? j - L : j] = n;
        h.n++;
    }
    h.last = n;
    memcpy(state, &h, sizeof h);
}

/* ---- burst_reserve ------------------------------------------------------------------------
 * Base: token bucket of B refilling B/s (tat, interval, tau). Reserve: grows 1 ns of credit
 * per ns of elapsed time up to rtau = R*rinterval; reserve_ns = min(rtau, now' - z). A request
 * is served wholly by the base if it has `cost`, else wholly by the reserve, else denied. */

typedef struct br_view {
    int64_t n, backlog, bhave, rhave;
} br_view;

static br_view br_look(const sl_climit *c, const br_st *s, int64_t now)
{
    br_view v;
    v.n = max64(now, s->last);
    v.backlog = s->tat > v.n ? s->tat - v.n : 0;
    v.bhave = v.backlog >= c->tau ? 0 : c->tau - v.backlog;
    __int128 r = (__int128)v.n - s->z;
    v.rhave = r <= 0 ? 0 : r >= c->rtau ? c->rtau : (int64_t)r;
    return v;
}

static void br_check(const sl_climit *c, const br_st *s, uint64_t cost, int64_t now,
                     sl_check *o)
{
    br_view v = br_look(c, s, now);
    int64_t T = c->interval, RT = c->rinterval;
    int64_t bneed = (int64_t)cost * T;
    u128 rneed = (u128)cost * (uint64_t)RT;
    int64_t bafter = v.bhave, rafter = v.rhave;
    if (bneed <= v.bhave) {
        o->allowed = 1;
        bafter -= bneed;
        o->reset_after = v.backlog + bneed;
    } else if (rneed <= (u128)v.rhave) {
        o->allowed = 1;
        o->via_reserve = 1;
        rafter -= (int64_t)rneed;
        o->reset_after = v.backlog;
    } else {
        o->reset_after = v.backlog;
        int64_t wait = bneed - v.bhave;
        if (rneed <= (u128)c->rtau)
            wait = min64(wait, (int64_t)rneed - v.rhave);
        o->retry_after = wait;
    }
    o->remaining = (uint64_t)(bafter / T) + (uint64_t)(rafter / RT);
    o->tokens = (double)bafter / (double)T;
    o->reserve = (double)rafter / (double)RT;
}

static void br_commit(const sl_climit *c, br_st *s, uint64_t cost, int64_t now, int via_reserve)
{
    br_view v = br_look(c, s, now);
    if (cost > 0) {
        if (!via_reserve)
            s->tat = max64(s->tat, v.n) + (int64_t)cost * c->interval;
        else
            s->z = max64(s->z, v.n - c->rtau) + (int64_t)cost * c->rinterval;
    }
    s->last = v.n;
}

/* ---- concurrency --------------------------------------------------------------------------
 * Up to N leases in a ring sorted by expiry (oldest first). A lease of weight w holds w slots
 * until its expiry; expiry <= now' frees it. */

static inline cc_lease *cc_ring(void *state) { return (cc_lease *)((char *)state + sizeof(cc_hdr)); }
static inline const cc_lease *cc_cring(const void *state)
{
    return (const cc_lease *)((const char *)state + sizeof(cc_hdr));
}
static inline uint64_t cc_idx(const cc_hdr *h, uint64_t N, uint64_t i)
{
    uint64_t j = (uint64_t)h->head + i;
    return j >= N ? j - N : j;
}

/* Number of expired leases at the front, and their weight. */
static uint32_t cc_expired(const cc_lease *r, const cc_hdr *h, uint64_t N, int64_t n,
                           uint64_t *weight)
{
    uint32_t i = 0;
    uint64_t w = 0;
    while (i < h->n && r[cc_idx(h, N, i)].expiry <= n) {
        w += r[cc_idx(h, N, i)].weight;
        i++;
    }
    *weight = w;
    return i;
}

static void cc_drop_expired(const sl_climit *c, cc_hdr *h, cc_lease *r, int64_t n)
{
    uint64_t w;
    uint32_t i = cc_expired(r, h, c->limit, n, &w);
    h->head = (uint32_t)cc_idx(h, c->limit, i);
    h->n -= i;
    h->used -= w;
    if (h->n == 0)
        h->head = 0;
}

static void cc_check(const sl_climit *c, const void *state, uint64_t cost, int64_t now,
                     sl_check *o)
{
    cc_hdr h;
    memcpy(&h, state, sizeof h);
    const cc_lease *r = cc_cring(state);
    uint64_t N = c->limit, ew;
    int64_t n = max64(now, h.last);
    uint32_t i = cc_expired(r, &h, N, n, &ew);
    uint64_t live = h.used - ew;
    int64_t latest = h.n > i ? r[cc_idx(&h, N, h.n - 1)].expiry : n;
    if (live + cost <= N) {
        o->allowed = 1;
        o->remaining = N - live - cost;
        if (cost > 0)
            latest = max64(latest, n + c->window);
    } else {
        o->remaining = N - live;
        uint64_t k = live + cost - N, acc = 0; /* slots that must free */
        int64_t t = n;
        for (uint32_t j = i; j < h.n && acc < k; j++) {
            acc += r[cc_idx(&h, N, j)].weight;
            t = r[cc_idx(&h, N, j)].expiry;
        }
        o->retry_after = t - n;
    }
    o->reset_after = latest - n;
    o->tokens = (double)o->remaining;
}

static void cc_commit(const sl_climit *c, void *state, uint64_t cost, int64_t now,
                      uint64_t lease)
{
    cc_hdr h;
    memcpy(&h, state, sizeof h);
    cc_lease *r = cc_ring(state);
    uint64_t N = c->limit;
    int64_t n = max64(now, h.last);
    cc_drop_expired(c, &h, r, n);
    if (cost > 0 && h.n < N) {
        cc_lease nl = {lease, n + c->window, cost};
        /* insert in expiry order (normally at the end) */
        uint64_t pos = h.n;
        while (pos > 0 && r[cc_idx(&h, N, pos - 1)].expiry > nl.expiry) {
            r[cc_idx(&h, N, pos)] = r[cc_idx(&h, N, pos - 1)];
            pos--;
        }
        r[cc_idx(&h, N, pos)] = nl;
        h.n++;
        h.used += cost;
    }
    h.last = n;
    memcpy(state, &h, sizeof h);
}

int sl_algo_release(const sl_climit *c, void *state, uint64_t id, int64_t now)
{
    if (c->algorithm != SL_CONCURRENCY || id == 0)
        return SL_ELEASE;
    cc_hdr h;
    memcpy(&h, state, sizeof h);
    cc_lease *r = cc_ring(state);
    uint64_t N = c->limit;
    int64_t n = max64(now, h.last);
    cc_drop_expired(c, &h, r, n);
    h.last = n;
    int rc = SL_ELEASE;
    for (uint32_t j = 0; j < h.n; j++) {
        if (r[cc_idx(&h, N, j)].id != id)
            continue;
        h.used -= r[cc_idx(&h, N, j)].weight;
        for (uint32_t k = j; k + 1 < h.n; k++)
            r[cc_idx(&h, N, k)] = r[cc_idx(&h, N, k + 1)];
        h.n--;
        if (h.n == 0)
            h.head = 0;
        rc = SL_OK;
        break;
    }
    memcpy(state, &h, sizeof h);
    return rc;
}

/* ---- states from outside (snapshots) --------------------------------------------------- */

static int time_ok(int64_t t)
{
    return t >= 0 && t < MAX_TAU; /* the range of `now` */
}

/* The bounds are those every state produced here keeps, loosened where a policy change can
 * legitimately leave a state beyond the new limit's own (a leaky queue keeps its drain time,
 * a lease its expiry), and always tight enough that no arithmetic on the state overflows.
 * A token bucket's credit is clamped on a change, so its tat is never more than tau past
 * `last`; a lease never outlives the longest window past `last` (a file that said otherwise
 * once locked a key out for 73 years: found by review). */
int sl_algo_state_valid(const sl_climit *c, const void *state, uint64_t *max_lease)
{
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s;
        memcpy(&s, state, sizeof s);
        int64_t ahead = c->algorithm == SL_TOKEN_BUCKET ? c->tau : MAX_TAU;
        return time_ok(s.last) && s.tat >= 0 && s.tat - s.last <= ahead;
    }
    case SL_BURST_RESERVE: {
        br_st s;
        memcpy(&s, state, sizeof s);
        return time_ok(s.last) && s.tat >= 0 && s.tat - s.last <= MAX_TAU && s.z <= s.last &&
               s.z >= -MAX_TAU;
    }
    case SL_FIXED_WINDOW: {
        fw_st s;
        memcpy(&s, state, sizeof s);
        return time_ok(s.last) && s.count <= c->limit;
    }
    case SL_SLIDING_WINDOW: {
        sw_st s;
        memcpy(&s, state, sizeof s);
        return time_ok(s.last) && s.cur <= c->limit && s.prev <= c->limit;
    }
    case SL_SLIDING_LOG: {
        log_hdr h;
        memcpy(&h, state, sizeof h);
        if (!time_ok(h.last) || h.head >= c->limit || h.n > c->limit)
            return 0;
        const int64_t *r = log_cring(state);
        int64_t prev = 0;
        for (uint32_t i = 0; i < h.n; i++) {
            int64_t t = log_at(r, &h, c->limit, i);
            if (t < prev || t > h.last) /* oldest first, none after `last` */
                return 0;
            prev = t;
        }
        return 1;
    }
    case SL_CONCURRENCY: {
        cc_hdr h;
        memcpy(&h, state, sizeof h);
        if (!time_ok(h.last) || h.head >= c->limit || h.n > c->limit || h.used > c->limit)
            return 0;
        const cc_lease *r = cc_cring(state);
        uint64_t used = 0;
        int64_t prev = 0;
        for (uint32_t i = 0; i < h.n; i++) {
            cc_lease l = r[cc_idx(&h, c->limit, i)];
            if (l.id == 0 || l.id >= SL_LEASE_ID_MAX || l.weight == 0 || l.weight > c->limit ||
                l.expiry < prev ||
                l.expiry - h.last > MAX_SPAN_NS) /* sorted by expiry */
                return 0;
            used += l.weight; /* at most N * N <= 1e10 */
            prev = l.expiry;
            if (l.id > *max_lease)
                *max_lease = l.id;
        }
        return used == h.used;
    }
    }
    return 0;
}

/* ---- the interface ------------------------------------------------------------------------ */

void sl_algo_init(const sl_climit *c, void *state, int64_t now)
{
    memset(state, 0, c->state_size);
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s = {now, now};
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_BURST_RESERVE: {
        br_st s = {now, now, now};
        memcpy(state, &s, sizeof s);
        break;
    }
    default: /* every other layout starts with int64_t last, the rest zero */
        memcpy(state, &now, sizeof now);
        break;
    }
}

static void check_valid(const sl_climit *c, const void *state, uint64_t cost, int64_t now,
                        sl_check *o)
{
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s;
        memcpy(&s, state, sizeof s);
        gcra_check(c, &s, cost, now, o);
        break;
    }
    case SL_FIXED_WINDOW: {
        fw_st s;
        memcpy(&s, state, sizeof s);
        fw_check(c, s, cost, now, o);
        break;
    }
    case SL_SLIDING_WINDOW: {
        sw_st s;
        memcpy(&s, state, sizeof s);
        sw_check(c, s, cost, now, o);
        break;
    }
    case SL_SLIDING_LOG:
        log_check(c, state, cost, now, o);
        break;
    case SL_BURST_RESERVE: {
        br_st s;
        memcpy(&s, state, sizeof s);
        br_check(c, &s, cost, now, o);
        break;
    }
    case SL_CONCURRENCY:
        cc_check(c, state, cost, now, o);
        break;
    }
}

void sl_algo_check(const sl_climit *c, const void *state, uint64_t cost, int64_t now,
                   sl_check *out)
{
    memset(out, 0, sizeof *out);
    if (cost > c->limit) {
        /* Outside the contract (the caller rejects it with SL_ECOST): never passes. */
        check_valid(c, state, 0, now, out);
        out->allowed = 0;
        out->delay = 0;
        out->retry_after = INT64_MAX;
        return;
    }
    check_valid(c, state, cost, now, out);
}

void sl_algo_touch(const sl_climit *c, void *state, int64_t now)
{
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s;
        memcpy(&s, state, sizeof s);
        s.last = max64(now, s.last);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_FIXED_WINDOW: {
        fw_st s;
        memcpy(&s, state, sizeof s);
        fw_roll(c, &s, now);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_SLIDING_WINDOW: {
        sw_st s;
        memcpy(&s, state, sizeof s);
        sw_roll(c, &s, now);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_BURST_RESERVE: {
        br_st s;
        memcpy(&s, state, sizeof s);
        s.last = max64(now, s.last);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_SLIDING_LOG:
    case SL_CONCURRENCY: { /* both headers start with int64_t last */
        int64_t last;
        memcpy(&last, state, sizeof last);
        last = max64(now, last);
        memcpy(state, &last, sizeof last);
        break;
    }
    }
}

void sl_algo_commit(const sl_climit *c, void *state, uint64_t cost, int64_t now,
                    const sl_check *chk, uint64_t lease)
{
    /* `chk` is the check of this very state, cost and now (same lock hold); without one,
     * check again, so that nothing is ever consumed on a denial. */
    sl_check k;
    if (!chk) {
        sl_algo_check(c, state, cost, now, &k);
        chk = &k;
    }
    if (!chk->allowed) {
        sl_algo_touch(c, state, now);
        return;
    }
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s;
        memcpy(&s, state, sizeof s);
        gcra_commit(c, &s, cost, now);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_FIXED_WINDOW: {
        fw_st s;
        memcpy(&s, state, sizeof s);
        fw_roll(c, &s, now);
        s.count += cost;
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_SLIDING_WINDOW: {
        sw_st s;
        memcpy(&s, state, sizeof s);
        sw_roll(c, &s, now);
        s.cur += (uint32_t)cost;
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_SLIDING_LOG:
        log_commit(c, state, cost, now);
        break;
    case SL_BURST_RESERVE: {
        br_st s;
        memcpy(&s, state, sizeof s);
        br_commit(c, &s, cost, now, chk->via_reserve);
        memcpy(state, &s, sizeof s);
        break;
    }
    case SL_CONCURRENCY:
        cc_commit(c, state, cost, now, lease);
        break;
    }
}

int64_t sl_algo_full_at(const sl_climit *c, const void *state)
{
    switch (c->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        gcra_st s;
        memcpy(&s, state, sizeof s);
        return s.tat;
    }
    case SL_FIXED_WINDOW: {
        fw_st s;
        memcpy(&s, state, sizeof s);
        int64_t start = s.last - s.last % c->window;
        return s.count > 0 ? start + c->window : start;
    }
    case SL_SLIDING_WINDOW: {
        sw_st s;
        memcpy(&s, state, sizeof s);
        int64_t start = s.last - s.last % c->window;
        return s.cur > 0 ? start + 2 * c->window : s.prev > 0 ? start + c->window : start;
    }
    case SL_SLIDING_LOG: {
        log_hdr h;
        memcpy(&h, state, sizeof h);
        if (h.n == 0)
            return h.last;
        return log_at(log_cring(state), &h, c->limit, h.n - 1) + c->window;
    }
    case SL_CONCURRENCY: {
        cc_hdr h;
        memcpy(&h, state, sizeof h);
        if (h.n == 0)
            return h.last;
        return cc_cring(state)[cc_idx(&h, c->limit, h.n - 1)].expiry;
    }
    case SL_BURST_RESERVE:
    default:
        return INT64_MAX;
    }
}

/* ---- policy change ------------------------------------------------------------------------ */

/* Units kept under a new limit: min(L_new, L_old - used_old). Returns the new `used`. */
static uint64_t carry_used(uint64_t l_old, uint64_t used_old, uint64_t l_new)
{
    uint64_t rem = used_old >= l_old ? 0 : l_old - used_old;
    return rem >= l_new ? 0 : l_new - rem;
}

/* Across algorithms (a limit of an algorithm the old policy lacks takes the state of an old
 * limit of another one): the new limit keeps R = min(whole units the old one leaves at n,
 * L_new) -- fractions are dropped, so it never holds more than the old one did -- and is
 * built to leave exactly R at n. An old limit as full as a new key (burst_reserve: its base
 * full, whatever its reserve) gives a full new one. Concurrency holds leases, not units: to
 * or from it the new limit starts fresh (limiter.c never pairs it across algorithms).
 * redis_script.lua's carry_across is the same. */
static void carry_across(const sl_climit *oc, const void *ostate, const sl_climit *nc,
                         void *nstate, int64_t n)
{
    sl_algo_init(nc, nstate, n); /* fresh: full */
    if (oc->algorithm == SL_CONCURRENCY || nc->algorithm == SL_CONCURRENCY)
        return;
    sl_check k;
    sl_algo_check(oc, ostate, 0, n, &k); /* a peek: k.remaining = whole units left at n */
    int full;
    if (oc->algorithm == SL_BURST_RESERVE) {
        br_st o;
        memcpy(&o, ostate, sizeof o);
        full = o.tat <= n;
    } else {
        full = k.remaining >= oc->limit;
    }
    if (full || k.remaining >= nc->limit)
        return;
    uint64_t used = nc->limit - k.remaining; /* L_new - R, in 1..L_new */
    switch (nc->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET: {
        /* have = tau - (tat - n) = R*T: remaining = floor(have / T) = R. For the leaky
         * bucket that is a queue of L - R units ahead (the next request waits for them) and
         * room for R. used*T <= tau < 2^62. */
        gcra_st s = {n + (int64_t)used * nc->interval, n};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_BURST_RESERVE: { /* base R, reserve 0 */
        br_st s = {n + (int64_t)used * nc->interval, n, n};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_FIXED_WINDOW: { /* L - R used in the window holding n */
        fw_st s = {n, used};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_SLIDING_WINDOW: { /* L - R in the current window, none in the previous one */
        sw_st s = {n, (uint32_t)used, 0};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_SLIDING_LOG: { /* L - R timestamps at n */
        int64_t *nr = log_ring(nstate);
        for (uint64_t i = 0; i < used; i++)
            nr[i] = n;
        log_hdr h = {n, 0, (uint32_t)used};
        memcpy(nstate, &h, sizeof h);
        break;
    }
    case SL_CONCURRENCY:
        break;
    }
}

void sl_algo_carry(const sl_climit *oc, const void *ostate, const sl_climit *nc, void *nstate,
                   int64_t now)
{
    if (sl_climit_same(oc, nc)) {
        memcpy(nstate, ostate, nc->state_size);
        return;
    }
    int64_t last;
    memcpy(&last, (const char *)ostate +
                      (oc->algorithm == SL_TOKEN_BUCKET || oc->algorithm == SL_LEAKY_BUCKET
                           ? offsetof(gcra_st, last)
                       : oc->algorithm == SL_BURST_RESERVE ? offsetof(br_st, last)
                                                           : 0),
           sizeof last);
    int64_t n = max64(now, last);
    if (oc->algorithm != nc->algorithm) {
        carry_across(oc, ostate, nc, nstate, n);
        return;
    }
    sl_algo_init(nc, nstate, n); /* the full state; below only non-full keys are adjusted */

    switch (oc->algorithm) {
    case SL_LEAKY_BUCKET: {
        /* Shaping: requests already admitted keep their departure times, so the queue keeps
         * its drain time; new requests queue behind it (a shallower queue denies until it
         * has drained enough). Keeping the free room instead would let new requests leave
         * before queued ones and exceed the leak rate for a moment. */
        gcra_st o;
        memcpy(&o, ostate, sizeof o);
        if (o.tat > n) {
            gcra_st s = {o.tat, n};
            memcpy(nstate, &s, sizeof s);
        }
        break;
    }
    case SL_TOKEN_BUCKET: {
        gcra_st o;
        memcpy(&o, ostate, sizeof o);
        int64_t backlog = o.tat > n ? o.tat - n : 0;
        if (backlog == 0)
            break; /* full stays full */
        int64_t have = backlog >= oc->tau ? 0 : oc->tau - backlog;
        int64_t h = carry_credit(have, oc->interval, nc->interval, nc->tau);
        gcra_st s = {n + (nc->tau - h), n};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_BURST_RESERVE: {
        br_st o;
        memcpy(&o, ostate, sizeof o);
        br_view v = br_look(oc, &o, n);
        br_st s = {n, n, n};
        if (v.backlog > 0)
            s.tat = n + (nc->tau - carry_credit(v.bhave, oc->interval, nc->interval, nc->tau));
        s.z = n - carry_credit(v.rhave, oc->rinterval, nc->rinterval, nc->rtau);
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_FIXED_WINDOW: {
        fw_st o;
        memcpy(&o, ostate, sizeof o);
        fw_roll(oc, &o, n);
        if (o.count == 0)
            break;
        fw_st s = {n, carry_used(oc->limit, o.count, nc->limit)};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_SLIDING_WINDOW: {
        sw_st o;
        memcpy(&o, ostate, sizeof o);
        sw_roll(oc, &o, n);
        if (o.cur == 0 && o.prev == 0)
            break;
        sl_check k;
        memset(&k, 0, sizeof k);
        sw_check(oc, o, 0, n, &k); /* k.remaining = whole units left under the old limit */
        /* The units in use move into the current window of the new alignment. */
        sw_st s = {n, (uint32_t)carry_used(oc->limit, oc->limit - k.remaining, nc->limit), 0};
        memcpy(nstate, &s, sizeof s);
        break;
    }
    case SL_SLIDING_LOG: {
        log_hdr h;
        memcpy(&h, ostate, sizeof h);
        const int64_t *r = log_cring(ostate);
        /* live under the old window and under the new one */
        int64_t cut = n - min64(oc->window, nc->window);
        uint32_t i = log_first_after(r, &h, oc->limit, cut);
        uint64_t keep = h.n - i;
        if (keep > nc->limit)
            keep = nc->limit;
        int64_t *nr = log_ring(nstate);
        for (uint64_t k = 0; k < keep; k++)
            nr[k] = log_at(r, &h, oc->limit, (uint32_t)(h.n - keep + k));
        log_hdr nh = {n, 0, (uint32_t)keep};
        memcpy(nstate, &nh, sizeof nh);
        break;
    }
    case SL_CONCURRENCY: {
        cc_hdr h;
        memcpy(&h, ostate, sizeof h);
        const cc_lease *r = cc_cring(ostate);
        uint64_t ew;
        uint32_t i = cc_expired(r, &h, oc->limit, n, &ew);
        /* Keep the live leases with the latest expiries that fit; the oldest one kept may
         * keep only part of its weight, so used_new = min(N_new, live_old). */
        uint64_t room = nc->limit, first_w = 0;
        uint32_t j = h.n;
        while (j > i && room > 0) {
            j--;
            uint64_t w = r[cc_idx(&h, oc->limit, j)].weight;
            first_w = w < room ? w : room;
            room -= first_w;
        }
        cc_lease *nr = cc_ring(nstate);
        cc_hdr nh = {n, 0, 0, 0};
        for (uint32_t k = j; k < h.n; k++) {
            cc_lease l = r[cc_idx(&h, oc->limit, k)];
            if (k == j)
                l.weight = first_w;
            nr[nh.n++] = l;
            nh.used += l.weight;
        }
        memcpy(nstate, &nh, sizeof nh);
        break;
    }
    }
}
