/*
 * redis.h — the Redis store: decisions as one atomic Lua function call per request on Redis or
 * Redis Cluster (redis_script.lua, loaded as a Redis Function library; its arguments and
 * reply are described there).
 *
 * Two transports share everything below:
 *  - the library's own, blocking (redis.c): sl_take & co. on a limiter opened with
 *    sl_options.redis, pipelined per batch over pooled hiredis connections;
 *  - sluiced's, asynchronous: hiredis contexts on each worker's libuv loop, which call
 *    sl_rs_prepare / sl_rs_finish / sl_rs_fallback around their own I/O and use the slot map
 *    and node table here.
 *
 * A request's life: sl_rs_prepare validates and resolves it (the limiter's rules), and either
 * decides it locally (bad input, the near cache) or formats its FCALL command and names the
 * node it goes to. The transport sends it; the reply goes to sl_rs_finish, which either fills
 * the decision or says what to do: load the library and resend ("Function not found"), resend to another
 * node (MOVED, which also updates the slot map), or resend there after ASKING (ASK). When the
 * node cannot be reached, sl_rs_fallback decides by the fail mode.
 *
 * Thread-safety: everything here may be called from any thread at once.
 */
#ifndef SL_REDIS_H
#define SL_REDIS_H

#include <stddef.h>
#include <stdint.h>

#include "policy.h"
#include "sluice.h"

typedef struct sl_rstore sl_rstore;
struct redisReply;

#define SL_RS_MAX_NODES 256
#define SL_RS_SLOTS 16384
#define SL_RS_CMD_MAX 2048 /* an FCALL command: key <= ~800 bytes, 4 limits of 6 numbers */
#define SL_RS_MAX_SPAN (INT64_C(1) << 52)
#define SL_RS_PREFIX_MAX 64
#define SL_RS_MAX_LEASE (INT64_C(1) << 53) /* lease ids the script issues are below */

/* SL_RS_STATUS: sluiced's GET /api/status in one call: what a take of cost 0 shows (the key
 * as it is now: limit, remaining, reset_after, ...) with allowed and retry_after of a peek of
 * cost 1 at the same time (the script's op "status"). */
enum { SL_RS_TAKE, SL_RS_PEEK, SL_RS_RELEASE, SL_RS_STATUS };

/* One request on its way to Redis. */
typedef struct sl_rcall {
    int op;                 /* SL_RS_* */
    int node;               /* where to send it (index into the node table) */
    int asking;             /* send ASKING first (an ASK redirection) */
    int redirects;          /* redirections followed so far */
    uint16_t slot;
    uint64_t cost;          /* or the lease id (release) */
    uint64_t hash;          /* of the encoded key (near cache) */
    int64_t sent;           /* local clock when prepared (near cache) */
    int explicit_now;       /* the caller gave `now` (no near cache) */
    int over;               /* the cost is above the capacity: SL_ECOST, sent as a peek of
                               cost 0 for what is left */
    sl_cpolicy cp;          /* resolved policy (a copy: it may be collected meanwhile) */
    size_t tenant_len;
    char tenant[SL_MAX_ID_LEN];
    size_t len;
    uint16_t key_off;       /* cmd[key_off..tail_off): the key's bulk string */
    uint16_t tail_off;      /* cmd[tail_off..len): the arguments after the key */
    char cmd[SL_RS_CMD_MAX];/* the formatted FCALL (RESP) */
} sl_rcall;

/* From sl_options.redis; SL_EADDRESS for a bad server list, SL_EINVAL, SL_ENOMEM. Does not
 * connect (the first decision does). */
int sl_rs_new(sl_limiter *l, const sl_redis_options *o, sl_rstore **out);
void sl_rs_free(sl_rstore *rs);

/* Prepare request `r` at `now` (SL_NOW: Redis's clock): a take, or a peek when r->peek or
 * r->cost is 0. Returns 1 when `d` is decided already (d->err set for bad input; or the near
 * cache), else 0 with `call` ready to send. */
int sl_rs_prepare(sl_rstore *rs, const sl_request *r, int64_t now, sl_rcall *call,
                  sl_decision *d);
