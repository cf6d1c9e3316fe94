/*
 * http_api.c — the HTTP/JSON endpoints of sluiced: routing, JSON in and out, decisions
 * through admission control.
 *
 * Decisions (POST /api/check_and_consume, GET /api/status/...) become items of the worker's
 * admission scheduler, which decides the pipelined requests of every connection together in
 * sl_take_batch calls and hands each back to sd_api_emit. Everything else is answered at once
 * into sd_reply_buf(c), behind any undecided item of the connection (see http_api.h).
 *
 * Every error body is {"error": "..."}. Library errors are named as the RESP front end names
 * them: "<message> (SL_E...)".
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http_api.h"

#include "config.h"
#include "policy.h"
#include "server.h"
#include "state.h"

#define MAX_SEGS 8        /* path segments; no route has more */
#if JSON_INTEGER_IS_LONG_LONG
#define JSON_INTEGER_MAX LLONG_MAX
#else
#define JSON_INTEGER_MAX LONG_MAX
#endif

/* ---- JSON output ------------------------------------------------------------------------ */

static void jraw(resp_buf *o, const char *s)
{
    resp_raw(o, s, strlen(s));
}


/* A JSON string. Ids are arbitrary bytes: those that are not UTF-8 become U+FFFD. */
static void jstr(resp_buf *o, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    resp_raw(o, "\"", 1);
    for (size_t i = 0; i < n;) {
        size_t k = sd_utf8_len(u + i, n - i);
        if (k == 0) {
            resp_raw(o, "\xef\xbf\xbd", 3);
            i++;
        } else if (u[i] == '"' || u[i] == '\\') {
            resp_raw(o, "\\", 1);
            resp_raw(o, s + i++, 1);
        } else if (u[i] < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", u[i++]);
            resp_raw(o, esc, 6);
        } else {
            resp_raw(o, s + i, k);
            i += k;
        }
    }
    resp_raw(o, "\"", 1);
}

static void jcstr(resp_buf *o, const char *s)
{
    jstr(o, s, strlen(s));
}

/* An id where "" means the default tenant or action. */
static void jid(resp_buf *o, const char *s, size_t n)
{
    if (n == 0)
        jcstr(o, "default");
    else
        jstr(o, s, n);
}

/* The shortest of %.15g..%.17g that reads back as the same double. */
static void jnum(resp_buf *o, double v)
{
    char buf[40];
    if (!isfinite(v)) {
        jraw(o, "null");
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    jraw(o, buf);
}

static void jint(resp_buf *o, int64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRId64, v);
    jraw(o, buf);
}

/* `"key": ` preceded by ", " unless it is the first member (*n counts members). */
static void jkey(resp_buf *o, int *n, const char *key)
{
    if ((*n)++)
        resp_raw(o, ", ", 2);
    jcstr(o, key);
    resp_raw(o, ": ", 2);
}

/* The same with an id as the key ("" is "default"). */
static void jkey_id(resp_buf *o, int *n, const char *key, size_t len)
{
    if ((*n)++)
        resp_raw(o, ", ", 2);
    jid(o, key, len);
    resp_raw(o, ": ", 2);
}

static void jlimit(resp_buf *o, const sl_limit *l)
{
    int n = 0;
    resp_raw(o, "{", 1);
    jkey(o, &n, "algorithm");
    jcstr(o, sl_algorithm_name(l->algorithm));
    switch (l->algorithm) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        jkey(o, &n, "capacity");
        jnum(o, l->limit);
        jkey(o, &n, "refill_rate");
        jnum(o, l->rate);
        break;
    case SL_BURST_RESERVE:
        jkey(o, &n, "max_requests");
        jnum(o, l->limit);
        jkey(o, &n, "window_duration_seconds");
        jraw(o, "1");
        jkey(o, &n, "reserve_rate");
        jnum(o, l->rate);
        jkey(o, &n, "reserve_cap");
        jnum(o, l->reserve_cap);
        break;
    default: /* windows, concurrency */
        jkey(o, &n, "max_requests");
        jnum(o, l->limit);
        jkey(o, &n, "window_duration_seconds");
        jnum(o, l->window);
        break;
    }
    resp_raw(o, "}", 1);
}

/* A policy in a form PUT accepts: one limit as an object, stacked limits as {"limits": []}. */
static void jpolicy(resp_buf *o, const sl_policy *p)
{
    if (p->nlimits == 1)
        return jlimit(o, &p->limits[0]);
    jraw(o, "{\"limits\": [");
    for (unsigned i = 0; i < p->nlimits; i++) {
        if (i)
            resp_raw(o, ", ", 2);
        jlimit(o, &p->limits[i]);
    }
    jraw(o, "]}");
}

/* ---- requests and replies ------------------------------------------------------------- */

typedef struct seg {
    const char *p;
    size_t len;
} seg;

/* One request being answered. */
typedef struct ctx {
    sd_conn *c;
    const sd_http_req *r;
    sd_endpoint ep;
    seg arg[MAX_SEGS]; /* the path segments the route's '*'s matched, decoded */
    int nargs;
} ctx;

static int64_t ceil_div(int64_t ns, int64_t unit)
{
    return ns <= 0 ? 0 : (ns + unit - 1) / unit;
}

/* Answer now (after the connection's undecided items). `headers`: complete lines or NULL. */
static void reply(ctx *x, int status, const char *headers, const resp_buf *body)
{
    if (body->oom) {
        x->c->out.oom = 1; /* the connection closes: a truncated reply must not go out */
        return;
    }
    sd_http_reply(sd_reply_buf(x->c), x->r->tag, x->ep, status, NULL, headers,
                  headers ? strlen(headers) : 0, body->p, body->len);
}

