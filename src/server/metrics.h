/*
 * metrics.h — process-wide counters the front ends update, and the Prometheus exposition.
 *
 * Everything here is lock-free: a worker adds to relaxed atomic counters; GET /metrics reads
 * them while workers keep adding, so one scrape may mix a few increments of different moments
 * (never a torn number, and a histogram's buckets, `_count` and `+Inf` always agree).
 *
 * Decision latency: whoever calls sl_take_batch for the front ends (the admission scheduler)
 * reads sl_mono_ns() before and after it and reports the difference with
 * sd_metrics_decision(). One observation per batch, not per request: the batch is the unit of
 * work, and timing it costs two clock reads in all.
 */
#ifndef SD_METRICS_H
#define SD_METRICS_H

#include <stdint.h>

#include "resp.h"
#include "server.h"

/* HTTP endpoints, for sluice_http_requests_total{endpoint=...}. SD_EP_OTHER: no route matched
 * (404) or the request never got that far (malformed, too large). */
typedef enum sd_endpoint {
    SD_EP_CHECK,   /* POST /api/check_and_consume */
    SD_EP_STATUS,  /* GET /api/status/... */
    SD_EP_RELEASE, /* POST /api/release */
    SD_EP_HEALTH,  /* GET /api/health */
    SD_EP_CONFIG,  /* /api/config... */
    SD_EP_METRICS, /* GET /metrics */
    SD_EP_OTHER,
    SD_EP_COUNT
} sd_endpoint;

/* One batch decision (sl_take_batch) took `ns` nanoseconds. */
void sd_metrics_decision(int64_t ns);

/* One HTTP response with this status was sent for this endpoint. */
void sd_metrics_http(sd_endpoint ep, int status);

/* Append the whole exposition (text format 0.0.4) to `o`. */
void sd_metrics_render(sd_server *srv, resp_buf *o);

#endif
