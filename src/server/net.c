/*
 * net.c — worker threads, listeners and connections (libuv).
 *
 * Every worker has its own loop and its own listening socket per front end, all bound to the
 * same address with SO_REUSEPORT, so the kernel spreads new connections over the workers and
 * no lock is shared on accept. Listeners are opened by the main thread before any worker
 * starts, so a port that cannot be bound is reported at once and nothing is left running.
 *
 * Stopping: the main thread sets `stopping` and wakes every worker. A worker closes its
 * listeners at once, closes each connection as soon as it has no reply left to write, and
 * after `shutdown_timeout_ms` closes whatever is left. Its loop then runs out of handles.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "net.h"
#include "redis_link.h"

#define READ_CHUNK (64 * 1024)

typedef struct worker worker;

typedef struct conn {
    sd_conn c; /* first: protocol code gets &conn->c */
    uv_tcp_t tcp;
    uv_write_t wreq;
    uv_shutdown_t sreq;
    worker *w;
    int writing, closing;
    int64_t writing_since;  /* uv_now when the pending write began (a client not reading) */
    int paused;             /* reading stopped: SD_PIPELINE_MAX of its requests undecided, or
                               SD_REPLY_HIGH reply bytes unwritten */
    char *in_buf;           /* c.in = in_buf + in_off: consumed input is skipped, not moved */
    size_t in_off;
    int64_t draining_since; /* > 0: replies sent, FIN sent, input discarded until EOF */
    struct conn *prev, *next;
} conn;

struct worker {
    sd_server *srv;
    int idx;
    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t tick;
    uv_tcp_t lst[2]; /* RESP, HTTP */
    uv_check_t check; /* after each poll: run admission control */
    uv_idle_t idle;   /* active while requests wait: the loop must not block in poll */
    uv_timer_t retry; /* requests wait at the global cap: look again soon (not spinning) */
    sd_sched *sched;
    sd_rlink *rlink; /* the Redis store's connections (NULL: in-memory store) */
    int have[2];
    conn *conns;
    int stopping;
    int64_t deadline_ms;
    uv_thread_t thread;
};

static worker *g_workers;
static int g_nworkers;
static _Atomic uint64_t g_next_conn_id = 1;
static const sd_proto *const k_protos[2] = {&sd_proto_resp, &sd_proto_http};

/* ---- connections ---------------------------------------------------------------------- */

typedef struct offload {
    uv_work_t req;
    void (*work)(void *arg);
    void (*done)(void *arg);
    void *arg;
} offload;

static void offload_work(uv_work_t *req)
{
    offload *o = req->data;
    o->work(o->arg);
}

static void offload_done(uv_work_t *req, int status)
{
    (void)status; /* never cancelled */
    offload *o = req->data;
    o->done(o->arg);
    free(o);
}

int sd_offload(sd_conn *c, void (*work)(void *arg), void (*done)(void *arg), void *arg)
{
    offload *o = malloc(sizeof *o);
    if (!o)
        return -1;
    *o = (offload){.work = work, .done = done, .arg = arg};
    o->req.data = o;
    if (uv_queue_work(&((conn *)c)->w->loop, &o->req, offload_work, offload_done) != 0) {
        free(o);
        return -1;
    }
    return 0;
}


static void on_closed(uv_handle_t *h)
{
    conn *k = h->data;
    if (k->c.proto->close)
        k->c.proto->close(&k->c);
    if (k->prev)
        k->prev->next = k->next;
    else
        k->w->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    atomic_fetch_sub(&k->w->srv->m.connections_open, 1);
    sd_debug("conn %llu %s closed", (unsigned long long)k->c.id, k->c.peer);
    free(k->in_buf);
    resp_buf_free(&k->c.out);
    free(k);
}

