/*
 * redis_link.c — a worker's connections to the Redis store (see redis_link.h).
 */
#include "redis_link.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "metrics.h"
#include "mono.h"
#include "redis.h"

#define SWEEP_MS 50 /* how often in-flight requests are checked against the timeout */
#define RL_SLOTS 16384

typedef struct rl_conn rl_conn;

/* One request in flight: its item and the formatted call. Or a group: one FCALL deciding
 * its members (requests alike in all but the key, sl_rs_plan_groups), linked by `next`. */
typedef struct rl_req {
    struct rl_req *next; /* the connection's in-flight FIFO, a group's members, the free list */
    sd_item *it;         /* NULL for a group */
    rl_conn *conn;
    int64_t t0;          /* sl_mono_ns at arrival (the decision's latency) */
    int64_t sent;        /* sl_mono_ns when last written (its timeout, the node's health) */
    uint64_t seq;        /* arrival order (cluster: kept per slot across redirections) */
    int counted;         /* in its slot's in-flight count (cluster): sent, or parked on a
                            connection until its FUNCTION LOAD is answered */
    struct rl_req *members; /* a group's, in key order */
    int nmembers;
    sl_rcall call;          /* not used by a group */
} rl_req;

struct rl_conn {
    sd_rlink *lk;
    int node;
    redisAsyncContext *ac; /* NULL: not connected */
    int load_queued;       /* a FUNCTION LOAD is queued ahead of later commands */
    int64_t load_at;       /* sl_mono_ns when it was sent */
    /* While the load is queued nothing more is sent, so that a key's requests stay in order:
     * requests refused with "Function not found" (sent before the load, in reply order,
     * which is send order) and requests sent meanwhile wait, in that order, for its reply. */
    rl_req *held_old, *held_old_tail, *held_new, *held_new_tail;
    rl_req *head, *tail;   /* requests in flight, in send order (replies come in order) */
};

/* One connection per node: Redis runs one connection's commands in order, so the requests
 * for a key are decided in the order they were sent (several connections let Redis serve
 * one's whole pipeline before another's); a library reload holds what follows (rl_conn). */
typedef struct rl_node {
    rl_conn c;
    rl_conn *probe;   /* a PING in flight on this connection (the node is down), or NULL */
    int64_t probe_at; /* sl_mono_ns when it was sent */
} rl_node;

struct sd_rlink {
    uv_loop_t *loop;
    sl_rstore *rs;
    sd_sched *sched;
    rl_node *nodes[SL_RS_MAX_NODES];
    rl_req *free;
    rl_req *wait_head, *wait_tail; /* waiting for the topology */
    int discovering;
    int discover_tries; /* nodes asked for the topology since requests began to wait */
    rl_conn *asked;     /* the connection a CLUSTER SLOTS was sent on, while discovering */
    int64_t asked_at;   /* sl_mono_ns */
    int closing;
    uv_timer_t sweep;
    /* Cluster: a key's requests stay in order when its slot moves. All requests in flight
     * for a slot are on one node (slot_node); a request routed elsewhere meanwhile (the slot
     * map changed under them) waits in `held`, in arrival order, until they are answered:
     * those still to be redirected then go first. NULL when not a cluster. */
    struct rl_slot {
        uint32_t inflight;
        int16_t node;
        uint32_t nheld;  /* requests of this slot in `held` */
        uint64_t oldest; /* the smallest seq among them (when nheld) */
    } *slots;
    rl_req *held, *held_tail; /* by seq: fresh arrivals append; only resends search */
    uint64_t next_seq;
    char gcmd[SL_RS_GROUP_MAX * SL_RS_CMD_MAX]; /* a group's FCALL, being formatted */
};

/* ---- requests ---------------------------------------------------------------------------- */

static rl_req *req_new(sd_rlink *lk)
{
    rl_req *q = lk->free;
    if (q)
        lk->free = q->next;
    else if (!(q = malloc(sizeof *q)))
        return NULL;
    q->next = NULL;
    q->conn = NULL;
    q->members = NULL;
    q->nmembers = 0;
    q->seq = lk->next_seq++;
    q->counted = 0;
    return q;
}

