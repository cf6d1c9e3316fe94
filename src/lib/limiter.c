/*
 * limiter.c — the public API: key validation, policy resolution, the decision path, rules,
 * tiers and counters. The data path of one decision:
 *
 *   validate -> read `now` once -> encode + hash the key -> resolve its policy from the
 *   current rule-set snapshot (lock-free) -> lock the key's shard -> find or insert the entry
 *   -> (carry state over if the key's policy changed) -> check every limit, commit all or
 *   none -> unlock -> count for the tenant.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "algo.h"
#include "bytes.h"
#include "dir.h"
#include "ebr.h"
#include "limiter_int.h"
#include "memory.h"
#include "policy.h"
#include "redis.h"
#include "sluice.h"

#define SL_MAX_TENANTS 65536      /* beyond this, counters go to the overflow tenant */
#define SL_OVERFLOW_TENANT "_overflow"
#define SL_MAX_POLICIES (1u << 20) /* distinct policies in use at once */
#define SL_GC_MIN 1024             /* collect policies once this many exist, at the least */
#define REG_CHUNK 4096
#define REG_CHUNKS (SL_MAX_POLICIES / REG_CHUNK)
#define STRIPES 8                 /* counter stripes per tenant: one per thread, see below */
#define MAX_NOW (INT64_C(1) << 62)

typedef struct stripe {
    _Atomic uint64_t allowed, denied, evicted;
    char pad[64 - 3 * sizeof(uint64_t)];
} stripe;

typedef struct sl_tenant {
    stripe s[STRIPES];
} sl_tenant;

struct sl_limiter {
    sl_table *table;
    sl_ebr *ebr;
    sl_dir *tenants;  /* tenant name -> sl_tenant */
    sl_dir *policies; /* normalised sl_policy bytes -> sl_cpolicy */
    _Atomic(sl_cpolicy *) *reg[REG_CHUNKS]; /* id -> policy; chunks published once */
    pthread_mutex_t ids;                    /* npolicies, free_ids (after the dir lock) */
    uint32_t npolicies;                     /* ids used so far */
    uint32_t *free_ids;                     /* ids of collected policies, to reuse */
    size_t nfree, free_cap;
    _Atomic size_t gc_at;                   /* collect when the directory holds this many */
    _Atomic uint64_t gc_runs, gc_freed;     /* for tests and stats */
    _Atomic uint64_t gc_started, gc_done;   /* collections begun / ended (inline_intern) */
    pthread_mutex_t gc;                     /* one collection at a time */
    _Atomic(sl_rules *) rules;
    pthread_mutex_t cfg; /* serialises rule, tier and default changes */
    sl_tenant *deflt_tenant, *overflow_tenant;
    sl_clock_fn clock;
    void *clock_ctx;
    int64_t anchor; /* wall - monotonic at open */
    _Atomic uint64_t next_lease;
    _Atomic uint64_t reclaimed, evicted;
    uint64_t serial; /* unique per limiter in this process: keys the per-thread caches */
    sl_snapshot_info snap[2]; /* the last snapshot written, read (under cfg) */
    int have_snap[2];
    sl_rstore *redis; /* the Redis store, or NULL: the table */
};

static _Atomic uint64_t g_serial = 1;

/* ---- clock ------------------------------------------------------------------------------- */

static int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * SL_SECOND + ts.tv_nsec;
}

int64_t sl_now(sl_limiter *l)
{
    if (l->clock)
        return l->clock(l->clock_ctx);
    return clock_ns(CLOCK_MONOTONIC) + l->anchor;
}

/* ---- policy registry --------------------------------------------------------------------- */

static const sl_cpolicy *reg_get(sl_limiter *l, uint32_t id)
{
    if (id == 0 || id >= SL_MAX_POLICIES)
        return NULL;
    _Atomic(sl_cpolicy *) *chunk = l->reg[id / REG_CHUNK];
    return chunk ? atomic_load_explicit(&chunk[id % REG_CHUNK], memory_order_acquire) : NULL;
}

/* sl_dir make callback: compile, give an id, publish in the registry. Under the dir lock. */
static void *policy_make(void *ctx, const void *key, size_t len)
{
    sl_limiter *l = ctx;
    sl_cpolicy *cp = malloc(sizeof *cp);
    if (!cp)
        return NULL;
    if (sl_policy_compile(key, NULL, cp) != SL_OK) { /* validated by the caller already */
        free(cp);
        return NULL;
    }
    pthread_mutex_lock(&l->ids);
    uint32_t id = l->nfree ? l->free_ids[l->nfree - 1] : l->npolicies + 1;
    if (id >= SL_MAX_POLICIES) {
        pthread_mutex_unlock(&l->ids);
        free(cp);
        return NULL;
    }
    cp->id = id;
    atomic_init(&cp->condemned, 0);
    cp->fp = sl_table_hash(key, len);
    size_t ci = id / REG_CHUNK;
    if (!l->reg[ci]) {
        l->reg[ci] = calloc(REG_CHUNK, sizeof(*l->reg[ci]));
        if (!l->reg[ci]) {
            pthread_mutex_unlock(&l->ids);
            free(cp);
            return NULL;
        }
    }
    atomic_store_explicit(&l->reg[ci][id % REG_CHUNK], cp, memory_order_release);
    if (l->nfree)
        l->nfree--;
    else
        l->npolicies = id;
    pthread_mutex_unlock(&l->ids);
    return cp;
}

/* sl_dir found callback (under the dir lock): a policy being collected but still in the
 * directory is wanted again; the collection then keeps it (it frees, under the same lock,
 * only what is still condemned). */
static void policy_revive(void *ctx, void *val)
{
    (void)ctx;
    sl_cpolicy *cp = val;
    if (atomic_load_explicit(&cp->condemned, memory_order_relaxed))
        atomic_store_explicit(&cp->condemned, 0, memory_order_seq_cst);
}

static void policy_gc(sl_limiter *l, int cfg_held);

/* Validate, normalise and intern; the caller is inside an EBR section. cfg_held: the caller
 * holds l->cfg (a rule change), so a collection started here must not take it. A policy
 * returned may be condemned by a collection that starts afterwards: whoever writes its id
 * into an entry checks that under the shard lock (policy_usable_locked) and, if so, interns
 * again; rule changes hold l->cfg, which a collection holds throughout. */
static int policy_intern(sl_limiter *l, const sl_policy *p, const sl_cpolicy **out,
                         int cfg_held)
{
    sl_policy norm;
    int rc = sl_policy_compile(p, &norm, NULL);
    if (rc != SL_OK)
        return rc;
    uint64_t h = sl_table_hash(&norm, sizeof norm);
    sl_cpolicy *cp = sl_dir_get(l->policies, h, &norm, sizeof norm);
    if (cp && !atomic_load_explicit(&cp->condemned, memory_order_acquire)) {
        *out = cp;
        return SL_OK;
    }
    if (!cp && sl_dir_count(l->policies) >= atomic_load_explicit(&l->gc_at, memory_order_relaxed))
        policy_gc(l, cfg_held);
    cp = sl_dir_intern(l->policies, h, &norm, sizeof norm, policy_make, policy_revive, l);
    if (!cp && sl_dir_count(l->policies) + 1 >= SL_MAX_POLICIES) { /* full: collect, once */
        policy_gc(l, cfg_held);
        cp = sl_dir_intern(l->policies, h, &norm, sizeof norm, policy_make, policy_revive, l);
    }
    if (!cp)
        return sl_dir_count(l->policies) + 1 >= SL_MAX_POLICIES ? SL_ETOOMANY : SL_ENOMEM;
    *out = cp;
    return SL_OK;
}

/* Under the shard lock, before a decision uses cp with an entry of that shard: false when a
 * collection condemned cp (the caller interns again). See policy_gc for why this suffices. */
static inline int policy_usable_locked(const sl_cpolicy *cp)
{
    return !atomic_load_explicit(&cp->condemned, memory_order_acquire);
}

/* ---- policy collection -----------------------------------------------------------------
 * Every distinct policy a limiter sees is interned, inline ones included (a server's clients
 * choose those), so policies nothing uses any more are collected: when the directory holds
 * gc_at of them, the next new one first runs a collection, and gc_at becomes twice what
 * survived or a 64th of the keys (SL_GC_MIN at the least), so that its cost per new policy
 * stays bounded.
 *
 * A policy is in use when the rule set (rules, tiers, default) or an entry names it, or when
 * a thread holds it between interning and writing its id into an entry. The last kind is
 * what makes this subtle; a collection, holding l->cfg (no rule change meanwhile):
 *   1. marks what the rule set and every entry name (each shard under its lock);
 *   2. condemns every other policy that existed at the start (cp->condemned = 1);
 *   3. visits every entry again, clearing the mark of any condemned policy an entry names;
 *   4. under the directory's lock, removes what is still condemned: the registry slot is
 *      cleared, the id reused, the memory retired through EBR.
 * A thread about to write cp's id into an entry checks cp->condemned under that shard's lock
 * (policy_usable_locked). If its lock hold comes before step 3's visit of the shard, step 3
 * sees the entry and keeps cp; if after, the thread sees step 2's store and interns again
 * (which finds and revives cp while it is still in the directory, or makes a new one). The
 * same check keeps a thread from comparing a stale cp's id with an entry's reused one. */

