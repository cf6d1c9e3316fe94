/*
 * admission.c — admission control (see admission.h).
 */
#include "admission.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "mono.h"
#include "net.h"
#include "policy.h"

#define BATCH 64            /* requests decided per sl_take_batch call */
#define RUN_MAX 512        /* requests decided per sd_sched_run: the loop must go on reading */
#define MAX_TQ 65536        /* tenant queues a worker keeps; idle ones are dropped beyond */
#define WEIGHT_MAX 1000

/* ---- tenant weights (process-wide, read-mostly) ------------------------------------------ */

/* Weights and queues are keyed by the tenant id as the limiter keys it: "default" and "" are
 * one tenant (sl_norm_default), with one weight and, per worker, one queue. Every way in
 * (sd_weight_set, sd_weight_get, tenant_queue) normalises, so callers need not. */

typedef struct weight_ent {
    struct weight_ent *next;
    unsigned weight;
    size_t len;
    char name[];
} weight_ent;

static pthread_mutex_t g_wlock = PTHREAD_MUTEX_INITIALIZER;
static weight_ent *g_weights; /* a list: tenants with a weight other than 1 are few */

void sd_admission_init(sd_admission *a)
{
    atomic_init(&a->max_global_concurrent, 10000);
    atomic_init(&a->max_tenant_queue, 1000);
    atomic_init(&a->max_queue_wait_ms, 1000);
    atomic_init(&a->in_progress, 0);
    atomic_init(&a->admitted, 0);
    atomic_init(&a->rejected_full, 0);
    atomic_init(&a->rejected_expired, 0);
    atomic_init(&a->queued_now, 0);
    atomic_init(&a->weights_version, 1);
}

int sd_weight_set(sd_admission *a, const char *tenant, size_t len, unsigned weight)
{
    if (weight < 1 || weight > WEIGHT_MAX || len > SL_MAX_ID_LEN)
        return -1;
    len = sl_norm_default(tenant, len);
    pthread_mutex_lock(&g_wlock);
    weight_ent **pp = &g_weights;
    while (*pp && !((*pp)->len == len && memcmp((*pp)->name, tenant, len) == 0))
        pp = &(*pp)->next;
    int rc = 0;
    if (*pp && weight == 1) { /* 1 is the default: forget the entry */
        weight_ent *e = *pp;
        *pp = e->next;
        free(e);
    } else if (*pp) {
        (*pp)->weight = weight;
    } else if (weight != 1) {
        weight_ent *e = malloc(sizeof *e + len);
        if (!e) {
            rc = -1;
        } else {
            e->next = g_weights;
            e->weight = weight;
            e->len = len;
            memcpy(e->name, tenant, len);
            g_weights = e;
        }
    }
    atomic_fetch_add(&a->weights_version, 1);
    pthread_mutex_unlock(&g_wlock);
    return rc;
}

unsigned sd_weight_get(sd_admission *a, const char *tenant, size_t len)
{
    (void)a;
    unsigned w = 1;
    len = sl_norm_default(tenant, len);
    pthread_mutex_lock(&g_wlock);
    for (weight_ent *e = g_weights; e; e = e->next)
        if (e->len == len && memcmp(e->name, tenant, len) == 0)
            w = e->weight;
    pthread_mutex_unlock(&g_wlock);
    return w;
}

void sd_weight_list(sd_admission *a, sd_weight_fn fn, void *ctx)
{
    (void)a;
    pthread_mutex_lock(&g_wlock);
    for (weight_ent *e = g_weights; e; e = e->next)
        if (fn(ctx, e->name, e->len, e->weight))
            break;
    pthread_mutex_unlock(&g_wlock);
}

/* ---- per-worker tenant queues ------------------------------------------------------------- */

struct sd_tq {
    sd_tq *hnext;          /* hash chain */
    sd_tq *anext;          /* active ring order */
    sd_item *head, *tail;  /* waiting requests, oldest first */
    size_t len;
    unsigned deficit;      /* requests this tenant may still take in its current turn */
    unsigned weight;
    uint64_t wversion;
    int active;
    uint64_t hash;
    size_t nlen;
    char name[];
};

