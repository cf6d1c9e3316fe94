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
/* Visit every key of one shard under that shard's lock (fn must be quick and must not call
 * into the limiter). Returns what fn returned to stop, else 0. */
int sl_limiter_visit_shard(sl_limiter *l, unsigned shard, sl_key_visit_fn fn, void *ctx);
/* The same a slice at a time (memory.h's sl_table_visit_slice: SL_SLICE_DONE, _MORE, or
 * _MOVED: start the shard again). */
int sl_limiter_visit_slice(sl_limiter *l, unsigned shard, uint32_t *pos, uint32_t *stamp,
                           int first, uint32_t max, sl_key_visit_fn fn, void *ctx, int *fnrc);
/* Give key (encoded) policy p and exactly this state, replacing what it had. state_size must
 * be the compiled policy's (else SL_ESNAPSHOT). */
int sl_limiter_restore(sl_limiter *l, const char *key, size_t klen, const sl_policy *p,
                       const void *state, size_t state_size);

#endif
