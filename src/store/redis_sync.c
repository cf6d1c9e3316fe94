/*
 * redis_sync.c — the library's blocking transport for the Redis store (see redis.h).
 *
 * Each node has a pool of idle hiredis connections; a call takes one per node it needs
 * (opening one if none is idle) and gives it back after, so a thread never waits for another
 * thread's round trip. A batch goes out in rounds: every request is formatted, all of a
 * round's commands are written to their nodes (pipelined), then the replies are read node by
 * node. Redirections (MOVED, ASK) and "Function not found" (after loading the library) send a request again in the next round; a node
 * that fails (connect, write, read, timeout) decides its requests by the fail mode and is not
 * tried again before its back-off has passed.
 */
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "inject.h"
#include "mono.h"
#include "redis.h"

#define POOL_MAX 64
#define CHUNK 64     /* requests in flight per round */
#define MAX_ROUNDS 8 /* > the redirections one request may follow */

typedef struct sl_rpool {
    pthread_mutex_t mu;
    int n;
    redisContext *c[POOL_MAX];
} sl_rpool;

void sl_rs_pool_free(sl_rpool *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n; i++)
        redisFree(p->c[i]);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static pthread_mutex_t pool_init_mu = PTHREAD_MUTEX_INITIALIZER;

static sl_rpool *pool_of(sl_rstore *rs, int node)
{
    sl_rpool **slot = sl_rs_pool_slot(rs, node);
    sl_rpool *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (p)
        return p;
    pthread_mutex_lock(&pool_init_mu);
    if (!(p = *slot) && (p = calloc(1, sizeof *p))) {
        pthread_mutex_init(&p->mu, NULL);
        __atomic_store_n(slot, p, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&pool_init_mu);
    return p;
}

/* A command that must answer +OK (AUTH, SELECT) on a fresh connection. */
static int setup_cmd(redisContext *c, const char *why_prefix, char *why, size_t whylen,
                     const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    int ok = r && r->type == REDIS_REPLY_STATUS;
    if (!ok)
        snprintf(why, whylen, "%s: %s", why_prefix, r ? r->str : c->errstr);
    if (r)
        freeReplyObject(r);
    return ok;
}

static redisContext *conn_open(sl_rstore *rs, int node, char *why, size_t whylen)
{
    const sl_redis_options *o = sl_rs_options(rs);
    const sl_rnode *a = sl_rs_node(rs, node);
    struct timeval tv = {o->timeout_ms / 1000, (o->timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(a->host, a->port, tv);
    if (!c || c->err) {
        snprintf(why, whylen, "connect: %s", c ? c->errstr : "out of memory");
        redisFree(c);
        return NULL;
    }
    sl_rs_cap_reader(c->reader);
    redisSetTimeout(c, tv);
    redisEnableKeepAlive(c);
    if ((o->password && !setup_cmd(c, "AUTH", why, whylen, "AUTH %s", o->password)) ||
        (o->db && !sl_rs_is_cluster(rs) &&
         !setup_cmd(c, "SELECT", why, whylen, "SELECT %u", o->db))) {
        redisFree(c);
        return NULL;
    }
    sl_rs_count_reconnect(rs);
    return c;
}

static redisContext *checkout(sl_rstore *rs, int node)
{
    sl_rpool *p = pool_of(rs, node);
    redisContext *c = NULL;
    if (p) {
        pthread_mutex_lock(&p->mu);
        if (p->n > 0)
            c = p->c[--p->n];
        pthread_mutex_unlock(&p->mu);
    }
    if (!c) {
        char why[300];
        if (!(c = conn_open(rs, node, why, sizeof why)))
            sl_rs_node_failed(rs, node, why);
    }
    return c;
}

static void checkin(sl_rstore *rs, int node, redisContext *c)
{
    sl_rpool *p = pool_of(rs, node);
    if (p) {
        pthread_mutex_lock(&p->mu);
        if (p->n < POOL_MAX) {
            p->c[p->n++] = c;
            c = NULL;
        }
        pthread_mutex_unlock(&p->mu);
    }
    redisFree(c);
}

/* Drop every idle connection of a node that failed (they are likely dead too). */
static void pool_flush(sl_rstore *rs, int node)
{
    sl_rpool *p = pool_of(rs, node);
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    while (p->n > 0)
        redisFree(p->c[--p->n]);
    pthread_mutex_unlock(&p->mu);
}

static void conn_failed(sl_rstore *rs, int node, redisContext *c)
{
    sl_rs_node_failed(rs, node, c->errstr[0] ? c->errstr : "connection lost");
    redisFree(c);
    pool_flush(rs, node);
}

/* Learn the topology (one Redis, or the cluster's slot map) from the first node that
 * answers; again after a cluster node failed (a replica may have taken its slots). SL_OK or
 * SL_ESTORE. */
static int topology(sl_rstore *rs)
{
    if (sl_rs_topology_known(rs) && !sl_rs_claim_refresh(rs))
        return SL_OK;
    int64_t now = sl_mono_ns();
    for (int i = 0; i < sl_rs_nnodes(rs); i++) {
        if (!sl_rs_node_usable(rs, i, now))
            continue;
        redisContext *c = checkout(rs, i);
        if (!c)
            continue;
        redisReply *r = redisCommand(c, "CLUSTER SLOTS");
        if (!r) {
            conn_failed(rs, i, c);
            continue;
        }
        int rc = sl_rs_apply_slots(rs, i, r);
        freeReplyObject(r);
        checkin(rs, i, c);
        if (rc == SL_OK)
            return SL_OK;
    }
    return sl_rs_topology_known(rs) ? SL_OK : SL_ESTORE;
}

static int load_script(sl_rstore *rs, redisContext *c)
{
    size_t len;
    const char *s = sl_rs_script(&len);
    redisReply *r = redisCommand(c, "FUNCTION LOAD REPLACE %b", s, len);
    int ok = r && r->type == REDIS_REPLY_STRING;
    if (r)
        freeReplyObject(r);
    if (ok)
        sl_rs_count_script_load(rs);
    return ok;
}

/* One request of a batch. */
typedef struct slot_req {
    sl_rcall call;
    sl_decision *d;
    int *release_rc;
} slot_req;

static void fallback(sl_rstore *rs, slot_req *q)
{
    sl_rs_fallback(rs, &q->call, q->d, q->release_rc);
}

_Static_assert(CHUNK <= SL_RS_GROUP_MAX, "a round is planned as one set of groups");

static _Atomic long g_group_fail_after = -1;

void sl_rs_fail_group_allocs_after(long n)
{
    atomic_store(&g_group_fail_after, n);
}

/* Send every pending request, read every reply; what must go again stays pending. Requests
 * alike in all but the key go as one call (sl_rs_plan_groups): group g is pend[order[at[g]
 * .. at[g] + size[g])]. */
static void round_trip(sl_rstore *rs, slot_req **pend, size_t *npend)
{
    int nn = sl_rs_nnodes(rs);
    int64_t now = sl_mono_ns();
    slot_req *again[CHUNK]; /* what must go out again, in order */
    size_t keep = 0, n = *npend;
    sl_rcall *calls[CHUNK];
    size_t order[CHUNK], size[CHUNK], at[CHUNK], ng = 0;
    for (size_t i = 0; i < n; i++)
        calls[i] = &pend[i]->call;
    if (n)
        ng = sl_rs_plan_groups(rs, calls, n, order, size);
    char *gbuf = NULL; /* a group's command */
    for (size_t g = 0, k = 0; g < ng; k += size[g++]) {
        at[g] = k;
        if (size[g] > 1 && !gbuf &&
            (sl_inject_fails(&g_group_fail_after) ||
             !(gbuf = malloc((size_t)SL_RS_GROUP_MAX * SL_RS_CMD_MAX))))
            break;
    }
    if (!gbuf && ng < n) { /* out of memory for a group's command: each request alone */
        for (size_t i = 0; i < n; i++)
            order[i] = at[i] = i, size[i] = 1;
        ng = n;
    }
    /* one node at a time for writing: nodes of this round, in first-seen order */
    int nodes[CHUNK];
    redisContext *conn[CHUNK];
    int nord = 0;
    for (size_t g = 0; g < ng; g++) {
        int nd = calls[order[at[g]]]->node, seen = 0;
        for (int k = 0; k < nord && !seen; k++)
            seen = nodes[k] == nd;
        if (nd >= nn) /* cannot happen: node indices come from the table */
            for (size_t m = 0; m < size[g]; m++)
                fallback(rs, pend[order[at[g] + m]]);
        else if (!seen)
            nodes[nord++] = nd;
    }
    for (int k = 0; k < nord; k++) {
        int nd = nodes[k];
        conn[k] = sl_rs_node_usable(rs, nd, now) ? checkout(rs, nd) : NULL;
        if (!conn[k])
            continue;
        for (size_t g = 0; g < ng; g++) {
            sl_rcall *c = calls[order[at[g]]];
            if (c->node != nd)
                continue;
            if (size[g] > 1) {
                sl_rcall *members[SL_RS_GROUP_MAX];
                for (size_t m = 0; m < size[g]; m++)
                    members[m] = calls[order[at[g] + m]];
                /* the buffer holds any group (SL_RS_CMD_MAX per member) */
                size_t len = sl_rs_group_cmd(members, (int)size[g], gbuf,
                                             (size_t)SL_RS_GROUP_MAX * SL_RS_CMD_MAX);
                redisAppendFormattedCommand(conn[k], gbuf, len);
                continue;
            }
            if (c->asking)
                redisAppendCommand(conn[k], "ASKING");
            redisAppendFormattedCommand(conn[k], c->cmd, c->len);
        }
        int done = 0;
        while (!done)
            if (redisBufferWrite(conn[k], &done) != REDIS_OK) {
                conn_failed(rs, nd, conn[k]);
                conn[k] = NULL;
                break;
            }
    }
    free(gbuf);
    for (int k = 0; k < nord; k++) {
        int nd = nodes[k], notloaded = 0;
        for (size_t g = 0; g < ng; g++) {
            const sl_rcall *c = calls[order[at[g]]];
            if (c->node != nd)
                continue;
            redisReply *r = NULL;
            if (conn[k] && c->asking && size[g] == 1) { /* +OK to ASKING */
                if (redisGetReply(conn[k], (void **)&r) == REDIS_OK)
                    freeReplyObject(r);
                r = NULL;
            }
            if (conn[k] && redisGetReply(conn[k], (void **)&r) != REDIS_OK) {
                conn_failed(rs, nd, conn[k]);
                conn[k] = NULL;
            }
            for (size_t m = 0; m < size[g]; m++) {
                slot_req *q = pend[order[at[g] + m]];
                int st = size[g] > 1 ? sl_rs_finish_member(rs, &q->call, r, m, size[g], q->d,
                                                           q->release_rc)
                         : r ? sl_rs_finish(rs, &q->call, r, q->d, q->release_rc)
                             : SL_RS_FAILED;
                if (st == SL_RS_NOTLOADED)
                    notloaded = 1;
                if (st == SL_RS_RESEND || st == SL_RS_NOTLOADED)
                    again[keep++] = q;
                else if (st == SL_RS_FAILED)
                    fallback(rs, q);
            }
            if (r)
                freeReplyObject(r);
        }
        if (conn[k]) {
            if (notloaded && !load_script(rs, conn[k])) {
                conn_failed(rs, nd, conn[k]);
                continue;
            }
            sl_rs_node_ok(rs, nd, now);
            checkin(rs, nd, conn[k]);
        }
    }
    memcpy(pend, again, keep * sizeof *again);
    *npend = keep;
}

static void run(sl_rstore *rs, slot_req **pend, size_t npend)
{
    if (npend && topology(rs) != SL_OK) {
        for (size_t i = 0; i < npend; i++)
            fallback(rs, pend[i]);
        return;
    }
    for (int round = 0; npend > 0; round++) {
        if (round == MAX_ROUNDS) {
            for (size_t i = 0; i < npend; i++)
                fallback(rs, pend[i]);
            return;
        }
        /* requests prepared before the topology was known all point at node 0 */
        for (size_t i = 0; i < npend && round == 0; i++)
            pend[i]->call.node = sl_rs_slot_node(rs, pend[i]->call.slot);
        round_trip(rs, pend, &npend);
    }
}

int sl_rs_batch(sl_rstore *rs, const sl_request *reqs, size_t n, int64_t now,
                sl_decision *out)
{
    slot_req *q = malloc(sizeof *q * (n < CHUNK ? n : CHUNK));
    slot_req *pend[CHUNK];
    if (n && !q)
        return SL_ENOMEM;
    for (size_t base = 0; base < n; base += CHUNK) {
        size_t m = n - base < CHUNK ? n - base : CHUNK, np = 0;
        for (size_t i = 0; i < m; i++) {
            const sl_request *r = &reqs[base + i];
            q[i].d = &out[base + i];
            q[i].release_rc = NULL;
            if (!sl_rs_prepare(rs, r, now, &q[i].call, q[i].d))
                pend[np++] = &q[i];
        }
        run(rs, pend, np);
    }
    free(q);
    return SL_OK;
}

int sl_rs_release(sl_rstore *rs, const sl_key *k, uint64_t lease, int64_t now)
{
    slot_req *q = malloc(sizeof *q);
    if (!q)
        return SL_ENOMEM;
    int rc;
    q->d = NULL;
    q->release_rc = &rc;
    if (!sl_rs_prepare_release(rs, k, lease, now, &q->call, &rc)) {
        slot_req *p = q;
        run(rs, &p, 1);
    }
    free(q);
    return rc;
}
