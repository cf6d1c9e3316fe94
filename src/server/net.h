/*
 * net.h — connections as the protocol code sees them.
 *
 * A worker reads into the connection's input buffer and calls its protocol's `feed`, which
 * handles the complete requests in it (answering at once, or submitting decisions to the
 * admission scheduler, up to SD_PIPELINE_MAX undecided) and says how many bytes it used.
 * Replies go out in request order, as many as are ready in one write. While a write is
 * pending, or too many requests are undecided, the connection is not read (backpressure: a
 * client that does not read its replies stops being served, and buffers stay bounded).
 */
#ifndef SD_NET_H
#define SD_NET_H

#include <stddef.h>
#include <stdint.h>

#include "resp.h"
#include "server.h"

#define SD_IN_MAX (1024 * 1024 + 2 * RESP_MAX_BULK) /* input a connection may buffer */
/* Undecided requests one connection may have: `feed` stops parsing at this many (the rest
 * stays in the input buffer, and the connection is not read, until some are decided). */
#define SD_PIPELINE_MAX 256
/* Parsing also stops between requests while this many reply bytes wait to be written (a
 * client that sends requests without reading the replies: /metrics, say, 2,000 times). */
#define SD_REPLY_HIGH (256 * 1024)
/* Reply bytes this connection holds: written out, or waiting behind its decisions. */
size_t sd_conn_reply_bytes(const struct sd_conn *c);

#include "admission.h"

typedef struct sd_proto {
    const char *name;
    int (*open)(sd_conn *c);     /* allocate c->state; 0 or -1 (connection refused) */
    size_t (*feed)(sd_conn *c);  /* see above */
    void (*close)(sd_conn *c);   /* free c->state */
    /* Write the reply of a finished (decided or rejected) item. */
    void (*emit)(sd_conn *c, sd_item *it, resp_buf *out);
    /* What a connection refused for --max-connections is told before it is closed. */
    const char *full;
} sd_proto;

struct sd_conn {
    sd_server *srv;
    const sd_proto *proto;
    void *state;          /* the protocol's */
    uint64_t id;          /* unique in this process, from 1 */
    char *in;
    size_t in_len, in_cap;
    resp_buf out;         /* replies not yet written (any protocol) */
    int close_after_write;/* set by the protocol: QUIT, protocol error, HTTP Connection: close */
    int64_t last_active_ms;
    char peer[64];        /* "127.0.0.1:5432", for logs */
    sd_sched *sched;      /* the worker's admission scheduler */
    sd_item *items, *items_tail; /* requests whose replies are not written yet, in order */
    size_t items_waiting;        /* of those, how many are not decided yet */
    size_t lit_closed;           /* reply bytes in literal items that are no longer the tail */
    int64_t req_started_ms;      /* when the request (or command) being received began, or
                                    the last one completed before it (0: none); one that
                                    takes --idle-timeout is a slowloris (sd_conn_request_timer) */
    int ordered_wait; /* feed stopped at a request that must see every earlier decision of
                         this connection (a rule change after a take): reading pauses, and
                         feed runs again once items_waiting is 0 */
    int dirty;                   /* on the scheduler's list of connections with new replies */
    sd_conn *dirty_next;
};

/* For a front end's feed, at its end: `completed`, whether a request (command) was completed
 * in this call; `partial`, whether one that has not arrived whole is left. The timer runs
 * from the read that began the partial request or completed the one before it, so a
 * connection whose requests keep completing is never cut off, however its writes split
 * them, while one that trickles a request in is (net.c, --idle-timeout). */
static inline void sd_conn_request_timer(sd_conn *c, int completed, int partial)
{
    if (completed || !partial)
        c->req_started_ms = 0;
    if (partial && !c->req_started_ms)
        c->req_started_ms = c->last_active_ms;
}

/* Run work(arg) on libuv's thread pool, then done(arg) on c's worker loop (for replies that
 * take long to build: the loop serves other connections meanwhile). -1 if it could not be
 * queued (nothing was run). The worker's loop does not end before done has run. */
int sd_offload(sd_conn *c, void (*work)(void *arg), void (*done)(void *arg), void *arg);

extern const sd_proto sd_proto_resp;
extern const sd_proto sd_proto_http;

#endif