struct sd_sched {
    sd_admission *a;
    sl_limiter *lim;
    sd_tq **tab;
    size_t nbuckets, ntq;
    sd_tq *act_head, *act_tail;
    size_t waiting;
    size_t waiting_reported; /* this worker's share of a->queued_now */
    int capped;              /* the last run stopped at the global cap (sd_sched_capped) */
    sd_conn *dirty;
    sd_submit_fn submit;        /* NULL: decide with sl_take_batch */
    void *submit_ctx;
    sd_item *batch[BATCH];
    sl_request reqs[BATCH];
    sl_decision ds[BATCH];
    sd_item *spare;  /* freed items of ITEM_KEY key bytes, for reuse */
    unsigned nspare;
};

static uint64_t name_hash(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a: tenant names are short */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
    return h;
}

sd_sched *sd_sched_new(sd_admission *a, sl_limiter *lim)
{
    sd_sched *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->a = a;
    s->lim = lim;
    s->nbuckets = 256;
    s->tab = calloc(s->nbuckets, sizeof *s->tab);
    if (!s->tab) {
        free(s);
        return NULL;
    }
    return s;
}

/* An item for a key of up to ITEM_KEY bytes is kept for reuse (at most ITEM_SPARE per
 * worker): a pipeline's items come and go in bursts, which glibc's malloc serves from its
 * slow paths (~900 of a pipelined CL.THROTTLE's ~6,200 instructions, bench/callgrind_server.sh). */
#define ITEM_KEY 192
#define ITEM_SPARE 4096

static void item_free(sd_sched *s, sd_item *it)
{
    resp_buf_free(&it->lit);
    if (s && it->keycap == ITEM_KEY && s->nspare < ITEM_SPARE) {
        it->next = s->spare;
        s->spare = it;
        s->nspare++;
    } else {
        free(it);
    }
}

void sd_sched_free(sd_sched *s)
{
    if (!s)
        return;
    for (size_t b = 0; b < s->nbuckets; b++)
        for (sd_tq *q = s->tab[b], *n; q; q = n) {
            n = q->hnext;
            for (sd_item *it = q->head, *x; it; it = x) {
                x = it->qnext;
                if (!it->c) /* orphans belong to the queue; live items to their conns */
                    item_free(NULL, it);
            }
            free(q);
        }
    for (sd_item *it = s->spare, *n; it; it = n) {
        n = it->next;
        free(it);
    }
    free(s->tab);
    free(s);
}

/* Drop every inactive tenant queue (a worker that saw a flood of tenant names). */
static void purge_idle(sd_sched *s)
{
    for (size_t b = 0; b < s->nbuckets; b++) {
        sd_tq **pp = &s->tab[b];
        while (*pp) {
            sd_tq *q = *pp;
            if (!q->active && q->len == 0) {
                *pp = q->hnext;
                free(q);
                s->ntq--;
            } else {
                pp = &q->hnext;
            }
        }
    }
}

static void grow(sd_sched *s)
{
    size_t nb = s->nbuckets * 2;
    sd_tq **t = calloc(nb, sizeof *t);
    if (!t)
        return; /* longer chains; still correct */
    for (size_t b = 0; b < s->nbuckets; b++)
        for (sd_tq *q = s->tab[b], *n; q; q = n) {
            n = q->hnext;
            q->hnext = t[q->hash & (nb - 1)];
            t[q->hash & (nb - 1)] = q;
        }
    free(s->tab);
    s->tab = t;
    s->nbuckets = nb;
}

static sd_tq *tenant_queue(sd_sched *s, const char *name, size_t len)
{
    len = sl_norm_default(name, len);
    uint64_t h = name_hash(name, len);
    for (sd_tq *q = s->tab[h & (s->nbuckets - 1)]; q; q = q->hnext)
        if (q->hash == h && q->nlen == len && memcmp(q->name, name, len) == 0)
            return q;
    if (s->ntq >= MAX_TQ)
        purge_idle(s);
    if (s->ntq >= s->nbuckets)
        grow(s);
    sd_tq *q = calloc(1, sizeof *q + len);
    if (!q)
        return NULL;
    q->hash = h;
    q->nlen = len;
    memcpy(q->name, name, len);
    q->hnext = s->tab[h & (s->nbuckets - 1)];
    s->tab[h & (s->nbuckets - 1)] = q;
    s->ntq++;
    return q;
}

static unsigned weight_of(sd_sched *s, sd_tq *q)
{
    uint64_t v = atomic_load_explicit(&s->a->weights_version, memory_order_acquire);
    if (q->wversion != v) {
        q->weight = sd_weight_get(s->a, q->name, q->nlen);
        q->wversion = v;
    }
    return q->weight;
}