typedef struct gc_ctx {
    sl_limiter *l;
    uint32_t n;           /* ids 1..n existed at the start */
    sl_cpolicy **pol;     /* pol[id]: the policy with that id at the start (NULL: none) */
    unsigned char *mark;  /* mark[id]: named by the rule set or an entry */
    int rescan;
} gc_ctx;

static void gc_mark_id(gc_ctx *g, uint32_t id)
{
    if (id == 0 || id > g->n || !g->pol[id])
        return;
    if (g->rescan) {
        if (atomic_load_explicit(&g->pol[id]->condemned, memory_order_relaxed))
            atomic_store_explicit(&g->pol[id]->condemned, 0, memory_order_relaxed);
    } else {
        g->mark[id] = 1;
    }
}

static int gc_visit(void *ctx, sl_entry *e)
{
    gc_mark_id(ctx, e->policy);
    return 0;
}

static void gc_mark_map(gc_ctx *g, const sl_imap *m)
{
    for (size_t i = 0; m && i <= m->mask; i++)
        if (m->s[i] && m->s[i]->pol)
            gc_mark_id(g, m->s[i]->pol->id);
}

static int gc_doomed(void *ctx, void *val)
{
    const gc_ctx *g = ctx;
    const sl_cpolicy *cp = val;
    return cp->id <= g->n && g->pol[cp->id] == cp &&
           atomic_load_explicit(&cp->condemned, memory_order_relaxed);
}

static void gc_gone(void *ctx, void *val) /* under the dir lock */
{
    gc_ctx *g = ctx;
    sl_limiter *l = g->l;
    sl_cpolicy *cp = val;
    atomic_store_explicit(&l->reg[cp->id / REG_CHUNK][cp->id % REG_CHUNK], NULL,
                          memory_order_release);
    pthread_mutex_lock(&l->ids);
    l->free_ids[l->nfree++] = cp->id; /* room reserved by policy_gc */
    pthread_mutex_unlock(&l->ids);
    sl_ebr_retire(l->ebr, cp, free);
}

static void policy_gc(sl_limiter *l, int cfg_held)
{
    if (pthread_mutex_trylock(&l->gc) != 0)
        return; /* one is running: this thread goes on */
    if (!cfg_held && pthread_mutex_trylock(&l->cfg) != 0) {
        pthread_mutex_unlock(&l->gc);
        return; /* a rule change is running: a later new policy collects */
    }
    atomic_fetch_add(&l->gc_started, 1); /* before anything is condemned (inline_intern) */
    gc_ctx g = {.l = l};
    pthread_mutex_lock(&l->ids);
    g.n = l->npolicies;
    size_t need = l->nfree + g.n; /* every id could be free afterwards */
    if (need > l->free_cap) {
        uint32_t *f = realloc(l->free_ids, need * sizeof *f);
        if (f) {
            l->free_ids = f;
            l->free_cap = need;
        }
    }
    int room = l->free_cap >= need;
    pthread_mutex_unlock(&l->ids);
    g.pol = calloc((size_t)g.n + 1, sizeof *g.pol);
    g.mark = calloc((size_t)g.n + 1, 1);
    if (room && g.pol && g.mark) {
        for (uint32_t id = 1; id <= g.n; id++)
            g.pol[id] = (sl_cpolicy *)reg_get(l, id);
        /* 1. mark */
        const sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
        gc_mark_map(&g, r->client);
        gc_mark_map(&g, r->action);
        gc_mark_map(&g, r->tenant);
        gc_mark_map(&g, r->tiers);
        gc_mark_id(&g, r->deflt->id);
        sl_table_foreach(l->table, gc_visit, &g);
        /* 2. condemn */
        for (uint32_t id = 1; id <= g.n; id++)
            if (g.pol[id] && !g.mark[id])
                atomic_store_explicit(&g.pol[id]->condemned, 1, memory_order_seq_cst);
        /* 3. keep what an entry written meanwhile names */
        g.rescan = 1;
        sl_table_foreach(l->table, gc_visit, &g);
        /* 4. remove */
        long freed = sl_dir_remove_if(l->policies, gc_doomed, gc_gone, &g);
        if (freed < 0) { /* no memory to rebuild the directory: keep them all */
            for (uint32_t id = 1; id <= g.n; id++)
                if (g.pol[id])
                    atomic_store_explicit(&g.pol[id]->condemned, 0, memory_order_seq_cst);
        } else {
            atomic_fetch_add_explicit(&l->gc_freed, (uint64_t)freed, memory_order_relaxed);
        }
        atomic_fetch_add_explicit(&l->gc_runs, 1, memory_order_relaxed);
    }
    /* next time: twice what survived, and at least a 64th of the keys, since a collection
     * visits every key (twice): amortised, a new policy costs O(1) visits */
    size_t live = sl_dir_count(l->policies), at = live * 2, keys = sl_table_count(l->table);
    if (at < keys / 64)
        at = keys / 64;
    if (at > SL_MAX_POLICIES - SL_MAX_POLICIES / 8) /* else, past 2^19 live, never again */
        at = SL_MAX_POLICIES - SL_MAX_POLICIES / 8;
    atomic_store_explicit(&l->gc_at, at > SL_GC_MIN ? at : SL_GC_MIN, memory_order_relaxed);
    free(g.pol);
    free(g.mark);
    atomic_fetch_add(&l->gc_done, 1);
    if (!cfg_held)
        pthread_mutex_unlock(&l->cfg);
    pthread_mutex_unlock(&l->gc);
}

/* The inline policy this thread interned last, for the next request that brings the same
 * bytes (a server's clients mostly repeat theirs: CL.THROTTLE's arguments, the HTTP check's
 * max_requests). Interning compiles, hashes and looks up ~170 bytes: about a seventh of a
 * pipelined CL.THROTTLE's instructions (bench/callgrind_server.sh). Only a collection frees a policy. The entry is filled only when no
 * collection was running when the lookup began (gc_done == gc_started then) and none began
 * until it ended, and is used only while none has begun since (gc_started unchanged): a
 * collection that begins after that check retires through EBR, after the caller's read
 * section. A policy found here is not condemned: condemning comes after gc_started moves. */
static _Thread_local struct {
    uint64_t serial, gen;
    const sl_cpolicy *cp;
    sl_policy in;
} t_inline;

static int inline_intern(sl_limiter *l, const sl_policy *p, const sl_cpolicy **out)
{
    uint64_t gen = atomic_load(&l->gc_started), done = atomic_load(&l->gc_done);
    if (t_inline.cp && t_inline.serial == l->serial && t_inline.gen == gen &&
        memcmp(&t_inline.in, p, sizeof *p) == 0) {
        *out = t_inline.cp;
        return SL_OK;
    }
    int rc = policy_intern(l, p, out, 0);
    /* done == gen: no collection was running when the lookup began (one that was could
     * still have removed, after the lookup, the policy it found); gc_started unchanged: none
     * began since */
    if (rc == SL_OK && done == gen && atomic_load(&l->gc_started) == gen) {
        t_inline.serial = l->serial;
        t_inline.gen = gen;
        t_inline.cp = *out;
        memcpy(&t_inline.in, p, sizeof *p);
    }
    return rc;
}

int sl_policy_validate(const sl_policy *p)
{
    return sl_policy_compile(p, NULL, NULL);
}

/* ---- tenants ----------------------------------------------------------------------------- */

static void *tenant_make(void *ctx, const void *key, size_t len)
{
    (void)ctx, (void)key, (void)len;
    sl_tenant *t = aligned_alloc(64, sizeof *t);
    if (t)
        memset(t, 0, sizeof *t);
    return t;
}

/* The last tenant this thread counted for, per limiter serial: most threads serve few
 * tenants, and this skips a hash and a directory probe per decision. */
#define TCACHE_NAME 48
static _Thread_local struct {
    uint64_t serial;
    size_t len;
    sl_tenant *t;
    char name[TCACHE_NAME];
} t_tenant;

/* The counter stripe this thread adds to. By thread, not by key: two threads on one hot key
 * then do not bounce a counter line between them on every decision. A thread owns its stripe
 * while it lives (the first STRIPES - 1 threads alive at once; the rest share the last), and
 * the owner adds with a plain load and store: no locked instruction on the decision path.
 * Ownership passes at thread exit through g_owned (release there, acquire on claiming), so a
 * new owner continues from the last count. */