static void recycle(sd_rlink *lk, rl_req *q)
{
    q->next = lk->free;
    lk->free = q;
}

static void complete(sd_rlink *lk, rl_req *q)
{
    sd_metrics_decision(sl_mono_ns() - q->t0);
    sd_sched_decided(lk->sched, q->it);
    recycle(lk, q);
}

static void fail(sd_rlink *lk, rl_req *q)
{
    sl_rs_fallback(lk->rs, &q->call, &q->it->d, &q->it->d.err);
    complete(lk, q);
}

/* Decide every request waiting for the topology by the fail mode. */
static void fail_waiting(sd_rlink *lk)
{
    lk->discover_tries = 0;
    rl_req *q = lk->wait_head;
    lk->wait_head = lk->wait_tail = NULL;
    while (q) {
        rl_req *next = q->next;
        fail(lk, q);
        q = next;
    }
}

/* ---- hiredis on libuv ---------------------------------------------------------------------- */

/* hiredis's event hooks on a uv_poll_t. The adapter Debian ships with hiredis 0.14 drops a
 * poll's error status: libuv reports a refused connect (POLLERR) as an error and stops the
 * poll, the adapter returns without telling hiredis, and the connection waits forever with
 * its requests. Here an error is handed to hiredis as readiness for what it waits for: its
 * read, write or connect check then finds the error and fails the connection. */
typedef struct rl_poll {
    redisAsyncContext *ac; /* NULL once hiredis let go (the handle is closing) */
    uv_poll_t handle;
    int events;
} rl_poll;

static void on_poll(uv_poll_t *h, int status, int events);

/* Wait for `events` now (hiredis adds and removes one kind at a time through the hooks). */
static void poll_set(rl_poll *p)
{
    if (p->events)
        uv_poll_start(&p->handle, p->events, on_poll);
    else
        uv_poll_stop(&p->handle);
}

static void poll_change(void *d, int event, int on)
{
    rl_poll *p = d;
    p->events = on ? p->events | event : p->events & ~event;
    poll_set(p);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    rl_poll *p = h->data;
    if (status < 0) {
        events = p->events;
        poll_set(p); /* libuv stopped it */
    }
    if (p->ac && (events & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
}

static void poll_add_read(void *d) { poll_change(d, UV_READABLE, 1); }
static void poll_del_read(void *d) { poll_change(d, UV_READABLE, 0); }
static void poll_add_write(void *d) { poll_change(d, UV_WRITABLE, 1); }
static void poll_del_write(void *d) { poll_change(d, UV_WRITABLE, 0); }

static void poll_closed(uv_handle_t *h) { free(h->data); }

static void poll_cleanup(void *d) /* hiredis is done with the connection */
{
    rl_poll *p = d;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->handle, poll_closed);
}

static int poll_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    rl_poll *p = calloc(1, sizeof *p);
    if (!p)
        return -1;
    if (uv_poll_init(loop, &p->handle, ac->c.fd) != 0) {
        free(p);
        return -1;
    }
    p->ac = ac;
    p->handle.data = p;
    ac->ev.data = p;
    ac->ev.addRead = poll_add_read;
    ac->ev.delRead = poll_del_read;
    ac->ev.addWrite = poll_add_write;
    ac->ev.delWrite = poll_del_write;
    ac->ev.cleanup = poll_cleanup;
    return 0;
}

/* ---- connections ------------------------------------------------------------------------- */

static void send_req(sd_rlink *lk, rl_req *q);
static void count(sd_rlink *lk, rl_req *q, int node);
static int uncount(sd_rlink *lk, rl_req *q);
static void release_held(sd_rlink *lk, uint16_t slot);
static void release_ready(sd_rlink *lk);
static void discover(sd_rlink *lk);
static void drop_timed_out(rl_conn *c);

