/*
 * server.h — sluiced's shared pieces: settings, the server, logging.
 *
 * Threads: `threads` workers, each with its own libuv loop and its own listening sockets
 * (SO_REUSEPORT: the kernel spreads connections). A connection lives on one worker for its
 * whole life; the only state workers share is the limiter (thread-safe) and the counters in
 * `sd_metrics` (atomics). The main thread waits for signals and stops the workers.
 */
#ifndef SD_SERVER_H
#define SD_SERVER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "admission.h"
#include "sluice.h"

typedef struct sd_settings {
    char bind[64];
    int resp_port;  /* 0 = RESP front end off */
    int http_port;  /* 0 = HTTP front end off */
    int threads;
    char data_dir[512];
    char admin_token[256];
    char requirepass[256];
    int log_level; /* 0 error, 1 warn, 2 info, 3 debug */
    size_t max_keys;
    int max_connections;     /* per server */
    int idle_timeout_s;      /* close connections idle this long (0 = never) */
    int shutdown_timeout_ms; /* graceful stop: longest wait for in-flight requests */
    int snapshot_interval_ms; /* bucket-state snapshots into data_dir (0 = only on stop) */
    char store[1024];        /* "memory" or "redis://[:password@]host:port[,host:port...][/db]" */
    char redis_password[256];
    int redis_db;
    char fail_mode[16];      /* "closed" (default) or "open" */
    int redis_timeout_ms;
    int near_cache;          /* 1 (default) or 0 */
    int metrics_tenants;     /* 1 (default): /metrics has a series per tenant; 0: totals */
} sd_settings;

void sd_settings_init(sd_settings *s);

typedef struct sd_metrics {
    _Atomic uint64_t connections_total, connections_open, connections_rejected;
    _Atomic uint64_t resp_commands, resp_protocol_errors;
    _Atomic uint64_t http_requests, http_protocol_errors; /* errors: malformed, 413, 431 */
    _Atomic uint64_t snapshots, snapshot_errors, snapshot_last_ms;
} sd_metrics;

typedef struct sd_server {
    sd_settings cfg;
    sl_limiter *lim;
    struct sl_rstore *rstore; /* the limiter's Redis store, or NULL (in-memory) */
    sd_metrics m;
    sd_admission adm;
    struct sd_config *config; /* durable configuration (config.c) */
    _Atomic int stopping;
    int64_t started_ns; /* wall clock, for INFO uptime */
} sd_server;

/* ---- logging: one line per event on stderr, "2026-11-23T02:40:01.123Z info message" ---- */
enum { SD_LOG_ERROR, SD_LOG_WARN, SD_LOG_INFO, SD_LOG_DEBUG };
extern int sd_log_level;
void sd_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define sd_error(...) sd_log(SD_LOG_ERROR, __VA_ARGS__)
#define sd_warn(...) sd_log(SD_LOG_WARN, __VA_ARGS__)
#define sd_info(...) sd_log(SD_LOG_INFO, __VA_ARGS__)
#define sd_debug(...) (sd_log_level >= SD_LOG_DEBUG ? sd_log(SD_LOG_DEBUG, __VA_ARGS__) : (void)0)

/* The value of a hexadecimal digit, or -1 (percent-encodings, JSON \u escapes). */
static inline int sd_hex_digit(int ch)
{
    return ch >= '0' && ch <= '9'   ? ch - '0'
           : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
           : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                    : -1;
}

/* ---- the network layer (net.c) ---- */

/* Open every listener (on failure: logged, nothing left open, -1) and start the workers. */
int sd_net_start(sd_server *srv);
/* Ask the workers to stop: listeners close at once, connections once their replies are
 * written (at most cfg.shutdown_timeout_ms later). Call from any thread after sd_net_start. */
void sd_net_stop(sd_server *srv);
/* Wait for the workers to finish; frees the network layer. */
void sd_net_wait(sd_server *srv);

#endif