static void conn_close(conn *k)
{
    if (k->closing)
        return;
    k->closing = 1;
    sd_conn_forget(&k->c); /* its undecided requests are dropped when their turn comes */
    uv_close((uv_handle_t *)&k->tcp, on_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void on_shutdown(uv_shutdown_t *req, int status)
{
    conn *k = req->data;
    if (status < 0)
        conn_close(k);
}

/* Close after the last reply without losing it: closing a socket that still has unread input
 * makes the kernel send RST, which can destroy the reply in flight (a client that pipelined
 * past a protocol error would never see the error). So: FIN first, then discard input until
 * the client closes (or a second passes). */
static void conn_finish(conn *k)
{
    if (k->closing || k->draining_since)
        return;
    k->draining_since = (int64_t)uv_now(&k->w->loop);
    k->sreq.data = k;
    if (uv_shutdown(&k->sreq, (uv_stream_t *)&k->tcp, on_shutdown) != 0) {
        conn_close(k);
        return;
    }
    uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    conn *k = h->data;
    sd_conn *c = &k->c;
    if (c->in_cap - k->in_off - c->in_len < READ_CHUNK && k->in_off) { /* compact */
        memmove(k->in_buf, c->in, c->in_len);
        k->in_off = 0;
        c->in = k->in_buf;
    }
    if (c->in_cap - c->in_len < READ_CHUNK && c->in_cap < SD_IN_MAX) {
        size_t cap = c->in_cap ? c->in_cap * 2 : READ_CHUNK;
        while (cap - c->in_len < READ_CHUNK && cap < SD_IN_MAX)
            cap *= 2;
        if (cap > SD_IN_MAX)
            cap = SD_IN_MAX;
        char *p = realloc(k->in_buf, cap);
        if (p) {
            k->in_buf = p;
            c->in = p;
            c->in_cap = cap;
        }
    }
    buf->base = k->in_buf ? c->in + c->in_len : NULL;
    buf->len = k->in_buf ? c->in_cap - k->in_off - c->in_len : 0; /* 0: UV_ENOBUFS */
}

static void flush(conn *k, int resume);

static void read_again(conn *k)
{
    if (!k->closing && !k->writing && !k->paused && !k->draining_since)
        uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read);
}

static void process_input(conn *k);

/* Move finished replies into `out`, take up input that waited for them, and write, unless a
 * write is already under way (then on_written comes back here). */
static void kick(conn *k)
{
    sd_conn *c = &k->c;
    /* a few rounds: parsing stops at SD_REPLY_HIGH unwritten reply bytes, and a write that
     * the socket takes at once makes room for more of the input already read. If input is
     * left after the last round, its replies go out through uv_write even when the socket
     * could take them now, so that on_written comes back here on the loop's next turn
     * (other connections are served meanwhile): nothing else would, and a pipeline of
     * immediate replies (INFO, GET /api/config) stalled until the client sent more. With no
     * reply to write, parsing waits for an undecided item (on_ready) or for more input. */
    for (int round = 0; round < 16; round++) {
        if (k->closing || k->writing || k->draining_since)
            return;
        sd_conn_drain(c);
        size_t before = c->in_len;
        /* input to parse; or, for a request waiting on earlier decisions, none undecided */
        if (!c->close_after_write && (c->ordered_wait ? !c->items_waiting : c->in_len != 0))
            process_input(k);
        flush(k, round == 15 && c->in_len != 0);
        if (k->closing || k->writing || c->in_len == 0 || c->in_len == before)
            break;
    }
    if (!k->closing && !k->writing && k->paused && c->items_waiting < SD_PIPELINE_MAX &&
        !c->ordered_wait && sd_conn_reply_bytes(c) < SD_REPLY_HIGH) {
        k->paused = 0;
        read_again(k);
    }
}

static void on_written(uv_write_t *req, int status)
{
    conn *k = req->data;
    k->writing = 0;
    resp_buf_reset(&k->c.out);
    if (status < 0) {
        conn_close(k);
        return;
    }
    kick(k);
    read_again(k);
}

/* Write everything in c->out. After the last reply of a connection asked to close: close.
 * resume: all of it through uv_write, so that on_written comes (see kick). */
static void flush(conn *k, int resume)
{
    sd_conn *c = &k->c;
    if (c->out.oom) {
        sd_error("conn %llu %s: out of memory for replies; closing", (unsigned long long)c->id,
                 c->peer);
        conn_close(k);
        return;
    }
    if (c->out.len) {
        uv_buf_t b = uv_buf_init(c->out.p, (unsigned)c->out.len);
        int n = resume ? 0 : uv_try_write((uv_stream_t *)&k->tcp, &b, 1);
        if (n == UV_EAGAIN)
            n = 0;
        if (n < 0) {
            conn_close(k);
            return;
        }
        if ((size_t)n < c->out.len) { /* the rest when the socket takes it */
            b = uv_buf_init(c->out.p + n, (unsigned)(c->out.len - (size_t)n));
            k->writing = 1;
            k->writing_since = (int64_t)uv_now(&k->w->loop);
            k->wreq.data = k;
            uv_read_stop((uv_stream_t *)&k->tcp);
            if (uv_write(&k->wreq, (uv_stream_t *)&k->tcp, &b, 1, on_written) != 0) {
                k->writing = 0;
                conn_close(k);
            }
            return;
        }
        resp_buf_reset(&c->out);
    }
    if (!c->items && (c->close_after_write || k->w->stopping))
        conn_finish(k);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    conn *k = s->data;
    sd_conn *c = &k->c;
    if (nread == UV_ENOBUFS && k->draining_since) {
        c->in_len = 0;
        return;
    }
    if (nread == UV_ENOBUFS) {
        sd_warn("conn %llu %s: request larger than %d bytes; closing",
                (unsigned long long)c->id, c->peer, SD_IN_MAX);
        conn_close(k);
        return;
    }
    if (nread < 0) {
        conn_close(k);
        return;
    }
    if (nread == 0)
        return;
    if (k->draining_since || c->close_after_write)
        return; /* after the last reply, or a request that closes (QUIT, a protocol error)
                   whose earlier replies are still undecided: input is read only to be dropped */
    c->in_len += (size_t)nread;
    c->last_active_ms = (int64_t)uv_now(&k->w->loop);
    kick(k);
}

/* Hand the buffered input to the protocol; stop reading while it has too much undecided, or
 * while it waits for this connection's decisions before a request that must follow them. */
static void process_input(conn *k)
{
    sd_conn *c = &k->c;
    size_t used = c->proto->feed(c);
    c->in += used; /* moved down only when on_alloc needs the room */
    k->in_off += used;
    c->in_len -= used;
    if (c->in_len == 0) {
        k->in_off = 0;
        c->in = k->in_buf;
        if (c->in_cap > 4 * READ_CHUNK) { /* give back what a burst took */
            free(k->in_buf);
            k->in_buf = c->in = NULL;
            c->in_cap = 0;
        }
    }
    if ((c->items_waiting >= SD_PIPELINE_MAX || c->ordered_wait ||
         sd_conn_reply_bytes(c) >= SD_REPLY_HIGH) &&
        !k->paused) {
        k->paused = 1;
        uv_read_stop((uv_stream_t *)&k->tcp);
    }
}

static void format_peer(uv_tcp_t *t, char *out, size_t len)
{
    struct sockaddr_storage ss;
    int n = sizeof ss;
    out[0] = 0;
    if (uv_tcp_getpeername(t, (struct sockaddr *)&ss, &n) != 0)
        return;
    char ip[INET6_ADDRSTRLEN] = "";
    int port = 0;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        uv_ip4_name(a, ip, sizeof ip);
        port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a, ip, sizeof ip);
        port = ntohs(a->sin6_port);
    }
    snprintf(out, len, "%s:%d", ip, port);
}

