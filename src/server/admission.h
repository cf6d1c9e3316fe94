/*
 * admission.h — admission control: the load manager every decision request passes through.
 *
 * Per worker thread (no locks inside; one process-wide atomic counts requests in progress):
 *
 *   arrive ──► tenant FIFO (bounded: max_tenant_queue_size; full ──► rejected at once)
 *                 │
 *                 ▼  weighted deficit round-robin across tenants with waiting requests,
 *                    while requests in progress < max_global_concurrent_requests
 *              decided in one sl_take_batch ──► reply, in each connection's request order
 *
 *   waiting longer than max_queue_wait_ms ──► rejected (expired)
 *
 * A tenant of weight w gets w requests per round while several tenants wait, so a flooding
 * tenant fills only its own queue (and is rejected beyond it) while a quiet tenant's requests
 * are served in the next round. When nothing waits, a request goes through in the same loop
 * iteration it was read in.
 *
 * Replies keep request order per connection: each connection holds its requests in order
 * (`sd_item`s); the front end writes an item's reply only when every earlier one is written.
 */
#ifndef SD_ADMISSION_H
#define SD_ADMISSION_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "resp.h"
#include "sluice.h"

typedef struct sd_conn sd_conn;
typedef struct sd_sched sd_sched;
typedef struct sd_tq sd_tq;

/* One unit of a connection's reply order: a decision request, or literal reply bytes that had
 * to wait behind one. */
typedef struct sd_item {
    struct sd_item *next;      /* the connection's order */
    struct sd_item *qnext;     /* the tenant queue's order */
    sd_conn *c;                /* NULL once the connection closed (the item is then dropped) */
    sd_tq *tq;
    int64_t enq_ms;
    int state;                 /* SD_ITEM_* */
    int kind;                  /* the front end's request kind */
    int flags;                 /* the front end's (HTTP: keep-alive, ...) */
    int release;               /* release lease req.cost of req.key instead of deciding;
                                  the outcome is d.err (SL_OK, SL_ELEASE, ...) */
    int peek_next;             /* right after this decision (of cost 0), ask whether one of
                                  cost 1 would pass (a peek with the same inline policy):
                                  d.allowed and d.retry_after become that answer (HTTP
                                  status; on the Redis store the link asks both in one
                                  call: sl_rs_prepare_status) */
    sl_request req;
    sl_policy pol;             /* req.inline_policy points here when set */
    sl_decision d;
    resp_buf lit;              /* SD_ITEM_LITERAL: the reply bytes */
    size_t keylen, keycap;     /* key bytes used, and room for (admission.c reuses items) */
    char key[];                /* tenant, action, client bytes (req.key points in here) */
} sd_item;

enum { SD_ITEM_WAITING, SD_ITEM_DONE, SD_ITEM_REJECTED_FULL, SD_ITEM_REJECTED_EXPIRED,
       SD_ITEM_LITERAL };

/* Admission settings, shared by all workers; changed at runtime by the config API. */
typedef struct sd_admission {
    _Atomic int64_t max_global_concurrent; /* >= 1 */
    _Atomic int64_t max_tenant_queue;      /* >= 0 (0: nothing waits; over the cap = reject) */
    _Atomic int64_t max_queue_wait_ms;     /* >= 1 */
    _Atomic int64_t in_progress;           /* decisions being made right now, all workers */
    _Atomic uint64_t admitted, rejected_full, rejected_expired, queued_now;
    _Atomic uint64_t weights_version;      /* bumped by sd_weight_set */
} sd_admission;

void sd_admission_init(sd_admission *a);
/* Tenant weights (default 1, 1..1000). Thread-safe. */
int sd_weight_set(sd_admission *a, const char *tenant, size_t len, unsigned weight);
unsigned sd_weight_get(sd_admission *a, const char *tenant, size_t len);
typedef int (*sd_weight_fn)(void *ctx, const char *tenant, size_t len, unsigned weight);
void sd_weight_list(sd_admission *a, sd_weight_fn fn, void *ctx);

/* ---- per worker ---- */

sd_sched *sd_sched_new(sd_admission *a, sl_limiter *lim);
void sd_sched_free(sd_sched *s);

/* A new decision item for tenant/action/client (copied) on connection c, appended to c's
 * order. NULL when out of memory. The caller fills kind, flags, req.cost and, if any, pol
 * (then sets req.inline_policy = &item->pol). */
sd_item *sd_item_new(sd_conn *c, const char *t, size_t tl, const char *a, size_t al,
                     const char *cl, size_t cll);
/* A place in c's reply order for a reply built elsewhere (off the loop): an undecided item
 * in no tenant queue, which holds later replies back. Fill it->lit, then, on c's worker
 * loop, call sd_item_literal_done (which frees it if c closed meanwhile). NULL when out of
 * memory. */
sd_item *sd_item_pending(sd_conn *c);
void sd_item_literal_done(sd_sched *s, sd_item *it);
/* Queue it (or reject it at once when its tenant's queue is full). */
void sd_sched_submit(sd_sched *s, sd_item *it, int64_t now_ms);
/* The buffer a front end appends an immediate reply to: c->out when nothing of c's is still
 * waiting, else a literal item at the end of c's order. */
resp_buf *sd_reply_buf(sd_conn *c);

/* Decide what may be decided now: weighted DRR across tenants, in batches, while requests in
 * progress stay under the cap; then reject what is over its tenant's queue bound or waited
 * too long. Each batch's connections are handed to `ready` (once per batch) so their replies
 * go out before the next batch is decided. Returns the number of requests still waiting. */
size_t sd_sched_run(sd_sched *s, int64_t now_ms, void (*ready)(sd_conn *c));
/* 1 when the last sd_sched_run left requests waiting because the global cap on requests in
 * progress was reached (running again at once cannot help), 0 when it stopped after
 * RUN_MAX decisions (it should go on at once) or had nothing left. */
int sd_sched_capped(const sd_sched *s);

/* Asynchronous decisions (the Redis store): each batch goes to `submit` instead of
 * sl_take_batch. `submit` owns the items until it calls sd_sched_decided for each (it->d
 * filled), at once or from a later callback on this worker's loop; every such item holds one
 * request "in progress" until then. Replies go out at the next sd_sched_run (the worker's
 * check handler runs it after every poll). */
typedef void (*sd_submit_fn)(void *ctx, sd_item **items, int n);
void sd_sched_set_submit(sd_sched *s, sd_submit_fn fn, void *ctx);
void sd_sched_decided(sd_sched *s, sd_item *it);

/* Move every finished item at the head of c's order into c->out (through the protocol's
 * emit); stop at the first one still waiting. */
void sd_conn_drain(sd_conn *c);
/* The connection is closing: free its finished items, orphan its waiting ones (the scheduler
 * frees them when it reaches them). */
void sd_conn_forget(sd_conn *c);

#endif