#define SHARED_STRIPE (STRIPES - 1)
static _Atomic unsigned g_owned; /* bit i: stripe i has an owner */
static pthread_key_t g_stripe_key;
static pthread_once_t g_stripe_once = PTHREAD_ONCE_INIT;
static _Thread_local unsigned t_stripe; /* stripe + 1; 0 = not picked yet */

static void stripe_release(void *v)
{
    unsigned i = (unsigned)(uintptr_t)v - 1;
    t_stripe = SHARED_STRIPE + 1; /* a later decision in this thread's exit shares */
    atomic_fetch_and_explicit(&g_owned, ~(1u << i), memory_order_release);
}

static void stripe_key_init(void)
{
    if (pthread_key_create(&g_stripe_key, stripe_release) != 0)
        atomic_store_explicit(&g_owned, (1u << SHARED_STRIPE) - 1, memory_order_relaxed);
}

static unsigned stripe_claim(void)
{
    pthread_once(&g_stripe_once, stripe_key_init);
    unsigned m = atomic_load_explicit(&g_owned, memory_order_relaxed);
    for (;;) {
        unsigned i = (unsigned)__builtin_ctz(~m); /* the lowest free stripe */
        if (i >= SHARED_STRIPE)
            return SHARED_STRIPE;
        if (atomic_compare_exchange_weak_explicit(&g_owned, &m, m | 1u << i,
                                                  memory_order_acquire, memory_order_relaxed)) {
            if (pthread_setspecific(g_stripe_key, (void *)(uintptr_t)(i + 1)) == 0)
                return i;
            atomic_fetch_and_explicit(&g_owned, ~(1u << i), memory_order_release);
            return SHARED_STRIPE; /* no release at exit possible: do not keep it */
        }
    }
}

/* Count one decision of this thread for tenant t. */
static inline void count_decision(sl_tenant *t, int allowed)
{
    if (!t_stripe)
        t_stripe = stripe_claim() + 1;
    unsigned i = t_stripe - 1;
    _Atomic uint64_t *c = allowed ? &t->s[i].allowed : &t->s[i].denied;
    if (i == SHARED_STRIPE)
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
    else /* only this thread writes it */
        atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                              memory_order_relaxed);
}

/* The counters of tenant (encoded: "" = default). Never NULL once the limiter is open. */
static sl_tenant *tenant_of(sl_limiter *l, const char *name, size_t len)
{
    if (len == 0)
        return l->deflt_tenant;
    if (t_tenant.serial == l->serial && t_tenant.len == len && sl_equal(t_tenant.name, name, len))
        return t_tenant.t;
    uint64_t h = sl_table_hash(name, len);
    sl_tenant *t = sl_dir_get(l->tenants, h, name, len);
    if (!t)
        t = sl_dir_intern(l->tenants, h, name, len, tenant_make, NULL, NULL);
    if (!t)
        return l->overflow_tenant;
    if (len <= TCACHE_NAME) {
        t_tenant.serial = l->serial;
        t_tenant.len = len;
        t_tenant.t = t;
        memcpy(t_tenant.name, name, len);
    }
    return t;
}

/* ---- table hooks --------------------------------------------------------------------------- */

static inline void *entry_state(sl_entry *e)
{
    return (e->flags & SL_ENTRY_HEAP) ? (void *)(uintptr_t)e->state[0] : (void *)e->state;
}

/* Reclaiming waits this long after a key is full, so that timestamps that arrive out of
 * order by up to this much (across keys: a reclaim runs at another key's `now`) see exactly
 * what they would have seen had no key been reclaimed. (Clamping every key not in the table
 * to the shard's latest reclaim time, tried for larger reorders, let one far-future timestamp
 * starve every new key of its shard for good; per-key tombstones would be needed.) */
#define SL_REORDER_NS SL_SECOND

static int64_t hook_full_at(void *ctx, const sl_entry *e)
{
    sl_limiter *l = ctx;
    const sl_cpolicy *cp = reg_get(l, e->policy);
    if (!cp)
        return INT64_MIN; /* no state worth keeping */
    const char *st = entry_state((sl_entry *)e);
    int64_t at = INT64_MIN;
    for (uint32_t i = 0; i < cp->nlimits; i++) {
        int64_t f = sl_algo_full_at(&cp->lim[i], st + cp->offs[i]);
        if (f > at)
            at = f;
    }
    return at >= MAX_NOW ? INT64_MAX : at + SL_REORDER_NS; /* INT64_MAX: never full */
}

static void hook_drop(void *ctx, sl_entry *e, int why)
{
    sl_limiter *l = ctx;
    if (e->flags & SL_ENTRY_HEAP)
        free((void *)(uintptr_t)e->state[0]);
    e->flags &= (uint8_t)~SL_ENTRY_HEAP;
    if (why == 0) {
        atomic_fetch_add_explicit(&l->reclaimed, 1, memory_order_relaxed);
    } else if (why == 1) {
        size_t len;
        const char *k = sl_entry_key(e, &len);
        sl_tenant *t = tenant_of(l, k + 2, (unsigned char)k[0]);
        atomic_fetch_add_explicit(&t->s[0].evicted, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&l->evicted, 1, memory_order_relaxed);
    }
}

static void hook_retire(void *ctx, void *p, void (*fn)(void *), size_t bytes)
{
    sl_limiter *l = ctx;
    sl_ebr_retire_sized(l->ebr, p, fn, bytes);
}

/* ---- open / close ------------------------------------------------------------------------ */

void sl_options_init(sl_options *o)
{
    memset(o, 0, sizeof *o);
}

int sl_open(sl_limiter **out, const sl_options *opts)
{
    if (!out)
        return SL_EINVAL;
    *out = NULL;
    sl_options o;
    if (opts)
        o = *opts;
    else
        sl_options_init(&o);
    if ((o.shards & (o.shards - 1)) || o.shards > 65536) /* memory.c's SL_MAX_SHARDS */
        return SL_EINVAL;
    sl_policy def = SL_POLICY_TOKEN_BUCKET(5, 1.0);
    if (o.default_policy)
        def = *o.default_policy;
    int rc = sl_policy_compile(&def, NULL, NULL);
    if (rc != SL_OK)
        return rc;

    sl_limiter *l = calloc(1, sizeof *l);
    if (!l)
        return SL_ENOMEM;
    rc = SL_ENOMEM;
    if (pthread_mutex_init(&l->cfg, NULL) != 0)
        goto fail_mutex;
    if (pthread_mutex_init(&l->ids, NULL) != 0) {
        pthread_mutex_destroy(&l->cfg);
        goto fail_mutex;
    }
    if (pthread_mutex_init(&l->gc, NULL) != 0) {
        pthread_mutex_destroy(&l->ids);
        pthread_mutex_destroy(&l->cfg);
        goto fail_mutex;
    }
    atomic_init(&l->gc_at, SL_GC_MIN);
    l->clock = o.clock;
    l->clock_ctx = o.clock_ctx;
    int64_t wall = clock_ns(CLOCK_REALTIME);
    l->anchor = wall - clock_ns(CLOCK_MONOTONIC);
    /* Lease ids start at the wall clock in microseconds, not at 1: a limiter that restarts
     * (after a crash, say, whose snapshot predates its last leases) must not hand out again
     * an id a holder of the old one still has, or that holder's late release would free the
     * new lease. A repeat needs more than one lease per microsecond over the old limiter's
     * whole life (or the wall clock set back); ids stay below 2^53, exact in a double
     * (JSON clients). */
    atomic_init(&l->next_lease, wall >= 1000 ? (uint64_t)(wall / 1000) : 1);
    l->serial = atomic_fetch_add(&g_serial, 1);
    if (!(l->ebr = sl_ebr_new()))
        goto fail_ebr;
    if (!(l->tenants = sl_dir_new(l->ebr, SL_MAX_TENANTS)))
        goto fail_tenants;
    if (!(l->policies = sl_dir_new(l->ebr, SL_MAX_POLICIES)))
        goto fail_policies;
    if (!(l->deflt_tenant = tenant_make(NULL, NULL, 0)))
        goto fail_deflt;
    if (!(l->overflow_tenant = sl_dir_intern(l->tenants, sl_table_hash(SL_OVERFLOW_TENANT, 9),
                                             SL_OVERFLOW_TENANT, 9, tenant_make, NULL, NULL)))
        goto fail_table;
    sl_table_hooks hooks = {.ctx = l, .full_at = hook_full_at, .drop = hook_drop,
                            .retire = hook_retire};
    if (!(l->table = sl_table_new(o.shards, o.max_keys, &hooks)))
        goto fail_table;
    sl_rules *r = calloc(1, sizeof *r);
    if (!r)
        goto fail_rules;
    if (sl_ebr_enter(l->ebr) != 0) {
        free(r);
        goto fail_rules;
    }
    rc = policy_intern(l, &def, &r->deflt, 0);
    sl_ebr_leave(l->ebr);
    if (rc != SL_OK) {
        free(r);
        goto fail_rules;
    }
    atomic_init(&l->rules, r);
    if (o.redis && (rc = sl_rs_new(l, o.redis, &l->redis)) != SL_OK) {
        sl_close(l);
        return rc;
    }
    *out = l;
    return SL_OK;

fail_rules:
    sl_table_free(l->table);
fail_table:
    free(l->deflt_tenant);
fail_deflt:
    sl_dir_free(l->policies, free);
fail_policies:
    sl_dir_free(l->tenants, free);
fail_tenants:
    sl_ebr_free(l->ebr);
fail_ebr:
    pthread_mutex_destroy(&l->gc);
    pthread_mutex_destroy(&l->ids);
    pthread_mutex_destroy(&l->cfg);
fail_mutex:
    for (size_t i = 0; i < REG_CHUNKS; i++)
        free(l->reg[i]);
    free(l);
    return rc;
}

