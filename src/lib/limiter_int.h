/*
 * limiter_int.h — what the snapshot code (snapshot.c) needs from the limiter's inside.
 */
#ifndef SL_LIMITER_INT_H
#define SL_LIMITER_INT_H

#include <stddef.h>
#include <stdint.h>

#include "sluice.h"

/* One key: its encoded bytes (policy.h's key encoding), normalised policy, state bytes. */
typedef int (*sl_key_visit_fn)(void *ctx, const char *key, size_t klen, const sl_policy *p,
                               const void *state, size_t state_size);

unsigned sl_limiter_nshards(sl_limiter *l);
/* Visit one shard's keys a slice at a time under that shard's lock (memory.h's
 * sl_table_visit_slice: SL_SLICE_MORE until SL_SLICE_DONE or SL_SLICE_REPEATS; fn must be
 * quick, must not call into the limiter, and returns 0, > 0 or < 0 as described there). */
struct sl_slice;
int sl_limiter_visit_slice(sl_limiter *l, unsigned shard, struct sl_slice *c, int first,
                           uint32_t max, sl_key_visit_fn fn, void *ctx, int *fnrc);
/* Make room for `keys` more keys (sl_table_reserve) before restoring them. */
void sl_limiter_reserve(sl_limiter *l, uint64_t keys);
/* Give key (encoded) policy p and exactly this state, replacing what it had (the state is
 * checked with sl_algo_state_valid: SL_ESNAPSHOT if it does not fit the policy). Lease ids
 * issued afterwards are above every lease id in the state. */
int sl_limiter_restore(sl_limiter *l, const char *key, size_t klen, const sl_policy *p,
                       const void *state, size_t state_size);
/* For stores other than the table (redis.c): validate and encode key `k` (sl_key_encode, into
 * `buf` of SL_KEY_MAX bytes) and resolve its policy (inline policy `inl` interned if given)
 * into *cp, a copy (the limiter may collect the policy once nothing in it uses it). */
struct sl_cpolicy;
int sl_limiter_resolve(sl_limiter *l, const sl_key *k, const sl_policy *inl, char *buf,
                       size_t *len, uint64_t *hash, struct sl_cpolicy *cp);
/* Policies interned now; *runs and *freed (if not NULL): collections run and policies they
 * freed so far. For tests. */
size_t sl_limiter_policies(sl_limiter *l, uint64_t *runs, uint64_t *freed);
/* The limiter's Redis store (redis.h), or NULL: the in-memory table. */
struct sl_rstore *sl_limiter_rstore(sl_limiter *l);
/* Count a decision for the tenant (sl_stats). */
void sl_limiter_count(sl_limiter *l, const char *tenant, size_t len, int allowed);

/* SL_ECOST, for both stores: `d` shows the key as a take of cost 0 did (nothing consumed),
 * marked denied. No wait lets a cost above the capacity pass: retry_after is 0. */
static inline int sl_over_cost(sl_decision *d)
{
    d->allowed = 0;
    d->retry_after = 0;
    d->delay = 0;
    d->lease = 0;
    d->err = SL_ECOST;
    return SL_ECOST;
}

/* Record what a successful snapshot call did, for sl_snapshot_last. */
void sl_limiter_snapshot_note(sl_limiter *l, int op, const sl_snapshot_info *info);

#endif
