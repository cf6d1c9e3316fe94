/*
 * metrics.c — lock-free counters and the Prometheus text exposition (format 0.0.4).
 *
 * The latency histogram keeps one counter per bucket (not cumulative): an observation is one
 * relaxed fetch_add on its bucket and one on the sum. The exposition accumulates the buckets
 * it read, and `_count` is that same total, so `+Inf` and `_count` always agree.
 */
#include "metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Upper bounds of the latency buckets, in ns (le="1e-06" ... le="0.1"); +Inf follows. */
static const int64_t k_bounds_ns[] = {1000,    2500,    5000,    10000,    25000,
                                      50000,   100000,  250000,  500000,   1000000,
                                      2500000, 5000000, 10000000, 100000000};
#define NBOUNDS (sizeof k_bounds_ns / sizeof k_bounds_ns[0])

typedef struct hist {
    _Atomic uint64_t bucket[NBOUNDS + 1]; /* the last one: above every bound */
    _Atomic uint64_t sum_ns;
} hist;

static hist g_decision;

/* HTTP responses by endpoint and status. Codes not in the list count as "other". */
static const int k_codes[] = {200, 400, 401, 404, 405, 409, 413, 429, 431, 500, 503, 507};
#define NCODES (sizeof k_codes / sizeof k_codes[0])
static _Atomic uint64_t g_http[SD_EP_COUNT][NCODES + 1];
static const char *const k_endpoints[SD_EP_COUNT] = {
    "check_and_consume", "status", "release", "health", "config", "metrics", "other"};

void sd_metrics_decision(int64_t ns)
{
    if (ns < 0) /* cannot happen with a monotonic clock; never let it wrap the sum */
        ns = 0;
    size_t i = 0;
    while (i < NBOUNDS && ns > k_bounds_ns[i])
        i++;
    atomic_fetch_add_explicit(&g_decision.bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_decision.sum_ns, (uint64_t)ns, memory_order_relaxed);
}

void sd_metrics_http(sd_endpoint ep, int status)
{
    if ((unsigned)ep >= SD_EP_COUNT)
        ep = SD_EP_OTHER;
    size_t i = 0;
    while (i < NCODES && k_codes[i] != status)
        i++;
    atomic_fetch_add_explicit(&g_http[ep][i], 1, memory_order_relaxed);
}

/* ---- exposition ---------------------------------------------------------------------------- */

static void put(resp_buf *o, const char *s)
{
    resp_raw(o, s, strlen(s));
}