/* Prepare a status of r's key and inline policy (r->cost and r->peek are ignored): as a take
 * of cost 0, with d->allowed and d->retry_after those of a peek of cost 1 at the same time,
 * in one call (SL_RS_STATUS). Never answered by the near cache. Returns as sl_rs_prepare. */
int sl_rs_prepare_status(sl_rstore *rs, const sl_request *r, int64_t now, sl_rcall *call,
                         sl_decision *d);
/* Prepare a release of `lease` on key `k`; returns 1 with *rc set when decided already. */
int sl_rs_prepare_release(sl_rstore *rs, const sl_key *k, uint64_t lease, int64_t now,
                          sl_rcall *call, int *rc);

/* Requests alike in all but the key can share one FCALL (a group) on one Redis (not a
 * cluster): takes, peeks or statuses with the same time, op, cost and limits, neither
 * redirected.
 * Each key of a group is decided as its own call would be (redis_script.lua, CALL); the
 * group saves Redis the call's own cost per key. */
#define SL_RS_GROUP_MAX 64
/* Plan the groups of calls[0..n), 1 <= n <= SL_RS_GROUP_MAX, to be sent in order: returns
 * the number of groups; group g has size[g] members, whose indices follow those of the
 * groups before it in order[0..n) (in index order; a call alone is a group of 1). A call
 * joins the group of the first earlier one it can share a call with, unless it would
 * overtake a call for the same key that is not in that group: per key, calls run in their
 * order. */
size_t sl_rs_plan_groups(sl_rstore *rs, sl_rcall *const *calls, size_t n, size_t *order,
                         size_t *size);
/* Format one FCALL for calls[0..n), 2 <= n <= SL_RS_GROUP_MAX, a group planned by
 * sl_rs_plan_groups, into out[0..cap) (n * SL_RS_CMD_MAX bytes always suffice). Its length, or 0 if
 * cap is too small. The reply is an array of n elements, element i the reply to calls[i]
 * for sl_rs_finish; any other reply (an error: "Function not found", MOVED, ...) answers
 * every member as if each had been sent alone. */
size_t sl_rs_group_cmd(sl_rcall *const *calls, int n, char *out, size_t cap);
/* sl_rs_finish for member i of a group of n, given the group's reply (NULL: none): element
 * i of the array of n replies (an error element is that key's own failure: the script
 * decides each key apart, so the others stand). An error reply for the whole call is every
 * member's own (a redirection is followed; "Function not found" loads the library; any
 * other: the fail mode); Redis gives those before the function runs, so no key was decided.
 * Anything else fails every member. An error reply counts once in the store's errors. */
int sl_rs_finish_member(sl_rstore *rs, sl_rcall *c, const struct redisReply *group, size_t i,
                        size_t n, sl_decision *d, int *release_rc);

/* Make reader `r` (a redisContext's c->reader) refuse arrays longer than SL_RS_MAX_ARRAY
 * instead of allocating them. Every connection to Redis calls it before reading. */
#define SL_RS_MAX_ARRAY 65536
struct redisReader;
void sl_rs_cap_reader(struct redisReader *r);

/* The function's reply to a take, peek or status, decoded (redis_script.lua, REPLY). */
typedef struct sl_rs_reply {
    int allowed;
    unsigned index; /* < the policy's nlimits */
    int64_t remaining, reset_after, retry_after, delay, lease;
    double tokens, reserve;
    int64_t now; /* ns the script decided at */
} sl_rs_reply;

/* 1 and *r when p[0..len) is a well-formed reply for a policy of nlimits limits, else 0. */
int sl_rs_decode(const char *p, size_t len, unsigned nlimits, sl_rs_reply *r);