static void reply_error(ctx *x, int status, const char *headers, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void reply_error(ctx *x, int status, const char *headers, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    resp_buf o = {0};
    jraw(&o, "{\"error\": ");
    jcstr(&o, msg);
    jraw(&o, "}");
    reply(x, status, headers, &o);
    resp_buf_free(&o);
}

static int lib_status(int rc)
{
    switch (rc) {
    case SL_ENOTFOUND:
    case SL_ELEASE:
        return 404;
    case SL_ETIERINUSE:
        return 409;
    case SL_ENOMEM:
    case SL_ESTORE:
        return 503;
    default:
        return 400;
    }
}

static void reply_lib(ctx *x, int rc)
{
    if (rc == SD_EPERSIST) { /* 507 when the disk is full, else 500 */
        int e = sd_config_errno();
        reply_error(x, e == ENOSPC || e == EDQUOT ? 507 : 500, NULL,
                    "configuration not saved to disk (%s): nothing changed", strerror(e));
        return;
    }
    reply_error(x, lib_status(rc), NULL, "%s (%s)", sl_strerror(rc), sl_err_name(rc));
}

/* Reply with a JSON body built in `o`, then free it. */
static void reply_json(ctx *x, int status, resp_buf *o)
{
    reply(x, status, NULL, o);
    resp_buf_free(o);
}

static void reply_policy(ctx *x, const sl_policy *p)
{
    resp_buf o = {0};
    jpolicy(&o, p);
    reply_json(x, 200, &o);
}

static void reply_deleted(ctx *x)
{
    resp_buf o = {0};
    jraw(&o, "{\"deleted\": true}");
    reply_json(x, 200, &o);
}

/* ---- JSON input ------------------------------------------------------------------------- */

/* The body as a JSON object, or NULL with the 400 already sent. */
static json_t *body_object(ctx *x)
{
    json_error_t e;
    json_t *v = json_loadb(x->r->body, x->r->body_len, JSON_REJECT_DUPLICATES, &e);
    if (!v) {
        reply_error(x, 400, NULL, "invalid JSON at line %d, column %d: %s", e.line, e.column,
                    e.text);
        return NULL;
    }
    if (!json_is_object(v)) {
        json_decref(v);
        reply_error(x, 400, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return v;
}

static int in_list(const char *key, const char *const *list)
{
    for (; *list; list++)
        if (strcmp(key, *list) == 0)
            return 1;
    return 0;
}

/* Every member of `o` is in `allowed`; else -1 naming the first one that is not. */
static int only_fields(const json_t *o, const char *const *allowed, const char *where,
                       char *err, size_t errlen)
{
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)o, key, v)
    {
        if (!in_list(key, allowed)) {
            snprintf(err, errlen, "%sunknown field \"%.64s\"", where, key);
            return -1;
        }
    }
    return 0;
}

/* A required string member. */
static int str_field(const json_t *o, const char *name, const char **p, size_t *n, char *err,
                     size_t errlen)
{
    const json_t *v = json_object_get(o, name);
    if (!v) {
        snprintf(err, errlen, "missing field \"%s\"", name);
        return -1;
    }
    if (!json_is_string(v)) {
        snprintf(err, errlen, "field \"%s\" must be a string", name);
        return -1;
    }
    *p = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* An optional whole-number member in [min, max]; *have says whether it was there. */
static int int_field(const json_t *o, const char *name, json_int_t min, json_int_t max,
                     json_int_t *out, int *have, char *err, size_t errlen)
{
    const json_t *v = json_object_get(o, name);
    *have = v != NULL;
    if (!v)
        return 0;
    /* JSON has numbers, not integers: 2.0 and 1e3 are whole numbers too (exactly, up to 2^53) */
    json_int_t n = 0;
    int whole = json_is_integer(v);
    if (whole) {
        n = json_integer_value(v);
    } else if (json_is_real(v)) {
        double d = json_real_value(v);
        whole = d == floor(d) && fabs(d) <= 9007199254740992.0;
        n = whole ? (json_int_t)d : 0;
    }
    if (!whole || n < min || n > max) {
        if (max == JSON_INTEGER_MAX)
            snprintf(err, errlen, "field \"%s\" must be a whole number >= %" JSON_INTEGER_FORMAT,
                     name, min);
        else
            snprintf(err, errlen,
                     "field \"%s\" must be a whole number from %" JSON_INTEGER_FORMAT
                     " to %" JSON_INTEGER_FORMAT, name, min, max);
        return -1;
    }
    *out = n;
    return 0;
}

/* An optional number member. */
static int num_field(const json_t *o, const char *where, const char *name, double *out,
                     int *have, char *err, size_t errlen)
{
    const json_t *v = json_object_get(o, name);
    *have = v != NULL;
    if (v && !json_is_number(v)) {
        snprintf(err, errlen, "%sfield \"%s\" must be a number", where, name);
        return -1;
    }
    if (v)
        *out = json_number_value(v);
    return 0;
}

/* ---- policies from JSON ---- */

static const char *const k_bucket_fields[] = {"algorithm", "max_requests",
                                              "window_duration_seconds", "burst", "capacity",
                                              "refill_rate", NULL};
static const char *const k_window_fields[] = {"algorithm", "max_requests",
                                              "window_duration_seconds", NULL};
static const char *const k_reserve_fields[] = {"algorithm", "max_requests",
                                               "window_duration_seconds", "reserve_rate",
                                               "reserve_cap", NULL};
static const char *const k_any_limit_field[] = {"algorithm", "max_requests",
                                                "window_duration_seconds", "burst", "capacity",
                                                "refill_rate", "reserve_rate", "reserve_cap",
                                                NULL};

typedef struct limit_in {
    double v[8]; /* by k_any_limit_field index (0, "algorithm", unused) */
    int have[8];
} limit_in;
enum { F_MAX = 1, F_WINDOW, F_BURST, F_CAPACITY, F_REFILL, F_RESERVE_RATE, F_RESERVE_CAP };

static int need(const limit_in *in, int f, const char *where, char *err, size_t errlen)
{
    if (in->have[f])
        return 0;
    snprintf(err, errlen, "%smissing field \"%s\"", where, k_any_limit_field[f]);
    return -1;
}

/* Validate one limit built from JSON, naming the field(s) an error comes from: the library's
 * codes say which parameter is wrong, these say where the client wrote it. */
static int check_limit(const sl_limit *l, const char *cap, const char *rate, const char *where,
                       char *err, size_t errlen)
{
    sl_policy one = {1, {*l}};
    int rc = sl_policy_validate(&one);
    if (rc == SL_OK)
        return 0;
    const char *f = NULL;
    if (rc == SL_ECAPACITY || rc == SL_ELOGSIZE) {
        f = cap;
        if (l->algorithm == SL_BURST_RESERVE) { /* the base or the reserve's cap? */
            sl_policy base = {1, {*l}};
            base.limits[0].reserve_cap = 0;
            if (sl_policy_validate(&base) == SL_OK)
                f = "reserve_cap";
        }
    } else if (rc == SL_ERATE || (rc == SL_ESPAN && rate)) {
        f = rate;
    } else if (rc == SL_EWINDOW || rc == SL_ESPAN) {
        f = "window_duration_seconds";
    }
    if (!f) {
        snprintf(err, errlen, "%sinvalid policy: %s (%s)", where, sl_strerror(rc),
                 sl_err_name(rc));
        return -1;
    }
    snprintf(err, errlen, "%s%s \"%s\": %s (%s)", where, strchr(f, '/') ? "fields" : "field",
             f, sl_strerror(rc), sl_err_name(rc));
    return -1;
}

/* One limit object. */
static int limit_from_json(const json_t *o, const char *where, sl_limit *l, char *err,
                           size_t errlen)
{
    if (!json_is_object(o)) {
        snprintf(err, errlen, "%sa policy must be a JSON object", where);
        return -1;
    }
    memset(l, 0, sizeof *l);
    l->algorithm = SL_TOKEN_BUCKET;
    const json_t *a = json_object_get(o, "algorithm");
    if (a && (!json_is_string(a) ||
              sl_algorithm_parse(json_string_value(a), json_string_length(a), &l->algorithm) !=
                  SL_OK)) {
        snprintf(err, errlen,
                 "%sfield \"algorithm\" must be one of token_bucket, leaky_bucket, "
                 "fixed_window, sliding_window, sliding_log, burst_reserve, concurrency",
                 where);
        return -1;
    }
    sl_algorithm alg = l->algorithm;
    const char *const *fields = alg == SL_TOKEN_BUCKET || alg == SL_LEAKY_BUCKET ? k_bucket_fields
                                : alg == SL_BURST_RESERVE                        ? k_reserve_fields
                                                                                 : k_window_fields;
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)o, key, v)
    {
        if (in_list(key, fields))
            continue;
        if (in_list(key, k_any_limit_field))
            snprintf(err, errlen, "%sfield \"%s\" does not apply to algorithm %s", where, key,
                     sl_algorithm_name(alg));
        else
            snprintf(err, errlen, "%sunknown field \"%.64s\"", where, key);
        return -1;
    }
    limit_in in;
    memset(&in, 0, sizeof in);
    for (int f = F_MAX; f <= F_RESERVE_CAP; f++)
        if (num_field(o, where, k_any_limit_field[f], &in.v[f], &in.have[f], err, errlen) != 0)
            return -1;
    if (in.have[F_WINDOW] && !(in.v[F_WINDOW] > 0)) {
        snprintf(err, errlen, "%sfield \"window_duration_seconds\" must be > 0", where);
        return -1;
    }
    switch (alg) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        if (in.have[F_CAPACITY] || in.have[F_REFILL]) {
            if (in.have[F_MAX] || in.have[F_WINDOW] || in.have[F_BURST]) {
                snprintf(err, errlen,
                         "%suse either capacity and refill_rate, or max_requests and "
                         "window_duration_seconds (and burst)", where);
                return -1;
            }
            if (need(&in, F_CAPACITY, where, err, errlen) || need(&in, F_REFILL, where, err, errlen))
                return -1;
            l->limit = in.v[F_CAPACITY];
            l->rate = in.v[F_REFILL];
            return check_limit(l, "capacity", "refill_rate", where, err, errlen);
        }
        if (need(&in, F_MAX, where, err, errlen) || need(&in, F_WINDOW, where, err, errlen))
            return -1;
        l->limit = in.have[F_BURST] ? in.v[F_BURST] : in.v[F_MAX];
        l->rate = in.v[F_MAX] / in.v[F_WINDOW];
        return check_limit(l, in.have[F_BURST] ? "burst" : "max_requests",
                           "max_requests/window_duration_seconds", where, err, errlen);
    case SL_BURST_RESERVE:
        if (need(&in, F_MAX, where, err, errlen) || need(&in, F_WINDOW, where, err, errlen) ||
            need(&in, F_RESERVE_RATE, where, err, errlen) ||
            need(&in, F_RESERVE_CAP, where, err, errlen))
            return -1;
        l->limit = in.v[F_MAX] / in.v[F_WINDOW];
        l->rate = in.v[F_RESERVE_RATE];
        l->reserve_cap = in.v[F_RESERVE_CAP];
        return check_limit(l, "max_requests/window_duration_seconds", "reserve_rate", where,
                           err, errlen);
    default:
        if (need(&in, F_MAX, where, err, errlen) || need(&in, F_WINDOW, where, err, errlen))
            return -1;
        l->limit = in.v[F_MAX];
        l->window = in.v[F_WINDOW];
        return check_limit(l, "max_requests", NULL, where, err, errlen);
    }
}