static void putf(resp_buf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(resp_buf *o, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0)
        resp_raw(o, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void family(resp_buf *o, const char *name, const char *type, const char *help)
{
    putf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}


/* A label value: \, " and newline escaped as the format asks; a byte that is not UTF-8
 * (tenant ids are arbitrary bytes) and % itself percent-encoded, so that two tenants never
 * print as one series (bytes that were not UTF-8 became U+FFFD: \xff, \xfe and a real U+FFFD
 * were one series three times over, which Prometheus drops as duplicates; found by review). */
static void label_value(resp_buf *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = sd_utf8_len(u + i, n - i);
        if (k == 0 || u[i] == '%') {
            char pct[3] = {'%', hex[u[i] >> 4], hex[u[i] & 15]};
            resp_raw(o, pct, 3);
            i++;
        } else if (u[i] == '\\' || u[i] == '"') {
            resp_raw(o, "\\", 1);
            resp_raw(o, s + i, 1);
            i++;
        } else if (u[i] == '\n') {
            resp_raw(o, "\\n", 2);
            i++;
        } else {
            resp_raw(o, s + i, k);
            i += k;
        }
    }
}

static void scalar(resp_buf *o, const char *name, const char *type, const char *help,
                   uint64_t v);

typedef struct tenant_lines {
    resp_buf decisions, evicted;
} tenant_lines;

static int tenant_cb(void *ctx, const char *tenant, size_t len, const sl_stats *s)
{
    tenant_lines *t = ctx;
    /* three lines per tenant, up to 65,536 tenants: appends, not printf */
    static const char *const results[] = {"\",result=\"allowed\"} ", "\",result=\"denied\"} "};
    const uint64_t counts[] = {s->allowed, s->denied};
    for (int i = 0; i < 2; i++) {
        put(&t->decisions, "sluice_decisions_total{tenant=\"");
        label_value(&t->decisions, tenant, len);
        put(&t->decisions, results[i]);
        resp_dec(&t->decisions, (int64_t)counts[i]); /* < 2^63 decisions */
        put(&t->decisions, "\n");
    }
    put(&t->evicted, "sluice_keys_evicted_total{tenant=\"");
    label_value(&t->evicted, tenant, len);
    put(&t->evicted, "\"} ");
    resp_dec(&t->evicted, (int64_t)s->evicted);
    put(&t->evicted, "\n");
    return 0;
}

static void append_buf(resp_buf *o, resp_buf *b)
{
    if (b->len)
        resp_raw(o, b->p, b->len);
    if (b->oom)
        o->oom = 1;
    resp_buf_free(b);
}

/* all: the limiter's totals (sl_stats_get of every tenant, read once per scrape: it visits
 * every tenant's counters) */
static void render_tenants(sd_server *srv, const sl_stats *all, resp_buf *o)
{
    if (!srv->cfg.metrics_tenants) { /* totals: two series, however many tenants */
        family(o, "sluice_decisions_total", "counter",
               "Rate-limit decisions, by result (all tenants: --metrics-tenants 0).");
        putf(o, "sluice_decisions_total{result=\"allowed\"} %" PRIu64 "\n", all->allowed);
        putf(o, "sluice_decisions_total{result=\"denied\"} %" PRIu64 "\n", all->denied);
        scalar(o, "sluice_keys_evicted_total", "counter",
               "Keys evicted by the max_keys bound (all tenants: --metrics-tenants 0).",
               all->evicted);
        return;
    }
    tenant_lines t;
    memset(&t, 0, sizeof t);
    sl_stats_list(srv->lim, tenant_cb, &t);
    family(o, "sluice_decisions_total", "counter",
           "Rate-limit decisions, by tenant and result.");
    append_buf(o, &t.decisions);
    family(o, "sluice_keys_evicted_total", "counter",
           "Keys evicted by the max_keys bound, by tenant.");
    append_buf(o, &t.evicted);
}

static void render_histogram(resp_buf *o)
{
    const char *name = "sluice_decision_duration_seconds";
    family(o, name, "histogram", "Time spent deciding one batch of requests (one sl_take_batch).");
    const hist *h = &g_decision;
    uint64_t cum = 0;
    for (size_t i = 0; i <= NBOUNDS; i++) {
        cum += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
        if (i < NBOUNDS)
            putf(o, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, (double)k_bounds_ns[i] / 1e9,
                 cum);
        else
            putf(o, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cum);
    }
    uint64_t sum = atomic_load_explicit(&h->sum_ns, memory_order_relaxed);
    putf(o, "%s_sum %.9f\n", name, (double)sum / 1e9);
    putf(o, "%s_count %" PRIu64 "\n", name, cum);
}

static void render_http(resp_buf *o)
{
    family(o, "sluice_http_requests_total", "counter",
           "HTTP responses sent, by endpoint and status code.");
    for (int ep = 0; ep < SD_EP_COUNT; ep++)
        for (size_t i = 0; i <= NCODES; i++) {
            uint64_t n = atomic_load_explicit(&g_http[ep][i], memory_order_relaxed);
            if (n == 0)
                continue;
            char code[16];
            if (i < NCODES)
                snprintf(code, sizeof code, "%d", k_codes[i]);
            else
                snprintf(code, sizeof code, "other");
            putf(o, "sluice_http_requests_total{endpoint=\"%s\",code=\"%s\"} %" PRIu64 "\n",
                 k_endpoints[ep], code, n);
        }
}

static void render_admission(sd_admission *a, resp_buf *o)
{
    scalar(o, "sluice_admission_admitted_total", "counter",
           "Decision requests admitted by admission control.", atomic_load(&a->admitted));
    family(o, "sluice_admission_rejected_total", "counter",
           "Decision requests rejected by admission control, by reason.");
    putf(o, "sluice_admission_rejected_total{reason=\"queue_full\"} %" PRIu64 "\n",
         atomic_load(&a->rejected_full));
    putf(o, "sluice_admission_rejected_total{reason=\"expired\"} %" PRIu64 "\n",
         atomic_load(&a->rejected_expired));
    int64_t queued = (int64_t)atomic_load(&a->queued_now); /* a modular sum over workers */
    scalar(o, "sluice_admission_queued", "gauge", "Decision requests waiting for admission.",
           queued > 0 ? (uint64_t)queued : 0);
    int64_t busy = atomic_load(&a->in_progress);
    scalar(o, "sluice_admission_in_progress", "gauge", "Decisions being made right now.",
           busy > 0 ? (uint64_t)busy : 0);
}

static void scalar(resp_buf *o, const char *name, const char *type, const char *help,
                    uint64_t v)
{
    family(o, name, type, help);
    putf(o, "%s %" PRIu64 "\n", name, v);
}

/* The Redis store (distributed mode): only when sluiced runs on it. */
static void render_store(sd_server *srv, resp_buf *o)
{
    sl_store_stats st;
    if (!srv->rstore || sl_store_stats_get(srv->lim, &st) != SL_OK)
        return;
    scalar(o, "sluice_redis_up", "gauge", "1 while every Redis node is reachable, else 0.",
           (uint64_t)st.up);
    scalar(o, "sluice_redis_cluster", "gauge", "1 when the store is a Redis Cluster.",
           (uint64_t)st.cluster);
    family(o, "sluice_redis_decisions_total", "counter",
           "Decisions on the Redis store, by who made them: redis (the script), near_cache "
           "(denied locally until the retry time), fail_open / fail_closed (Redis unreachable).");
    putf(o, "sluice_redis_decisions_total{source=\"redis\"} %" PRIu64 "\n", st.calls);
    putf(o, "sluice_redis_decisions_total{source=\"near_cache\"} %" PRIu64 "\n", st.near_cache);
    putf(o, "sluice_redis_decisions_total{source=\"fail_open\"} %" PRIu64 "\n", st.fail_open);
    putf(o, "sluice_redis_decisions_total{source=\"fail_closed\"} %" PRIu64 "\n",
         st.fail_closed);
    scalar(o, "sluice_redis_errors_total", "counter",
           "Redis connection failures, timeouts and error replies.", st.errors);
    scalar(o, "sluice_redis_connects_total", "counter", "Connections to Redis opened.",
           st.reconnects);
    scalar(o, "sluice_redis_script_loads_total", "counter",
           "Loads of the sluice function library (a Redis node did not have it).", st.script_loads);
    scalar(o, "sluice_redis_redirects_total", "counter",
           "Redis Cluster MOVED and ASK redirections followed.", st.redirects);
}

void sd_metrics_render(sd_server *srv, resp_buf *o)
{
    sd_metrics *m = &srv->m;
    family(o, "sluice_build_info", "gauge", "Version of sluiced (always 1).");
    putf(o, "sluice_build_info{version=\"%s\"} 1\n", sl_version_string());
    sl_stats s;
    sl_stats_get(srv->lim, NULL, 0, &s);
    render_tenants(srv, &s, o);
    scalar(o, "sluice_keys", "gauge", "Keys held by the limiter.", s.keys);
    scalar(o, "sluice_keys_reclaimed_total", "counter",
            "Idle full keys dropped (losslessly) to make room.", s.reclaimed);
    render_histogram(o);
    scalar(o, "sluice_connections_open", "gauge", "Client connections open now.",
            atomic_load(&m->connections_open));
    scalar(o, "sluice_connections_total", "counter", "Client connections accepted.",
            atomic_load(&m->connections_total));
    scalar(o, "sluice_connections_rejected_total", "counter",
            "Client connections refused (max_connections, shutting down).",
            atomic_load(&m->connections_rejected));
    family(o, "sluice_protocol_errors_total", "counter",
           "Requests that broke the protocol (the connection was closed), by protocol.");
    putf(o, "sluice_protocol_errors_total{protocol=\"resp\"} %" PRIu64 "\n",
         atomic_load(&m->resp_protocol_errors));
    putf(o, "sluice_protocol_errors_total{protocol=\"http\"} %" PRIu64 "\n",
         atomic_load(&m->http_protocol_errors));
    scalar(o, "sluice_resp_commands_total", "counter", "RESP commands received.",
            atomic_load(&m->resp_commands));
    scalar(o, "sluice_http_requests_received_total", "counter", "HTTP requests received.",
           atomic_load(&m->http_requests));
    render_admission(&srv->adm, o);
    render_store(srv, o);
    render_http(o);
}