void sl_close(sl_limiter *l)
{
    if (!l)
        return;
    sl_rs_free(l->redis);
    sl_table_free(l->table); /* hooks need the registry: free the table first */
    sl_rules_free(atomic_load(&l->rules));
    sl_ebr_free(l->ebr); /* frees retired rule sets and directory arrays */
    sl_dir_free(l->policies, free);
    sl_dir_free(l->tenants, free);
    free(l->deflt_tenant);
    for (size_t i = 0; i < REG_CHUNKS; i++)
        free(l->reg[i]);
    free(l->free_ids);
    pthread_mutex_destroy(&l->gc);
    pthread_mutex_destroy(&l->ids);
    pthread_mutex_destroy(&l->cfg);
    free(l);
}

/* ---- the decision path ------------------------------------------------------------------- */

/* A request made ready for the table: validated, encoded, hashed. */
typedef struct prep {
    int err;
    size_t len;
    uint64_t hash;
    char buf[SL_KEY_MAX];
} prep;

static int check_id(const char *s, size_t len)
{
    if (len > SL_MAX_ID_LEN)
        return SL_EKEYLONG;
    if (len && !s)
        return SL_EINVAL;
    return SL_OK;
}

static int key_check(const sl_key *k)
{
    int rc;
    if (!k)
        return SL_EINVAL;
    if ((rc = check_id(k->tenant, k->tenant_len)) || (rc = check_id(k->action, k->action_len)) ||
        (rc = check_id(k->client, k->client_len)))
        return rc;
    return k->client_len ? SL_OK : SL_EKEYEMPTY;
}

static void prepare(const sl_key *k, prep *p)
{
    if ((p->err = key_check(k)) != SL_OK)
        return;
    p->len = sl_key_encode(p->buf, k->tenant, k->tenant_len, k->action, k->action_len,
                           k->client, k->client_len);
    p->hash = sl_table_hash(p->buf, p->len);
}

/* Resolve the policy for an encoded key (see sluice.h for the order). Inside EBR. */
static const sl_cpolicy *resolve(const sl_rules *r, const prep *p, const sl_cpolicy *inl)
{
    const sl_ient *e;
    size_t tl = (unsigned char)p->buf[0], al = (unsigned char)p->buf[1];
    if (r->client && (e = sl_imap_get(r->client, p->hash, p->buf, p->len)))
        return e->pol;
    if (r->action) {
        size_t n = 2 + tl + al; /* the key's prefix is the (tenant, action) encoding */
        if ((e = sl_imap_get(r->action, sl_table_hash(p->buf, n), p->buf, n)))
            return e->pol;
    }
    if (r->tenant || r->assign) {
        char b[SL_KEY_MAX];
        size_t n = sl_key_encode(b, p->buf + 2, tl, NULL, 0, NULL, 0);
        if (r->tenant && (e = sl_imap_get(r->tenant, sl_table_hash(b, n), b, n)))
            return e->pol;
        if (r->assign) {
            size_t cl = p->len - 2 - tl - al;
            n = sl_key_encode(b, p->buf + 2, tl, NULL, 0, p->buf + 2 + tl + al, cl);
            if ((e = sl_imap_get(r->assign, sl_table_hash(b, n), b, n))) {
                const sl_ient *t = !r->tiers ? NULL : sl_imap_get(r->tiers, sl_table_hash(e->data + e->klen, e->vlen),
                                               e->data + e->klen, e->vlen);
                if (t)
                    return t->pol;
            }
        }
    }
    return inl ? inl : r->deflt;
}

static void init_state(const sl_cpolicy *cp, char *st, int64_t now)
{
    for (uint32_t i = 0; i < cp->nlimits; i++)
        sl_algo_init(&cp->lim[i], st + cp->offs[i], now);
}

/* Which limit of `old` each limit of `cp` carries its state from (-1: none, fresh). Limits
 * are matched limit by limit, each old one used once: first one with the same parameters,
 * then the one at the same position if it has the same algorithm, then the first of the same
 * algorithm. So adding, removing or reordering limits keeps what the limits kept still
 * hold (it used to start the whole key anew: a key out of its 10/s handed a fresh bucket
 * when "and 1000/day" was added; found by review). Last, a limit still unmatched (its
 * algorithm is not among the old limits left) takes the first old limit still unused, of
 * another algorithm, and keeps its remaining units (sl_algo_carry): a key that switched
 * from an emptied bucket to a window started anew, full (found by review). Concurrency
 * (leases, not units) takes part in that last step on neither side. When no old limit is
 * left, the limit starts fresh: taking one already matched again (the most restrictive,
 * say) would hand an added "1000/day" the momentary emptiness of a 10/s bucket for the rest
 * of the day. The Redis script matches the same way. pairs_in says which pairs a pass takes:
 * new limit n (the i-th) and old limit o (the j-th). */
static int pairs_in(int pass, uint32_t i, uint32_t j, const sl_climit *n, const sl_climit *o)
{
    switch (pass) {
    case 0: /* the same parameters */
        return sl_climit_same(o, n);
    case 1: /* the same position and algorithm */
        return j == i && o->algorithm == n->algorithm;
    case 2: /* the same algorithm */
        return o->algorithm == n->algorithm;
    default: /* any other, but leases are not units */
        return o->algorithm != SL_CONCURRENCY && n->algorithm != SL_CONCURRENCY;
    }
}

static void match_limits(const sl_cpolicy *old, const sl_cpolicy *cp, int from[SL_MAX_LIMITS])
{
    unsigned used = 0;
    for (uint32_t i = 0; i < cp->nlimits; i++)
        from[i] = -1;
    for (int pass = 0; pass < 4; pass++)
        for (uint32_t i = 0; i < cp->nlimits; i++)
            for (uint32_t j = 0; j < old->nlimits && from[i] < 0; j++)
                if (!(used & (1u << j)) && pairs_in(pass, i, j, &cp->lim[i], &old->lim[j])) {
                    from[i] = (int)j;
                    used |= 1u << j;
                }
}

/* Fill `nst` (cp->state_size bytes) with e's state as seen under `cp`: each limit carried
 * over from the old policy's limit match_limits pairs it with, fresh otherwise. */
static void state_for(sl_limiter *l, sl_entry *e, int created, const sl_cpolicy *cp,
                      char *nst, int64_t now)
{
    const sl_cpolicy *old = created ? NULL : reg_get(l, e->policy);
    if (!old) {
        init_state(cp, nst, now);
        return;
    }
    int from[SL_MAX_LIMITS];
    match_limits(old, cp, from);
    const char *ost = entry_state(e);
    for (uint32_t i = 0; i < cp->nlimits; i++) {
        if (from[i] < 0)
            sl_algo_init(&cp->lim[i], nst + cp->offs[i], now);
        else
            sl_algo_carry(&old->lim[from[i]], ost + old->offs[from[i]], &cp->lim[i],
                          nst + cp->offs[i], now);
    }
}

/* Give entry `e` state for `cp`: fresh for a new key, carried over when its policy changed. */
static int attach_policy_locked(sl_limiter *l, sl_entry *e, const sl_cpolicy *cp, int created,
                                int64_t now)
{
    uint64_t inl[2];
    char *nst = cp->heap ? malloc(cp->state_size) : (char *)inl;
    if (!nst)
        return SL_ENOMEM;
    state_for(l, e, created, cp, nst, now);
    if (e->flags & SL_ENTRY_HEAP)
        free((void *)(uintptr_t)e->state[0]);
    if (cp->heap) {
        e->state[0] = (uint64_t)(uintptr_t)nst;
        e->flags |= SL_ENTRY_HEAP;
    } else {
        memcpy(e->state, inl, sizeof inl);
        e->flags &= (uint8_t)~SL_ENTRY_HEAP;
    }
    e->policy = cp->id;
    return SL_OK;
}

