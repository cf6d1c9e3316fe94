/*
 * main.c — sluiced: settings (config file, then flags), logging, signals.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "config.h"
#include "limiter_int.h"
#include "server.h"
#include "state.h"

int sd_log_level = SD_LOG_INFO;
static const char *const k_levels[] = {"error", "warn", "info", "debug"};

void sd_log(int level, const char *fmt, ...)
{
    if (level > sd_log_level)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[1024];
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, k_levels[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    (void)!write(STDERR_FILENO, line, len); /* one write: lines of threads never interleave */
}

void sd_settings_init(sd_settings *s)
{
    memset(s, 0, sizeof *s);
    snprintf(s->bind, sizeof s->bind, "127.0.0.1");
    s->resp_port = 6390;
    s->http_port = 8080;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    s->threads = n > 0 && n < 256 ? (int)n : 1;
    s->log_level = SD_LOG_INFO;
    s->max_connections = 10000;
    s->idle_timeout_s = 300;
    s->shutdown_timeout_ms = 5000;
    s->snapshot_interval_ms = 1000;
    strcpy(s->store, "memory");
    strcpy(s->fail_mode, "closed");
    s->redis_timeout_ms = 1000;
    s->near_cache = 1;
    s->metrics_tenants = 1;
}

static const char k_usage[] =
    "usage: sluiced [options]\n"
    "  --bind ADDR             address to listen on (default 127.0.0.1)\n"
    "  --resp-port N           Redis-protocol port (default 6390; 0 = off)\n"
    "  --http-port N           HTTP/JSON port (default 8080; 0 = off)\n"
    "  --threads N             worker threads (default: the number of CPUs)\n"
    "  --config FILE           JSON settings file; flags given here override it\n"
    "  --data-dir DIR          where configuration and snapshots are kept\n"
    "  --admin-token TOKEN     required (Authorization: Bearer) for HTTP config changes\n"
    "  --requirepass PASSWORD  required (AUTH) on the Redis-protocol port\n"
    "  --max-keys N            keys held at most; least recently used evicted (0 = no bound)\n"
    "  --max-connections N     open connections at most (default 10000)\n"
    "  --idle-timeout S        close connections idle S seconds (default 300; 0 = never)\n"
    "  --shutdown-timeout MS   on SIGTERM, wait at most MS for in-flight requests (5000)\n"
    "  --snapshot-interval S   snapshot bucket state into --data-dir every S seconds\n"
    "                          (default 1; 0 = only on shutdown and on demand)\n"
    "  --store STORE           memory (default) or redis://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]\n"
    "                          (one Redis, or seed nodes of a Redis Cluster)\n"
    "  --redis-password P      AUTH password for Redis (instead of in the URL)\n"
    "  --redis-db N            Redis database (not with a cluster; instead of /DB)\n"
    "  --fail-mode MODE        Redis unreachable: closed (deny, default) or open (allow)\n"
    "  --redis-timeout MS      Redis connect and reply timeout (default 1000)\n"
    "  --near-cache 0|1        deny keys known to be over their limit without asking Redis\n"
    "                          until their retry time (default 1)\n"
    "  --metrics-tenants 0|1   /metrics: decisions and evictions per tenant (1, default) or\n"
    "                          totals only (0: one series each, however many tenants)\n"
    "  --log-level LEVEL       error, warn, info (default) or debug\n"
    "  --help, --version\n";

/* ---- one setting, from a flag or the config file ---- */

typedef struct opt {
    const char *flag;  /* "--resp-port" */
    const char *key;   /* "resp_port" in the config file */
    char kind;         /* 'i' int, 's' string, 'z' size, 'l' log level, 'm' seconds -> ms */
    size_t off;
    long long min, max; /* strings: min 1 = must not be empty (a secret: "" would be an unset
                           variable, and would leave the server open without a word) */
    size_t cap;        /* strings: buffer size */
} opt;

