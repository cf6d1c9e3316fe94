/*
 * algo.h — the seven algorithms over a key's few bytes of state. Pure computation: no locks,
 * no allocation, no clock. The caller (limiter.c) holds the key's shard lock, reads `now`
 * once per request and evaluates every limit of a policy against it.
 *
 * Units are converted once, when a policy is compiled (sl_climit_compile): rates become an
 * integer number of nanoseconds per unit, rounded UP so that rounding can only deny, never
 * over-admit.
 */
#ifndef SL_ALGO_H
#define SL_ALGO_H

#include <stdint.h>

#include "sluice.h"

/* A compiled limit: everything the hot path needs, as integers. */
typedef struct sl_climit {
    sl_algorithm algorithm;
    uint32_t state_size; /* bytes of per-key state (multiple of 8) */
    uint64_t limit;      /* C, N, L, B or max in flight */
    int64_t interval;    /* ns per unit: token/leaky refill, burst_reserve base refill */
    int64_t tau;         /* limit * interval (token/leaky/burst base) */
    int64_t window;      /* ns: windows, log, concurrency lease TTL */
    int64_t rinterval;   /* burst_reserve: ns per reserve unit */
    uint64_t rcap;       /* burst_reserve: reserve ceiling */
    int64_t rtau;        /* rcap * rinterval */
} sl_climit;

/* The period a decision reports for this limit (sl_decision.window): the time to refill
 * from empty (tau) for the bucket algorithms, else the window or lease TTL. */
/* Same algorithm and parameters: a state kept under one is the state under the other. */
static inline int sl_climit_same(const sl_climit *a, const sl_climit *b)
{
    return a->algorithm == b->algorithm && a->limit == b->limit &&
           a->interval == b->interval && a->window == b->window &&
           a->rinterval == b->rinterval && a->rcap == b->rcap;
}

static inline int64_t sl_climit_window(const sl_climit *c)
{
    return (c->algorithm == SL_TOKEN_BUCKET || c->algorithm == SL_LEAKY_BUCKET ||
            c->algorithm == SL_BURST_RESERVE)
               ? c->tau
               : c->window;
}

/* Validate and convert. SL_OK or the specific SL_E* code; `out` untouched on error. */
int sl_climit_compile(const sl_limit *in, sl_climit *out);

/* The outcome of checking one limit; filled by sl_algo_check. */
typedef struct sl_check {
    int allowed;
    uint64_t remaining;  /* whole units left AFTER this request if it were admitted; when
                            denied, whole units left now */
    int64_t reset_after; /* ns until full (after the request, if admitted) */
    int64_t retry_after; /* 0 if allowed, else ns until this cost could pass */
    int64_t delay;       /* leaky bucket only */
    double tokens;       /* fractional units left (after the request if admitted) */
    double reserve;      /* burst_reserve only: reserve left (after, if admitted) */
    int via_reserve;     /* burst_reserve: the request is served from the reserve */
} sl_check;

/* Initialise the state of a key seen for the first time at `now` (token bucket: full;
 * burst_reserve: base full, reserve 0; concurrency: no leases). */
void sl_algo_init(const sl_climit *c, void *state, int64_t now);

/* Would `cost` pass at `now`? Reads state only. cost 0 = peek (always allowed unless the
 * algorithm defines otherwise; remaining describes the present). cost <= c->limit is
 * guaranteed by the caller. */
void sl_algo_check(const sl_climit *c, const void *state, uint64_t cost, int64_t now,
                   sl_check *out);

/* Consume `cost` at `now` after every limit of the policy allowed it. `chk` is what
 * sl_algo_check produced for this state, cost and `now` (nothing changed in between), or NULL
 * to have it checked again; nothing is consumed when it was not allowed. For concurrency,
 * `lease` is the id to record. */
void sl_algo_commit(const sl_climit *c, void *state, uint64_t cost, int64_t now,
                    const sl_check *chk, uint64_t lease);

/* Record that a request was denied at `now` (lets state remember the latest time so that a
 * later earlier timestamp counts as zero elapsed). May be a no-op. */
void sl_algo_touch(const sl_climit *c, void *state, int64_t now);

/* Earliest time at which the key is indistinguishable from a new key (so dropping it loses
 * nothing); INT64_MAX if never (burst_reserve, whose new keys start with an empty reserve). */
int64_t sl_algo_full_at(const sl_climit *c, const void *state);

/* Policy change: fill `nstate` (for limit `nc`) from `ostate` (kept under `oc`) at `now` so
 * that the key keeps its remaining units, clamped to the new capacity; a key full under the
 * old limit is full under the new one. Across algorithms the new limit keeps exactly
 * min(whole units the old one leaves, new capacity) (none gained from fractions); to or from
 * concurrency (leases, not units) it starts fresh. */
void sl_algo_carry(const sl_climit *oc, const void *ostate, const sl_climit *nc, void *nstate,
                   int64_t now);

/* Could `state` have been produced by limit `c`? Checks what the other functions rely on
 * (ring positions and counts within the limit, times in range and in order, a concurrency
 * state's total weight) so that a state read from outside (a snapshot) can be used safely.
 * Returns 1 or 0. `*max_lease` (concurrency) is raised to the largest lease id held. */
/* Lease ids a loaded state may hold are below this: the limiter numbers new leases from the
 * largest loaded id + 1, and from any id below 2^62 that count never wraps round to 0 (no
 * lease) or to ids in use (a snapshot holding UINT64_MAX made the next lease 0: fuzz_snapshot). */
#define SL_LEASE_ID_MAX (UINT64_C(1) << 62)
int sl_algo_state_valid(const sl_climit *c, const void *state, uint64_t *max_lease);

/* concurrency: release lease `id`. Returns SL_OK or SL_ELEASE. */
int sl_algo_release(const sl_climit *c, void *state, uint64_t id, int64_t now);

#endif
