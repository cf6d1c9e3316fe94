/*
 * redis.c — the Redis store's core, shared by both transports (see redis.h): configuration,
 * node table and slot map, node health, the near cache, and the codec (request -> FCALL
 * command, function reply -> decision).
 */
#include "redis.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bytes.h"
#include "limiter_int.h"
#include "mono.h"

#define NS_PER_MS INT64_C(1000000)
#define BACKOFF_MIN (50 * NS_PER_MS)
#define BACKOFF_MAX (2000 * NS_PER_MS)
#define MAX_REDIRECTS 5
#define FAIL_CLOSED_RETRY (1000 * NS_PER_MS)

/* Near cache: direct-mapped, NC_SHARDS x NC_SLOTS entries, one mutex per shard. A slot holds
 * the last denial seen for one key hash; a newer denial of another key overwrites it (it is a
 * cache: losing an entry only costs a round trip). */
#define NC_SHARDS 64
#define NC_SLOTS 256

typedef struct nc_ent {
    uint64_t hash;      /* 0: empty */
    uint64_t policy;    /* the fingerprint (cp.fp) of the policy it was denied under: another
                           policy misses (ids are reused once a policy is collected) */
    uint32_t limit_index;
    uint64_t cost;      /* denied for this cost: another one misses (a smaller might pass, a
                           larger waits longer than `until`) */
    int64_t until;      /* monotonic ns: the retry time */
    int64_t reset_at;   /* monotonic ns: when the key was to be full */
    uint64_t remaining;
    double tokens, reserve;
} nc_ent;

typedef struct nc_shard {
    pthread_mutex_t mu;
    nc_ent e[NC_SLOTS];
} nc_shard;

typedef struct node_st {
    sl_rnode addr;
    _Atomic int64_t retry_at; /* monotonic ns before which the node is not tried */
    _Atomic int64_t backoff;
    _Atomic int down;
    _Atomic int64_t failed_at; /* monotonic ns of the last failure */
    struct sl_rpool *pool;    /* the blocking transport's idle connections */
} node_st;

struct sl_rstore {
    sl_limiter *l;
    sl_redis_options o;
    char *servers, *password;
    char prefix[SL_RS_PREFIX_MAX + 1];
    size_t prefix_len;
    pthread_mutex_t nodes_mu;           /* serialises additions to the node table */
    _Atomic int nnodes;
    node_st *nodes[SL_RS_MAX_NODES];    /* published before nnodes grows; never removed */
    _Atomic uint8_t slots[SL_RS_SLOTS]; /* node index of each slot */
    _Atomic int topology;               /* 0 unknown, 1 one Redis, 2 cluster */
    _Atomic int ndown;
    _Atomic int stale;                  /* a cluster node failed: refresh the slot map */
    _Atomic int64_t refreshed;          /* monotonic ns of the last refresh claim */
    pthread_mutex_t state_mu;           /* orders on_state calls */
    int reported_up;
    nc_shard *nc;
    _Atomic uint64_t calls, near, fopen, fclosed, errors, reconnects, loads, redirects;
    _Atomic int64_t last_fallback; /* sl_mono_ns() of the last fail-mode decision; 0: none */
};

#define BUMP(x) atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

/* ---- options, nodes ---------------------------------------------------------------------- */

void sl_redis_options_init(sl_redis_options *o)
{
    if (o)
        memset(o, 0, sizeof *o);
}