/* ---- items and connections ------------------------------------------------------------------ */

sd_item *sd_item_new(sd_conn *c, const char *t, size_t tl, const char *a, size_t al,
                     const char *cl, size_t cll)
{
    sd_sched *s = c->sched;
    size_t need = tl + al + cll, cap = need <= ITEM_KEY ? ITEM_KEY : need;
    sd_item *it = NULL;
    if (cap == ITEM_KEY && s && s->spare) {
        it = s->spare;
        s->spare = it->next;
        s->nspare--;
    } else if (!(it = malloc(sizeof *it + cap))) {
        return NULL;
    }
    memset(it, 0, sizeof *it);
    it->keycap = cap;
    it->c = c;
    it->keylen = tl + al + cll;
    if (tl)
        memcpy(it->key, t, tl);
    if (al)
        memcpy(it->key + tl, a, al);
    if (cll)
        memcpy(it->key + tl + al, cl, cll);
    it->req.key = (sl_key){it->key, tl, it->key + tl, al, it->key + tl + al, cll};
    it->state = SD_ITEM_WAITING;
    if (c->items_tail && c->items_tail->state == SD_ITEM_LITERAL)
        c->lit_closed += c->items_tail->lit.len; /* no longer grows */
    if (c->items_tail)
        c->items_tail->next = it;
    else
        c->items = it;
    c->items_tail = it;
    c->items_waiting++;
    return it;
}

resp_buf *sd_reply_buf(sd_conn *c)
{
    if (!c->items)
        return &c->out;
    sd_item *t = c->items_tail;
    if (t->state == SD_ITEM_LITERAL)
        return &t->lit;
    sd_item *it = calloc(1, sizeof *it);
    if (!it) {
        c->out.oom = 1; /* the connection closes; nothing can be answered in order now */
        return &c->out;
    }
    it->c = c;
    it->state = SD_ITEM_LITERAL;
    t->next = it;
    c->items_tail = it;
    return &it->lit;
}

static void mark_dirty(sd_sched *s, sd_conn *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        c->dirty_next = s->dirty;
        s->dirty = c;
    }
}

/* An item leaves the waiting state (decided or rejected). */
static void finish(sd_sched *s, sd_item *it, int state)
{
    it->state = state;
    if (it->c) {
        it->c->items_waiting--;
        mark_dirty(s, it->c);
    } else {
        item_free(s, it); /* its connection is gone */
    }
}

sd_item *sd_item_pending(sd_conn *c)
{
    return sd_item_new(c, NULL, 0, NULL, 0, NULL, 0);
}

void sd_item_literal_done(sd_sched *s, sd_item *it)
{
    if (it->c && it != it->c->items_tail)
        it->c->lit_closed += it->lit.len; /* as if it had been closed by a later item */
    finish(s, it, SD_ITEM_LITERAL);
}

void sd_conn_drain(sd_conn *c)
{
    sd_item *it;
    while ((it = c->items) && it->state != SD_ITEM_WAITING) {
        if (it->state == SD_ITEM_LITERAL) {
            resp_raw(&c->out, it->lit.p ? it->lit.p : "", it->lit.len);
            if (it != c->items_tail)
                c->lit_closed -= it->lit.len;
        } else
            c->proto->emit(c, it, &c->out);
        c->items = it->next;
        if (!c->items)
            c->items_tail = NULL;
        item_free(c->sched, it);
    }
}

size_t sd_conn_reply_bytes(const sd_conn *c)
{
    const sd_item *t = c->items_tail;
    return c->out.len + c->lit_closed + (t && t->state == SD_ITEM_LITERAL ? t->lit.len : 0);
}

void sd_conn_forget(sd_conn *c)
{
    for (sd_item *it = c->items, *n; it; it = n) {
        n = it->next;
        if (it->state == SD_ITEM_WAITING)
            it->c = NULL; /* still in a tenant queue: freed when it leaves it */
        else
            item_free(c->sched, it);
    }
    c->items = c->items_tail = NULL;
    c->items_waiting = 0;
    c->lit_closed = 0;
}

/* ---- queueing and the round-robin ----------------------------------------------------------- */