static int invalid_policy(int rc, const char *where, char *err, size_t errlen)
{
    snprintf(err, errlen, "%sinvalid policy: %s (%s)", where, sl_strerror(rc), sl_err_name(rc));
    return -1;
}

/* A policy object: one limit, or {"limits": [ ... ]}. Validated. `where` prefixes errors. */
static int policy_from_json(const json_t *v, const char *where, sl_policy *p, char *err,
                            size_t errlen)
{
    memset(p, 0, sizeof *p);
    if (!json_is_object(v)) {
        snprintf(err, errlen, "%sa policy must be a JSON object", where);
        return -1;
    }
    const json_t *lims = json_object_get(v, "limits");
    if (!lims) {
        p->nlimits = 1;
        if (limit_from_json(v, where, &p->limits[0], err, errlen) != 0)
            return -1;
    } else {
        const char *key;
        json_t *other;
        json_object_foreach((json_t *)v, key, other)
        {
            if (strcmp(key, "limits") != 0) {
                snprintf(err, errlen, "%sfield \"%.64s\" cannot be used with \"limits\"",
                         where, key);
                return -1;
            }
        }
        if (!json_is_array(lims) || json_array_size(lims) < 1 ||
            json_array_size(lims) > SL_MAX_LIMITS) {
            snprintf(err, errlen, "%sfield \"limits\" must be an array of 1 to %d limits",
                     where, SL_MAX_LIMITS);
            return -1;
        }
        p->nlimits = (unsigned)json_array_size(lims);
        for (unsigned i = 0; i < p->nlimits; i++) {
            char w[96];
            snprintf(w, sizeof w, "%slimits[%u]: ", where, i);
            if (limit_from_json(json_array_get(lims, i), w, &p->limits[i], err, errlen) != 0)
                return -1;
            sl_policy one = {1, {p->limits[i]}};
            int rc = sl_policy_validate(&one);
            if (rc != SL_OK)
                return invalid_policy(rc, w, err, errlen);
        }
    }
    int rc = sl_policy_validate(p);
    return rc == SL_OK ? 0 : invalid_policy(rc, where, err, errlen);
}

/* The body as a policy, or -1 with the 400 sent. */
static int body_policy(ctx *x, sl_policy *p)
{
    json_t *root = body_object(x);
    if (!root)
        return -1;
    char err[512];
    int rc = policy_from_json(root, "", p, err, sizeof err);
    json_decref(root);
    if (rc != 0)
        reply_error(x, 400, NULL, "%s", err);
    return rc;
}

/* ---- decisions through admission control ------------------------------------------------ */

enum { F_CLOSE = 1, F_KEEP_ALIVE_10 = 2, F_HEAD = 4 }; /* sd_item.flags: the sd_http_tag */

/* Submit one decision. Ids longer than the library takes are refused here, with the
 * library's error, rather than copied into an item. */
static void submit(ctx *x, const seg key[3], uint64_t cost, const sl_policy *pol)
{
    for (int i = 0; i < 3; i++)
        if (key[i].len > SL_MAX_ID_LEN)
            return reply_lib(x, SL_EKEYLONG);
    sd_conn *c = x->c;
    sd_item *it = sd_item_new(c, key[0].p, key[0].len, key[1].p, key[1].len, key[2].p,
                              key[2].len);
    if (!it)
        return reply_error(x, 503, NULL, "out of memory");
    const sd_http_tag *t = &x->r->tag;
    it->kind = (int)x->ep;
    it->flags = (t->close ? F_CLOSE : 0) | (t->keep_alive_10 ? F_KEEP_ALIVE_10 : 0) |
                (t->head ? F_HEAD : 0);
    it->req.cost = cost;
    it->release = x->ep == SD_EP_RELEASE; /* cost is the lease id */
    /* a status: the key as a decision of cost 0 shows it, then whether one more would pass,
     * asked in order: in memory right after it (admission.c), on Redis in the same call (the
     * script's op "status", sl_rs_prepare_status) */
    it->peek_next = x->ep == SD_EP_STATUS;
    if (pol) {
        it->pol = *pol;
        it->req.inline_policy = &it->pol;
    }
    sd_sched_submit(c->sched, it, c->last_active_ms);
}

/* "RateLimit-Policy" and "RateLimit" as draft-ietf-httpapi-ratelimit-headers-11 (May 2026)
 * defines them: Lists of Structured Field Items, a String naming the policy with Integer
 * parameters q (quota), w (window, seconds, > 0), r (available quota), t (seconds until the
 * quota is restored). Plus Retry-After (RFC 9110, delay-seconds) on 429. */
static void rate_headers(resp_buf *h, const sl_decision *d, int denied)
{
    /* The window the policy was given in: the refill period is a whole number of ns per unit,
     * rounded up, so 3 per 1 s is 1.000000002 s; within a millisecond of a whole number of
     * seconds, that number (w is descriptive; t below stays rounded up: it is a promise) */
    int64_t w = ceil_div(d->window > SL_SECOND / 1000 ? d->window - SL_SECOND / 1000 : d->window,
                         SL_SECOND);
    resp_str(h, "RateLimit-Policy: \"default\";q=");
    resp_dec(h, (int64_t)d->limit);
    if (w > 0) {
        resp_str(h, ";w=");
        resp_dec(h, w);
    }
    resp_str(h, "\r\nRateLimit: \"default\";r=");
    resp_dec(h, (int64_t)d->remaining);
    resp_str(h, ";t=");
    resp_dec(h, ceil_div(d->reset_after, SL_SECOND));
    resp_raw(h, "\r\n", 2);
    if (denied) {
        resp_str(h, "Retry-After: ");
        resp_dec(h, ceil_div(d->retry_after, SL_SECOND));
        resp_raw(h, "\r\n", 2);
    }
}

/* The response to a decision (check: 200 or 429; status: 200). `now`: the limiter's clock,
 * which is wall time (anchored at start), for reset_time_seconds. Built without printf: this
 * is every check's reply. */
static void decision_reply(resp_buf *out, sd_http_tag tag, sd_endpoint ep,
                           const sl_decision *d, int64_t now)
{
    if (d->err != SL_OK) {
        char body[640];
        int n = snprintf(body, sizeof body, "{\"error\": \"%s (%s)\"}", sl_strerror(d->err),
                         sl_err_name(d->err));
        return sd_http_reply(out, tag, ep, lib_status(d->err), NULL, NULL, 0, body, (size_t)n);
    }
    int denied = ep == SD_EP_CHECK && !d->allowed;
    char hbuf[256], bbuf[512]; /* the longest reply needs about half of each */
    resp_buf h = {hbuf, 0, sizeof hbuf, 0, 1}, b = {bbuf, 0, sizeof bbuf, 0, 1};
    rate_headers(&h, d, denied);
    resp_str(&b, d->allowed ? "{\"allowed\": true, \"remaining_requests\": "
                            : "{\"allowed\": false, \"remaining_requests\": ");
    resp_dec(&b, (int64_t)d->remaining);
    resp_str(&b, ", \"reset_time_seconds\": ");
    resp_dec(&b, ceil_div(now + d->reset_after, SL_SECOND));
    resp_str(&b, ", \"retry_after_seconds\": ");
    resp_dec(&b, d->allowed ? 0 : ceil_div(d->retry_after, SL_SECOND));
    resp_str(&b, ", \"limit\": ");
    resp_dec(&b, (int64_t)d->limit);
    resp_str(&b, ", \"status\": \"processed\"");
    if (d->lease) {
        resp_str(&b, ", \"lease_id\": ");
        resp_dec(&b, (int64_t)d->lease);
    } else if (d->algorithm == SL_CONCURRENCY && ep == SD_EP_CHECK) {
        resp_str(&b, ", \"lease_id\": null");
    }
    if (d->algorithm == SL_LEAKY_BUCKET && d->allowed) {
        char num[48];
        int k = snprintf(num, sizeof num, ", \"delay_seconds\": %.9g", (double)d->delay / 1e9);
        resp_raw(&b, num, (size_t)k);
    }
    resp_raw(&b, "}", 1);
    if (h.oom || b.oom) /* cannot happen with these sizes; never send half a reply */
        out->oom = 1;
    else
        sd_http_reply(out, tag, ep, denied ? 429 : 200, NULL, h.p, h.len, b.p, b.len);
}