static char *dup_or_null(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* "host:port": the host is everything before the last ':' ("[::1]:6379" brackets allowed). */
static int parse_addr(const char *s, size_t len, const char **host, size_t *hostlen, int *port)
{
    const char *colon = NULL;
    for (size_t i = 0; i < len; i++)
        if (s[i] == ':')
            colon = s + i;
    if (!colon || colon == s || colon + 1 == s + len)
        return SL_EADDRESS;
    long p = 0;
    for (const char *c = colon + 1; c < s + len; c++) {
        if (*c < '0' || *c > '9' || (p = p * 10 + (*c - '0')) > 65535)
            return SL_EADDRESS;
    }
    if (p < 1)
        return SL_EADDRESS;
    *host = s;
    *hostlen = (size_t)(colon - s);
    if (*hostlen >= 2 && s[0] == '[' && colon[-1] == ']') {
        (*host)++;
        *hostlen -= 2;
    }
    if (*hostlen == 0 || *hostlen >= sizeof(((sl_rnode *)0)->host))
        return SL_EADDRESS;
    *port = (int)p;
    return SL_OK;
}

int sl_rs_node_index(sl_rstore *rs, const char *host, size_t hostlen, int port)
{
    /* the host is kept as a C string: one with a NUL byte would never be found again, and
       every CLUSTER SLOTS refresh naming it would add another node until the table is full */
    if (hostlen == 0 || hostlen >= sizeof(((sl_rnode *)0)->host) || memchr(host, 0, hostlen))
        return -1;
    int n = atomic_load_explicit(&rs->nnodes, memory_order_acquire);
    for (int i = 0; i < n; i++) {
        const sl_rnode *a = &rs->nodes[i]->addr;
        if (a->port == port && strlen(a->host) == hostlen && !memcmp(a->host, host, hostlen))
            return i;
    }
    pthread_mutex_lock(&rs->nodes_mu);
    int i, found = -1;
    n = atomic_load_explicit(&rs->nnodes, memory_order_relaxed);
    for (i = 0; i < n && found < 0; i++) {
        const sl_rnode *a = &rs->nodes[i]->addr;
        if (a->port == port && strlen(a->host) == hostlen && !memcmp(a->host, host, hostlen))
            found = i;
    }
    if (found < 0 && n < SL_RS_MAX_NODES) {
        node_st *nd = calloc(1, sizeof *nd);
        if (nd) {
            memcpy(nd->addr.host, host, hostlen);
            nd->addr.port = port;
            rs->nodes[n] = nd;
            atomic_store_explicit(&rs->nnodes, n + 1, memory_order_release);
            found = n;
        }
    }
    pthread_mutex_unlock(&rs->nodes_mu);
    return found;
}

int sl_rs_nnodes(sl_rstore *rs) { return atomic_load_explicit(&rs->nnodes, memory_order_acquire); }
const sl_rnode *sl_rs_node(sl_rstore *rs, int i) { return &rs->nodes[i]->addr; }
const sl_redis_options *sl_rs_options(sl_rstore *rs) { return &rs->o; }
int sl_rs_topology_known(sl_rstore *rs) { return atomic_load(&rs->topology) != 0; }
int sl_rs_is_cluster(sl_rstore *rs) { return atomic_load(&rs->topology) == 2; }

int sl_rs_slot_node(sl_rstore *rs, uint16_t slot)
{
    return atomic_load_explicit(&rs->slots[slot & (SL_RS_SLOTS - 1)], memory_order_relaxed);
}

int sl_rs_claim_refresh(sl_rstore *rs)
{
    if (!atomic_load_explicit(&rs->stale, memory_order_relaxed))
        return 0;
    int64_t now = sl_mono_ns(), last = atomic_load(&rs->refreshed);
    if (now - last < 100 * NS_PER_MS || !atomic_compare_exchange_strong(&rs->refreshed, &last, now))
        return 0;
    atomic_store(&rs->stale, 0);
    return 1;
}

struct sl_rpool **sl_rs_pool_slot(sl_rstore *rs, int i) { return &rs->nodes[i]->pool; }

int sl_rs_new(sl_limiter *l, const sl_redis_options *o, sl_rstore **out)
{
    if (!o || !o->servers || (o->fail_mode != SL_FAIL_CLOSED && o->fail_mode != SL_FAIL_OPEN))
        return SL_EINVAL;
    const char *pre = o->key_prefix ? o->key_prefix : "sl:";
    if (strlen(pre) > SL_RS_PREFIX_MAX)
        return SL_EINVAL;
    sl_rstore *rs = calloc(1, sizeof *rs);
    if (!rs)
        return SL_ENOMEM;
    rs->l = l;
    rs->o = *o;
    rs->prefix_len = strlen(pre);
    memcpy(rs->prefix, pre, rs->prefix_len);
    rs->reported_up = 1;
    pthread_mutex_init(&rs->nodes_mu, NULL);
    pthread_mutex_init(&rs->state_mu, NULL);
    int rc = SL_ENOMEM;
    rs->servers = dup_or_null(o->servers);
    rs->password = dup_or_null(o->password);
    rs->nc = calloc(NC_SHARDS, sizeof *rs->nc);
    if (!rs->servers || (o->password && !rs->password) || !rs->nc)
        goto fail;
    for (int i = 0; i < NC_SHARDS; i++)
        pthread_mutex_init(&rs->nc[i].mu, NULL);
    rs->o.servers = rs->servers;
    rs->o.password = rs->password;
    rs->o.key_prefix = rs->prefix;
    if (!rs->o.timeout_ms)
        rs->o.timeout_ms = 1000;
    /* the seed nodes */
    const char *s = rs->servers;
    rc = SL_EADDRESS;
    for (;;) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        const char *host;
        size_t hl;
        int port;
        if (parse_addr(s, len, &host, &hl, &port) != SL_OK)
            goto fail;
        if (sl_rs_node_index(rs, host, hl, port) < 0) {
            rc = SL_EINVAL; /* more than SL_RS_MAX_NODES */
            goto fail;
        }
        if (!end)
            break;
        s = end + 1;
    }
    *out = rs;
    return SL_OK;
fail:
    sl_rs_free(rs);
    return rc;
}