static void activate(sd_sched *s, sd_tq *q)
{
    if (q->active)
        return;
    q->active = 1;
    q->deficit = 0;
    q->anext = NULL;
    if (s->act_tail)
        s->act_tail->anext = q;
    else
        s->act_head = q;
    s->act_tail = q;
}

void sd_sched_submit(sd_sched *s, sd_item *it, int64_t now_ms)
{
    sd_tq *q = tenant_queue(s, it->req.key.tenant, it->req.key.tenant_len);
    if (!q) {
        atomic_fetch_add_explicit(&s->a->rejected_full, 1, memory_order_relaxed);
        finish(s, it, SD_ITEM_REJECTED_FULL);
        return;
    }
    it->tq = q;
    it->enq_ms = now_ms;
    it->qnext = NULL;
    if (q->tail)
        q->tail->qnext = it;
    else
        q->head = it;
    q->tail = it;
    q->len++;
    s->waiting++;
    activate(s, q);
}

/* The next request by weighted deficit round-robin: the tenant at the head of the ring takes
 * up to `weight` requests, then goes to the back. */
static sd_item *pop(sd_sched *s)
{
    sd_tq *q = s->act_head;
    if (!q)
        return NULL;
    if (q->deficit == 0)
        q->deficit = weight_of(s, q);
    sd_item *it = q->head;
    q->head = it->qnext;
    if (!q->head)
        q->tail = NULL;
    q->len--;
    s->waiting--;
    q->deficit--;
    if (q->len == 0 || q->deficit == 0) {
        s->act_head = q->anext;
        if (!s->act_head)
            s->act_tail = NULL;
        q->anext = NULL;
        q->active = 0;
        if (q->len) /* turn used up, still waiting: to the back of the ring */
            activate(s, q);
    }
    return it;
}

/* Reserve up to `want` slots of the global in-progress cap. */
static int64_t reserve(sd_admission *a, int64_t want)
{
    int64_t cap = atomic_load_explicit(&a->max_global_concurrent, memory_order_relaxed);
    int64_t cur = atomic_load_explicit(&a->in_progress, memory_order_relaxed);
    for (;;) {
        int64_t r = cap - cur < want ? cap - cur : want;
        if (r <= 0)
            return 0;
        if (atomic_compare_exchange_weak_explicit(&a->in_progress, &cur, cur + r,
                                                  memory_order_acq_rel, memory_order_relaxed))
            return r;
    }
}

static void report(sd_sched *s, void (*ready)(sd_conn *c))
{
    while (s->dirty) {
        sd_conn *c = s->dirty;
        s->dirty = c->dirty_next;
        c->dirty = 0;
        c->dirty_next = NULL;
        ready(c);
    }
}

/* Reject what waited too long, and what is over its tenant's queue bound (newest first, so
 * the oldest keep their place). */
static void reject_excess(sd_sched *s, int64_t now_ms)
{
    int64_t maxq = atomic_load_explicit(&s->a->max_tenant_queue, memory_order_relaxed);
    int64_t wait = atomic_load_explicit(&s->a->max_queue_wait_ms, memory_order_relaxed);
    for (sd_tq *q = s->act_head; q; q = q->anext) {
        while (q->head && now_ms - q->head->enq_ms >= wait) {
            sd_item *it = q->head;
            q->head = it->qnext;
            q->len--;
            s->waiting--;
            atomic_fetch_add_explicit(&s->a->rejected_expired, 1, memory_order_relaxed);
            finish(s, it, SD_ITEM_REJECTED_EXPIRED);
        }
        if (!q->head)
            q->tail = NULL;
        if (q->len > (size_t)maxq) {
            /* keep the first maxq, reject the rest */
            sd_item *keep = q->head;
            for (int64_t i = 1; i < maxq; i++)
                keep = keep->qnext;
            sd_item *it = maxq ? keep->qnext : q->head;
            if (maxq) {
                keep->qnext = NULL;
                q->tail = keep;
            } else {
                q->head = q->tail = NULL;
            }
            while (it) {
                sd_item *n = it->qnext;
                q->len--;
                s->waiting--;
                atomic_fetch_add_explicit(&s->a->rejected_full, 1, memory_order_relaxed);
                finish(s, it, SD_ITEM_REJECTED_FULL);
                it = n;
            }
        }
    }
    /* tenants emptied above leave the ring */
    sd_tq **pp = &s->act_head, *last = NULL;
    while (*pp) {
        sd_tq *q = *pp;
        if (q->len == 0) {
            *pp = q->anext;
            q->anext = NULL;
            q->active = 0;
        } else {
            last = q;
            pp = &q->anext;
        }
    }
    s->act_tail = last;
}