/* Fill `d` from limit r's check (delay and reserve are left to the caller). */
static inline void report(const sl_climit *lim, uint32_t r, const sl_check *c, int ok,
                          uint64_t lease, sl_decision *d)
{
    d->err = SL_OK;
    d->allowed = ok;
    d->limit = lim->limit;
    d->remaining = c->remaining;
    d->reset_after = c->reset_after;
    d->retry_after = ok ? 0 : c->retry_after;
    d->delay = 0;
    d->tokens = c->tokens;
    d->reserve = 0;
    d->lease = lease;
    d->limit_index = r;
    d->algorithm = lim->algorithm;
    d->window = sl_climit_window(lim);
}

static uint64_t new_lease(sl_limiter *l, const sl_cpolicy *cp)
{
    return cp->has_lease ? atomic_fetch_add_explicit(&l->next_lease, 1, memory_order_relaxed) : 0;
}

/* Check every limit against one `now`; commit all (take) or none. Fills `d`. */
static void decide_state(sl_limiter *l, const sl_cpolicy *cp, char *st, uint64_t cost,
                         int64_t now, int take, sl_decision *d)
{
    sl_check chk[SL_MAX_LIMITS];
    uint64_t lease = 0;
    if (cp->nlimits == 1) { /* the common case, without the loops */
        const sl_climit *lim = &cp->lim[0];
        sl_algo_check(lim, st, cost, now, &chk[0]);
        int ok = chk[0].allowed;
        if (take && ok && cost > 0) {
            lease = new_lease(l, cp);
            sl_algo_commit(lim, st, cost, now, &chk[0], lease);
        } else if (take) {
            sl_algo_touch(lim, st, now);
        }
        report(lim, 0, &chk[0], ok, lease, d);
        d->delay = ok && chk[0].delay > 0 ? chk[0].delay : 0;
        if (lim->algorithm == SL_BURST_RESERVE)
            d->reserve = chk[0].reserve;
        return;
    }
    int ok = 1;
    for (uint32_t i = 0; i < cp->nlimits; i++) {
        sl_algo_check(&cp->lim[i], st + cp->offs[i], cost, now, &chk[i]);
        ok &= chk[i].allowed;
    }
    if (take && ok && cost > 0) {
        lease = new_lease(l, cp);
        for (uint32_t i = 0; i < cp->nlimits; i++)
            sl_algo_commit(&cp->lim[i], st + cp->offs[i], cost, now, &chk[i], lease);
    } else if (take) {
        for (uint32_t i = 0; i < cp->nlimits; i++)
            sl_algo_touch(&cp->lim[i], st + cp->offs[i], now);
    }
    /* Report the most restrictive limit: when denied, the one that makes the caller wait
     * longest; when allowed, the one with the fewest units left. */
    uint32_t r = 0;
    for (uint32_t i = 1; i < cp->nlimits; i++) {
        const sl_check *a = &chk[i], *b = &chk[r];
        int better = ok ? (a->remaining < b->remaining ||
                           (a->remaining == b->remaining && a->reset_after > b->reset_after))
                        : (!a->allowed && (b->allowed || a->retry_after > b->retry_after));
        if (better)
            r = i;
    }
    report(&cp->lim[r], r, &chk[r], ok, lease, d);
    for (uint32_t i = 0; i < cp->nlimits; i++) {
        if (ok && chk[i].delay > d->delay)
            d->delay = chk[i].delay;
        if (cp->lim[i].algorithm == SL_BURST_RESERVE)
            d->reserve = chk[i].reserve;
    }
}

static int decide(sl_limiter *l, const prep *p, uint64_t cost, const sl_policy *inline_policy,
                  int64_t now, int take, sl_decision *d)
{
    const sl_cpolicy *inl = NULL, *cp;
    int rc;
    sl_shard *s = sl_table_shard(l->table, p->hash);
    for (;;) {
        if (inline_policy && (rc = inline_intern(l, inline_policy, &inl)) != SL_OK)
            return rc;
        const sl_rules *rules = atomic_load_explicit(&l->rules, memory_order_acquire);
        cp = resolve(rules, p, inl);
        if (cost > cp->max_cost)
            return SL_ECOST; /* the caller fills d (over_cost) */
        sl_shard_lock(s);
        if (policy_usable_locked(cp))
            break;
        sl_shard_unlock(s); /* a collection condemned it: intern and resolve again */
    }
    sl_entry *e;
    int created = 0;
    if (take)
        e = sl_shard_upsert_locked(s, p->hash, p->buf, p->len, now, &created);
    else
        e = sl_shard_find_locked(s, p->hash, p->buf, p->len);
    if (take && !e) {
        sl_shard_unlock(s);
        return SL_ENOMEM;
    }
    if (!e || (!take && e->policy != cp->id)) {
        /* A peek never changes the table: answer from a copy of what the key would hold
         * (a new key's state, or its state carried over to the new policy). */
        uint64_t tmp[2];
        char *st = cp->heap ? malloc(cp->state_size) : (char *)tmp;
        if (st) {
            if (e)
                state_for(l, e, 0, cp, st, now);
            else
                init_state(cp, st, now);
        }
        sl_shard_unlock(s);
        if (!st)
            return SL_ENOMEM;
        decide_state(l, cp, st, cost, now, 0, d);
        if (cp->heap)
            free(st);
        return SL_OK;
    }
    if (created || e->policy != cp->id) {
        if ((rc = attach_policy_locked(l, e, cp, created, now)) != SL_OK) {
            if (created)
                sl_shard_remove_locked(s, e);
            sl_shard_unlock(s);
            return rc;
        }
    }
    decide_state(l, cp, entry_state(e), cost, now, take, d);
    sl_shard_unlock(s);

    if (take)
        count_decision(tenant_of(l, p->buf + 2, (unsigned char)p->buf[0]), d->allowed);
    return SL_OK;
}

/* After decide's SL_ECOST: d as a take of cost 0 shows it, marked denied. Out of line, so
 * that the decision path stays as short as it was. */
static __attribute__((noinline, cold)) int over_cost(sl_limiter *l, const prep *p,
                                                     const sl_policy *inline_policy,
                                                     int64_t now, sl_decision *d)
{
    int rc = decide(l, p, 0, inline_policy, now, 0, d);
    return rc == SL_OK ? sl_over_cost(d) : rc;
}

static int resolve_now(sl_limiter *l, int64_t *now)
{
    if (*now == SL_NOW && l->redis && !l->clock)
        return SL_OK; /* the script reads Redis's clock */
    if (*now == SL_NOW)
        *now = sl_now(l);
    return (*now < 0 || *now >= MAX_NOW) ? SL_EINVAL : SL_OK;
}