void sd_api_emit(sd_conn *c, sd_item *it, resp_buf *out)
{
    sd_http_tag tag = {(it->flags & F_CLOSE) != 0, (it->flags & F_KEEP_ALIVE_10) != 0,
                       (it->flags & F_HEAD) != 0};
    sd_endpoint ep = (sd_endpoint)it->kind;
    if (it->state == SD_ITEM_REJECTED_FULL || it->state == SD_ITEM_REJECTED_EXPIRED) {
        char body[160];
        int n = snprintf(body, sizeof body,
                         "{\"status\": \"rejected\", \"error\": \"%s; retry later\"}",
                         it->state == SD_ITEM_REJECTED_FULL
                             ? "overloaded: too many requests of this tenant waiting"
                             : "overloaded: the request waited too long for admission");
        static const char retry[] = "Retry-After: 1\r\n";
        return sd_http_reply(out, tag, ep, 503, NULL, retry, sizeof retry - 1, body, (size_t)n);
    }
    if (it->release) {
        if (it->d.err != SL_OK)
            return decision_reply(out, tag, ep, &it->d, 0); /* the error reply */
        static const char ok[] = "{\"released\": true}";
        return sd_http_reply(out, tag, ep, 200, NULL, NULL, 0, ok, sizeof ok - 1);
    }
    sl_limiter *l = c->srv->lim;
    int64_t now = sl_now(l); /* the decision was made moments ago, in this loop iteration */
    /* A status is a decision of cost 0 (which always passes: the key as it is now) whose
     * allowed and retry_after are those of a peek of cost 1 with its inline policy
     * (sd_item.peek_next), asked right after it by the scheduler (in memory) or in the same
     * call (Redis): not sl_peek here, which would see the decisions pipelined after it and
     * no inline policy. (On Redis it was one peek of cost 1, whose reset_after describes
     * the key after the request it imagines: one unit late; found by review.) */
    decision_reply(out, tag, ep, &it->d, now);
}

/* ---- decisions ---------------------------------------------------------------------------- */

static int key_fields(const json_t *o, seg key[3], char *err, size_t errlen)
{
    return str_field(o, "tenant_id", &key[0].p, &key[0].len, err, errlen) ||
           str_field(o, "action_type", &key[1].p, &key[1].len, err, errlen) ||
           str_field(o, "client_id", &key[2].p, &key[2].len, err, errlen);
}

/* POST /api/check_and_consume */
/* The body of a check as it almost always is: one flat object of plain strings and numbers,
 * each of the known fields at most once. Parsed here without building a JSON tree (jansson
 * costs ~13,000 instructions per request, most of a check's work); anything else — escapes,
 * non-ASCII, other fields, duplicates, other types — returns -1 and the body goes to jansson,
 * which also words the errors. */
static int fast_check(const char *p, size_t n, seg key[3], json_int_t *cost, int *have_cost,
                      double *max, int *have_max, double *win, int *have_win)
{
    static const char *const names[] = {"tenant_id", "action_type", "client_id", "cost",
                                        "max_requests", "window_duration_seconds"};
    int seen = 0;
    size_t i = 0;
#define WS() while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r')) i++
    WS();
    if (i >= n || p[i++] != '{')
        return -1;
    for (;;) {
        WS();
        if (i >= n || p[i++] != '"')
            return -1;
        size_t k0 = i;
        while (i < n && p[i] != '"' && p[i] != '\\' && (unsigned char)p[i] >= 0x20 &&
               (unsigned char)p[i] < 0x80)
            i++;
        if (i >= n || p[i] != '"')
            return -1;
        int f = -1;
        for (int j = 0; j < 6; j++)
            if (strlen(names[j]) == i - k0 && memcmp(names[j], p + k0, i - k0) == 0)
                f = j;
        i++;
        if (f < 0 || (seen & (1 << f)))
            return -1;
        seen |= 1 << f;
        WS();
        if (i >= n || p[i++] != ':')
            return -1;
        WS();
        if (f < 3) { /* a plain string */
            if (i >= n || p[i++] != '"')
                return -1;
            size_t v0 = i;
            while (i < n && p[i] != '"' && p[i] != '\\' && (unsigned char)p[i] >= 0x20 &&
                   (unsigned char)p[i] < 0x80)
                i++;
            if (i >= n || p[i] != '"')
                return -1;
            key[f].p = p + v0;
            key[f].len = i - v0;
            i++;
        } else { /* a number: JSON's grammar, then strtod / strtoll on a copy */
            size_t v0 = i, digits = 0;
            int frac = 0;
            if (i < n && p[i] == '-')
                i++;
            if (i < n && p[i] == '0')
                i++, digits++;
            else
                while (i < n && p[i] >= '0' && p[i] <= '9')
                    i++, digits++;
            if (!digits || digits > 15)
                return -1;
            if (i < n && p[i] == '.') {
                frac = 1, i++;
                size_t d = i;
                while (i < n && p[i] >= '0' && p[i] <= '9')
                    i++;
                if (i == d)
                    return -1;
            }
            if (i < n && (p[i] == 'e' || p[i] == 'E'))
                return -1; /* rare: let jansson */
            char num[40];
            if (i - v0 >= sizeof num)
                return -1;
            memcpy(num, p + v0, i - v0);
            num[i - v0] = 0;
            if (f == 3) {
                if (frac)
                    return -1;
                *cost = strtoll(num, NULL, 10);
                if (*cost < 0)
                    return -1;
                *have_cost = 1;
            } else {
                *(f == 4 ? max : win) = strtod(num, NULL);
                *(f == 4 ? have_max : have_win) = 1;
            }
        }
        WS();
        if (i < n && p[i] == ',') {
            i++;
            continue;
        }
        if (i >= n || p[i++] != '}')
            return -1;
        WS();
        return i == n && (seen & 7) == 7 ? 0 : -1;
    }
#undef WS
}

/* The inline policy of a check or status (max_requests and window_duration_seconds, both or
 * neither: a token bucket of that capacity refilling it per window) into *pol; 0, or -1 with
 * err naming the `what` ("field", "parameter") at fault. */
static int inline_policy(double max, int have_max, double win, int have_win, const char *what,
                         sl_policy *pol, char *err, size_t errlen)
{
    if (have_max != have_win) {
        snprintf(err, errlen, "%s \"%s\" is required with \"%s\"", what,
                 have_max ? "window_duration_seconds" : "max_requests",
                 have_max ? "max_requests" : "window_duration_seconds");
        return -1;
    }
    if (!have_max)
        return 0;
    if (!(win > 0)) {
        snprintf(err, errlen, "%s \"window_duration_seconds\" must be > 0", what);
        return -1;
    }
    *pol = SL_POLICY_TOKEN_BUCKET(max, max / win);
    int rc = sl_policy_validate(pol);
    if (rc != SL_OK) {
        invalid_policy(rc, "max_requests/window_duration_seconds: ", err, errlen);
        return -1;
    }
    return 0;
}

static void h_check(ctx *x, int method)
{
    (void)method;
    static const char *const fields[] = {"tenant_id", "client_id", "action_type", "cost",
                                         "max_requests", "window_duration_seconds", NULL};
    json_t *o = NULL;
    char err[512];
    seg key[3];
    json_int_t cost = 1;
    int have_cost = 0, have_max = 0, have_win = 0;
    double max = 0, win = 0;
    sl_policy pol;
    if (fast_check(x->r->body, x->r->body_len, key, &cost, &have_cost, &max, &have_max, &win,
                   &have_win) != 0) {
        cost = 1, max = win = 0;
        if (!(o = body_object(x)))
            return;
        if (only_fields(o, fields, "", err, sizeof err) || key_fields(o, key, err, sizeof err) ||
            int_field(o, "cost", 0, JSON_INTEGER_MAX, &cost, &have_cost, err, sizeof err) ||
            num_field(o, "", "max_requests", &max, &have_max, err, sizeof err) ||
            num_field(o, "", "window_duration_seconds", &win, &have_win, err, sizeof err))
            goto bad;
    }
    if (inline_policy(max, have_max, win, have_win, "field", &pol, err, sizeof err) != 0)
        goto bad;
    submit(x, key, (uint64_t)cost, have_max ? &pol : NULL); /* copies the key */
    json_decref(o);
    return;
bad:
    json_decref(o);
    reply_error(x, 400, NULL, "%s", err);
}