static rl_conn *conn_of(redisAsyncContext *ac) { return ac->data; }

/* The connection is gone (hiredis frees `ac` after this): every request still in flight has
 * had its callback with a NULL reply already. */
static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rl_conn *c = ac->data;
    if (!c)
        return;
    if (c->ac == ac) { /* not a newer connection opened meanwhile */
        c->ac = NULL;
        c->load_queued = 0;
    }
    if (status != REDIS_OK && !c->lk->closing)
        sl_rs_node_failed(c->lk->rs, c->node, ac->errstr[0] ? ac->errstr : "connection lost");
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    rl_conn *c = ac->data;
    if (status != REDIS_OK && c) {
        c->ac = NULL;
        c->load_queued = 0;
        sl_rs_node_failed(c->lk->rs, c->node, ac->errstr[0] ? ac->errstr : "connect failed");
    }
}

/* AUTH / SELECT answered: an error means this connection is useless. */
static void on_setup(redisAsyncContext *ac, void *r, void *priv)
{
    (void)priv;
    redisReply *rep = r;
    rl_conn *c = conn_of(ac);
    if (rep && rep->type == REDIS_REPLY_ERROR && c && !c->lk->closing) {
        sl_rs_node_failed(c->lk->rs, c->node, rep->str);
        redisAsyncDisconnect(ac);
    }
}