#define OFF(f) offsetof(sd_settings, f)
static const opt k_opts[] = {
    {"--bind", "bind", 's', OFF(bind), 0, 0, sizeof(((sd_settings *)0)->bind)},
    {"--resp-port", "resp_port", 'i', OFF(resp_port), 0, 65535, 0},
    {"--http-port", "http_port", 'i', OFF(http_port), 0, 65535, 0},
    {"--threads", "threads", 'i', OFF(threads), 1, 256, 0},
    {"--data-dir", "data_dir", 's', OFF(data_dir), 0, 0, sizeof(((sd_settings *)0)->data_dir)},
    {"--admin-token", "admin_token", 's', OFF(admin_token), 1, 0,
     sizeof(((sd_settings *)0)->admin_token)},
    {"--requirepass", "requirepass", 's', OFF(requirepass), 1, 0,
     sizeof(((sd_settings *)0)->requirepass)},
    {"--max-keys", "max_keys", 'z', OFF(max_keys), 0, (long long)1 << 40, 0},
    {"--max-connections", "max_connections", 'i', OFF(max_connections), 1, 1000000, 0},
    {"--idle-timeout", "idle_timeout_seconds", 'i', OFF(idle_timeout_s), 0, 86400 * 7, 0},
    {"--shutdown-timeout", "shutdown_timeout_ms", 'i', OFF(shutdown_timeout_ms), 0, 600000, 0},
    {"--log-level", "log_level", 'l', OFF(log_level), 0, 0, 0},
    {"--snapshot-interval", "snapshot_interval", 'm', OFF(snapshot_interval_ms), 0, 3600, 0},
    {"--store", "store", 's', OFF(store), 0, 0, sizeof(((sd_settings *)0)->store)},
    {"--redis-password", "redis_password", 's', OFF(redis_password), 1, 0,
     sizeof(((sd_settings *)0)->redis_password)},
    {"--redis-db", "redis_db", 'i', OFF(redis_db), 0, 1000000, 0},
    {"--fail-mode", "fail_mode", 's', OFF(fail_mode), 0, 0, sizeof(((sd_settings *)0)->fail_mode)},
    {"--redis-timeout", "redis_timeout_ms", 'i', OFF(redis_timeout_ms), 1, 600000, 0},
    {"--near-cache", "near_cache", 'i', OFF(near_cache), 0, 1, 0},
    {"--metrics-tenants", "metrics_tenants", 'i', OFF(metrics_tenants), 0, 1, 0},
};
#define NOPTS (sizeof k_opts / sizeof k_opts[0])

/* "sluiced: <msg>" as one line: control characters in the names and values it quotes (a
 * JSON "\n" escape in a config file) are printed as '?'. */
static void error_line(const char *msg)
{
    fputs("sluiced: ", stderr);
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++)
        fputc(*p < 0x20 || *p == 0x7f ? '?' : *p, stderr);
    fputc('\n', stderr);
}

static _Noreturn void bad(const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    error_line(msg);
    exit(2);
}

/* Apply a textual value (flag) to a setting. */
static void set_text(sd_settings *s, const opt *o, const char *v, const char *where)
{
    char *p = (char *)s + o->off;
    if (o->kind == 's') {
        if (o->min > 0 && !*v)
            bad("%s: must not be empty (leave it out to run without one)", where);
        if (strlen(v) >= o->cap)
            bad("%s: value longer than %zu bytes", where, o->cap - 1);
        memcpy(p, v, strlen(v) + 1);
        return;
    }
    if (o->kind == 'l') {
        for (int i = 0; i < 4; i++)
            if (strcmp(v, k_levels[i]) == 0) {
                *(int *)p = i;
                return;
            }
        bad("%s: '%s' is not a log level (error, warn, info, debug)", where, v);
    }
    char *end;
    errno = 0;
    if (o->kind == 'm') { /* seconds, fractions allowed, kept as whole ms */
        double sec = strtod(v, &end);
        if (!*v || *end || errno || !(sec >= (double)o->min) || !(sec <= (double)o->max) ||
            (sec > 0 && sec < 0.001))
            bad("%s: '%s' is not a number of seconds from %lld to %lld (0.001 at least, or 0)",
                where, v, o->min, o->max);
        *(int *)p = (int)(sec * 1000 + 0.5);
        return;
    }
    long long n = strtoll(v, &end, 10);
    if (!*v || *end || errno || n < o->min || n > o->max)
        bad("%s: '%s' is not a whole number from %lld to %lld", where, v, o->min, o->max);
    if (o->kind == 'z')
        *(size_t *)p = (size_t)n;
    else
        *(int *)p = (int)n;
}

static json_t *g_items;          /* --config's "items": configuration to start from */
static const char *g_items_path;