static void on_connection(uv_stream_t *l, int status)
{
    worker *w = l->data;
    sd_server *srv = w->srv;
    if (status < 0)
        return;
    conn *k = calloc(1, sizeof *k);
    if (!k)
        return;
    k->w = w;
    k->c.srv = srv;
    k->c.sched = w->sched;
    k->c.proto = k_protos[l == (uv_stream_t *)&w->lst[1]];
    k->c.id = atomic_fetch_add(&g_next_conn_id, 1);
    uv_tcp_init(&w->loop, &k->tcp);
    k->tcp.data = k;
    k->next = w->conns;
    if (w->conns)
        w->conns->prev = k;
    w->conns = k;
    atomic_fetch_add(&srv->m.connections_open, 1);
    if (uv_accept(l, (uv_stream_t *)&k->tcp) != 0) { /* state NULL: close() copes */
        k->closing = 1;
        uv_close((uv_handle_t *)&k->tcp, on_closed);
        return;
    }
    atomic_fetch_add(&srv->m.connections_total, 1);
    format_peer(&k->tcp, k->c.peer, sizeof k->c.peer);
    uint64_t open = atomic_load(&srv->m.connections_open);
    if (w->stopping || (srv->cfg.max_connections && open > (uint64_t)srv->cfg.max_connections) ||
        k->c.proto->open(&k->c) != 0) {
        atomic_fetch_add(&srv->m.connections_rejected, 1);
        if (!w->stopping) {
            sd_warn("conn %s refused: %llu connections open (max %d)", k->c.peer,
                    (unsigned long long)open, srv->cfg.max_connections);
            /* say why (best effort: a new socket's buffer takes these few bytes) */
            uv_buf_t b = uv_buf_init((char *)k->c.proto->full,
                                     (unsigned)strlen(k->c.proto->full));
            uv_try_write((uv_stream_t *)&k->tcp, &b, 1);
        }
        k->c.state = NULL;
        k->closing = 1;
        uv_close((uv_handle_t *)&k->tcp, on_closed);
        return;
    }
    uv_tcp_nodelay(&k->tcp, 1);
    k->c.last_active_ms = (int64_t)uv_now(&w->loop);
    sd_debug("conn %llu %s open (%s)", (unsigned long long)k->c.id, k->c.peer,
             k->c.proto->name);
    uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read);
}