void sl_rs_free(sl_rstore *rs)
{
    if (!rs)
        return;
    int n = atomic_load(&rs->nnodes);
    for (int i = 0; i < n; i++) {
        sl_rs_pool_free(rs->nodes[i]->pool);
        free(rs->nodes[i]);
    }
    if (rs->nc)
        for (int i = 0; i < NC_SHARDS; i++)
            pthread_mutex_destroy(&rs->nc[i].mu);
    free(rs->nc);
    free(rs->servers);
    free(rs->password);
    pthread_mutex_destroy(&rs->nodes_mu);
    pthread_mutex_destroy(&rs->state_mu);
    free(rs);
}

/* ---- health ------------------------------------------------------------------------------ */

static void report_state(sl_rstore *rs, const char *why)
{
    pthread_mutex_lock(&rs->state_mu);
    int up = atomic_load(&rs->ndown) == 0;
    if (up != rs->reported_up) {
        rs->reported_up = up;
        if (rs->o.on_state)
            rs->o.on_state(rs->o.on_state_ctx, up, why);
    }
    pthread_mutex_unlock(&rs->state_mu);
}

void sl_rs_node_failed(sl_rstore *rs, int i, const char *why)
{
    node_st *nd = rs->nodes[i];
    BUMP(rs->errors);
    if (sl_rs_is_cluster(rs))
        atomic_store(&rs->stale, 1);
    int64_t b = atomic_load(&nd->backoff);
    b = b ? (2 * b > BACKOFF_MAX ? BACKOFF_MAX : 2 * b) : BACKOFF_MIN;
    atomic_store(&nd->backoff, b);
    int64_t now = sl_mono_ns();
    atomic_store(&nd->failed_at, now);
    atomic_store(&nd->retry_at, now + b);
    if (atomic_exchange(&nd->down, 1) == 0) {
        atomic_fetch_add(&rs->ndown, 1);
        char msg[512];
        snprintf(msg, sizeof msg, "%s:%d: %s", nd->addr.host, nd->addr.port, why);
        report_state(rs, msg);
    }
}

void sl_rs_node_ok(sl_rstore *rs, int i, int64_t sent)
{
    node_st *nd = rs->nodes[i];
    if (atomic_load_explicit(&nd->down, memory_order_relaxed) == 0)
        return;
    /* a reply to a request sent before the last failure (already in flight on another
     * connection when this one broke) says nothing about the node now */
    if (sent < atomic_load(&nd->failed_at))
        return;
    atomic_store(&nd->backoff, 0);
    atomic_store(&nd->retry_at, 0);
    if (atomic_exchange(&nd->down, 0) == 1) {
        atomic_fetch_sub(&rs->ndown, 1);
        char msg[300];
        snprintf(msg, sizeof msg, "%s:%d reachable", nd->addr.host, nd->addr.port);
        report_state(rs, msg);
    }
}

int sl_rs_node_down(sl_rstore *rs, int i)
{
    return atomic_load_explicit(&rs->nodes[i]->down, memory_order_relaxed);
}

int sl_rs_node_usable(sl_rstore *rs, int i, int64_t now_mono)
{
    return now_mono >= atomic_load_explicit(&rs->nodes[i]->retry_at, memory_order_relaxed);
}

void sl_rs_count_reconnect(sl_rstore *rs) { BUMP(rs->reconnects); }
void sl_rs_count_script_load(sl_rstore *rs) { BUMP(rs->loads); }

void sl_rs_stats(sl_rstore *rs, sl_store_stats *out)
{
    out->redis = 1;
    out->up = atomic_load(&rs->ndown) == 0;
    out->cluster = sl_rs_is_cluster(rs);
    out->calls = atomic_load(&rs->calls);
    out->near_cache = atomic_load(&rs->near);
    out->fail_open = atomic_load(&rs->fopen);
    int64_t lf = atomic_load_explicit(&rs->last_fallback, memory_order_relaxed);
    out->fallback_ms_ago = lf ? (uint64_t)(sl_mono_ns() - lf) / 1000000 : UINT64_MAX;
    out->fail_closed = atomic_load(&rs->fclosed);
    out->errors = atomic_load(&rs->errors);
    out->reconnects = atomic_load(&rs->reconnects);
    out->script_loads = atomic_load(&rs->loads);
    out->redirects = atomic_load(&rs->redirects);
}

/* ---- slots ------------------------------------------------------------------------------- */

/* CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster hashes keys: a byte at a
 * time through a table of the CRC of every byte value, built once. (Bit by bit it was 6% of
 * sluiced's CPU on the Redis store.) */
static uint16_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (unsigned v = 0; v < 256; v++) {
        uint16_t crc = (uint16_t)(v << 8);
        for (int b = 0; b < 8; b++)
            crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
        crc_table[v] = crc;
    }
}

static uint16_t crc16(const char *p, size_t n)
{
    pthread_once(&crc_once, crc_init);
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++)
        crc = (uint16_t)((crc << 8) ^ crc_table[((crc >> 8) ^ (unsigned char)p[i]) & 0xff]);
    return crc;
}