static void load_config(sd_settings *s, const char *path)
{
    json_error_t e;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &e);
    if (!root && e.line < 1) /* not JSON's fault: the file could not be read */
        bad("--config %s: %s", path, e.text);
    if (!root)
        bad("--config %s: line %d, column %d: %s", path, e.line, e.column, e.text);
    if (!json_is_object(root)) {
        json_decref(root);
        bad("--config %s: the file must hold one JSON object", path);
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        const opt *o = NULL;
        for (size_t i = 0; i < NOPTS; i++)
            if (strcmp(k_opts[i].key, key) == 0)
                o = &k_opts[i];
        if (strcmp(key, "items") == 0) { /* rules, tiers, ...: checked by sd_config_open */
            if (!json_is_object(v))
                bad("--config %s: field \"items\": must be an object", path);
            json_decref(g_items);
            g_items = json_incref(v);
            g_items_path = path;
            continue;
        }
        char where[800];
        sd_file_where(where, sizeof where, "--config ", path, 1, key);
        size_t wl = strlen(where);
        snprintf(where + wl, sizeof where - wl, ": field \"%s\"", key);
        if (!o)
            bad("%s: unknown setting", where);
        if (o->kind == 's' || o->kind == 'l') {
            if (!json_is_string(v))
                bad("%s: must be a string", where);
            set_text(s, o, json_string_value(v), where);
        } else {
            int flag = o->kind == 'i' && o->min == 0 && o->max == 1; /* 0|1: JSON's false|true too */
            if (flag && json_is_boolean(v)) {
                set_text(s, o, json_is_true(v) ? "1" : "0", where);
                continue;
            }
            if (o->kind == 'm' ? !json_is_number(v) : !json_is_integer(v))
                bad("%s: must be a %s", where, o->kind == 'm' ? "number" : "whole number");
            char num[40];
            if (o->kind == 'm')
                snprintf(num, sizeof num, "%.17g", json_number_value(v));
            else
                snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
            set_text(s, o, num, where);
        }
    }
    json_decref(root);
}

static void parse_args(sd_settings *s, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) { /* the config file first: flags override it */
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc)
                bad("--config: missing file name");
            load_config(s, argv[++i]);
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            load_config(s, argv[i] + 9);
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(k_usage, stdout);
            exit(0);
        }
        if (strcmp(a, "--version") == 0) {
            printf("sluiced %s\n", sl_version_string());
            exit(0);
        }
        const char *eq = strchr(a, '=');
        size_t flen = eq ? (size_t)(eq - a) : strlen(a);
        if (flen == 8 && strncmp(a, "--config", 8) == 0) {
            if (!eq)
                i++;
            continue;
        }
        const opt *o = NULL;
        for (size_t k = 0; k < NOPTS; k++)
            if (strlen(k_opts[k].flag) == flen && strncmp(k_opts[k].flag, a, flen) == 0)
                o = &k_opts[k];
        if (!o)
            bad("unknown option '%s' (see --help)", a);
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v)
            bad("%s: missing value", o->flag);
        set_text(s, o, v, o->flag);
    }
    if (!s->resp_port && !s->http_port)
        bad("--resp-port and --http-port are both 0: nothing to serve");
    struct sockaddr_in6 a6; /* as net.c will read it: IPv6 when it has a ':', else IPv4 */
    struct sockaddr_in a4;
    int bad_addr = strchr(s->bind, ':') ? uv_ip6_addr(s->bind, 0, &a6) != 0
                                        : uv_ip4_addr(s->bind, 0, &a4) != 0;
    if (bad_addr)
        bad("--bind: '%s' is not an IPv4 or IPv6 address", s->bind);
    if (strcmp(s->fail_mode, "open") != 0 && strcmp(s->fail_mode, "closed") != 0)
        bad("--fail-mode: '%s' is not open or closed", s->fail_mode);
}

/* --store: "memory", or a redis:// URL split into the library's options (servers, password
 * and db point into `buf`). Exits 2 naming the problem. */