/* GET /api/status/{tenant}/{client}/{action}: the key as it is, consuming nothing and creating
 * no key. Decided in order with the connection's other requests, as a decision of cost 0
 * (which gives the units left now); sd_api_emit adds whether a check of cost 1 would pass. */
static void h_status(ctx *x, int method)
{
    (void)method;
    seg key[3] = {x->arg[0], x->arg[2], x->arg[1]};
    /* the query may carry the check's inline policy: ?max_requests=N&window_duration_seconds=S */
    const char *t = x->r->target, *q = memchr(t, '?', x->r->target_len);
    const char *end = t + x->r->target_len, *hash = q ? memchr(q, '#', (size_t)(end - q)) : NULL;
    double v[2] = {0, 0};
    int have[2] = {0, 0};
    char err[512];
    sl_policy pol;
    if (hash)
        end = hash;
    for (const char *p = q ? q + 1 : end; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p)), *e = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(e - p));
        size_t nl = (size_t)((eq ? eq : e) - p);
        int f = nl == 12 && memcmp(p, "max_requests", 12) == 0              ? 0
                : nl == 23 && memcmp(p, "window_duration_seconds", 23) == 0 ? 1
                                                                            : -1;
        size_t vl = eq ? (size_t)(e - eq - 1) : 0;
        json_error_t je;
        json_t *jv = NULL;
        if (nl == 0 && !eq) { /* "a&&b" or a trailing '&' */
            p = e + 1;
            continue;
        }
        if (f < 0)
            return reply_error(x, 400, NULL, "unknown query parameter \"%.*s\" (max_requests, "
                               "window_duration_seconds)", (int)(nl > 64 ? 64 : nl), p);
        if (have[f])
            return reply_error(x, 400, NULL, "query parameter \"%s\" given twice",
                               f ? "window_duration_seconds" : "max_requests");
        /* a number as a body writes it, read by the body's parser (JSON's grammar: no hex,
         * leading zero or '+', inf or nan; out of range is an error), then checked as a
         * body's is (inline_policy) */
        size_t ok = 0;
        while (ok < vl && memchr("0123456789+-.eE", eq[1 + ok], 15))
            ok++;
        je.text[0] = 0;
        if (vl > 0 && ok == vl)
            jv = json_loadb(eq + 1, vl, JSON_DECODE_ANY, &je);
        if (!json_is_number(jv)) {
            json_decref(jv);
            return reply_error(x, 400, NULL, "query parameter \"%s\" must be a number%s%s",
                               f ? "window_duration_seconds" : "max_requests",
                               je.text[0] ? ": " : "", je.text);
        }
        v[f] = json_number_value(jv);
        json_decref(jv);
        have[f] = 1;
        p = e + 1;
    }
    if (inline_policy(v[0], have[0], v[1], have[1], "parameter", &pol, err, sizeof err) != 0)
        return reply_error(x, 400, NULL, "%s", err);
    submit(x, key, 0, have[0] ? &pol : NULL);
}

/* POST /api/release */
static void h_release(ctx *x, int method)
{
    (void)method;
    static const char *const fields[] = {"tenant_id", "client_id", "action_type", "lease_id",
                                         NULL};
    json_t *o = body_object(x);
    if (!o)
        return;
    char err[512];
    seg key[3];
    json_int_t lease = 0;
    int have = 0, bad = only_fields(o, fields, "", err, sizeof err) ||
                        key_fields(o, key, err, sizeof err) ||
                        int_field(o, "lease_id", 1, JSON_INTEGER_MAX, &lease, &have, err,
                                  sizeof err);
    if (!bad && !have) {
        snprintf(err, sizeof err, "missing field \"lease_id\"");
        bad = 1;
    }
    if (bad) {
        json_decref(o);
        return reply_error(x, 400, NULL, "%s", err);
    }
    submit(x, key, (uint64_t)lease, NULL); /* in order with the connection's decisions */
    json_decref(o);
}

/* ---- small endpoints -------------------------------------------------------------------- */

/* GET /api/health */
/* GET /api/health: 200 while sluiced serves. On the Redis store it also says whether Redis
 * is reachable ("degraded": decisions follow --fail-mode), still with 200: every sluiced of a
 * deployment shares its Redis, so taking them out of a balancer would not help. */
static void h_health(ctx *x, int method)
{
    (void)method;
    sd_server *srv = x->c->srv;
    sl_store_stats st;
    int redis = srv->rstore && sl_store_stats_get(srv->lim, &st) == SL_OK;
    /* degraded: unreachable, or decisions made by the fail mode in the last 10 s (Redis
     * answering with errors: out of memory, NOAUTH, ...) */
    int degraded = redis && (!st.up || st.fallback_ms_ago < 10000);
    resp_buf o = {0};
    jraw(&o, degraded ? "{\"status\": \"degraded\", \"version\": "
                      : "{\"status\": \"ok\", \"version\": ");
    jcstr(&o, sl_version_string());
    if (redis) {
        jraw(&o, ", \"store\": \"redis\", \"redis_up\": ");
        jraw(&o, st.up ? "true" : "false");
        jraw(&o, ", \"fail_mode\": ");
        jcstr(&o, srv->cfg.fail_mode);
        jraw(&o, ", \"fail_mode_decided_ms_ago\": ");
        if (st.fallback_ms_ago == UINT64_MAX)
            jraw(&o, "null");
        else
            jint(&o, (int64_t)st.fallback_ms_ago);
    }
    jraw(&o, "}");
    reply_json(x, 200, &o);
}

/* GET /metrics. With many tenants the exposition takes long to build (65,536 tenants: ~12 MB,
 * ~150 ms), so it is built on libuv's thread pool while this worker serves its other
 * connections; the reply keeps its place in this connection's order, and the connection
 * reads no further request until it is out (one scrape at a time per connection: a client
 * pipelining scrapes cannot pile up renders). */
typedef struct scrape {
    sd_server *srv;
    sd_sched *sched;
    sd_item *it;
    sd_http_tag tag;
    sd_endpoint ep;
} scrape;

static void scrape_work(void *arg)
{
    scrape *s = arg;
    resp_buf o = {0};
    sd_metrics_render(s->srv, &o);
    if (o.oom)
        s->it->lit.oom = 1;
    else
        sd_http_reply(&s->it->lit, s->tag, s->ep, 200,
                      "text/plain; version=0.0.4; charset=utf-8", NULL, 0, o.p, o.len);
    resp_buf_free(&o);
}

static void scrape_done(void *arg)
{
    scrape *s = arg;
    if (s->it->lit.oom && s->it->c)
        s->it->c->out.oom = 1; /* the connection closes, as for any reply without memory */
    sd_item_literal_done(s->sched, s->it);
    free(s);
}

static void h_metrics(ctx *x, int method)
{
    (void)method;
    scrape *s = malloc(sizeof *s);
    sd_item *it = s ? sd_item_pending(x->c) : NULL;
    if (!it) {
        free(s);
        x->c->out.oom = 1;
        return;
    }
    *s = (scrape){x->c->srv, x->c->sched, it, x->r->tag, x->ep};
    x->c->ordered_wait = 1;
    if (sd_offload(x->c, scrape_work, scrape_done, s) != 0) {
        scrape_work(s); /* the pool refused: build it here, as before */
        scrape_done(s);
    }
}

/* ---- configuration ------------------------------------------------------------------------ */

typedef struct members {
    resp_buf *o;
    int n;
} members;

static int weight_item(void *arg, const char *tenant, size_t len, unsigned weight)
{
    members *m = arg;
    jkey_id(m->o, &m->n, tenant, len);
    jint(m->o, weight);
    return 0;
}

/* The members of GET|PUT /api/config/global: the default policy and admission control. */
static void global_body(sd_server *srv, resp_buf *o, int *n, int weights)
{
    sl_policy p;
    sl_default_get(srv->lim, &p);
    jkey(o, n, "default_policy");
    jpolicy(o, &p);
    jkey(o, n, "max_global_concurrent_requests");
    jint(o, atomic_load(&srv->adm.max_global_concurrent));
    jkey(o, n, "max_tenant_queue_size");
    jint(o, atomic_load(&srv->adm.max_tenant_queue));
    jkey(o, n, "max_queue_wait_ms");
    jint(o, atomic_load(&srv->adm.max_queue_wait_ms));
    if (!weights)
        return;
    jkey(o, n, "tenant_weights");
    members w = {o, 0};
    resp_raw(o, "{", 1);
    sd_weight_list(&srv->adm, weight_item, &w);
    resp_raw(o, "}", 1);
}