static int one(sl_limiter *l, const sl_key *key, uint64_t cost, int64_t now, int take,
               sl_decision *d)
{
    if (!l || !d)
        return SL_EINVAL;
    int rc;
    if (l->redis) {
        if ((rc = resolve_now(l, &now)) != SL_OK)
            return rc;
        if (!key)
            return SL_EINVAL;
        sl_request r = {.key = *key, .cost = cost, .peek = !take};
        if ((rc = sl_rs_batch(l->redis, &r, 1, now, d)) == SL_OK)
            rc = d->err;
        return rc;
    }
    if (now != SL_NOW && (rc = resolve_now(l, &now)) != SL_OK)
        return rc; /* a bad `now` is refused before the key is looked at, as before */
    prep p;
    prepare(key, &p);
    if (p.err != SL_OK)
        return p.err;
    /* A key not in cache costs a miss on its entry (its control byte, read first, is usually
     * cached). Start bringing the control byte, read the clock meanwhile, then start the
     * entry and resolve the policy (in decide) while it is on its way. */
    sl_table_prefetch_home(l->table, p.hash);
    if (now == SL_NOW && (rc = resolve_now(l, &now)) != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_table_prefetch_entry(l->table, p.hash);
    rc = decide(l, &p, cost, NULL, now, take && cost > 0, d);
    if (rc == SL_ECOST)
        rc = over_cost(l, &p, NULL, now, d);
    sl_ebr_leave(l->ebr);
    return rc;
}

/* ---- for other stores (redis.c) ---------------------------------------------------------- */

int sl_limiter_resolve(sl_limiter *l, const sl_key *k, const sl_policy *inl, char *buf,
                       size_t *len, uint64_t *hash, sl_cpolicy *cp)
{
    int rc = key_check(k);
    if (rc != SL_OK)
        return rc;
    prep p;
    prepare(k, &p);
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    const sl_cpolicy *in = NULL;
    if (inl && (rc = inline_intern(l, inl, &in)) != SL_OK) {
        sl_ebr_leave(l->ebr);
        return rc;
    }
    /* a copy: the policy may be collected while the call is on its way to Redis. Field by
     * field: `condemned` is written by collections meanwhile, and is not the copy's */
    const sl_cpolicy *r = resolve(atomic_load_explicit(&l->rules, memory_order_acquire), &p, in);
    cp->id = r->id;
    atomic_init(&cp->condemned, 0);
    cp->fp = r->fp;
    cp->nlimits = r->nlimits;
    cp->state_size = r->state_size;
    cp->heap = r->heap;
    memcpy(cp->offs, r->offs, sizeof cp->offs);
    cp->max_cost = r->max_cost;
    cp->has_lease = r->has_lease;
    memcpy(cp->lim, r->lim, sizeof cp->lim);
    cp->src = r->src;
    sl_ebr_leave(l->ebr);
    memcpy(buf, p.buf, p.len);
    *len = p.len;
    *hash = p.hash;
    return SL_OK;
}

sl_rstore *sl_limiter_rstore(sl_limiter *l) { return l->redis; }

size_t sl_limiter_policies(sl_limiter *l, uint64_t *runs, uint64_t *freed)
{
    if (runs)
        *runs = atomic_load_explicit(&l->gc_runs, memory_order_relaxed);
    if (freed)
        *freed = atomic_load_explicit(&l->gc_freed, memory_order_relaxed);
    return sl_dir_count(l->policies);
}

void sl_limiter_count(sl_limiter *l, const char *tenant, size_t len, int allowed)
{
    if (sl_ebr_enter(l->ebr) != 0)
        return;
    count_decision(tenant_of(l, tenant, len), allowed);
    sl_ebr_leave(l->ebr);
}

int sl_store_stats_get(sl_limiter *l, sl_store_stats *out)
{
    if (!l || !out)
        return SL_EINVAL;
    memset(out, 0, sizeof *out);
    if (l->redis)
        sl_rs_stats(l->redis, out);
    return SL_OK;
}

int sl_take(sl_limiter *l, const sl_key *key, uint64_t cost, int64_t now, sl_decision *d)
{
    return one(l, key, cost, now, 1, d);
}

int sl_peek(sl_limiter *l, const sl_key *key, int64_t now, sl_decision *d)
{
    return one(l, key, 1, now, 0, d);
}

#define BATCH_AHEAD 8       /* requests prepared (hashed, control byte prefetched) ahead */
#define BATCH_ENTRY_AHEAD 4 /* requests whose entry is prefetched ahead (their control byte
                               has had BATCH_AHEAD - BATCH_ENTRY_AHEAD decisions' time) */

static void prepare_ahead(sl_limiter *l, const sl_key *k, prep *p)
{
    prepare(k, p);
    if (p->err == SL_OK)
        sl_table_prefetch(l->table, p->hash);
}

int sl_take_batch(sl_limiter *l, const sl_request *reqs, size_t n, int64_t now,
                  sl_decision *out)
{
    if (!l || (n && (!reqs || !out)))
        return SL_EINVAL;
    int rc = resolve_now(l, &now);
    if (rc != SL_OK)
        return rc;
    if (l->redis)
        return sl_rs_batch(l->redis, reqs, n, now, out);
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    prep ring[BATCH_AHEAD];
    for (size_t i = 0; i < n && i < BATCH_AHEAD; i++)
        prepare_ahead(l, &reqs[i].key, &ring[i]);
    for (size_t i = 0; i < n; i++) {
        prep *p = &ring[i % BATCH_AHEAD];
        sl_decision *d = &out[i];
        if (i + BATCH_ENTRY_AHEAD < n) {
            const prep *q = &ring[(i + BATCH_ENTRY_AHEAD) % BATCH_AHEAD];
            if (q->err == SL_OK)
                sl_table_prefetch_entry(l->table, q->hash);
        }
        int err = p->err;
        if (err == SL_OK)
            err = decide(l, p, reqs[i].cost, reqs[i].inline_policy, now,
                         !reqs[i].peek && reqs[i].cost > 0, d);
        if (err == SL_ECOST) /* comes with what is left */
            err = over_cost(l, p, reqs[i].inline_policy, now, d);
        if (err != SL_OK && err != SL_ECOST)
            memset(d, 0, sizeof *d);
        d->err = err;
        if (i + BATCH_AHEAD < n)
            prepare_ahead(l, &reqs[i + BATCH_AHEAD].key, p);
    }
    sl_ebr_leave(l->ebr);
    return SL_OK;
}

int sl_release(sl_limiter *l, const sl_key *key, uint64_t lease, int64_t now)
{
    if (!l)
        return SL_EINVAL;
    int rc = resolve_now(l, &now);
    if (rc != SL_OK)
        return rc;
    if (l->redis)
        return sl_rs_release(l->redis, key, lease, now);
    prep p;
    prepare(key, &p);
    if (p.err != SL_OK)
        return p.err;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    rc = SL_ELEASE;
    sl_shard *s = sl_table_shard(l->table, p.hash);
    sl_shard_lock(s);
    sl_entry *e = sl_shard_find_locked(s, p.hash, p.buf, p.len);
    const sl_cpolicy *cp = e ? reg_get(l, e->policy) : NULL;
    for (uint32_t i = 0; cp && i < cp->nlimits; i++)
        if (cp->lim[i].algorithm == SL_CONCURRENCY &&
            sl_algo_release(&cp->lim[i], (char *)entry_state(e) + cp->offs[i], lease, now) ==
                SL_OK)
            rc = SL_OK;
    sl_shard_unlock(s);
    sl_ebr_leave(l->ebr);
    return rc;
}

size_t sl_sweep(sl_limiter *l, int64_t now, size_t budget)
{
    if (!l || resolve_now(l, &now) != SL_OK || sl_ebr_enter(l->ebr) != 0)
        return 0;
    size_t n = sl_table_sweep(l->table, now, budget);
    sl_ebr_leave(l->ebr);
    sl_ebr_collect(l->ebr);
    return n;
}

/* ---- rules, tiers, default ---------------------------------------------------------------- */

/* Encode the part of `k` a scope uses; SL_OK or the error for a bad key. */
static int scope_key(sl_scope scope, const sl_key *k, char *buf, size_t *len)
{
    int rc;
    if (!k)
        return SL_EINVAL;
    if ((rc = check_id(k->tenant, k->tenant_len)) != SL_OK)
        return rc;
    switch (scope) {
    case SL_SCOPE_TENANT:
        *len = sl_key_encode(buf, k->tenant, k->tenant_len, NULL, 0, NULL, 0);
        return SL_OK;
    case SL_SCOPE_ACTION:
        if ((rc = check_id(k->action, k->action_len)) != SL_OK)
            return rc;
        *len = sl_key_encode(buf, k->tenant, k->tenant_len, k->action, k->action_len, NULL, 0);
        return SL_OK;
    case SL_SCOPE_CLIENT:
        if ((rc = key_check(k)) != SL_OK)
            return rc;
        *len = sl_key_encode(buf, k->tenant, k->tenant_len, k->action, k->action_len, k->client,
                             k->client_len);
        return SL_OK;
    }
    return SL_ESCOPE;
}

static sl_imap **scope_map(sl_rules *r, sl_scope scope)
{
    return scope == SL_SCOPE_TENANT ? &r->tenant
         : scope == SL_SCOPE_ACTION ? &r->action
                                    : &r->client;
}

/* A copy of the current snapshot sharing every map; the caller holds l->cfg. */
static sl_rules *rules_clone(sl_limiter *l)
{
    sl_rules *cur = atomic_load_explicit(&l->rules, memory_order_relaxed);
    sl_rules *n = malloc(sizeof *n);
    if (!n)
        return NULL;
    *n = *cur;
    sl_imap_ref(n->client);
    sl_imap_ref(n->action);
    sl_imap_ref(n->tenant);
    sl_imap_ref(n->assign);
    sl_imap_ref(n->tiers);
    return n;
}

/* Swap in `next` (holding l->cfg) and retire the previous snapshot. */
static int rules_publish(sl_limiter *l, sl_rules *next)
{
    sl_rules *prev = atomic_exchange_explicit(&l->rules, next, memory_order_acq_rel);
    sl_ebr_retire(l->ebr, prev, sl_rules_free);
    return SL_OK;
}

/* Replace one map of the snapshot by a copy with (k -> pol, v) set or deleted. */
static int rules_update(sl_limiter *l, int which, const char *k, size_t klen,
                        const sl_cpolicy *pol, const char *v, size_t vlen, int del)
{
    sl_rules *n = rules_clone(l);
    if (!n)
        return SL_ENOMEM;
    sl_imap **slot = which == 0   ? &n->tenant
                   : which == 1   ? &n->action
                   : which == 2   ? &n->client
                   : which == 3   ? &n->assign
                                  : &n->tiers;
    sl_imap *m;
    int found;
    int rc = sl_imap_with(*slot, sl_table_hash(k, klen), k, klen, pol, v, vlen, del, &m, &found);
    if (rc == SL_OK && del && !found)
        rc = SL_ENOTFOUND;
    if (rc != SL_OK) {
        if (m)
            sl_imap_unref(m);
        sl_rules_free(n);
        return rc;
    }
    sl_imap_unref(*slot);
    *slot = m;
    return rules_publish(l, n);
}

static int scope_index(sl_scope s) { return s == SL_SCOPE_TENANT ? 0 : s == SL_SCOPE_ACTION ? 1 : 2; }

int sl_rule_set(sl_limiter *l, sl_scope scope, const sl_key *key, const sl_policy *p)
{
    char k[SL_KEY_MAX];
    size_t klen;
    const sl_cpolicy *cp;
    if (!l || !p)
        return SL_EINVAL;
    int rc = scope_key(scope, key, k, &klen);
    if (rc != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    pthread_mutex_lock(&l->cfg); /* before interning: no collection until it is published */
    if ((rc = policy_intern(l, p, &cp, 1)) == SL_OK)
        rc = rules_update(l, scope_index(scope), k, klen, cp, NULL, 0, 0);
    pthread_mutex_unlock(&l->cfg);
    sl_ebr_leave(l->ebr);
    return rc;
}

int sl_rule_get(sl_limiter *l, sl_scope scope, const sl_key *key, sl_policy *out)
{
    char k[SL_KEY_MAX];
    size_t klen;
    if (!l || !out)
        return SL_EINVAL;
    int rc = scope_key(scope, key, k, &klen);
    if (rc != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    sl_imap *m = *scope_map(r, scope);
    const sl_ient *e = m ? sl_imap_get(m, sl_table_hash(k, klen), k, klen) : NULL;
    if (e)
        *out = e->pol->src;
    sl_ebr_leave(l->ebr);
    return e ? SL_OK : SL_ENOTFOUND;
}

int sl_rule_del(sl_limiter *l, sl_scope scope, const sl_key *key)
{
    char k[SL_KEY_MAX];
    size_t klen;
    if (!l)
        return SL_EINVAL;
    int rc = scope_key(scope, key, k, &klen);
    if (rc != SL_OK)
        return rc;
    pthread_mutex_lock(&l->cfg);
    rc = rules_update(l, scope_index(scope), k, klen, NULL, NULL, 0, 1);
    pthread_mutex_unlock(&l->cfg);
    return rc;
}

int sl_rule_list(sl_limiter *l, sl_rule_fn fn, void *ctx)
{
    if (!l || !fn)
        return SL_EINVAL;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    static const sl_scope scopes[] = {SL_SCOPE_TENANT, SL_SCOPE_ACTION, SL_SCOPE_CLIENT};
    int rc = 0;
    for (size_t s = 0; s < 3 && !rc; s++) {
        sl_imap *m = *scope_map(r, scopes[s]);
        for (size_t i = 0; m && i <= m->mask && !rc; i++) {
            const sl_ient *e = m->s[i];
            if (!e)
                continue;
            sl_key k;
            sl_key_decode(e->data, e->klen, &k);
            rc = fn(ctx, scopes[s], &k, &e->pol->src);
        }
    }
    sl_ebr_leave(l->ebr);
    return rc;
}

int sl_default_set(sl_limiter *l, const sl_policy *p)
{
    const sl_cpolicy *cp;
    if (!l || !p)
        return SL_EINVAL;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    pthread_mutex_lock(&l->cfg); /* before interning: no collection until it is published */
    int rc = policy_intern(l, p, &cp, 1);
    if (rc == SL_OK) {
        sl_rules *n = rules_clone(l);
        if (n) {
            n->deflt = cp;
            rc = rules_publish(l, n);
        } else {
            rc = SL_ENOMEM;
        }
    }
    pthread_mutex_unlock(&l->cfg);
    sl_ebr_leave(l->ebr);
    return rc;
}

int sl_default_get(sl_limiter *l, sl_policy *out)
{
    if (!l || !out)
        return SL_EINVAL;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    *out = atomic_load_explicit(&l->rules, memory_order_acquire)->deflt->src;
    sl_ebr_leave(l->ebr);
    return SL_OK;
}

static int tier_name(const char *name, size_t *len)
{
    if (!name || !*name)
        return SL_EINVAL;
    *len = strlen(name);
    return *len > SL_MAX_ID_LEN ? SL_EKEYLONG : SL_OK;
}

int sl_tier_set(sl_limiter *l, const char *name, const sl_policy *p)
{
    size_t len;
    const sl_cpolicy *cp;
    if (!l || !p)
        return SL_EINVAL;
    int rc = tier_name(name, &len);
    if (rc != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    pthread_mutex_lock(&l->cfg); /* before interning: no collection until it is published */
    if ((rc = policy_intern(l, p, &cp, 1)) == SL_OK)
        rc = rules_update(l, 4, name, len, cp, NULL, 0, 0);
    pthread_mutex_unlock(&l->cfg);
    sl_ebr_leave(l->ebr);
    return rc;
}

int sl_tier_get(sl_limiter *l, const char *name, sl_policy *out)
{
    size_t len;
    if (!l || !out)
        return SL_EINVAL;
    int rc = tier_name(name, &len);
    if (rc != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    const sl_ient *e = r->tiers ? sl_imap_get(r->tiers, sl_table_hash(name, len), name, len)
                                : NULL;
    if (e)
        *out = e->pol->src;
    sl_ebr_leave(l->ebr);
    return e ? SL_OK : SL_ETIER;
}

int sl_tier_del(sl_limiter *l, const char *name)
{
    size_t len;
    if (!l)
        return SL_EINVAL;
    int rc = tier_name(name, &len);
    if (rc != SL_OK)
        return rc;
    pthread_mutex_lock(&l->cfg);
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_relaxed);
    for (size_t i = 0; r->assign && i <= r->assign->mask; i++) {
        const sl_ient *e = r->assign->s[i];
        if (e && e->vlen == len && memcmp(e->data + e->klen, name, len) == 0) {
            pthread_mutex_unlock(&l->cfg);
            return SL_ETIERINUSE;
        }
    }
    rc = rules_update(l, 4, name, len, NULL, NULL, 0, 1);
    pthread_mutex_unlock(&l->cfg);
    return rc == SL_ENOTFOUND ? SL_ETIER : rc;
}

/* An assignment's tier name (its value bytes) into `tier`, NUL-terminated (> 255 bytes). */
static void assigned_tier(const sl_ient *e, char *tier)
{
    memcpy(tier, e->data + e->klen, e->vlen);
    tier[e->vlen] = '\0';
}

/* Encode (tenant, client) for the assignment map; SL_OK or the key's error. */
static int assign_key(const sl_key *tc, char *k, size_t *klen)
{
    int rc;
    if (!tc)
        return SL_EINVAL;
    if ((rc = check_id(tc->tenant, tc->tenant_len)) != SL_OK ||
        (rc = check_id(tc->client, tc->client_len)) != SL_OK)
        return rc;
    if (!tc->client_len)
        return SL_EKEYEMPTY;
    *klen = sl_key_encode(k, tc->tenant, tc->tenant_len, NULL, 0, tc->client, tc->client_len);
    return SL_OK;
}

int sl_tier_assign(sl_limiter *l, const sl_key *tc, const char *tier)
{
    char k[SL_KEY_MAX];
    size_t len = 0;
    int rc;
    size_t klen;
    if (!l)
        return SL_EINVAL;
    if ((rc = assign_key(tc, k, &klen)) != SL_OK)
        return rc;
    if (tier && (rc = tier_name(tier, &len)) != SL_OK)
        return rc;
    pthread_mutex_lock(&l->cfg);
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_relaxed);
    if (tier && !(r->tiers && sl_imap_get(r->tiers, sl_table_hash(tier, len), tier, len)))
        rc = SL_ETIER;
    else
        rc = rules_update(l, 3, k, klen, NULL, tier, len, tier == NULL);
    pthread_mutex_unlock(&l->cfg);
    return rc;
}

int sl_tier_assignment(sl_limiter *l, const sl_key *tc, char *tier, size_t cap)
{
    char k[SL_KEY_MAX];
    size_t klen;
    if (!l || !tier || cap <= SL_MAX_ID_LEN)
        return SL_EINVAL;
    int rc = assign_key(tc, k, &klen);
    if (rc != SL_OK)
        return rc;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    const sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    const sl_ient *e = r->assign ? sl_imap_get(r->assign, sl_table_hash(k, klen), k, klen) : NULL;
    if (e)
        assigned_tier(e, tier);
    sl_ebr_leave(l->ebr);
    return e ? SL_OK : SL_ENOTFOUND;
}

int sl_tier_assignments(sl_limiter *l, sl_assign_fn fn, void *ctx)
{
    if (!l || !fn)
        return SL_EINVAL;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    const sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    int rc = 0;
    char tier[SL_MAX_ID_LEN + 1];
    for (size_t i = 0; r->assign && i <= r->assign->mask && !rc; i++) {
        const sl_ient *e = r->assign->s[i];
        if (!e)
            continue;
        sl_key tc;
        sl_key_decode(e->data, e->klen, &tc);
        assigned_tier(e, tier);
        rc = fn(ctx, &tc, tier);
    }
    sl_ebr_leave(l->ebr);
    return rc;
}

int sl_tier_list(sl_limiter *l, sl_tier_fn fn, void *ctx)
{
    if (!l || !fn)
        return SL_EINVAL;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_rules *r = atomic_load_explicit(&l->rules, memory_order_acquire);
    int rc = 0;
    char name[SL_MAX_ID_LEN + 1];
    for (size_t i = 0; r->tiers && i <= r->tiers->mask && !rc; i++) {
        const sl_ient *e = r->tiers->s[i];
        if (!e)
            continue;
        memcpy(name, e->data, e->klen);
        name[e->klen] = '\0';
        rc = fn(ctx, name, &e->pol->src);
    }
    sl_ebr_leave(l->ebr);
    return rc;
}

/* ---- counters ---------------------------------------------------------------------------- */

static void tenant_sum(const sl_tenant *t, sl_stats *s)
{
    for (int i = 0; i < STRIPES; i++) {
        s->allowed += atomic_load_explicit(&t->s[i].allowed, memory_order_relaxed);
        s->denied += atomic_load_explicit(&t->s[i].denied, memory_order_relaxed);
        s->evicted += atomic_load_explicit(&t->s[i].evicted, memory_order_relaxed);
    }
}

static int sum_cb(void *ctx, const void *key, size_t len, void *val)
{
    (void)key, (void)len;
    tenant_sum(val, ctx);
    return 0;
}

int sl_stats_get(sl_limiter *l, const char *tenant, size_t tenant_len, sl_stats *out)
{
    if (!l || !out || (tenant_len && !tenant))
        return SL_EINVAL;
    memset(out, 0, sizeof *out);
    if (!tenant) {
        tenant_sum(l->deflt_tenant, out);
        sl_dir_foreach(l->tenants, sum_cb, out);
        out->keys = sl_table_count(l->table);
        out->reclaimed = atomic_load(&l->reclaimed);
        return SL_OK;
    }
    char b[SL_KEY_MAX];
    if (tenant_len > SL_MAX_ID_LEN)
        return SL_EKEYLONG;
    size_t n = sl_key_encode(b, tenant, tenant_len, NULL, 0, NULL, 0) - 2;
    if (n == 0) {
        tenant_sum(l->deflt_tenant, out);
        return SL_OK;
    }
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
    sl_tenant *t = sl_dir_get(l->tenants, sl_table_hash(b + 2, n), b + 2, n);
    if (t)
        tenant_sum(t, out);
    sl_ebr_leave(l->ebr);
    return t ? SL_OK : SL_ENOTFOUND;
}

typedef struct list_ctx {
    sl_tenant_fn fn;
    void *ctx;
} list_ctx;

static int list_cb(void *ctx, const void *key, size_t len, void *val)
{
    list_ctx *c = ctx;
    sl_stats s;
    memset(&s, 0, sizeof s);
    tenant_sum(val, &s);
    return c->fn(c->ctx, key, len, &s);
}

int sl_stats_list(sl_limiter *l, sl_tenant_fn fn, void *ctx)
{
    if (!l || !fn)
        return SL_EINVAL;
    sl_stats s;
    memset(&s, 0, sizeof s);
    tenant_sum(l->deflt_tenant, &s);
    int rc = fn(ctx, "default", 7, &s);
    if (rc)
        return rc;
    list_ctx c = {fn, ctx};
    return sl_dir_foreach(l->tenants, list_cb, &c);
}

/* ---- for snapshots (limiter_int.h) ------------------------------------------------------- */

unsigned sl_limiter_nshards(sl_limiter *l)
{
    return sl_table_nshards(l->table);
}

typedef struct visit_ctx {
    sl_limiter *l;
    sl_key_visit_fn fn;
    void *ctx;
} visit_ctx;

static int visit_one(void *c, sl_entry *e)
{
    visit_ctx *v = c;
    const sl_cpolicy *cp = reg_get(v->l, e->policy);
    if (!cp)
        return 0; /* no state worth keeping */
    size_t klen;
    const char *k = sl_entry_key(e, &klen);
    return v->fn(v->ctx, k, klen, &cp->src, entry_state(e), cp->state_size);
}

int sl_limiter_visit_slice(sl_limiter *l, unsigned shard, sl_slice *c, int first,
                           uint32_t max, sl_key_visit_fn fn, void *ctx, int *fnrc)
{
    visit_ctx v = {l, fn, ctx};
    return sl_table_visit_slice(l->table, shard, c, first, max, visit_one, &v, fnrc);
}

void sl_limiter_reserve(sl_limiter *l, uint64_t keys)
{
    if (!l->redis)
        sl_table_reserve(l->table, keys > SIZE_MAX ? SIZE_MAX : (size_t)keys);
}

/* Lease ids stay unique: the next one issued is above every id restored. */
static void lease_floor(sl_limiter *l, uint64_t max_id)
{
    uint64_t cur = atomic_load_explicit(&l->next_lease, memory_order_relaxed);
    while (cur <= max_id &&
           !atomic_compare_exchange_weak_explicit(&l->next_lease, &cur, max_id + 1,
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

int sl_limiter_restore(sl_limiter *l, const char *key, size_t klen, const sl_policy *p,
                       const void *state, size_t state_size)
{
    const sl_cpolicy *cp;
    if (sl_ebr_enter(l->ebr) != 0)
        return SL_ENOMEM;
retry:;
    int rc = policy_intern(l, p, &cp, 0);
    uint64_t inl[2]; /* the state, aligned, before it is checked: in here or in `heap` */
    char *heap = NULL, *copy = (char *)inl;
    uint64_t max_lease = 0;
    if (rc == SL_OK && state_size != cp->state_size)
        rc = SL_ESNAPSHOT;
    if (rc == SL_OK && cp->heap && !(copy = heap = malloc(state_size)))
        rc = SL_ENOMEM;
    if (rc == SL_OK)
        memcpy(copy, state, state_size);
    for (uint32_t i = 0; rc == SL_OK && i < cp->nlimits; i++)
        if (!sl_algo_state_valid(&cp->lim[i], copy + cp->offs[i], &max_lease))
            rc = SL_ESNAPSHOT;
    if (rc != SL_OK) {
        free(heap);
    } else {
        lease_floor(l, max_lease);
        uint64_t hash = sl_table_hash(key, klen);
        sl_shard *s = sl_table_shard(l->table, hash);
        int created;
        sl_shard_lock(s);
        if (!policy_usable_locked(cp)) { /* condemned by a collection: intern again */
            sl_shard_unlock(s);
            free(heap);
            goto retry;
        }
        sl_entry *e = sl_shard_upsert_locked(s, hash, key, klen, SL_TABLE_NO_RECLAIM, &created);
        if (!e) {
            rc = SL_ENOMEM;
            free(heap);
        } else {
            if (e->flags & SL_ENTRY_HEAP)
                free((void *)(uintptr_t)e->state[0]);
            if (heap) {
                e->state[0] = (uint64_t)(uintptr_t)heap;
                e->flags |= SL_ENTRY_HEAP;
            } else {
                memset(e->state, 0, sizeof e->state);
                memcpy(e->state, inl, state_size);
                e->flags &= (uint8_t)~SL_ENTRY_HEAP;
            }
            e->policy = cp->id;
        }
        sl_shard_unlock(s);
    }
    sl_ebr_leave(l->ebr);
    return rc;
}

void sl_limiter_snapshot_note(sl_limiter *l, int op, const sl_snapshot_info *info)
{
    pthread_mutex_lock(&l->cfg);
    l->snap[op] = *info;
    l->have_snap[op] = 1;
    pthread_mutex_unlock(&l->cfg);
}

int sl_snapshot_last(sl_limiter *l, sl_snapshot_op op, sl_snapshot_info *out)
{
    if (!l || !out || (op != SL_SNAPSHOT_WRITE && op != SL_SNAPSHOT_READ))
        return SL_EINVAL;
    pthread_mutex_lock(&l->cfg);
    int rc = l->have_snap[op] ? SL_OK : SL_ENOTFOUND;
    if (rc == SL_OK)
        *out = l->snap[op];
    pthread_mutex_unlock(&l->cfg);
    return rc;
}
