/*
 * redis_link.h — a worker's connections to the Redis store (distributed mode).
 *
 * Each worker has its own link: one hiredis asynchronous context per Redis node on the
 * worker's libuv loop (attached by redis_link.c's own hooks), opened on first use. The link
 * is the admission scheduler's `submit`: every request of a batch is prepared by the store
 * (policy resolved, near cache consulted, FCALL formatted), requests alike in all but the key
 * are joined into one call (sl_rs_plan_groups), and each call is written to its node's
 * connection, so requests from all of the worker's clients share one pipelined connection
 * per node, in order. Replies come back in order; "Function not found" loads the library,
 * holding the refused requests and any later ones until it is loaded; MOVED/ASK resend to
 * the node named; and a failed connection, a reply overdue by the store's timeout, or a node
 * in back-off decides by the fail mode.
 */
#ifndef SD_REDIS_LINK_H
#define SD_REDIS_LINK_H

#include <uv.h>

#include "admission.h"

typedef struct sd_rlink sd_rlink;
struct sl_rstore;

/* Becomes `sched`'s submit function. NULL when out of memory. */
sd_rlink *sd_rlink_new(uv_loop_t *loop, struct sl_rstore *rs, sd_sched *sched);
/* Stopping: drop the connections (requests in flight are decided by the fail mode) and close
 * the link's handles; the loop must run once more before sd_rlink_free. */
void sd_rlink_close(sd_rlink *lk);
void sd_rlink_free(sd_rlink *lk);

#endif