typedef struct list_ctx {
    resp_buf *o;
    int n;
    const char *tenant; /* filter (GET /api/config/tenant/{t}); NULL = all */
    size_t tenant_len;
    sl_scope scope;     /* with a tenant: the scope listed */
} list_ctx;

static const char *const k_scopes[] = {"", "tenant", "action", "client"};

static int rule_item(void *arg, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    list_ctx *x = arg;
    resp_buf *o = x->o;
    int n = 0;
    if (x->n++)
        resp_raw(o, ", ", 2);
    resp_raw(o, "{", 1);
    jkey(o, &n, "scope");
    jcstr(o, k_scopes[scope]);
    jkey(o, &n, "tenant_id");
    jid(o, k->tenant, k->tenant_len);
    if (scope != SL_SCOPE_TENANT) {
        jkey(o, &n, "action_type");
        jid(o, k->action, k->action_len);
    }
    if (scope == SL_SCOPE_CLIENT) {
        jkey(o, &n, "client_id");
        jstr(o, k->client, k->client_len);
    }
    jkey(o, &n, "policy");
    jpolicy(o, p);
    resp_raw(o, "}", 1);
    return 0;
}

static int tier_item(void *arg, const char *name, const sl_policy *p)
{
    list_ctx *x = arg;
    if (x->n++)
        resp_raw(x->o, ", ", 2);
    jcstr(x->o, name);
    resp_raw(x->o, ": ", 2);
    jpolicy(x->o, p);
    return 0;
}

/* {"tenant_id", "client_id", "tier"}: an assignment, alone or in a list */
static void jassignment(resp_buf *o, const sl_key *k, const char *tier)
{
    int n = 0;
    resp_raw(o, "{", 1);
    jkey(o, &n, "tenant_id");
    jid(o, k->tenant, k->tenant_len);
    jkey(o, &n, "client_id");
    jstr(o, k->client, k->client_len);
    jkey(o, &n, "tier");
    jcstr(o, tier);
    resp_raw(o, "}", 1);
}

static int assign_item(void *arg, const sl_key *k, const char *tier)
{
    list_ctx *x = arg;
    if (x->n++)
        resp_raw(x->o, ", ", 2);
    jassignment(x->o, k, tier);
    return 0;
}

static void tiers_object(sl_limiter *l, resp_buf *o)
{
    list_ctx lx = {o, 0, NULL, 0, 0};
    resp_raw(o, "{", 1);
    sl_tier_list(l, tier_item, &lx);
    resp_raw(o, "}", 1);
}

/* GET /api/config */
static void h_config(ctx *x, int method)
{
    (void)method;
    sd_server *srv = x->c->srv;
    resp_buf o = {0};
    int n = 0;
    resp_raw(&o, "{", 1);
    global_body(srv, &o, &n, 1);
    jkey(&o, &n, "rules");
    resp_raw(&o, "[", 1);
    list_ctx lx = {&o, 0, NULL, 0, 0};
    sl_rule_list(srv->lim, rule_item, &lx);
    resp_raw(&o, "]", 1);
    jkey(&o, &n, "tiers");
    tiers_object(srv->lim, &o);
    jkey(&o, &n, "tier_assignments");
    resp_raw(&o, "[", 1);
    lx.n = 0;
    sl_tier_assignments(srv->lim, assign_item, &lx);
    resp_raw(&o, "]}", 2);
    reply_json(x, 200, &o);
}

static int adm_field(const json_t *o, int i, json_int_t *v, int *have, char *err, size_t n)
{
    const sd_adm_field *f = &sd_adm_fields[i];
    return int_field(o, f->name, f->min, f->max, v, have, err, n);
}

/* GET|PUT /api/config/global. PUT checks every field before it changes anything; what GET
 * returns, PUT accepts (tenant weights are per tenant, and in GET /api/config). */
static void h_global(ctx *x, int method)
{
    sd_server *srv = x->c->srv;
    if (method == SD_HTTP_PUT) {
        static const char *const fields[] = {"max_global_concurrent_requests",
                                             "max_tenant_queue_size", "max_queue_wait_ms",
                                             "default_policy", NULL};
        json_t *o = body_object(x);
        if (!o)
            return;
        char err[512];
        json_int_t global = 0, queue_size = 0, wait_ms = 0;
        int have_global, have_queue, have_wait;
        sl_policy p;
        const json_t *pv = json_object_get(o, "default_policy");
        if (only_fields(o, fields, "", err, sizeof err) ||
            adm_field(o, 0, &global, &have_global, err, sizeof err) ||
            adm_field(o, 1, &queue_size, &have_queue, err, sizeof err) ||
            adm_field(o, 2, &wait_ms, &have_wait, err, sizeof err) ||
            (pv && policy_from_json(pv, "default_policy: ", &p, err, sizeof err))) {
            json_decref(o);
            return reply_error(x, 400, NULL, "%s", err);
        }
        json_decref(o);
        int64_t vals[3] = {global, queue_size, wait_ms};
        int set[3] = {have_global, have_queue, have_wait};
        int rc = sd_cfg_global_set(srv, pv ? &p : NULL, vals, set); /* durable, all or none */
        if (rc != SL_OK)
            return reply_lib(x, rc);
        sd_info("config: global settings changed by %s", x->c->peer);
    }
    resp_buf o = {0};
    int n = 0;
    resp_raw(&o, "{", 1);
    global_body(srv, &o, &n, 0);
    resp_raw(&o, "}", 1);
    reply_json(x, 200, &o);
}

static int same_tenant(const sl_key *k, const char *t, size_t tl)
{
    size_t kl = sl_norm_default(k->tenant, k->tenant_len);
    tl = sl_norm_default(t, tl);
    return kl == tl && memcmp(k->tenant, t, tl) == 0;
}

static int tenant_rule_item(void *arg, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    list_ctx *x = arg;
    resp_buf *o = x->o;
    if (scope != x->scope || !same_tenant(k, x->tenant, x->tenant_len))
        return 0;
    if (x->n++)
        resp_raw(o, ", ", 2);
    if (scope == SL_SCOPE_ACTION) {
        jid(o, k->action, k->action_len);
        resp_raw(o, ": ", 2);
        jpolicy(o, p);
        return 0;
    }
    int n = 0;
    resp_raw(o, "{", 1);
    jkey(o, &n, "client_id");
    jstr(o, k->client, k->client_len);
    jkey(o, &n, "action_type");
    jid(o, k->action, k->action_len);
    jkey(o, &n, "policy");
    jpolicy(o, p);
    resp_raw(o, "}", 1);
    return 0;
}

/* PUT/DELETE (and GET) of one rule. */
static void rule_method(ctx *x, int method, sl_scope scope, const sl_key *k)
{
    sl_limiter *l = x->c->srv->lim;
    sl_policy p;
    int rc;
    if (method == SD_HTTP_GET) {
        if ((rc = sl_rule_get(l, scope, k, &p)) != SL_OK)
            return reply_lib(x, rc);
        return reply_policy(x, &p);
    }
    if (method == SD_HTTP_DELETE) {
        if ((rc = sd_cfg_rule_del(x->c->srv, scope, k)) != SL_OK)
            return reply_lib(x, rc);
        return reply_deleted(x);
    }
    if (body_policy(x, &p) != 0)
        return;
    if ((rc = sd_cfg_rule_set(x->c->srv, scope, k, &p)) != SL_OK)
        return reply_lib(x, rc);
    reply_policy(x, &p);
}

/* One "client": "tier" of the tenant in x (GET /api/config/tenant/{t}). */
static int tenant_assign_item(void *arg, const sl_key *k, const char *tier)
{
    list_ctx *x = arg;
    if (!same_tenant(k, x->tenant, x->tenant_len))
        return 0;
    if (x->n++)
        resp_raw(x->o, ", ", 2);
    jstr(x->o, k->client, k->client_len);
    resp_raw(x->o, ": ", 2);
    jcstr(x->o, tier);
    return 0;
}

/* GET|PUT|DELETE /api/config/tenant/{t}: GET shows every rule and tier assignment of the
 * tenant; PUT and DELETE set the tenant's default. */