/* ---- stopping and housekeeping ---------------------------------------------------------- */

static void close_if_done(worker *w)
{
    if (!w->stopping)
        return;
    int64_t now = (int64_t)uv_now(&w->loop);
    int late = now >= w->deadline_ms;
    for (conn *k = w->conns, *n; k; k = n) {
        n = k->next;
        if ((!k->writing && !k->c.items) || late)
            conn_close(k);
    }
    if (!w->conns) {
        sd_rlink_close(w->rlink);
        uv_handle_t *hs[] = {(uv_handle_t *)&w->tick, (uv_handle_t *)&w->wake,
                             (uv_handle_t *)&w->check, (uv_handle_t *)&w->idle,
                             (uv_handle_t *)&w->retry};
        for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++)
            if (!uv_is_closing(hs[i]))
                uv_close(hs[i], NULL);
    }
}

static void on_ready(sd_conn *c)
{
    kick((conn *)c);
}

static void on_idle(uv_idle_t *h)
{
    (void)h; /* its being active is the point: poll does not block while requests wait */
}

static void on_retry(uv_timer_t *t)
{
    (void)t; /* its firing is the point: the loop wakes and on_check runs the scheduler */
}

/* Requests that wait for the scheduler's next turn keep poll from blocking, except when they
 * wait at the global cap on the Redis store: the slots they need are freed by replies from
 * Redis, on this loop (which wakes it) or on another worker's (which does not), so the loop
 * looks again every RETRY_MS instead of spinning (it spun a core while a hung Redis held
 * every slot; found by review). On the in-memory store a slot is held only while another
 * worker decides a batch, microseconds: looking again at once is right there. */
#define RETRY_MS 1

static void on_check(uv_check_t *h)
{
    worker *w = h->data;
    size_t waiting = sd_sched_run(w->sched, (int64_t)uv_now(&w->loop), on_ready);
    if (uv_is_closing((uv_handle_t *)&w->idle))
        return;
    int capped = waiting && w->rlink && sd_sched_capped(w->sched);
    if (waiting && !capped)
        uv_idle_start(&w->idle, on_idle);
    else
        uv_idle_stop(&w->idle);
    if (capped && !uv_is_active((uv_handle_t *)&w->retry))
        uv_timer_start(&w->retry, on_retry, RETRY_MS, 0);
}

static void on_tick(uv_timer_t *t)
{
    worker *w = t->data;
    int idle = w->srv->cfg.idle_timeout_s;
    int64_t now = (int64_t)uv_now(&w->loop);
    for (conn *k = w->conns, *n; k; k = n) {
        n = k->next;
        if (k->draining_since && now - k->draining_since > 1000)
            conn_close(k);
    }
    if (idle > 0 && !w->stopping) {
        for (conn *k = w->conns, *n; k; k = n) {
            n = k->next;
            /* a connection waiting for its decisions is not idle (found by review) */
            if (!k->writing && !k->c.items_waiting &&
                now - k->c.last_active_ms > (int64_t)idle * 1000) {
                sd_debug("conn %llu %s idle for %d s; closing", (unsigned long long)k->c.id,
                         k->c.peer, idle);
                conn_close(k);
            } else if (k->c.req_started_ms && now - k->c.req_started_ms > (int64_t)idle * 1000) {
                /* a request trickling in, a byte now and then, keeps a connection active */
                sd_info("conn %llu %s: request not complete after %d s; closing",
                        (unsigned long long)k->c.id, k->c.peer, idle);
                conn_close(k);
            } else if (k->writing && now - k->writing_since > (int64_t)idle * 1000) {
                /* a client that stopped reading its replies holds their memory */
                sd_info("conn %llu %s has not read its replies for %d s; closing",
                        (unsigned long long)k->c.id, k->c.peer, idle);
                conn_close(k);
            }
        }
    }
    close_if_done(w);
}

static void on_wake(uv_async_t *a)
{
    worker *w = a->data;
    if (!atomic_load(&w->srv->stopping) || w->stopping)
        return;
    w->stopping = 1;
    w->deadline_ms = (int64_t)uv_now(&w->loop) + w->srv->cfg.shutdown_timeout_ms;
    for (int i = 0; i < 2; i++)
        if (w->have[i])
            uv_close((uv_handle_t *)&w->lst[i], NULL);
    uv_timer_start(&w->tick, on_tick, 10, 10); /* look often while draining */
    close_if_done(w);
}

/* ---- listeners ---------------------------------------------------------------------------- */