void sd_sched_set_submit(sd_sched *s, sd_submit_fn fn, void *ctx)
{
    s->submit = fn;
    s->submit_ctx = ctx;
}

void sd_sched_decided(sd_sched *s, sd_item *it)
{
    atomic_fetch_sub_explicit(&s->a->in_progress, 1, memory_order_release);
    finish(s, it, SD_ITEM_DONE);
}

/* Decide s->batch[0..n) on the in-memory store, in order: runs of decisions with one
 * sl_take_batch each, a release on its own between them (so a release pipelined behind a
 * take runs after it, as on the Redis store), and an item's peek_next right after it (so a
 * status pipelined before a take reports the key as it was before that take). */
static void decide_local(sd_sched *s, int n)
{
    int from = 0;
    for (int i = 0; i <= n; i++) {
        const sd_item *it = i < n ? s->batch[i] : NULL;
        if (it && !it->release && !it->peek_next)
            continue;
        int upto = it && it->peek_next ? i + 1 : i; /* a status is decided with its run */
        if (upto > from)
            sl_take_batch(s->lim, s->reqs + from, (size_t)(upto - from), SL_NOW, s->ds + from);
        if (it && it->peek_next) {
            /* then, before anything after it, whether one more would pass: the answer
             * belongs to this place in the order, with this inline policy */
            sl_request r = s->reqs[i];
            sl_decision next;
            r.cost = 1;
            r.peek = 1;
            if (s->ds[i].err == SL_OK && sl_take_batch(s->lim, &r, 1, SL_NOW, &next) == SL_OK &&
                next.err == SL_OK) {
                s->ds[i].allowed = next.allowed;
                s->ds[i].retry_after = next.retry_after;
            }
        } else if (it) {
            memset(&s->ds[i], 0, sizeof s->ds[i]);
            s->ds[i].err = sl_release(s->lim, &s->reqs[i].key, s->reqs[i].cost, SL_NOW);
        }
        from = i + 1;
    }
}

int sd_sched_capped(const sd_sched *s) { return s->capped; }

size_t sd_sched_run(sd_sched *s, int64_t now_ms, void (*ready)(sd_conn *c))
{
    size_t done = 0;
    s->capped = 0;
    while (s->waiting && done < RUN_MAX) {
        int64_t want = s->waiting < BATCH ? (int64_t)s->waiting : BATCH;
        int64_t got = reserve(s->a, want);
        if (got == 0) { /* the cap is reached: wait until requests in progress finish */
            s->capped = 1;
            break;
        }
        int n = 0;
        while (n < got) {
            sd_item *it = pop(s);
            if (!it)
                break;
            if (!it->c) { /* orphan: its connection closed while it waited */
                item_free(s, it);
                continue;
            }
            s->batch[n] = it;
            s->reqs[n] = it->req;
            n++;
        }
        if (s->submit) { /* each item holds its reservation until it is decided */
            atomic_fetch_sub_explicit(&s->a->in_progress, got - n, memory_order_release);
            atomic_fetch_add_explicit(&s->a->admitted, (uint64_t)n, memory_order_relaxed);
            if (n)
                s->submit(s->submit_ctx, s->batch, n);
            done += (size_t)n;
            report(s, ready);
            continue;
        }
        int64_t t0 = sl_mono_ns();
        decide_local(s, n);
        if (n)
            sd_metrics_decision(sl_mono_ns() - t0);
        atomic_fetch_sub_explicit(&s->a->in_progress, got, memory_order_release);
        atomic_fetch_add_explicit(&s->a->admitted, (uint64_t)n, memory_order_relaxed);
        for (int i = 0; i < n; i++) {
            s->batch[i]->d = s->ds[i];
            finish(s, s->batch[i], SD_ITEM_DONE);
        }
        done += (size_t)n;
        report(s, ready); /* this batch's replies go out before the next is decided */
    }
    reject_excess(s, now_ms);
    report(s, ready);
    atomic_fetch_add_explicit(&s->a->queued_now, s->waiting - s->waiting_reported,
                              memory_order_relaxed); /* modular: may subtract */
    s->waiting_reported = s->waiting;
    return s->waiting;
}