/* Only the part between the first '{' and the next '}' is hashed, if that is not empty. */
uint16_t sl_rs_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        const char *from = open + 1;
        const char *close = memchr(from, '}', len - (size_t)(from - key));
        if (close && close > from)
            return crc16(from, (size_t)(close - from)) & (SL_RS_SLOTS - 1);
    }
    return crc16(key, len) & (SL_RS_SLOTS - 1);
}

/* A failed node that no longer serves any slot (a master replaced by its replica) no longer
 * makes the store "down". */
static void forget_idle_failed(sl_rstore *rs)
{
    int n = atomic_load(&rs->nnodes), changed = 0;
    char serving[SL_RS_MAX_NODES] = {0};
    for (int s = 0; s < SL_RS_SLOTS; s++)
        serving[atomic_load_explicit(&rs->slots[s], memory_order_relaxed)] = 1;
    for (int i = 0; i < n; i++)
        if (!serving[i] && atomic_exchange(&rs->nodes[i]->down, 0) == 1) {
            atomic_fetch_sub(&rs->ndown, 1);
            changed = 1;
        }
    if (changed)
        report_state(rs, "the cluster's slots are all served again");
}

int sl_rs_apply_slots(sl_rstore *rs, int from, const redisReply *rep)
{
    if (!rep)
        return SL_ESTORE;
    if (rep->type == REDIS_REPLY_ERROR) {
        if (!strstr(rep->str, "cluster support disabled")) {
            /* NOAUTH, LOADING, NOPERM, ...: this node cannot be used now; say so (logged
             * once, counted, backed off) rather than deciding by the fail mode unseen */
            sl_rs_node_failed(rs, from, rep->str);
            return SL_ESTORE;
        }
        for (int s = 0; s < SL_RS_SLOTS; s++)
            atomic_store_explicit(&rs->slots[s], (uint8_t)from, memory_order_relaxed);
        atomic_store(&rs->topology, 1);
        return SL_OK;
    }
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements == 0)
        return SL_ESTORE; /* a cluster with no slots assigned yet */
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *r = rep->element[i];
        if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
            r->element[0]->type != REDIS_REPLY_INTEGER ||
            r->element[1]->type != REDIS_REPLY_INTEGER ||
            r->element[2]->type != REDIS_REPLY_ARRAY || r->element[2]->elements < 2)
            return SL_ESTORE;
        const redisReply *m = r->element[2];
        if (m->element[0]->type != REDIS_REPLY_STRING || m->element[1]->type != REDIS_REPLY_INTEGER)
            return SL_ESTORE;
        long long lo = r->element[0]->integer, hi = r->element[1]->integer;
        long long port = m->element[1]->integer; /* checked as parse_addr checks the others */
        if (port < 1 || port > 65535)
            return SL_ESTORE;
        int nd = sl_rs_node_index(rs, m->element[0]->str, m->element[0]->len, (int)port);
        if (nd < 0 || lo < 0 || hi >= SL_RS_SLOTS || lo > hi)
            return SL_ESTORE;
        for (long long s = lo; s <= hi; s++)
            atomic_store_explicit(&rs->slots[s], (uint8_t)nd, memory_order_relaxed);
    }
    atomic_store(&rs->topology, 2);
    forget_idle_failed(rs);
    return SL_OK;
}

/* ---- the near cache ---------------------------------------------------------------------- */

static nc_shard *nc_shard_of(sl_rstore *rs, uint64_t h) { return &rs->nc[h >> 58]; }
static nc_ent *nc_slot_of(nc_shard *s, uint64_t h) { return &s->e[h % NC_SLOTS]; }

/* Takes and peeks only: a status reports another limit's fields (the cost-0 decision's)
 * than a denial of cost 1 would, so an entry cannot answer it. */
static int nc_usable(const sl_rstore *rs, const sl_rcall *c)
{
    return !rs->o.no_near_cache && !c->explicit_now && !c->cp.has_lease &&
           (c->op == SL_RS_TAKE || c->op == SL_RS_PEEK) && !c->over;
}

/* Start `d` for limit `idx` of c's policy: zeroed, with the limit's own fields. */
static const sl_climit *report_limit(const sl_rcall *c, unsigned idx, sl_decision *d)
{
    const sl_climit *lim = &c->cp.lim[idx];
    memset(d, 0, sizeof *d);
    d->limit = lim->limit;
    d->limit_index = idx;
    d->algorithm = lim->algorithm;
    d->window = sl_climit_window(lim);
    return lim;
}

/* A denial known for this key, policy and this cost, still before its retry time? */
static int nc_lookup(sl_rstore *rs, const sl_rcall *c, sl_decision *d)
{
    uint64_t h = c->hash | 1;
    nc_shard *s = nc_shard_of(rs, h);
    int hit = 0;
    pthread_mutex_lock(&s->mu);
    nc_ent *e = nc_slot_of(s, h);
    /* the same cost only: a larger one is denied too, but for longer than the entry says */
    if (e->hash == h && e->policy == c->cp.fp && c->cost == e->cost && c->sent < e->until) {
        report_limit(c, e->limit_index, d);
        d->remaining = e->remaining;
        d->reset_after = e->reset_at > c->sent ? e->reset_at - c->sent : 0;
        d->retry_after = e->until - c->sent;
        d->tokens = e->tokens;
        d->reserve = e->reserve;
        d->source = SL_SOURCE_NEAR_CACHE;
        hit = 1;
    }
    pthread_mutex_unlock(&s->mu);
    return hit;
}