static int make_addr(const char *host, int port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (strchr(host, ':'))
        return uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss);
    return uv_ip4_addr(host, port, (struct sockaddr_in *)ss);
}

static int bind_socket(const struct sockaddr_storage *ss, int reuseport)
{
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    socklen_t len = ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_in);
    if (bind(fd, (const struct sockaddr *)ss, len) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* Every worker's listener for one front end. A probe bind without SO_REUSEPORT first, so
 * that a port another process listens on (even another sluiced) is an error, not a share. */
static int open_listeners(sd_server *srv, int which, int port)
{
    struct sockaddr_storage ss;
    const char *name = which ? "HTTP" : "RESP";
    if (make_addr(srv->cfg.bind, port, &ss) != 0) {
        sd_error("--bind %s: not an IPv4 or IPv6 address", srv->cfg.bind);
        return -1;
    }
    int probe = bind_socket(&ss, 0);
    if (probe < 0) {
        sd_error("%s port %s:%d: %s", name, srv->cfg.bind, port, strerror(-probe));
        return -1;
    }
    close(probe);
    for (int i = 0; i < g_nworkers; i++) {
        worker *w = &g_workers[i];
        int fd = bind_socket(&ss, 1);
        if (fd < 0) {
            sd_error("%s port %s:%d: %s", name, srv->cfg.bind, port, strerror(-fd));
            return -1;
        }
        uv_tcp_init(&w->loop, &w->lst[which]);
        w->lst[which].data = w;
        w->have[which] = 1;
        int rc = uv_tcp_open(&w->lst[which], fd);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&w->lst[which], 511, on_connection);
        if (rc != 0) {
            sd_error("%s port %s:%d: %s", name, srv->cfg.bind, port, uv_strerror(rc));
            return -1;
        }
    }
    sd_info("%s listening on %s:%d (%d workers)", name, srv->cfg.bind, port, g_nworkers);
    return 0;
}

static void worker_main(void *arg)
{
    worker *w = arg;
    uv_run(&w->loop, UV_RUN_DEFAULT);
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void workers_free(void)
{
    for (int i = 0; i < g_nworkers; i++) {
        sd_rlink_close(g_workers[i].rlink);
        uv_walk(&g_workers[i].loop, walk_close, NULL);
        uv_run(&g_workers[i].loop, UV_RUN_DEFAULT);
        uv_loop_close(&g_workers[i].loop);
        sd_rlink_free(g_workers[i].rlink);
        sd_sched_free(g_workers[i].sched);
    }
    free(g_workers);
    g_workers = NULL;
    g_nworkers = 0;
}

int sd_net_start(sd_server *srv)
{
    g_nworkers = srv->cfg.threads;
    g_workers = calloc((size_t)g_nworkers, sizeof *g_workers);
    if (!g_workers)
        return -1;
    for (int i = 0; i < g_nworkers; i++) {
        worker *w = &g_workers[i];
        w->srv = srv;
        w->idx = i;
        uv_loop_init(&w->loop);
        uv_async_init(&w->loop, &w->wake, on_wake);
        w->wake.data = w;
        uv_timer_init(&w->loop, &w->tick);
        w->tick.data = w;
        uv_timer_start(&w->tick, on_tick, 1000, 1000);
        uv_check_init(&w->loop, &w->check);
        w->check.data = w;
        uv_check_start(&w->check, on_check);
        uv_idle_init(&w->loop, &w->idle);
        w->idle.data = w;
        uv_timer_init(&w->loop, &w->retry);
        w->retry.data = w;
        if (!(w->sched = sd_sched_new(&srv->adm, srv->lim)) ||
            (srv->rstore && !(w->rlink = sd_rlink_new(&w->loop, srv->rstore, w->sched)))) {
            g_nworkers = i + 1;
            workers_free();
            return -1;
        }
    }
    if ((srv->cfg.resp_port && open_listeners(srv, 0, srv->cfg.resp_port) != 0) ||
        (srv->cfg.http_port && open_listeners(srv, 1, srv->cfg.http_port) != 0)) {
        workers_free();
        return -1;
    }
    for (int i = 0; i < g_nworkers; i++)
        uv_thread_create(&g_workers[i].thread, worker_main, &g_workers[i]);
    return 0;
}

void sd_net_wait(sd_server *srv)
{
    (void)srv;
    for (int i = 0; i < g_nworkers; i++)
        uv_thread_join(&g_workers[i].thread);
    workers_free();
}

void sd_net_stop(sd_server *srv)
{
    atomic_store(&srv->stopping, 1);
    for (int i = 0; i < g_nworkers; i++)
        uv_async_send(&g_workers[i].wake);
}