static void h_tenant(ctx *x, int method)
{
    const seg *t = &x->arg[0];
    sl_key k = {t->p, t->len, NULL, 0, NULL, 0};
    if (method != SD_HTTP_GET)
        return rule_method(x, method, SL_SCOPE_TENANT, &k);
    sl_limiter *l = x->c->srv->lim;
    resp_buf o = {0};
    int n = 0;
    sl_policy p;
    resp_raw(&o, "{", 1);
    jkey(&o, &n, "tenant_id");
    jid(&o, t->p, t->len);
    jkey(&o, &n, "default_policy");
    int rc = sl_rule_get(l, SL_SCOPE_TENANT, &k, &p);
    if (rc == SL_OK)
        jpolicy(&o, &p);
    else
        jraw(&o, "null");
    list_ctx lx = {&o, 0, t->p, t->len, SL_SCOPE_ACTION};
    jkey(&o, &n, "actions");
    resp_raw(&o, "{", 1);
    sl_rule_list(l, tenant_rule_item, &lx);
    resp_raw(&o, "}", 1);
    lx.n = 0;
    lx.scope = SL_SCOPE_CLIENT;
    jkey(&o, &n, "clients");
    resp_raw(&o, "[", 1);
    sl_rule_list(l, tenant_rule_item, &lx);
    resp_raw(&o, "]", 1);
    lx.n = 0;
    jkey(&o, &n, "client_tiers");
    resp_raw(&o, "{", 1);
    sl_tier_assignments(l, tenant_assign_item, &lx);
    resp_raw(&o, "}}", 2);
    if (rc != SL_OK && rc != SL_ENOTFOUND) {
        resp_buf_free(&o);
        return reply_lib(x, rc);
    }
    reply_json(x, 200, &o);
}

/* /api/config/tenant/{t}/action/{a} */
static void h_action_rule(ctx *x, int method)
{
    sl_key k = {x->arg[0].p, x->arg[0].len, x->arg[1].p, x->arg[1].len, NULL, 0};
    rule_method(x, method, SL_SCOPE_ACTION, &k);
}

/* /api/config/tenant/{t}/client/{c}/action/{a} */
static void h_client_rule(ctx *x, int method)
{
    sl_key k = {x->arg[0].p, x->arg[0].len, x->arg[2].p, x->arg[2].len, x->arg[1].p,
                x->arg[1].len};
    rule_method(x, method, SL_SCOPE_CLIENT, &k);
}

/* A tier name as the library takes it (NUL-terminated); -1 with the 400 sent. */
static int tier_name(ctx *x, const char *s, size_t n, char *out)
{
    if (n == 0 || n > SL_MAX_ID_LEN || memchr(s, 0, n)) {
        reply_error(x, 400, NULL, "tier names are 1 to %d bytes without NUL", SL_MAX_ID_LEN);
        return -1;
    }
    memcpy(out, s, n);
    out[n] = 0;
    return 0;
}

/* The tier named in the path does not exist. */
static void reply_no_tier(ctx *x)
{
    reply_error(x, 404, NULL, "%s (%s)", sl_strerror(SL_ETIER), sl_err_name(SL_ETIER));
}

/* GET /api/config/tiers */
static void h_tiers(ctx *x, int method)
{
    (void)method;
    resp_buf o = {0};
    jraw(&o, "{\"tiers\": ");
    tiers_object(x->c->srv->lim, &o);
    jraw(&o, "}");
    reply_json(x, 200, &o);
}

/* GET|PUT|DELETE /api/config/tiers/{name} */
static void h_tier(ctx *x, int method)
{
    sl_limiter *l = x->c->srv->lim;
    char name[SL_MAX_ID_LEN + 1];
    if (tier_name(x, x->arg[0].p, x->arg[0].len, name) != 0)
        return;
    sl_policy p;
    int rc;
    if (method == SD_HTTP_GET) {
        if ((rc = sl_tier_get(l, name, &p)) != SL_OK)
            return rc == SL_ETIER ? reply_no_tier(x) : reply_lib(x, rc);
        return reply_policy(x, &p);
    }
    if (method == SD_HTTP_DELETE) {
        if ((rc = sd_cfg_tier_del(x->c->srv, name)) != SL_OK)
            return rc == SL_ETIER ? reply_no_tier(x) : reply_lib(x, rc);
        return reply_deleted(x);
    }
    if (body_policy(x, &p) != 0)
        return;
    if ((rc = sd_cfg_tier_set(x->c->srv, name, &p)) != SL_OK)
        return reply_lib(x, rc);
    reply_policy(x, &p);
}

/* {"tenant_id", "client_id", "tier"} */
static void reply_assignment(ctx *x, const sl_key *k, const char *tier)
{
    resp_buf b = {0};
    jassignment(&b, k, tier);
    reply_json(x, 200, &b);
}

/* GET|PUT|DELETE /api/config/tenant/{t}/client/{c}/tier, body {"tier": "gold"} */
static void h_assign(ctx *x, int method)
{
    sl_key k = {x->arg[0].p, x->arg[0].len, NULL, 0, x->arg[1].p, x->arg[1].len};
    char name[SL_MAX_ID_LEN + 1];
    int rc;
    if (method == SD_HTTP_GET || method == SD_HTTP_DELETE) {
        rc = method == SD_HTTP_GET ? sl_tier_assignment(x->c->srv->lim, &k, name, sizeof name)
                                   : sd_cfg_tier_assign(x->c->srv, &k, NULL);
        if (rc == SL_ENOTFOUND)
            return reply_error(x, 404, NULL, "no tier is assigned to this client");
        if (rc != SL_OK)
            return reply_lib(x, rc);
        return method == SD_HTTP_GET ? reply_assignment(x, &k, name) : reply_deleted(x);
    }
    static const char *const fields[] = {"tier", NULL};
    json_t *o = body_object(x);
    if (!o)
        return;
    char err[512];
    seg t;
    if (only_fields(o, fields, "", err, sizeof err) ||
        str_field(o, "tier", &t.p, &t.len, err, sizeof err)) {
        json_decref(o);
        return reply_error(x, 400, NULL, "%s", err);
    }
    rc = tier_name(x, t.p, t.len, name);
    json_decref(o);
    if (rc != 0)
        return;
    if ((rc = sd_cfg_tier_assign(x->c->srv, &k, name)) != SL_OK)
        return rc == SL_ETIER ? reply_error(x, 400, NULL, "unknown tier \"%s\" (SL_ETIER)", name)
                              : reply_lib(x, rc);
    reply_assignment(x, &k, name);
}

/* GET|PUT|DELETE /api/config/tenant/{t}/weight, body {"weight": 1..1000}: the tenant's share
 * while requests wait for admission (DELETE: back to 1). */
static void h_weight(ctx *x, int method)
{
    sd_server *srv = x->c->srv;
    json_int_t w = 1;
    if (x->arg[0].len > SL_MAX_ID_LEN)
        return reply_lib(x, SL_EKEYLONG);
    if (method == SD_HTTP_GET) {
        w = sd_weight_get(&srv->adm, x->arg[0].p, x->arg[0].len);
    } else {
        if (method == SD_HTTP_PUT) {
            static const char *const fields[] = {"weight", NULL};
            json_t *o = body_object(x);
            if (!o)
                return;
            char err[512];
            int have;
            int bad = only_fields(o, fields, "", err, sizeof err) ||
                      int_field(o, "weight", 1, 1000, &w, &have, err, sizeof err);
            json_decref(o);
            if (bad || !have)
                return reply_error(x, 400, NULL, "%s",
                                   bad ? err : "field \"weight\" is required (1..1000)");
        }
        int rc = sd_cfg_weight_set(srv, x->arg[0].p, x->arg[0].len, (unsigned)w);
        if (rc != SL_OK)
            return reply_lib(x, rc);
    }
    resp_buf b = {0};
    int n = 0;
    resp_raw(&b, "{", 1);
    jkey(&b, &n, "tenant_id");
    jid(&b, x->arg[0].p, x->arg[0].len);
    jkey(&b, &n, "weight");
    jint(&b, w);
    resp_raw(&b, "}", 1);
    reply_json(x, 200, &b);
}

/* POST /api/admin/snapshot: write the bucket-state snapshot now (this connection waits). */
static void h_snapshot(ctx *x, int method)
{
    (void)method;
    sd_save_result r = sd_state_save(x->c->srv);
    if (r.rc == SL_ENOTFOUND)
        return reply_error(x, 409, NULL, "%s",
                           x->c->srv->rstore
                               ? "the Redis store keeps bucket state in Redis"
                               : "no --data-dir: bucket state is not kept on disk");
    if (r.rc == SL_EIO)
        return reply_error(x, r.err == ENOSPC || r.err == EDQUOT ? 507 : 500, NULL,
                           "snapshot not saved: %s", strerror(r.err));
    if (r.rc != SL_OK)
        return reply_lib(x, r.rc);
    resp_buf b = {0};
    int n = 0;
    resp_raw(&b, "{", 1);
    jkey(&b, &n, "saved");
    jraw(&b, "true");
    jkey(&b, &n, "keys");
    jint(&b, (int64_t)r.keys);
    jkey(&b, &n, "milliseconds");
    jint(&b, r.ms);
    resp_raw(&b, "}", 1);
    reply_json(x, 200, &b);
}