static void nc_insert(sl_rstore *rs, const sl_rcall *c, const sl_decision *d)
{
    uint64_t h = c->hash | 1;
    nc_shard *s = nc_shard_of(rs, h);
    pthread_mutex_lock(&s->mu);
    nc_ent *e = nc_slot_of(s, h);
    /* measured from when the request was prepared, so never later than Redis's own retry
       time (the round trip only shortens the local wait) */
    *e = (nc_ent){h, c->cp.fp, d->limit_index, c->cost, c->sent + d->retry_after,
                  c->sent + d->reset_after, d->remaining, d->tokens, d->reserve};
    pthread_mutex_unlock(&s->mu);
}

/* ---- the codec --------------------------------------------------------------------------- */

typedef struct obuf {
    char *p;
    size_t n, cap;
    int overflow;
} obuf;

static void put(obuf *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->overflow = 1;
        return;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static size_t u64_dec(char *out, uint64_t v)
{
    char t[24];
    size_t n = 0;
    do {
        t[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = t[n - 1 - i];
    return n;
}

/* "*<n>\r\n" (array) or "$<n>\r\n" (bulk string) */
static void put_header(obuf *b, char type, size_t n)
{
    char h[32];
    h[0] = type;
    size_t k = 1 + u64_dec(h + 1, n);
    h[k++] = '\r';
    h[k++] = '\n';
    put(b, h, k);
}

static void put_bulk(obuf *b, const void *s, size_t n)
{
    put_header(b, '$', n);
    put(b, s, n);
    put(b, "\r\n", 2);
}

static void put_num(obuf *b, uint64_t v)
{
    char t[24];
    put_bulk(b, t, u64_dec(t, v));
}

/* The Redis key: prefix, then "<tenant length>:<tenant>:<action length>:<action>:<client>"
 * (lengths in decimal, so any bytes are unambiguous and keys stay readable). */
static size_t redis_key(const sl_rstore *rs, const char *enc, size_t len, char *out)
{
    size_t tl = (unsigned char)enc[0], al = (unsigned char)enc[1], cl = len - 2 - tl - al;
    size_t n = rs->prefix_len;
    memcpy(out, rs->prefix, n);
    n += u64_dec(out + n, tl);
    out[n++] = ':';
    memcpy(out + n, enc + 2, tl);
    n += tl;
    out[n++] = ':';
    n += u64_dec(out + n, al);
    out[n++] = ':';
    memcpy(out + n, enc + 2 + tl, al);
    n += al;
    out[n++] = ':';
    memcpy(out + n, enc + 2 + tl + al, cl);
    return n + cl;
}

static int span_ok(const sl_cpolicy *cp)
{
    for (uint32_t i = 0; i < cp->nlimits; i++) {
        const sl_climit *c = &cp->lim[i];
        if (c->interval > SL_RS_MAX_SPAN || c->tau > SL_RS_MAX_SPAN ||
            c->window > SL_RS_MAX_SPAN || c->rinterval > SL_RS_MAX_SPAN ||
            c->rtau > SL_RS_MAX_SPAN)
            return 0;
    }
    return 1;
}

static const char *const op_names[] = {"take", "peek", "release", "status"};

/* Resolve, check and format. SL_OK or the error for the request. */
#define NEAR_HIT 1 /* encode: the near cache answered (d filled); nothing formatted */

static int encode(sl_rstore *rs, int op, const sl_key *k, const sl_policy *inl, uint64_t cost,
                  int64_t now, sl_rcall *c, sl_decision *d)
{
    char enc[SL_KEY_MAX];
    size_t len;
    int rc = sl_limiter_resolve(rs->l, k, inl, enc, &len, &c->hash, &c->cp);
    if (rc != SL_OK)
        return rc;
    if (!span_ok(&c->cp))
        return SL_ESPAN;
    /* a cost above the capacity is SL_ECOST, answered with what a take of cost 0 shows */
    c->over = op != SL_RS_RELEASE && cost > c->cp.max_cost;
    if (c->over) {
        op = SL_RS_PEEK;
        cost = 0;
    }
    c->op = op;
    c->cost = cost;
    c->explicit_now = now != SL_NOW;
    c->sent = sl_mono_ns();
    c->asking = 0;
    c->redirects = 0;
    c->tenant_len = (unsigned char)enc[0];
    memcpy(c->tenant, enc + 2, c->tenant_len);
    if (d && nc_usable(rs, c) && nc_lookup(rs, c, d)) /* before any formatting: under attack */
        return NEAR_HIT;                              /* this is most requests */

    char key[SL_RS_PREFIX_MAX + SL_KEY_MAX + 16];
    size_t klen = redis_key(rs, enc, len, key);
    c->slot = sl_rs_slot(key, klen);
    c->node = atomic_load_explicit(&rs->slots[c->slot], memory_order_relaxed);

    obuf b = {c->cmd, 0, sizeof c->cmd, 0};
    put_header(&b, '*', 8 + 6 * (size_t)c->cp.nlimits);
    put_bulk(&b, "FCALL", 5);
    put_bulk(&b, sl_rs_function(), strlen(sl_rs_function()));
    put_bulk(&b, "1", 1);
    c->key_off = (uint16_t)b.n;
    put_bulk(&b, key, klen);
    c->tail_off = (uint16_t)b.n;
    if (now == SL_NOW)
        put_bulk(&b, "", 0);
    else
        put_num(&b, (uint64_t)now);
    put_bulk(&b, op_names[op], strlen(op_names[op]));
    put_num(&b, cost);
    put_num(&b, c->cp.nlimits);
    for (uint32_t i = 0; i < c->cp.nlimits; i++) {
        const sl_climit *lim = &c->cp.lim[i];
        put_num(&b, (uint64_t)lim->algorithm);
        put_num(&b, lim->limit);
        put_num(&b, (uint64_t)lim->interval);
        put_num(&b, (uint64_t)lim->window);
        put_num(&b, (uint64_t)lim->rinterval);
        put_num(&b, lim->rcap);
    }
    if (b.overflow)
        return SL_EINVAL; /* cannot happen: SL_RS_CMD_MAX covers the longest request */
    c->len = b.n;
    return SL_OK;
}

/* Requests that can share one call: on one Redis (not a cluster: there a call's keys must
 * share a slot, and a slot half migrated refuses a call of several keys), takes, peeks or
 * statuses alike in every argument but the key (time, op, cost, limits), neither
 * redirected. */
static int groupable(sl_rstore *rs, const sl_rcall *a, const sl_rcall *b)
{
    size_t ta = a->len - a->tail_off, tb = b->len - b->tail_off;
    return atomic_load_explicit(&rs->topology, memory_order_relaxed) == 1 &&
           a->op != SL_RS_RELEASE && a->op == b->op && a->node == b->node && !a->asking &&
           !b->asking && ta == tb &&
           !memcmp(a->cmd + a->tail_off, b->cmd + b->tail_off, ta);
}

size_t sl_rs_plan_groups(sl_rstore *rs, sl_rcall *const *calls, size_t n, size_t *order,
                         size_t *size)
{
    size_t lead[SL_RS_GROUP_MAX]; /* index of the first member of call i's group */
    for (size_t i = 0; i < n; i++)
        lead[i] = SIZE_MAX;
    size_t ng = 0, k = 0;
    for (size_t i = 0; i < n; i++) {
        if (lead[i] != SIZE_MAX)
            continue;
        lead[i] = i;
        order[k++] = i;
        size[ng] = 1;
        /* keys of the requests passed over: they go after this group, so a request for one
         * of them may not join it (it would overtake them) */
        uint64_t passed[SL_RS_GROUP_MAX];
        size_t np = 0;
        for (size_t j = i + 1; j < n; j++) {
            if (lead[j] != SIZE_MAX)
                continue;
            int join = groupable(rs, calls[i], calls[j]);
            for (size_t q = 0; join && q < np; q++)
                join = passed[q] != calls[j]->hash;
            if (join) {
                lead[j] = i;
                order[k++] = j;
                size[ng]++;
            } else {
                passed[np++] = calls[j]->hash;
            }
        }
        ng++;
    }
    return ng;
}

size_t sl_rs_group_cmd(sl_rcall *const *calls, int n, char *out, size_t cap)
{
    const sl_rcall *c0 = calls[0];
    obuf b = {out, 0, cap, 0};
    put_header(&b, '*', 7 + (size_t)n + 6 * (size_t)c0->cp.nlimits);
    put_bulk(&b, "FCALL", 5);
    put_bulk(&b, sl_rs_function(), strlen(sl_rs_function()));
    put_num(&b, (uint64_t)n);
    for (int i = 0; i < n; i++)
        put(&b, calls[i]->cmd + calls[i]->key_off, calls[i]->tail_off - calls[i]->key_off);
    put(&b, c0->cmd + c0->tail_off, c0->len - c0->tail_off);
    return b.overflow ? 0 : b.n;
}

static int prepare(sl_rstore *rs, int op, const sl_request *r, uint64_t cost, int64_t now,
                   sl_rcall *call, sl_decision *d)
{
    int rc = encode(rs, op, &r->key, r->inline_policy, cost, now, call, d);
    if (rc == NEAR_HIT) {
        BUMP(rs->near);
        if (op == SL_RS_TAKE)
            sl_limiter_count(rs->l, call->tenant, call->tenant_len, 0);
        return 1;
    }
    if (rc != SL_OK) {
        memset(d, 0, sizeof *d);
        d->err = rc;
        return 1;
    }
    return 0;
}

int sl_rs_prepare(sl_rstore *rs, const sl_request *r, int64_t now, sl_rcall *call,
                  sl_decision *d)
{
    return prepare(rs, r->peek || r->cost == 0 ? SL_RS_PEEK : SL_RS_TAKE, r, r->cost, now, call,
                   d);
}

int sl_rs_prepare_status(sl_rstore *rs, const sl_request *r, int64_t now, sl_rcall *call,
                         sl_decision *d)
{
    return prepare(rs, SL_RS_STATUS, r, 1, now, call, d); /* cost: the request it imagines */
}

int sl_rs_prepare_release(sl_rstore *rs, const sl_key *k, uint64_t lease, int64_t now,
                          sl_rcall *call, int *rc)
{
    *rc = encode(rs, SL_RS_RELEASE, k, NULL, lease, now, call, NULL);
    /* The script issues ids below 2^53 (microseconds of a time below 2^62 ns) and refuses a
     * larger one as an argument it cannot hold exactly: that would come back as an error
     * reply and be answered SL_ESTORE ("Redis unreachable"). No take issued it: unknown. */
    if (*rc == SL_OK && lease >= SL_RS_MAX_LEASE)
        *rc = SL_ELEASE;
    return *rc != SL_OK;
}

/* "MOVED 3999 127.0.0.1:6381" / "ASK ...": the node index of the target, or -1. */
static int redirect_target(sl_rstore *rs, const char *msg, size_t len)
{
    const char *sp = memchr(msg, ' ', len);
    if (!sp)
        return -1;
    const char *addr = memchr(sp + 1, ' ', len - (size_t)(sp + 1 - msg));
    if (!addr)
        return -1;
    addr++;
    const char *host;
    size_t hl;
    int port;
    if (parse_addr(addr, len - (size_t)(addr - msg), &host, &hl, &port) != SL_OK)
        return -1;
    return sl_rs_node_index(rs, host, hl, port);
}

static int is_int(const redisReply *r) { return r->type == REDIS_REPLY_INTEGER; }

/* hiredis 0.14 allocates an array's element pointers as soon as it reads the header, so one
 * "*1000000000" line from a broken or hostile server costs 8 GB of address space. No reply we
 * read has more than SL_RS_MAX_ARRAY elements (CLUSTER SLOTS: one per slot range, at most
 * 16384), so a longer one is refused: the reader fails as out of memory, the connection is
 * dropped, and its requests are decided by the fail mode. */
static redisReplyObjectFunctions capped_fns;
static void *(*plain_array)(const redisReadTask *, int);
static pthread_once_t capped_once = PTHREAD_ONCE_INIT;

static void *capped_array(const redisReadTask *t, int elements)
{
    return elements > SL_RS_MAX_ARRAY ? NULL : plain_array(t, elements);
}

static void capped_init(void)
{
    redisReader *r = redisReaderCreate(); /* hiredis's own functions, to wrap */
    if (!r)
        abort();
    capped_fns = *r->fn;
    plain_array = capped_fns.createArray;
    capped_fns.createArray = capped_array;
    redisReaderFree(r);
}

void sl_rs_cap_reader(redisReader *r)
{
    pthread_once(&capped_once, capped_init);
    r->fn = &capped_fns;
}

/* The script's reply to a take, peek or status (redis_script.lua, REPLY): 74 bytes,
 * little-endian: allowed and limit index as bytes, then nine doubles. */
#define REPLY_LEN 74

static double le_double(const char *p) /* the host is little-endian (snapshot.c checks) */
{
    uint64_t u = sl_ld8(p);
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* The integral double at p into *out; 0 unless it is an integer in [0, 2^53]. */
static int le_count(const char *p, int64_t *out)
{
    double v = le_double(p);
    if (!(v >= 0 && v <= 9007199254740992.0) || v != (double)(int64_t)v)
        return 0;
    *out = (int64_t)v;
    return 1;
}

int sl_rs_decode(const char *p, size_t len, unsigned nlimits, sl_rs_reply *r)
{
    if (len != REPLY_LEN || (unsigned char)p[0] > 1 || (unsigned char)p[1] >= nlimits)
        return 0;
    r->allowed = p[0];
    r->index = (unsigned char)p[1];
    int64_t *ints[] = {&r->remaining, &r->reset_after, &r->retry_after, &r->delay};
    for (int i = 0; i < 4; i++)
        if (!le_count(p + 2 + 8 * i, ints[i]))
            return 0;
    r->tokens = le_double(p + 34);
    r->reserve = le_double(p + 42);
    int64_t sec, ns;
    if (!le_count(p + 50, &r->lease) || !le_count(p + 58, &sec) || !le_count(p + 66, &ns) ||
        ns >= 1000000000 || sec > INT64_MAX / 1000000000 - 1)
        return 0;
    r->now = sec * 1000000000 + ns;
    return 1;
}

/* sl_rs_finish; count_error 0: an error reply not counted (another member of the same
 * group reply counted it). */
static int finish(sl_rstore *rs, sl_rcall *c, const redisReply *rep, sl_decision *d,
                  int *release_rc, int count_error)
{
    if (!rep)
        return SL_RS_FAILED;
    if (rep->type == REDIS_REPLY_ERROR) {
        size_t n = rep->len;
        int moved = n > 6 && !memcmp(rep->str, "MOVED ", 6);
        int ask = n > 4 && !memcmp(rep->str, "ASK ", 4);
        if (strstr(rep->str, "Function not found"))
            return SL_RS_NOTLOADED;
        if (moved || ask) {
            int to = redirect_target(rs, rep->str, n);
            if (to < 0 || ++c->redirects > MAX_REDIRECTS)
                return SL_RS_FAILED;
            BUMP(rs->redirects);
            if (moved) /* the slot lives there now */
                atomic_store_explicit(&rs->slots[c->slot], (uint8_t)to, memory_order_relaxed);
            c->node = to;
            c->asking = ask;
            return SL_RS_RESEND;
        }
        if (count_error)
            BUMP(rs->errors); /* CLUSTERDOWN, TRYAGAIN, LOADING, NOAUTH, a script error, ... */
        return SL_RS_FAILED;
    }
    if (c->op == SL_RS_RELEASE) {
        if (!is_int(rep))
            return SL_RS_FAILED;
        BUMP(rs->calls);
        *release_rc = rep->integer == 1 ? SL_OK : SL_ELEASE;
        return SL_RS_DONE;
    }
    sl_rs_reply r;
    if (rep->type != REDIS_REPLY_STRING ||
        !sl_rs_decode(rep->str, rep->len, c->cp.nlimits, &r))
        return SL_RS_FAILED;
    report_limit(c, r.index, d);
    d->allowed = r.allowed;
    d->remaining = (uint64_t)r.remaining;
    d->reset_after = r.reset_after;
    d->retry_after = r.retry_after;
    d->delay = r.delay;
    d->tokens = r.tokens;
    d->reserve = r.reserve;
    d->lease = (uint64_t)r.lease;
    d->source = SL_SOURCE_STORE;
    BUMP(rs->calls);
    if (c->over)
        sl_over_cost(d);
    if (c->op == SL_RS_TAKE) {
        sl_limiter_count(rs->l, c->tenant, c->tenant_len, d->allowed);
        /* Only a denial whose `remaining` cannot change before its retry time: one unit
         * short of the cost (always so for cost 1). With fewer left, a refilling bucket or
         * a sliding window would show more units left (still denied) before then, and the
         * cached answer would go on showing the old count. */
        if (!d->allowed && d->retry_after > 0 && d->remaining + 1 >= c->cost &&
            nc_usable(rs, c))
            nc_insert(rs, c, d);
    }
    return SL_RS_DONE;
}

int sl_rs_finish(sl_rstore *rs, sl_rcall *c, const redisReply *rep, sl_decision *d,
                 int *release_rc)
{
    return finish(rs, c, rep, d, release_rc, 1);
}

int sl_rs_finish_member(sl_rstore *rs, sl_rcall *c, const redisReply *group, size_t i,
                        size_t n, sl_decision *d, int *release_rc)
{
    if (group && group->type == REDIS_REPLY_ARRAY && group->elements == n)
        return finish(rs, c, group->element[i], d, release_rc, 1);
    if (group && group->type == REDIS_REPLY_ERROR)
        return finish(rs, c, group, d, release_rc, i == 0);
    if (group && i == 0)
        BUMP(rs->errors); /* not the reply of a call of n keys (no reply: the transport's
                             failed connection counted already) */
    return SL_RS_FAILED;
}

void sl_rs_fallback(sl_rstore *rs, const sl_rcall *c, sl_decision *d, int *release_rc)
{
    if (c->op == SL_RS_RELEASE) {
        *release_rc = SL_ESTORE;
        return;
    }
    report_limit(c, 0, d);
    if (c->over) { /* an error whatever Redis holds, not a decision of the fail mode; what
                      is left is unknown (0) */
        sl_over_cost(d);
        d->source = rs->o.fail_mode == SL_FAIL_OPEN ? SL_SOURCE_FAIL_OPEN : SL_SOURCE_FAIL_CLOSED;
        return;
    }
    atomic_store_explicit(&rs->last_fallback, sl_mono_ns(), memory_order_relaxed);
    if (rs->o.fail_mode == SL_FAIL_OPEN) {
        d->allowed = 1;
        d->source = SL_SOURCE_FAIL_OPEN;
        BUMP(rs->fopen);
    } else {
        d->retry_after = FAIL_CLOSED_RETRY;
        d->source = SL_SOURCE_FAIL_CLOSED;
        BUMP(rs->fclosed);
    }
    if (c->op == SL_RS_TAKE)
        sl_limiter_count(rs->l, c->tenant, c->tenant_len, d->allowed);
}