/* What sl_rs_finish says about a reply. */
enum {
    SL_RS_DONE,     /* `d` (or *release_rc) is filled */
    SL_RS_RESEND,   /* send call->cmd again to call->node (after ASKING if call->asking) */
    SL_RS_NOTLOADED, /* FUNCTION LOAD REPLACE sl_rs_script() on that connection, then resend
                       (the node does not have the library: new, restarted, flushed) */
    SL_RS_FAILED    /* the node failed this request (CLUSTERDOWN, TRYAGAIN, too many
                       redirections, a malformed reply): use sl_rs_fallback */
};
int sl_rs_finish(sl_rstore *rs, sl_rcall *call, const struct redisReply *rep, sl_decision *d,
                 int *release_rc);
/* Decide `call` by the fail mode (d), or SL_ESTORE for a release (*release_rc). */
void sl_rs_fallback(sl_rstore *rs, const sl_rcall *call, sl_decision *d, int *release_rc);

/* The script as a Redis Function library (for FUNCTION LOAD REPLACE) and the name of its
 * function (for FCALL): "sluice_" and 16 hex digits of the script's SHA1. */
const char *sl_rs_script(size_t *len);
const char *sl_rs_function(void);

/* ---- nodes, slots, health (for transports) ---- */
typedef struct sl_rnode {
    char host[256];
    int port;
} sl_rnode;
int sl_rs_nnodes(sl_rstore *rs);
const sl_rnode *sl_rs_node(sl_rstore *rs, int i);
const sl_redis_options *sl_rs_options(sl_rstore *rs);
/* The node index for host:port, added to the table if new (-1: table full). */
int sl_rs_node_index(sl_rstore *rs, const char *host, size_t hostlen, int port);
/* Apply a CLUSTER SLOTS reply (or, when it is an error saying cluster support is disabled,
 * mark the store standalone: every slot on node `from`). SL_OK or SL_ESTORE. */
int sl_rs_apply_slots(sl_rstore *rs, int from, const struct redisReply *rep);
int sl_rs_topology_known(sl_rstore *rs);
/* The node serving `slot` (as far as known). */
int sl_rs_slot_node(sl_rstore *rs, uint16_t slot);
/* 1 (once, for one caller) when the cluster's slot map should be asked for again: a node
 * failed since the last refresh, and the last refresh was 100 ms ago or more. */
int sl_rs_claim_refresh(sl_rstore *rs);
int sl_rs_is_cluster(sl_rstore *rs);

/* Health of node i, as every transport reports it: a failure starts (or doubles) its back-off
 * (50 ms .. 2 s), a success clears it. sl_rs_node_usable says whether to try it now (not
 * within its back-off). The store's up/down state (and on_state) follows these. */
void sl_rs_node_failed(sl_rstore *rs, int i, const char *why);
void sl_rs_node_ok(sl_rstore *rs, int i, int64_t sent); /* sent: sl_mono_ns() of the request */
int sl_rs_node_usable(sl_rstore *rs, int i, int64_t now_mono);
/* Is node i marked unreachable (failed, and no success since)? */
int sl_rs_node_down(sl_rstore *rs, int i);

/* Test hook: the next n allocations of a group's command buffer (redis_sync.c) succeed, every
 * later one fails; n < 0 (the default) turns it off. Process-wide. */
void sl_rs_fail_group_allocs_after(long n);

void sl_rs_count_reconnect(sl_rstore *rs);
void sl_rs_count_script_load(sl_rstore *rs);
void sl_rs_stats(sl_rstore *rs, sl_store_stats *out);

/* ---- the library's blocking transport (redis_sync.c) ---- */
struct sl_rpool; /* a node's idle connections */
struct sl_rpool **sl_rs_pool_slot(sl_rstore *rs, int i); /* node i's, made on first use */
void sl_rs_pool_free(struct sl_rpool *p);
/* sl_take_batch on the store (now: SL_NOW = Redis's clock); sl_take and sl_peek are batches
 * of one. */
int sl_rs_batch(sl_rstore *rs, const sl_request *reqs, size_t n, int64_t now,
                sl_decision *out);
int sl_rs_release(sl_rstore *rs, const sl_key *k, uint64_t lease, int64_t now);

/* Redis slot of a key (CRC16/XMODEM of the key or of its {hash tag}, mod 16384). */
uint16_t sl_rs_slot(const char *key, size_t len);

#endif