/* ---- routing -------------------------------------------------------------------------------- */

#define M(m) (1u << (m))
typedef struct route {
    const char *pattern; /* '*' matches one segment */
    sd_endpoint ep;
    unsigned methods;    /* M(SD_HTTP_...); GET implies HEAD */
    void (*fn)(ctx *x, int method);
} route;

static const route k_routes[] = {
    {"/api/check_and_consume", SD_EP_CHECK, M(SD_HTTP_POST), h_check},
    {"/api/status/*/*/*", SD_EP_STATUS, M(SD_HTTP_GET), h_status},
    {"/api/release", SD_EP_RELEASE, M(SD_HTTP_POST), h_release},
    {"/api/health", SD_EP_HEALTH, M(SD_HTTP_GET), h_health},
    {"/api/admin/snapshot", SD_EP_CONFIG, M(SD_HTTP_POST), h_snapshot},
    {"/api/config", SD_EP_CONFIG, M(SD_HTTP_GET), h_config},
    {"/api/config/global", SD_EP_CONFIG, M(SD_HTTP_GET) | M(SD_HTTP_PUT), h_global},
    {"/api/config/tiers", SD_EP_CONFIG, M(SD_HTTP_GET), h_tiers},
    {"/api/config/tiers/*", SD_EP_CONFIG, M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE),
     h_tier},
    {"/api/config/tenant/*", SD_EP_CONFIG, M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE),
     h_tenant},
    {"/api/config/tenant/*/action/*", SD_EP_CONFIG,
     M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE), h_action_rule},
    {"/api/config/tenant/*/client/*/action/*", SD_EP_CONFIG,
     M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE), h_client_rule},
    {"/api/config/tenant/*/weight", SD_EP_CONFIG,
     M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE), h_weight},
    {"/api/config/tenant/*/client/*/tier", SD_EP_CONFIG,
     M(SD_HTTP_GET) | M(SD_HTTP_PUT) | M(SD_HTTP_DELETE),
     h_assign},
    {"/metrics", SD_EP_METRICS, M(SD_HTTP_GET), h_metrics},
};
#define NROUTES (sizeof k_routes / sizeof k_routes[0])

/* Split the path of a request-target into percent-decoded segments (decoded into `buf`,
 * at least as long as the target). Splitting comes first, so "%2F" stays inside a segment.
 * Returns the number of segments, or SPLIT_BAD_TARGET (not a path: "*", "host:port"),
 * SPLIT_BAD_ESCAPE (a '%' without two hex digits), SPLIT_TOO_DEEP (more segments than any
 * route has). */
enum { SPLIT_BAD_TARGET = -1, SPLIT_BAD_ESCAPE = -2, SPLIT_TOO_DEEP = -3 };

static int split_path(const char *t, size_t n, char *buf, seg *segs)
{
    size_t i = 0;
    if ((n >= 7 && strncasecmp(t, "http://", 7) == 0) ||
        (n >= 8 && strncasecmp(t, "https://", 8) == 0)) {
        i = t[4] == ':' ? 7 : 8; /* absolute-form: skip the authority */
        while (i < n && t[i] != '/' && t[i] != '?')
            i++;
    }
    size_t end = i;
    while (end < n && t[end] != '?' && t[end] != '#')
        end++;
    if (i >= end || t[i] != '/')
        return i == end && i > 0 ? 0 : SPLIT_BAD_TARGET; /* "http://host": the root */
    int ns = 0;
    size_t out = 0;
    while (i < end) {
        i++; /* the '/' */
        if (ns == MAX_SEGS)
            return SPLIT_TOO_DEEP;
        segs[ns].p = buf + out;
        size_t start = out;
        while (i < end && t[i] != '/') {
            if (t[i] == '%') {
                int hi = i + 2 < end ? sd_hex_digit(t[i + 1]) : -1;
                int lo = i + 2 < end ? sd_hex_digit(t[i + 2]) : -1;
                if (hi < 0 || lo < 0)
                    return SPLIT_BAD_ESCAPE;
                buf[out++] = (char)(hi * 16 + lo);
                i += 3;
            } else {
                buf[out++] = t[i++];
            }
        }
        segs[ns++].len = out - start;
    }
    return ns;
}

static int match(const char *pat, const seg *s, int ns, ctx *x)
{
    int i = 0;
    x->nargs = 0;
    const char *p = pat + 1;
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (i >= ns)
            return 0;
        if (len == 1 && *p == '*')
            x->arg[x->nargs++] = s[i];
        else if (s[i].len != len || memcmp(s[i].p, p, len) != 0)
            return 0;
        i++;
        if (!slash)
            break;
        p = slash + 1;
    }
    return i == ns;
}

/* Authorization: Bearer <admin_token>, compared in time independent of where it differs. */
static int authorized(const ctx *x)
{
    const char *want = x->c->srv->cfg.admin_token;
    if (!want[0])
        return 1;
    const char *a = x->r->auth;
    size_t n = x->r->auth_len;
    if (!a || n < 7 || strncasecmp(a, "Bearer ", 7) != 0)
        return 0;
    a += 7, n -= 7;
    while (n && (*a == ' ' || *a == '\t'))
        a++, n--;
    while (n && (a[n - 1] == ' ' || a[n - 1] == '\t'))
        n--;
    size_t wl = strlen(want);
    unsigned char diff = (unsigned char)(n != wl);
    for (size_t i = 0; i < wl; i++)
        diff |= (unsigned char)(want[i] ^ (i < n ? a[i] : 0));
    return diff == 0;
}

static void allow_header(unsigned methods, char *h, size_t len)
{
    static const struct {
        int m;
        const char *name;
    } names[] = {{SD_HTTP_GET, "GET, HEAD"}, {SD_HTTP_POST, "POST"}, {SD_HTTP_PUT, "PUT"},
                 {SD_HTTP_DELETE, "DELETE"}};
    size_t n = (size_t)snprintf(h, len, "Allow: ");
    int first = 1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (methods & M(names[i].m)) {
            n += (size_t)snprintf(h + n, len - n, "%s%s", first ? "" : ", ", names[i].name);
            first = 0;
        }
    snprintf(h + n, len - n, "\r\n");
}

void sd_api_dispatch(sd_conn *c, const sd_http_req *r)
{
    static _Thread_local char t_path[HTTP_MAX_HEAD]; /* decoded is never longer */
    ctx x = {c, r, SD_EP_OTHER, {{0}}, 0};
    seg segs[MAX_SEGS];
    int ns = r->target_len <= sizeof t_path ? split_path(r->target, r->target_len, t_path, segs)
                                            : SPLIT_BAD_TARGET;
    if (ns == SPLIT_BAD_TARGET)
        return reply_error(&x, 400, NULL, "the request target must be a path such as /api/health");
    if (ns == SPLIT_BAD_ESCAPE)
        return reply_error(&x, 400, NULL, "invalid percent-encoding in the request path");
    const route *rt = NULL;
    for (size_t i = 0; ns >= 0 && i < NROUTES && !rt; i++)
        if (match(k_routes[i].pattern, segs, ns, &x))
            rt = &k_routes[i];
    if (!rt)
        return reply_error(&x, 404, NULL, "no such endpoint");
    x.ep = rt->ep;
    int method = r->method == SD_HTTP_HEAD ? SD_HTTP_GET : r->method;
    if (method < 0 || method > SD_HTTP_PUT || !(rt->methods & M(method))) {
        char allow[96];
        allow_header(rt->methods, allow, sizeof allow);
        return reply_error(&x, 405, allow, "method not allowed (allowed: %.*s)",
                           (int)strlen(allow) - 9, allow + 7);
    }
    if ((method == SD_HTTP_PUT || method == SD_HTTP_DELETE || rt->fn == h_snapshot) &&
        !authorized(&x))
        return reply_error(&x, 401, "WWW-Authenticate: Bearer realm=\"sluiced\"\r\n",
                           "configuration changes need Authorization: Bearer <admin token>");
    rt->fn(&x, method);
}
