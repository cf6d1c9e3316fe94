/*
 * policy.h — compiled policies and the rule-set snapshot that maps keys to them.
 *
 * A policy is compiled once (units converted to integers, see algo.h) and interned: equal
 * policies share one sl_cpolicy with one id for the limiter's whole life, so a key's state can
 * record the id it was written under and a policy change is noticed (and carried over) by
 * comparing ids. Compiled policies are freed only when the limiter closes.
 */
#ifndef SL_POLICY_H
#define SL_POLICY_H

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "algo.h"
#include "sluice.h"

typedef struct sl_cpolicy {
    uint32_t id;                    /* 1.. ; 0 means "no policy" in an entry */
    _Atomic int condemned;          /* being collected, or collected (limiter.c) */
    uint64_t fp;                    /* hash of `src`: identity across collections */
    uint32_t nlimits;
    uint32_t state_size;            /* bytes for all limits together */
    uint32_t heap;                  /* state does not fit inline (16 bytes) */
    uint32_t offs[SL_MAX_LIMITS];   /* byte offset of each limit's state */
    uint64_t max_cost;              /* smallest limit: a larger cost is SL_ECOST */
    int has_lease;                  /* some limit is a concurrency limit */
    sl_climit lim[SL_MAX_LIMITS];
    sl_policy src;                  /* normalised source (unused fields zero) */
} sl_cpolicy;

/* Normalise (zero what the algorithms do not use) and compile; SL_OK or the first error. */
int sl_policy_compile(const sl_policy *in, sl_policy *norm, sl_cpolicy *out);

/* ---- immutable maps: byte key -> (policy, optional value bytes) ---- */
typedef struct sl_ient {
    uint64_t h;
    uint32_t klen, vlen;
    const sl_cpolicy *pol;
    char data[]; /* key, then value */
} sl_ient;

typedef struct sl_imap {
    _Atomic unsigned refs;
    size_t n, mask;
    sl_ient *s[];
} sl_imap;

const sl_ient *sl_imap_get(const sl_imap *m, uint64_t h, const void *k, size_t len);
/* A copy of `old` (NULL = empty) with `k` set to (pol, v) or, with del, removed. *out is NULL
 * when the result is empty. *found says whether `k` was in `old`. SL_OK or SL_ENOMEM. */
int sl_imap_with(const sl_imap *old, uint64_t h, const void *k, size_t klen,
                 const sl_cpolicy *pol, const void *v, size_t vlen, int del, sl_imap **out,
                 int *found);
void sl_imap_ref(sl_imap *m);
void sl_imap_unref(sl_imap *m);

/* The rule set: one immutable snapshot, swapped whole on every change. Empty maps are NULL
 * so the decision path skips them without hashing. Keys are encoded with sl_key_encode. */
typedef struct sl_rules {
    sl_imap *client; /* (tenant, action, client) -> policy */
    sl_imap *action; /* (tenant, action)         -> policy */
    sl_imap *tenant; /* (tenant)                 -> policy */
    sl_imap *assign; /* (tenant, "", client)     -> tier name (value bytes) */
    sl_imap *tiers;  /* tier name                -> policy */
    const sl_cpolicy *deflt;
} sl_rules;

void sl_rules_free(void *rules); /* drops the snapshot's references */

/* The length of tenant or action id s[0..len) as keys hold it: "default" and "" are the same
 * id, both of length 0. (Also how sluiced names the default tenant's weight and queue.) */
static inline size_t sl_norm_default(const char *s, size_t len)
{
    return len == 7 && memcmp(s, "default", 7) == 0 ? 0 : len;
}

/* Encoding of (tenant, action, client) used by the table and the rule maps:
 * [tenant_len][action_len][tenant][action][client], with "default" normalised to "". */
#define SL_KEY_MAX (2 + 3 * SL_MAX_ID_LEN)
size_t sl_key_encode(char *buf, const char *t, size_t tl, const char *a, size_t al,
                     const char *c, size_t cl);
/* Split an encoding back into its parts (pointers into `buf`). */
void sl_key_decode(const char *buf, size_t len, sl_key *out);

#endif