static void parse_store(const sd_settings *s, sl_redis_options *ro, char *buf, size_t cap)
{
    if (strcmp(s->store, "memory") == 0)
        return;
    if (strncmp(s->store, "redis://", 8) != 0)
        bad("--store: '%s' is neither memory nor redis://HOST:PORT[,HOST:PORT...]", s->store);
    snprintf(buf, cap, "%s", s->store + 8);
    char *p = buf, *slash = strchr(p, '/'), *at = strrchr(p, '@');
    if (slash && at && at > slash)
        at = NULL;
    ro->db = (unsigned)s->redis_db;
    if (slash && s->redis_db)
        bad("--store names a database and so does --redis-db: give one of them");
    if (slash) {
        *slash = '\0';
        char *end;
        errno = 0;
        long db = strtol(slash + 1, &end, 10);
        if (!slash[1] || *end || errno || db < 0 || db > 1000000)
            bad("--store: '%s' is not a database number", slash + 1);
        ro->db = (unsigned)db;
    }
    if (at) { /* [user]:password@ */
        *at = '\0';
        char *colon = strchr(p, ':');
        if (colon && colon != p)
            bad("--store: user names are not supported (redis://:PASSWORD@HOST:PORT)");
        ro->password = colon ? colon + 1 : p;
        if (!*ro->password)
            bad("--store: the password is empty (leave out ':@' to run without one)");
        p = at + 1;
    }
    if (s->redis_password[0] && at)
        bad("--store has a password and so does --redis-password: give one of them");
    if (s->redis_password[0])
        ro->password = s->redis_password;
    ro->servers = p;
    ro->fail_mode = strcmp(s->fail_mode, "open") == 0 ? SL_FAIL_OPEN : SL_FAIL_CLOSED;
    ro->timeout_ms = (unsigned)s->redis_timeout_ms;
    ro->no_near_cache = !s->near_cache;
}

static void on_store_state(void *ctx, int up, const char *why)
{
    const sd_server *srv = ctx;
    if (up)
        sd_info("redis: reachable again (%s)", why);
    else
        sd_warn("redis: unreachable (%s): deciding by --fail-mode %s until it is back", why,
                srv->cfg.fail_mode);
}

int main(int argc, char **argv)
{
    static sd_server srv;
    sd_settings_init(&srv.cfg);
    parse_args(&srv.cfg, argc, argv);
    sd_log_level = srv.cfg.log_level;

    sl_options o;
    sl_options_init(&o);
    o.max_keys = srv.cfg.max_keys;
    sl_redis_options ro;
    sl_redis_options_init(&ro);
    char store_buf[sizeof srv.cfg.store];
    parse_store(&srv.cfg, &ro, store_buf, sizeof store_buf);
    if (ro.servers) {
        ro.on_state = on_store_state;
        ro.on_state_ctx = &srv;
        o.redis = &ro;
    }
    int rc = sl_open(&srv.lim, &o);
    if (rc == SL_EADDRESS || rc == SL_EINVAL)
        bad("--store: %s", sl_strerror(rc));
    if (rc != SL_OK) {
        sd_error("cannot open the limiter: %s", sl_strerror(rc));
        return 1;
    }
    srv.rstore = sl_limiter_rstore(srv.lim);
    srv.started_ns = sl_now(srv.lim);
    sd_admission_init(&srv.adm);
    char err[1024];
    if (sd_config_open(&srv, g_items, g_items_path, err, sizeof err) != 0) {
        error_line(err); /* nothing started: refuse, do not run half-configured */
        return 2;
    }
    if (!srv.rstore && sd_state_open(&srv, err, sizeof err) != 0) {
        error_line(err);
        return 1;
    }

    /* Signals are taken by this thread only (sigwait); workers inherit the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (sd_net_start(&srv) != 0) {
        sd_config_close(&srv);
        sl_close(srv.lim);
        return 1;
    }
    if (!srv.rstore && sd_state_start(&srv) != 0)
        sd_error("state: cannot start the snapshot thread; snapshots only on shutdown");
    sd_info("sluiced %s ready: %d threads, %s store%s%s%s", sl_version_string(),
            srv.cfg.threads, srv.rstore ? "Redis" : "in-memory", srv.cfg.data_dir[0] ? ", data in " : " (nothing kept on disk)",
            srv.cfg.data_dir, srv.cfg.requirepass[0] ? ", AUTH required" : "");
    int sig = 0;
    sigwait(&set, &sig);
    sd_info("%s: stopping (in-flight requests get up to %d ms)",
            sig == SIGINT ? "SIGINT" : "SIGTERM", srv.cfg.shutdown_timeout_ms);
    sd_net_stop(&srv);
    sd_net_wait(&srv);
    /* the workers are gone: this snapshot is the final state; if it cannot be written, the
     * state since the last one is lost, and the exit code says so */
    int lost = !srv.rstore && sd_state_stop(&srv) != 0;
    sd_config_close(&srv);
    sl_close(srv.lim);
    if (lost) {
        sd_error("stopped, but the final snapshot failed: the state since the last one is lost");
        return 1;
    }
    sd_info("stopped");
    return 0;
}
