/*
 * redis_link.h — a worker's connections to the Redis store (distributed mode).
 *
 * Each worker has its own link: hiredis asynchronous contexts on the worker's libuv loop
 * (hiredis's libuv adapter), CONNS_PER_NODE per Redis node, opened on first use. The link is
 * the admission scheduler's `submit`: every request of a batch is prepared by the store
 * (policy resolved, near cache consulted, FCALL formatted) and written to its node's next
 * connection, so requests from all of the worker's clients share a few pipelined
 * connections. Replies come back in order per connection; "Function not found" loads the
 * library ahead of the resent request, MOVED/ASK resend to the node named, and a failed connection, a reply
 * overdue by the store's timeout, or a node in back-off decides by the fail mode.
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