static int conn_open(sd_rlink *lk, rl_conn *c)
{
    const sl_rnode *a = sl_rs_node(lk->rs, c->node);
    const sl_redis_options *o = sl_rs_options(lk->rs);
    redisAsyncContext *ac = redisAsyncConnect(a->host, a->port);
    if (!ac)
        return -1;
    if (ac->err) {
        sl_rs_node_failed(lk->rs, c->node, ac->errstr);
        redisAsyncFree(ac);
        return -1;
    }
    sl_rs_cap_reader(ac->c.reader);
    ac->data = c;
    if (poll_attach(ac, lk->loop) != 0) {
        redisAsyncFree(ac);
        return -1;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    /* AUTH, or a PING: a Redis that wants a password we lack then says NOAUTH (logged) before
     * the load below, whose size it refuses from a client not logged in by closing */
    if (o->password)
        redisAsyncCommand(ac, on_setup, NULL, "AUTH %s", o->password);
    else
        redisAsyncCommand(ac, on_setup, NULL, "PING");
    if (o->db && !sl_rs_is_cluster(lk->rs))
        redisAsyncCommand(ac, on_setup, NULL, "SELECT %u", o->db);
    /* Before any request, so that a node without the library (restarted, or new to the
     * cluster) does not refuse the first ones: had another client loaded it between two
     * requests of a key, the second would be decided and the first, refused, after it. Its
     * reply changes nothing (a node that refuses it refuses the requests after it, which then
     * go the usual way). */
    size_t len;
    const char *script = sl_rs_script(&len);
    redisAsyncCommand(ac, NULL, NULL, "FUNCTION LOAD REPLACE %b", script, len);
    sl_rs_count_reconnect(lk->rs);
    return 0;
}

static rl_conn *pick(sd_rlink *lk, int node)
{
    rl_node *n = lk->nodes[node];
    if (!n) {
        if (!(n = calloc(1, sizeof *n)))
            return NULL;
        n->c.lk = lk;
        n->c.node = node;
        lk->nodes[node] = n;
    }
    rl_conn *c = &n->c;
    if (!c->ac && conn_open(lk, c) != 0)
        return NULL;
    return c;
}

/* ---- replies ----------------------------------------------------------------------------- */

/* Append q to the list head..tail (linked by `next`). */
static void append(rl_req **head, rl_req **tail, rl_req *q)
{
    q->next = NULL;
    if (*tail)
        (*tail)->next = q;
    else
        *head = q;
    *tail = q;
}

/* The load is answered: send what waited for it, in order; or, when the connection failed
 * (no reply), the load was refused (an error: resending would only be refused again) or the
 * link is closing, decide it by the fail mode like the requests in flight. */
static void on_loaded(redisAsyncContext *ac, void *r, void *priv)
{
    (void)priv;
    rl_conn *c = conn_of(ac);
    redisReply *rep = r;
    if (!c)
        return;
    c->load_queued = 0;
    int loaded = rep && rep->type == REDIS_REPLY_STRING;
    if (loaded)
        sl_rs_count_script_load(c->lk->rs);
    rl_req *lists[2] = {c->held_old, c->held_new};
    c->held_old = c->held_old_tail = c->held_new = c->held_new_tail = NULL;
    for (int k = 0; k < 2; k++)
        for (rl_req *q = lists[k], *next; q; q = next) {
            next = q->next;
            q->next = NULL;
            uncount(c->lk, q);
            if (loaded && !c->lk->closing)
                send_req(c->lk, q);
            else
                fail(c->lk, q);
        }
    if (rep) /* not from inside a failing connection's callbacks: the sweep does those */
        release_ready(c->lk);
}

/* Act on what sl_rs_finish said about request q's reply (not a group's). */
static void settle(sd_rlink *lk, rl_conn *c, rl_req *q, int st)
{
    switch (st) {
    case SL_RS_DONE:
        complete(lk, q);
        break;
    case SL_RS_NOTLOADED: /* load it, once per connection; resend once it is loaded */
        if (c->ac && !c->load_queued) {
            size_t len;
            const char *s = sl_rs_script(&len);
            if (redisAsyncCommand(c->ac, on_loaded, NULL, "FUNCTION LOAD REPLACE %b", s, len) == REDIS_OK) {
                c->load_queued = 1;
                c->load_at = sl_mono_ns();
            }
        }
        if (c->load_queued) {
            append(&c->held_old, &c->held_old_tail, q);
            count(lk, q, c->node); /* parked on this node: its slot's order waits for it */
        } else {
            send_req(lk, q);
        }
        break;
    case SL_RS_RESEND:
        send_req(lk, q);
        break;
    default:
        fail(lk, q);
    }
}

/* A group's reply, member by member (sl_rs_finish_member: after an error reply each goes
 * again alone, or is decided by the fail mode). */
static void settle_group(sd_rlink *lk, rl_conn *c, rl_req *g, const redisReply *r)
{
    rl_req *m = g->members;
    size_t n = (size_t)g->nmembers;
    if (r)
        sl_rs_node_ok(lk->rs, c->node, g->sent);
    recycle(lk, g);
    for (size_t i = 0; m; i++) {
        rl_req *next = m->next;
        m->next = NULL;
        settle(lk, c, m, sl_rs_finish_member(lk->rs, &m->call, r, i, n, &m->it->d, &m->it->d.err));
        m = next;
    }
}

static void on_reply(redisAsyncContext *ac, void *r, void *priv)
{
    (void)ac;
    rl_req *q = priv;
    rl_conn *c = q->conn;
    sd_rlink *lk = c->lk;
    /* replies come in send order: q is the head */
    c->head = q->next;
    if (!c->head)
        c->tail = NULL;
    q->next = NULL;
    if (q->members) {
        settle_group(lk, c, q, r);
        return;
    }
    uint16_t slot = q->call.slot;
    int counted = uncount(lk, q);
    if (!r) { /* the connection failed or was closed */
        fail(lk, q);
    } else {
        sl_rs_node_ok(lk->rs, c->node, q->sent); /* sl_mono_ns, the same clock */
        settle(lk, c, q, sl_rs_finish(lk->rs, &q->call, r, &q->it->d, &q->it->d.err));
    }
    /* Not from inside a failing connection's callbacks (they may be reopening it): the
     * sweep releases those. */
    if (counted && r)
        release_held(lk, slot);
}

static void on_slots(redisAsyncContext *ac, void *r, void *priv)
{
    (void)priv;
    rl_conn *c = conn_of(ac);
    if (!c)
        return;
    sd_rlink *lk = c->lk;
    lk->discovering = 0;
    lk->asked = NULL;
    if (!r || sl_rs_apply_slots(lk->rs, c->node, r) != SL_OK) {
        /* another seed may answer (this one is backing off now if it failed): the waiting
         * requests go to the fail mode only when every node has been asked */
        if (!lk->closing && ++lk->discover_tries < sl_rs_nnodes(lk->rs))
            discover(lk);
        else
            fail_waiting(lk);
        return;
    }
    lk->discover_tries = 0;
    rl_req *q = lk->wait_head;
    lk->wait_head = lk->wait_tail = NULL;
    while (q) {
        rl_req *next = q->next;
        q->next = NULL;
        q->call.node = sl_rs_slot_node(lk->rs, q->call.slot);
        send_req(lk, q);
        q = next;
    }
}

/* Ask a node that may answer for the topology (CLUSTER SLOTS). */
static void discover(sd_rlink *lk)
{
    if (lk->discovering)
        return;
    int64_t now = sl_mono_ns();
    for (int i = 0; i < sl_rs_nnodes(lk->rs); i++) {
        /* a node marked down is the probe's to revive: asking it would hold every waiting
         * request for the timeout each time its back-off ends */
        if (sl_rs_node_down(lk->rs, i) || !sl_rs_node_usable(lk->rs, i, now))
            continue;
        rl_conn *c = pick(lk, i);
        if (c && c->ac && redisAsyncCommand(c->ac, on_slots, NULL, "CLUSTER SLOTS") == REDIS_OK) {
            lk->discovering = 1;
            lk->asked = c;
            lk->asked_at = sl_mono_ns();
            return;
        }
    }
    lk->discover_tries = 0;
    fail_waiting(lk); /* nobody to ask */
}

/* The connection to send to node `node` on, or NULL when the node is not to be tried. */
static rl_conn *conn_for(sd_rlink *lk, int node)
{
    if (sl_rs_is_cluster(lk->rs) && sl_rs_claim_refresh(lk->rs))
        discover(lk); /* a node failed: the slot map may have changed (goes on meanwhile) */
    /* a node marked down is decided by the fail mode at once: the sweep's probe, not a
     * request that would wait for the timeout, finds out when it is back */
    if (node < sl_rs_nnodes(lk->rs) && !sl_rs_node_down(lk->rs, node) &&
        sl_rs_node_usable(lk->rs, node, sl_mono_ns()))
        return pick(lk, node);
    return NULL;
}

/* q has just been written to c: its reply is the next after those in flight. */
static void in_flight(rl_conn *c, rl_req *q)
{
    q->conn = c;
    q->sent = sl_mono_ns();
    append(&c->head, &c->tail, q);
}

/* ---- a slot's order (cluster) ------------------------------------------------------------ */

/* Must q wait: requests for its slot in flight on another node, or an earlier request for
 * its slot waiting? */
static int must_wait(const sd_rlink *lk, const rl_req *q)
{
    if (!lk->slots)
        return 0;
    const struct rl_slot *sl = &lk->slots[q->call.slot];
    if (sl->inflight && sl->node != q->call.node)
        return 1;
    return sl->nheld && sl->oldest < q->seq;
}

static void hold(sd_rlink *lk, rl_req *q)
{
    struct rl_slot *sl = &lk->slots[q->call.slot];
    if (!sl->nheld++ || q->seq < sl->oldest)
        sl->oldest = q->seq;
    q->next = NULL;
    if (!lk->held || lk->held_tail->seq < q->seq) { /* a fresh arrival: the newest */
        append(&lk->held, &lk->held_tail, q);
        return;
    }
    rl_req **pp = &lk->held; /* a resend: before the later arrivals */
    while ((*pp)->seq < q->seq)
        pp = &(*pp)->next;
    q->next = *pp;
    *pp = q;
}

/* q is on its way to `node` (sent, or parked there until a load is answered). */
static void count(sd_rlink *lk, rl_req *q, int node)
{
    if (!lk->slots || q->counted)
        return;
    struct rl_slot *sl = &lk->slots[q->call.slot];
    sl->inflight++;
    sl->node = (int16_t)node;
    q->counted = 1;
}

/* q's reply has come (or never will): it no longer holds its slot. 1 if it did. */
static int uncount(sd_rlink *lk, rl_req *q)
{
    if (!q->counted)
        return 0;
    q->counted = 0;
    lk->slots[q->call.slot].inflight--;
    return 1;
}

/* Send, in arrival order, what waited for `slot` (each may wait again). */
static void release_held(sd_rlink *lk, uint16_t slot)
{
    struct rl_slot *sl = &lk->slots[slot];
    if (sl->inflight || !sl->nheld)
        return;
    sl->nheld = 0;
    rl_req *mine = NULL, **tail = &mine, *last = NULL;
    for (rl_req **pp = &lk->held; *pp;) {
        rl_req *h = *pp;
        if (h->call.slot == slot) {
            *pp = h->next;
            h->next = NULL;
            *tail = h;
            tail = &h->next;
        } else {
            last = h;
            pp = &h->next;
        }
    }
    lk->held_tail = last;
    while (mine) {
        rl_req *next = mine->next;
        mine->next = NULL;
        if (lk->closing) {
            fail(lk, mine);
        } else {
            /* the slot map may have changed again meanwhile (an ASK's target stays) */
            if (!mine->call.asking)
                mine->call.node = sl_rs_slot_node(lk->rs, mine->call.slot);
            send_req(lk, mine);
        }
        mine = next;
    }
}

/* Send what waits for slots that have nothing in flight any more. */
static void release_ready(sd_rlink *lk)
{
    for (rl_req *h = lk->held; h && !lk->closing;) {
        if (lk->slots[h->call.slot].inflight) {
            h = h->next;
            continue;
        }
        release_held(lk, h->call.slot);
        h = lk->held; /* the list changed: from the start (a slot released is gone from it) */
    }
}

static void send_req(sd_rlink *lk, rl_req *q)
{
    if (!sl_rs_topology_known(lk->rs)) {
        append(&lk->wait_head, &lk->wait_tail, q);
        discover(lk);
        return;
    }
    rl_conn *c = conn_for(lk, q->call.node);
    if (!c) {
        fail(lk, q);
        return;
    }
    if (!lk->slots && sl_rs_is_cluster(lk->rs)) /* out of memory: no order kept */
        lk->slots = calloc(RL_SLOTS, sizeof *lk->slots);
    if (must_wait(lk, q)) {
        hold(lk, q);
        return;
    }
    if (c->load_queued) { /* goes after the load, behind what it refused */
        append(&c->held_new, &c->held_new_tail, q);
        count(lk, q, c->node);
        return;
    }
    if (q->call.asking)
        redisAsyncCommand(c->ac, NULL, NULL, "ASKING");
    if (redisAsyncFormattedCommand(c->ac, on_reply, q, q->call.cmd, q->call.len) != REDIS_OK) {
        fail(lk, q);
        return;
    }
    in_flight(c, q);
    count(lk, q, c->node);
}

/* Send members[0..n) (n >= 2, all groupable with the first) as one FCALL. */
static void send_group(sd_rlink *lk, rl_req **members, int n)
{
    sl_rcall *calls[SL_RS_GROUP_MAX];
    for (int i = 0; i < n; i++) {
        calls[i] = &members[i]->call;
        members[i]->next = i + 1 < n ? members[i + 1] : NULL;
    }
    rl_conn *c = conn_for(lk, members[0]->call.node);
    size_t len = c && !c->load_queued ? sl_rs_group_cmd(calls, n, lk->gcmd, sizeof lk->gcmd) : 0;
    rl_req *g = len ? req_new(lk) : NULL;
    if (g) {
        g->it = NULL;
        g->t0 = sl_mono_ns();
        g->members = members[0];
        g->nmembers = n;
        if (redisAsyncFormattedCommand(c->ac, on_reply, g, lk->gcmd, len) == REDIS_OK) {
            in_flight(c, g);
            return;
        }
        recycle(lk, g);
    }
    for (int i = 0; i < n; i++) {
        members[i]->next = NULL;
        if (c) /* out of memory, or a load queued: each alone (send_req holds them) */
            send_req(lk, members[i]);
        else
            fail(lk, members[i]);
    }
}

/* Send prepared requests, those alike in all but the key as one call (sl_rs_plan_groups):
 * Redis then pays a call's own cost once per group, not once per request. */
static void send_all(sd_rlink *lk, rl_req **ready, int n)
{
    sl_rcall *calls[SL_RS_GROUP_MAX] = {0};
    rl_req *group[SL_RS_GROUP_MAX] = {0};
    size_t order[SL_RS_GROUP_MAX], size[SL_RS_GROUP_MAX], ng;
    if (n == 0)
        return;
    for (int i = 0; i < n; i++)
        calls[i] = &ready[i]->call;
    ng = sl_rs_plan_groups(lk->rs, calls, (size_t)n, order, size);
    for (size_t g = 0, k = 0; g < ng; k += size[g++]) {
        for (size_t m = 0; m < size[g]; m++)
            group[m] = ready[order[k + m]];
        if (size[g] == 1)
            send_req(lk, group[0]);
        else
            send_group(lk, group, (int)size[g]);
    }
}

/* ---- the scheduler's side ---------------------------------------------------------------- */

static void submit(void *ctx, sd_item **items, int n)
{
    sd_rlink *lk = ctx;
    rl_req *ready[SL_RS_GROUP_MAX];
    int nready = 0;
    for (int i = 0; i < n; i++) {
        sd_item *it = items[i];
        rl_req *q = req_new(lk);
        if (!q) { /* out of memory */
            memset(&it->d, 0, sizeof it->d);
            it->d.err = SL_ENOMEM;
            sd_sched_decided(lk->sched, it);
            continue;
        }
        q->it = it;
        q->t0 = sl_mono_ns();
        int local;
        if (it->release)
            local = sl_rs_prepare_release(lk->rs, &it->req.key, it->req.cost, SL_NOW, &q->call,
                                          &it->d.err);
        else if (it->peek_next) /* an HTTP status: the cost-0 view and cost 1's answer */
            local = sl_rs_prepare_status(lk->rs, &it->req, SL_NOW, &q->call, &it->d);
        else
            local = sl_rs_prepare(lk->rs, &it->req, SL_NOW, &q->call, &it->d);
        if (local) {
            complete(lk, q); /* bad input, or the near cache */
            continue;
        }
        ready[nready++] = q;
        if (nready == SL_RS_GROUP_MAX) {
            send_all(lk, ready, nready);
            nready = 0;
        }
    }
    send_all(lk, ready, nready);
}

/* The answer to a probe: any reply but an error means the node is back. */
static void on_probe(redisAsyncContext *ac, void *r, void *priv)
{
    (void)priv;
    rl_conn *c = conn_of(ac);
    if (!c)
        return;
    rl_node *n = c->lk->nodes[c->node];
    int64_t sent = n->probe_at;
    n->probe = NULL;
    redisReply *rep = r;
    if (!rep || c->lk->closing)
        return; /* the connection failed: on_connect / on_disconnect said so */
    if (rep->type == REDIS_REPLY_ERROR)
        sl_rs_node_failed(c->lk->rs, c->node, rep->str);
    else
        sl_rs_node_ok(c->lk->rs, c->node, sent); /* sl_mono_ns: the same clock */
}

/* A node marked down whose back-off is over gets a PING (one at a time per worker), so that
 * its return is noticed without traffic, and without a request waiting on a dead node. */
static void probe_down_nodes(sd_rlink *lk, int64_t now, int64_t limit)
{
    for (int i = 0; i < sl_rs_nnodes(lk->rs); i++) {
        rl_node *n = lk->nodes[i];
        if (n && n->probe) {
            if (n->probe->ac && now - n->probe_at > limit) {
                rl_conn *c = n->probe;
                n->probe = NULL;
                drop_timed_out(c); /* hiredis calls on_probe back with no reply */
            }
            continue;
        }
        if (!sl_rs_node_down(lk->rs, i) || !sl_rs_node_usable(lk->rs, i, sl_mono_ns()))
            continue;
        rl_conn *c = pick(lk, i);
        n = lk->nodes[i];
        if (c && c->ac && redisAsyncCommand(c->ac, on_probe, NULL, "PING") == REDIS_OK) {
            n->probe = c;
            n->probe_at = sl_mono_ns();
        }
    }
}

static void drop_timed_out(rl_conn *c)
{
    sl_rs_node_failed(c->lk->rs, c->node, "timeout");
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    redisAsyncFree(ac);
}

/* Requests older than the timeout, and a topology question unanswered as long (requests
 * wait for it): their connection is dropped. hiredis then calls back everything sent on it
 * with no reply, so the requests are decided by the fail mode. */
static void on_sweep(uv_timer_t *t)
{
    sd_rlink *lk = t->data;
    int64_t limit = (int64_t)sl_rs_options(lk->rs)->timeout_ms * 1000000;
    int64_t now = sl_mono_ns();
    if (lk->discovering && lk->asked && lk->asked->ac && now - lk->asked_at > limit)
        drop_timed_out(lk->asked);
    if (!lk->closing)
        probe_down_nodes(lk, now, limit);
    /* requests held for a slot whose last request in flight failed with its connection */
    release_ready(lk);
    for (int i = 0; i < SL_RS_MAX_NODES; i++) {
        rl_conn *c = lk->nodes[i] ? &lk->nodes[i]->c : NULL;
        if (c && c->ac && ((c->head && now - c->head->sent > limit) ||
                           (c->load_queued && now - c->load_at > limit)))
            drop_timed_out(c); /* a load unanswered holds requests: they fail with it */
    }
}

sd_rlink *sd_rlink_new(uv_loop_t *loop, sl_rstore *rs, sd_sched *sched)
{
    sd_rlink *lk = calloc(1, sizeof *lk);
    if (!lk)
        return NULL;
    lk->loop = loop;
    lk->rs = rs;
    lk->sched = sched;
    uv_timer_init(loop, &lk->sweep);
    lk->sweep.data = lk;
    uv_timer_start(&lk->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    uv_unref((uv_handle_t *)&lk->sweep);
    sd_sched_set_submit(sched, submit, lk);
    return lk;
}

void sd_rlink_close(sd_rlink *lk)
{
    if (!lk || lk->closing)
        return;
    lk->closing = 1;
    if (!uv_is_closing((uv_handle_t *)&lk->sweep))
        uv_close((uv_handle_t *)&lk->sweep, NULL);
    for (int i = 0; i < SL_RS_MAX_NODES; i++) {
        rl_node *n = lk->nodes[i];
        if (n && n->c.ac) { /* in-flight requests are called back (fail mode) */
            redisAsyncContext *ac = n->c.ac;
            n->c.ac = NULL;
            redisAsyncFree(ac);
        }
    }
    fail_waiting(lk);
    while (lk->held) {
        rl_req *q = lk->held;
        lk->held = q->next;
        q->next = NULL;
        lk->slots[q->call.slot].nheld--;
        fail(lk, q);
    }
    lk->held_tail = NULL;
}

void sd_rlink_free(sd_rlink *lk)
{
    if (!lk)
        return;
    for (int i = 0; i < SL_RS_MAX_NODES; i++)
        free(lk->nodes[i]);
    for (rl_req *q = lk->free, *n; q; q = n) {
        n = q->next;
        free(q);
    }
    free(lk->slots);
    free(lk);
}
