/*
 * resp_cmd.c — the RESP front end: commands and replies.
 *
 * Decision commands (SL.TAKE, SL.PEEK, CL.THROTTLE) become items of the worker's admission
 * scheduler (admission.h), which decides them in batches at the end of the loop iteration and
 * hands them back to resp_emit. Every other command is answered at once, into the buffer
 * sd_reply_buf gives, which keeps replies in request order behind undecided items.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "config.h"
#include "net.h"
#include "policy_text.h"
#include "state.h"

#define SL_CELL_TENANT "cl" /* CL.THROTTLE keys live in this tenant (rules on it win) */

typedef struct resp_state {
    int authed;
    int admin; /* AUTH admin <--admin-token>: may change the configuration */
    int proto; /* 2 or 3 (HELLO 3) */
    char name[256];
    size_t name_len;
} resp_state;

enum { K_TAKE, K_PEEK, K_THROTTLE, K_RELEASE };

static _Thread_local resp_cmd t_cmd;

/* ---- helpers ---- */

static int64_t ceil_div(int64_t ns, int64_t unit)
{
    return ns <= 0 ? 0 : (ns + unit - 1) / unit;
}

static void arity(resp_buf *o, const resp_arg *name)
{
    char lower[64];
    size_t n = name->len < sizeof lower - 1 ? name->len : sizeof lower - 1;
    for (size_t i = 0; i < n; i++)
        lower[i] = (char)((name->p[i] >= 'A' && name->p[i] <= 'Z') ? name->p[i] + 32 : name->p[i]);
    resp_error(o, "ERR wrong number of arguments for '%.*s' command", (int)n, lower);
}

static void lib_error(resp_buf *o, int rc)
{
    if (rc == SD_EPERSIST)
        return resp_error(o, "ERR configuration not saved to disk (%s): nothing changed",
                          strerror(sd_config_errno()));
    resp_error(o, "ERR %s (%s)", sl_strerror(rc), sl_err_name(rc));
}

static sl_key key3(const resp_arg *t, const resp_arg *a, const resp_arg *c)
{
    sl_key k = {t ? t->p : NULL, t ? t->len : 0, a ? a->p : NULL, a ? a->len : 0,
                c ? c->p : NULL, c ? c->len : 0};
    return k;
}

/* A NUL-terminated copy of an argument (tier names); -1 if it does not fit. */
static int cstr(const resp_arg *a, char *buf, size_t len)
{
    if (a->len >= len || memchr(a->p, 0, a->len))
        return -1;
    memcpy(buf, a->p, a->len);
    buf[a->len] = 0;
    return 0;
}

/* A null reply in the connection's protocol version. */
static void nul(sd_conn *c)
{
    const resp_state *st = c->state;
    if (st->proto == 3)
        resp_raw(sd_reply_buf(c), "_\r\n", 3);
    else
        resp_null(sd_reply_buf(c));
}

/* ---- decisions: queued through admission control, answered by resp_emit ---- */

static void resp_emit(sd_conn *c, sd_item *it, resp_buf *o)
{
    (void)c;
    if (it->state == SD_ITEM_REJECTED_FULL)
        return resp_error(o, "BUSY tenant queue full: too many requests waiting; retry later");
    if (it->state == SD_ITEM_REJECTED_EXPIRED)
        return resp_error(o, "BUSY request waited too long for admission; retry later");
    const sl_decision *d = &it->d;
    if (it->kind == K_RELEASE)
        return d->err == SL_OK ? resp_int(o, 1)
               : d->err == SL_ELEASE ? resp_int(o, 0) : lib_error(o, d->err);
    if (it->kind == K_THROTTLE && (d->err == SL_OK || d->err == SL_ECOST)) {
        /* a quantity above the capacity never passes: limited, retry-after -1, as redis-cell
         * answers (SL_ECOST comes with what is left) */
        int never = d->err == SL_ECOST;
        resp_array(o, 5);
        resp_int(o, !d->allowed);
        resp_int(o, (int64_t)d->limit);
        resp_int(o, (int64_t)d->remaining);
        resp_int(o, d->allowed || never ? -1 : ceil_div(d->retry_after, SL_SECOND));
        resp_int(o, ceil_div(d->reset_after, SL_SECOND));
        return;
    }
    if (d->err != SL_OK)
        return lib_error(o, d->err);
    resp_array(o, 7);
    resp_int(o, d->allowed);
    resp_int(o, (int64_t)d->limit);
    resp_int(o, (int64_t)d->remaining);
    resp_int(o, d->allowed ? -1 : ceil_div(d->retry_after, 1000000));
    resp_int(o, ceil_div(d->reset_after, 1000000));
    resp_int(o, (int64_t)d->lease);
    resp_int(o, ceil_div(d->delay, 1000000)); /* leaky bucket: proceed after this many ms */
}

static sd_item *submit_new(sd_conn *c, int kind, const resp_arg *t, const resp_arg *a,
                           const resp_arg *cl)
{
    sd_item *it = sd_item_new(c, t ? t->p : NULL, t ? t->len : 0, a ? a->p : NULL,
                              a ? a->len : 0, cl->p, cl->len);
    if (!it) {
        resp_error(sd_reply_buf(c), "ERR out of memory");
        return NULL;
    }
    it->kind = kind;
    return it;
}

/* SL.TAKE tenant action client [COST n] | SL.PEEK tenant action client */
static void cmd_take(sd_conn *c, const resp_cmd *m, int peek)
{
    if (peek ? m->argc != 4 : (m->argc != 4 && m->argc != 6))
        return arity(sd_reply_buf(c), &m->argv[0]);
    int64_t cost = 1;
    if (m->argc == 6) {
        if (!resp_arg_is(&m->argv[4], "COST"))
            return resp_error(sd_reply_buf(c), "ERR syntax error: expected COST <n>");
        if (resp_arg_int(&m->argv[5], &cost) != 0 || cost < 0)
            return resp_error(sd_reply_buf(c), "ERR COST must be a whole number >= 0");
    }
    sd_item *it = submit_new(c, peek ? K_PEEK : K_TAKE, &m->argv[1], &m->argv[2], &m->argv[3]);
    if (!it)
        return;
    it->req.cost = peek ? 1 : (uint64_t)cost; /* SL.PEEK: would one more pass? (sl_peek) */
    it->req.peek = peek;
    sd_sched_submit(c->sched, it, c->last_active_ms);
}

/* CL.THROTTLE key max_burst count period [quantity] — redis-cell's command and reply. */
static void cmd_throttle(sd_conn *c, const resp_cmd *m)
{
    if (m->argc != 5 && m->argc != 6)
        return arity(sd_reply_buf(c), &m->argv[0]);
    int64_t burst, count, period, qty = 1;
    if (resp_arg_int(&m->argv[2], &burst) != 0 || burst < 0 || burst >= 1000000000)
        return resp_error(sd_reply_buf(c), "ERR max_burst must be a whole number from 0 to 999999999");
    if (resp_arg_int(&m->argv[3], &count) != 0 || count < 1 || count > 1000000000)
        return resp_error(sd_reply_buf(c), "ERR count must be a whole number from 1 to 1000000000");
    if (resp_arg_int(&m->argv[4], &period) != 0 || period < 1 || period > 366 * 86400)
        return resp_error(sd_reply_buf(c), "ERR period must be a whole number of seconds from 1 to 31622400");
    if (m->argc == 6 && (resp_arg_int(&m->argv[5], &qty) != 0 || qty < 0))
        return resp_error(sd_reply_buf(c), "ERR quantity must be a whole number >= 0");
    if (m->argv[1].len == 0)
        return resp_error(sd_reply_buf(c), "ERR key must not be empty");
    const resp_arg tenant = {SL_CELL_TENANT, 2};
    sd_item *it = submit_new(c, K_THROTTLE, &tenant, NULL, &m->argv[1]);
    if (!it)
        return;
    it->pol = SL_POLICY_TOKEN_BUCKET((double)(burst + 1), (double)count / (double)period);
    it->req.inline_policy = &it->pol; /* a rule for tenant "cl" wins over these arguments */
    it->req.cost = (uint64_t)qty;
    sd_sched_submit(c->sched, it, c->last_active_ms);
}

/* SL.RELEASE tenant action client lease */
static void cmd_release(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    if (m->argc != 5)
        return arity(o, &m->argv[0]);
    int64_t lease;
    if (resp_arg_int(&m->argv[4], &lease) != 0 || lease <= 0)
        return resp_error(o, "ERR lease must be a lease id from SL.TAKE");
    /* through the scheduler, in order with the connection's decisions */
    sd_item *it = submit_new(c, K_RELEASE, &m->argv[1], &m->argv[2], &m->argv[3]);
    if (!it)
        return;
    it->release = 1;
    it->req.cost = (uint64_t)lease;
    sd_sched_submit(c->sched, it, c->last_active_ms);
}

/* ---- rules, tiers, the default ---- */

static void reply_policy(resp_buf *o, const sl_policy *p)
{
    char text[1024];
    sd_policy_format(p, text, sizeof text);
    resp_bulk_str(o, text);
}

/* Parses "TENANT t | ACTION t a | CLIENT t a c" at argv[i]; returns the index after it. */
static int scope_args(const resp_cmd *m, int i, sl_scope *scope, sl_key *k)
{
    if (i >= m->argc)
        return -1;
    int need = resp_arg_is(&m->argv[i], "TENANT")   ? 1
               : resp_arg_is(&m->argv[i], "ACTION") ? 2
               : resp_arg_is(&m->argv[i], "CLIENT") ? 3
                                                    : 0;
    if (!need || i + need >= m->argc)
        return -1;
    *scope = need == 1 ? SL_SCOPE_TENANT : need == 2 ? SL_SCOPE_ACTION : SL_SCOPE_CLIENT;
    const resp_arg *a = &m->argv[i + 1];
    *k = key3(a, need >= 2 ? a + 1 : NULL, need >= 3 ? a + 2 : NULL);
    return i + 1 + need;
}

typedef struct list_ctx {
    resp_buf *o;
    long n;
    resp_buf items;
} list_ctx;

static int rule_item(void *ctx, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    list_ctx *x = ctx;
    static const char *names[] = {"", "tenant", "action", "client"};
    resp_array(&x->items, 5);
    resp_bulk_str(&x->items, names[scope]);
    resp_bulk(&x->items, k->tenant, k->tenant_len);
    resp_bulk(&x->items, k->action, k->action_len);
    resp_bulk(&x->items, k->client, k->client_len);
    reply_policy(&x->items, p);
    x->n++;
    return 0;
}

static int tier_item(void *ctx, const char *name, const sl_policy *p)
{
    list_ctx *x = ctx;
    resp_array(&x->items, 2);
    resp_bulk_str(&x->items, name);
    reply_policy(&x->items, p);
    x->n++;
    return 0;
}

static int assign_item(void *ctx, const sl_key *k, const char *tier)
{
    list_ctx *x = ctx;
    resp_array(&x->items, 3);
    resp_bulk(&x->items, k->tenant, k->tenant_len);
    resp_bulk(&x->items, k->client, k->client_len);
    resp_bulk_str(&x->items, tier);
    x->n++;
    return 0;
}

static void list_done(list_ctx *x)
{
    resp_array(x->o, x->n);
    resp_raw(x->o, x->items.p ? x->items.p : "", x->items.len);
    if (x->items.oom)
        x->o->oom = 1;
    resp_buf_free(&x->items);
}

static int parse_policy_at(resp_buf *o, const resp_cmd *m, int i, sl_policy *p)
{
    char err[256];
    if (sd_policy_parse(m->argv + i, m->argc - i, p, err, sizeof err) != 0) {
        resp_error(o, "ERR %s", err);
        return -1;
    }
    return 0;
}

/* SL.RULE SET <scope> <policy> | GET <scope> | DEL <scope> | LIST
 *   scope: TENANT t | ACTION t a | CLIENT t a c */
static void cmd_rule(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    sl_limiter *l = c->srv->lim;
    if (m->argc < 2)
        return arity(o, &m->argv[0]);
    const resp_arg *sub = &m->argv[1];
    if (resp_arg_is(sub, "LIST")) {
        if (m->argc != 2)
            return arity(o, &m->argv[0]);
        list_ctx x = {o, 0, {0}};
        sl_rule_list(l, rule_item, &x);
        return list_done(&x);
    }
    sl_scope scope;
    sl_key k;
    int i = scope_args(m, 2, &scope, &k);
    if (i < 0)
        return resp_error(o, "ERR syntax error: expected TENANT t | ACTION t a | CLIENT t a c");
    int rc;
    if (resp_arg_is(sub, "SET")) {
        sl_policy p;
        if (parse_policy_at(o, m, i, &p) != 0)
            return;
        if ((rc = sd_cfg_rule_set(c->srv, scope, &k, &p)) != SL_OK)
            return lib_error(o, rc);
        return resp_simple(o, "OK");
    }
    if (i != m->argc)
        return arity(o, &m->argv[0]);
    if (resp_arg_is(sub, "GET")) {
        sl_policy p;
        rc = sl_rule_get(l, scope, &k, &p);
        if (rc == SL_ENOTFOUND)
            return nul(c);
        if (rc != SL_OK)
            return lib_error(o, rc);
        return reply_policy(o, &p);
    }
    if (resp_arg_is(sub, "DEL")) {
        rc = sd_cfg_rule_del(c->srv, scope, &k);
        if (rc == SL_ENOTFOUND)
            return resp_int(o, 0);
        if (rc != SL_OK)
            return lib_error(o, rc);
        return resp_int(o, 1);
    }
    resp_error(o, "ERR unknown SL.RULE subcommand '%.*s' (SET, GET, DEL, LIST)",
               (int)(sub->len > 32 ? 32 : sub->len), sub->p);
}

/* SL.TIER SET name <policy> | GET name | DEL name | LIST | ASSIGN tenant client tier |
 *         UNASSIGN tenant client (1, or 0: none) | ASSIGNED tenant client (the tier or nil) |
 *         ASSIGNMENTS (tenant, client, tier for each) */
static void cmd_tier(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    sl_limiter *l = c->srv->lim;
    if (m->argc < 2)
        return arity(o, &m->argv[0]);
    const resp_arg *sub = &m->argv[1];
    char name[SL_MAX_ID_LEN + 1];
    int rc;
    if ((resp_arg_is(sub, "LIST") || resp_arg_is(sub, "ASSIGNMENTS")) && m->argc == 2) {
        list_ctx x = {o, 0, {0}};
        if (resp_arg_is(sub, "LIST"))
            sl_tier_list(l, tier_item, &x);
        else
            sl_tier_assignments(l, assign_item, &x);
        return list_done(&x);
    }
    if (resp_arg_is(sub, "ASSIGN") || resp_arg_is(sub, "UNASSIGN") ||
        resp_arg_is(sub, "ASSIGNED")) {
        int assign = resp_arg_is(sub, "ASSIGN"), get = resp_arg_is(sub, "ASSIGNED");
        if (m->argc != (assign ? 5 : 4))
            return arity(o, &m->argv[0]);
        if (assign && cstr(&m->argv[4], name, sizeof name) != 0)
            return lib_error(o, SL_ETIER);
        sl_key k = key3(&m->argv[2], NULL, &m->argv[3]);
        rc = get ? sl_tier_assignment(l, &k, name, sizeof name)
                 : sd_cfg_tier_assign(c->srv, &k, assign ? name : NULL);
        if (rc == SL_ENOTFOUND)
            return get ? nul(c) : resp_int(o, 0);
        if (rc != SL_OK)
            return lib_error(o, rc);
        if (get)
            return resp_bulk_str(o, name);
        return assign ? resp_simple(o, "OK") : resp_int(o, 1);
    }
    if (m->argc < 3)
        return arity(o, &m->argv[0]);
    if (cstr(&m->argv[2], name, sizeof name) != 0 || !name[0])
        return resp_error(o, "ERR tier names are 1 to 255 bytes without NUL");
    if (resp_arg_is(sub, "SET")) {
        sl_policy p;
        if (parse_policy_at(o, m, 3, &p) != 0)
            return;
        if ((rc = sd_cfg_tier_set(c->srv, name, &p)) != SL_OK)
            return lib_error(o, rc);
        return resp_simple(o, "OK");
    }
    if (m->argc != 3)
        return arity(o, &m->argv[0]);
    if (resp_arg_is(sub, "GET")) {
        sl_policy p;
        rc = sl_tier_get(l, name, &p);
        if (rc == SL_ETIER || rc == SL_ENOTFOUND)
            return nul(c);
        if (rc != SL_OK)
            return lib_error(o, rc);
        return reply_policy(o, &p);
    }
    if (resp_arg_is(sub, "DEL")) {
        rc = sd_cfg_tier_del(c->srv, name);
        if (rc == SL_ETIER || rc == SL_ENOTFOUND)
            return resp_int(o, 0);
        if (rc != SL_OK)
            return lib_error(o, rc);
        return resp_int(o, 1);
    }
    resp_error(o, "ERR unknown SL.TIER subcommand (SET, GET, DEL, LIST, ASSIGN, UNASSIGN, "
                  "ASSIGNED, ASSIGNMENTS)");
}

/* SL.DEFAULT SET <policy> | GET */
static void cmd_default(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    if (m->argc >= 3 && resp_arg_is(&m->argv[1], "SET")) {
        sl_policy p;
        if (parse_policy_at(o, m, 2, &p) != 0)
            return;
        int rc = sd_cfg_global_set(c->srv, &p, (int64_t[3]){0}, (int[3]){0});
        if (rc != SL_OK)
            return lib_error(o, rc);
        return resp_simple(o, "OK");
    }
    if (m->argc == 2 && resp_arg_is(&m->argv[1], "GET")) {
        sl_policy p;
        sl_default_get(c->srv->lim, &p);
        return reply_policy(o, &p);
    }
    resp_error(o, "ERR syntax error: SL.DEFAULT SET <policy> | SL.DEFAULT GET");
}

/* SL.STATS [tenant]: allowed, denied, evicted (+ keys, reclaimed for the whole limiter) */
static void cmd_stats(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    if (m->argc > 2)
        return arity(o, &m->argv[0]);
    sl_stats s;
    int rc = sl_stats_get(c->srv->lim, m->argc == 2 ? m->argv[1].p : NULL,
                          m->argc == 2 ? m->argv[1].len : 0, &s);
    if (rc == SL_ENOTFOUND)
        return resp_error(o, "ERR no decisions for this tenant yet (SL_ENOTFOUND)");
    if (rc != SL_OK)
        return lib_error(o, rc);
    resp_array(o, m->argc == 2 ? 6 : 10);
    resp_bulk_str(o, "allowed");
    resp_int(o, (int64_t)s.allowed);
    resp_bulk_str(o, "denied");
    resp_int(o, (int64_t)s.denied);
    resp_bulk_str(o, "evicted");
    resp_int(o, (int64_t)s.evicted);
    if (m->argc == 1) {
        resp_bulk_str(o, "keys");
        resp_int(o, (int64_t)s.keys);
        resp_bulk_str(o, "reclaimed");
        resp_int(o, (int64_t)s.reclaimed);
    }
}

/* SL.ADMISSION GET | SET field value [field value ...]
 *   fields: max_global_concurrent_requests (>= 1), max_tenant_queue_size (>= 0),
 *           max_queue_wait_ms (>= 1). All or nothing. */
static void cmd_admission(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    sd_admission *a = &c->srv->adm;
    _Atomic int64_t *fields[] = {&a->max_global_concurrent, &a->max_tenant_queue,
                                 &a->max_queue_wait_ms};
    if (m->argc == 2 && resp_arg_is(&m->argv[1], "GET")) {
        resp_array(o, 2 * 3 + 8);
        for (int i = 0; i < 3; i++) {
            resp_bulk_str(o, sd_adm_fields[i].name);
            resp_int(o, atomic_load(fields[i]));
        }
        resp_bulk_str(o, "admitted");
        resp_int(o, (int64_t)atomic_load(&a->admitted));
        resp_bulk_str(o, "rejected_queue_full");
        resp_int(o, (int64_t)atomic_load(&a->rejected_full));
        resp_bulk_str(o, "rejected_wait_expired");
        resp_int(o, (int64_t)atomic_load(&a->rejected_expired));
        resp_bulk_str(o, "waiting");
        resp_int(o, (int64_t)atomic_load(&a->queued_now));
        return;
    }
    if (m->argc < 4 || m->argc % 2 != 0 || !resp_arg_is(&m->argv[1], "SET"))
        return resp_error(o, "ERR syntax error: SL.ADMISSION GET | SL.ADMISSION SET <field> "
                             "<value> [<field> <value> ...]");
    int64_t vals[3];
    int set[3] = {0, 0, 0};
    for (int i = 2; i < m->argc; i += 2) {
        int f = -1;
        for (int k = 0; k < 3; k++)
            if (resp_arg_is(&m->argv[i], sd_adm_fields[k].name))
                f = k;
        if (f < 0)
            return resp_error(o, "ERR unknown admission setting '%.*s'",
                              (int)(m->argv[i].len > 64 ? 64 : m->argv[i].len), m->argv[i].p);
        const sd_adm_field *af = &sd_adm_fields[f];
        if (resp_arg_int(&m->argv[i + 1], &vals[f]) != 0 || vals[f] < af->min ||
            vals[f] > af->max)
            return resp_error(o, "ERR %s must be a whole number from %lld to %lld", af->name,
                              (long long)af->min, (long long)af->max);
        set[f] = 1;
    }
    int rc = sd_cfg_global_set(c->srv, NULL, vals, set);
    if (rc != SL_OK)
        return lib_error(o, rc);
    resp_simple(o, "OK");
}

static int weight_item(void *ctx, const char *tenant, size_t len, unsigned w)
{
    list_ctx *x = ctx;
    resp_array(&x->items, 2);
    resp_bulk(&x->items, tenant, len);
    resp_int(&x->items, w);
    x->n++;
    return 0;
}

/* SL.WEIGHT SET tenant w | GET tenant | LIST: a tenant's share while requests must wait. */
static void cmd_weight(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    sd_admission *a = &c->srv->adm;
    if (m->argc == 2 && resp_arg_is(&m->argv[1], "LIST")) {
        list_ctx x = {o, 0, {0}};
        sd_weight_list(a, weight_item, &x);
        return list_done(&x);
    }
    if (m->argc == 3 && resp_arg_is(&m->argv[1], "GET"))
        return resp_int(o, sd_weight_get(a, m->argv[2].p, m->argv[2].len));
    if (m->argc == 4 && resp_arg_is(&m->argv[1], "SET")) {
        int64_t w;
        if (resp_arg_int(&m->argv[3], &w) != 0 || w < 1 || w > 1000)
            return resp_error(o, "ERR weight must be a whole number from 1 to 1000");
        if (m->argv[2].len > SL_MAX_ID_LEN)
            return lib_error(o, SL_EKEYLONG);
        int rc = sd_cfg_weight_set(c->srv, m->argv[2].p, m->argv[2].len, (unsigned)w);
        if (rc != SL_OK)
            return lib_error(o, rc);
        return resp_simple(o, "OK");
    }
    resp_error(o, "ERR syntax error: SL.WEIGHT SET <tenant> <1..1000> | GET <tenant> | LIST");
}

/* ---- connection-level commands ---- */

static int secret_eq(const char *want, const resp_arg *got)
{
    size_t wl = strlen(want);
    unsigned char diff = (unsigned char)(got->len != wl);
    for (size_t i = 0; i < wl; i++) /* constant time in the secret's length */
        diff |= (unsigned char)(want[i] ^ (i < got->len ? got->p[i] : 0));
    return diff == 0;
}

/* Two users, as Redis's ACL names them: "default" (--requirepass: decisions and reads) and,
 * with --admin-token, "admin" (everything, configuration changes included). 1 when
 * (user, pass) is one of them, with st updated; user NULL is "default". */
static int login(sd_conn *c, const resp_arg *user, const resp_arg *pass)
{
    resp_state *st = c->state;
    const sd_settings *cfg = &c->srv->cfg;
    if (user && user->len == 5 && memcmp(user->p, "admin", 5) == 0) {
        if (!cfg->admin_token[0] || !secret_eq(cfg->admin_token, pass))
            return 0;
        st->admin = st->authed = 1;
        return 1;
    }
    if (user && !(user->len == 7 && memcmp(user->p, "default", 7) == 0))
        return 0;
    /* without --requirepass the default user has no password: any will do, as in Redis
     * (AUTH <password> alone is refused by the caller, as Redis does) */
    if (cfg->requirepass[0] && !secret_eq(cfg->requirepass, pass))
        return 0;
    st->authed = 1;
    st->admin = 0; /* AUTH switches the user */
    return 1;
}

/* A client name as Redis takes it: printable ASCII without spaces ('!' to '~'), shorter
 * than the room kept for it; empty clears the name. */
static int name_ok(const resp_state *st, const resp_arg *n)
{
    if (n->len >= sizeof st->name)
        return 0;
    for (size_t i = 0; i < n->len; i++)
        if (n->p[i] < '!' || n->p[i] > '~')
            return 0;
    return 1;
}

static void bad_name(resp_buf *o)
{
    resp_error(o, "ERR Client names cannot contain spaces, newlines or special characters.");
}

static void cmd_auth(sd_conn *c, const resp_cmd *m)
{
    resp_buf *o = sd_reply_buf(c);
    if (m->argc != 2 && m->argc != 3)
        return arity(o, &m->argv[0]);
    if (m->argc == 2 && !c->srv->cfg.requirepass[0])
        return resp_error(o, "ERR AUTH <password> called without any password configured for "
                             "the default user. Are you sure your configuration is correct?");
    if (!login(c, m->argc == 3 ? &m->argv[1] : NULL, &m->argv[m->argc - 1]))
        return resp_error(o, "WRONGPASS invalid username-password pair or user is disabled.");
    resp_simple(o, "OK");
}

static void cmd_hello(sd_conn *c, const resp_cmd *m)
{
    resp_state *st = c->state;
    resp_buf *o = sd_reply_buf(c);
    int64_t ver = st->proto;
    int i = 1;
    if (m->argc >= 2) {
        if (resp_arg_int(&m->argv[1], &ver) != 0 || (ver != 2 && ver != 3))
            return resp_error(o, "NOPROTO unsupported protocol version");
        i = 2;
    }
    /* Every option is checked before any takes effect: a refused HELLO changes nothing. */
    const resp_arg *setname = NULL, *user = NULL, *pass = NULL;
    for (; i < m->argc; i++) {
        if (resp_arg_is(&m->argv[i], "AUTH") && i + 2 < m->argc) {
            user = &m->argv[i + 1];
            pass = &m->argv[i + 2];
            i += 2;
        } else if (resp_arg_is(&m->argv[i], "SETNAME") && i + 1 < m->argc) {
            setname = &m->argv[++i];
        } else {
            return resp_error(o, "ERR syntax error in HELLO option '%.*s'",
                              (int)(m->argv[i].len > 32 ? 32 : m->argv[i].len), m->argv[i].p);
        }
    }
    if (setname && !name_ok(st, setname))
        return bad_name(o);
    if (user && !login(c, user, pass))
        return resp_error(o, "WRONGPASS invalid username-password pair or user is disabled.");
    if (c->srv->cfg.requirepass[0] && !st->authed)
        return resp_error(o, "NOAUTH HELLO must be called with the client already "
                             "authenticated, otherwise the HELLO <proto> AUTH <user> <pass> "
                             "option can be used to authenticate the client and select the "
                             "RESP protocol version at the same time");
    if (setname) {
        memcpy(st->name, setname->p, setname->len);
        st->name_len = setname->len;
    }
    st->proto = (int)ver;
    if (ver == 3)
        resp_raw(o, "%7\r\n", 4);
    else
        resp_array(o, 14);
    resp_bulk_str(o, "server");
    resp_bulk_str(o, "sluice");
    resp_bulk_str(o, "version");
    resp_bulk_str(o, sl_version_string());
    resp_bulk_str(o, "proto");
    resp_int(o, ver);
    resp_bulk_str(o, "id");
    resp_int(o, (int64_t)c->id);
    resp_bulk_str(o, "mode");
    resp_bulk_str(o, "standalone");
    resp_bulk_str(o, "role");
    resp_bulk_str(o, "master");
    resp_bulk_str(o, "modules");
    resp_array(o, 0);
}

static void cmd_client(sd_conn *c, const resp_cmd *m)
{
    resp_state *st = c->state;
    resp_buf *o = sd_reply_buf(c);
    if (m->argc < 2)
        return arity(o, &m->argv[0]);
    const resp_arg *sub = &m->argv[1];
    if (resp_arg_is(sub, "SETNAME") && m->argc == 3) {
        const resp_arg *n = &m->argv[2];
        if (!name_ok(st, n))
            return bad_name(o);
        memcpy(st->name, n->p, n->len);
        st->name_len = n->len;
        return resp_simple(o, "OK");
    }
    if (resp_arg_is(sub, "GETNAME") && m->argc == 2)
        return st->name_len ? resp_bulk(o, st->name, st->name_len) : nul(c);
    if (resp_arg_is(sub, "ID") && m->argc == 2)
        return resp_int(o, (int64_t)c->id);
    if (resp_arg_is(sub, "SETINFO") && m->argc == 4)
        return resp_simple(o, "OK");
    resp_error(o, "ERR unknown subcommand '%.*s'. Try CLIENT SETNAME, GETNAME, ID.",
               (int)(sub->len > 32 ? 32 : sub->len), sub->p);
}

/* Does INFO's argument list (argv[1..]) ask for the section named name[0..len)? None, "all",
 * "everything" or "default" ask for every one. */
static int info_wants(const resp_cmd *m, const char *name, size_t len)
{
    if (m->argc < 2)
        return 1;
    for (int i = 1; i < m->argc; i++) {
        const resp_arg *a = &m->argv[i];
        if (resp_arg_is(a, "all") || resp_arg_is(a, "everything") || resp_arg_is(a, "default") ||
            (a->len == len && strncasecmp(a->p, name, len) == 0))
            return 1;
    }
    return 0;
}

/* INFO [section ...]: the sections of `text` ("# Name\r\n...\r\n", blank-line separated) that
 * m asks for, as Redis answers (an unknown section: an empty string). */
static void info_reply(sd_conn *c, const resp_cmd *m, const char *text, size_t n)
{
    resp_buf out = {0};
    for (size_t i = 0; i < n;) {
        const char *sec = text + i, *end = memmem(sec, n - i, "\r\n\r\n", 4);
        size_t len = end ? (size_t)(end - sec) + 2 : n - i; /* the section with its last CRLF */
        const char *nl = memchr(sec, '\r', len);
        if (len > 2 && sec[0] == '#' && nl && info_wants(m, sec + 2, (size_t)(nl - sec - 2))) {
            if (out.len)
                resp_raw(&out, "\r\n", 2);
            resp_raw(&out, sec, len);
        }
        i += len + (end ? 2 : 0);
    }
    resp_bulk(sd_reply_buf(c), out.p ? out.p : "", out.len);
    resp_buf_free(&out);
}

static void cmd_info(sd_conn *c, const resp_cmd *m)
{
    sd_server *srv = c->srv;
    sl_stats s;
    sl_stats_get(srv->lim, NULL, 0, &s);
    char buf[2048];
    int64_t up = (sl_now(srv->lim) - srv->started_ns) / SL_SECOND;
    int n = snprintf(buf, sizeof buf,
                     "# Server\r\nredis_version:7.0.0\r\nsluice_version:%s\r\n"
                     "redis_mode:standalone\r\nprocess_id:%ld\r\ntcp_port:%d\r\n"
                     "uptime_in_seconds:%" PRId64 "\r\nio_threads_active:%d\r\n\r\n"
                     "# Clients\r\nconnected_clients:%" PRIu64 "\r\n\r\n"
                     "# Stats\r\ntotal_connections_received:%" PRIu64 "\r\n"
                     "rejected_connections:%" PRIu64 "\r\ntotal_commands_processed:%" PRIu64
                     "\r\nprotocol_errors:%" PRIu64 "\r\n\r\n"
                     "# Limiter\r\nkeys:%" PRIu64 "\r\ndecisions_allowed:%" PRIu64
                     "\r\ndecisions_denied:%" PRIu64 "\r\nkeys_evicted:%" PRIu64
                     "\r\nkeys_reclaimed:%" PRIu64 "\r\n\r\n"
                     "# Admission\r\nadmitted:%" PRIu64 "\r\nrejected_queue_full:%" PRIu64
                     "\r\nrejected_wait_expired:%" PRIu64 "\r\nwaiting:%" PRIu64 "\r\n",
                     sl_version_string(), (long)getpid(), srv->cfg.resp_port, up,
                     srv->cfg.threads, atomic_load(&srv->m.connections_open),
                     atomic_load(&srv->m.connections_total),
                     atomic_load(&srv->m.connections_rejected),
                     atomic_load(&srv->m.resp_commands),
                     atomic_load(&srv->m.resp_protocol_errors), s.keys, s.allowed, s.denied,
                     s.evicted, s.reclaimed, atomic_load(&srv->adm.admitted),
                     atomic_load(&srv->adm.rejected_full), atomic_load(&srv->adm.rejected_expired),
                     atomic_load(&srv->adm.queued_now));
    sl_store_stats st;
    if (srv->rstore && sl_store_stats_get(srv->lim, &st) == SL_OK && n > 0 &&
        (size_t)n < sizeof buf)
        n += snprintf(buf + n, sizeof buf - (size_t)n,
                      "\r\n# Store\r\nstore:redis\r\nredis_up:%d\r\nredis_cluster:%d\r\n"
                      "redis_decisions:%" PRIu64 "\r\nnear_cache_denials:%" PRIu64
                      "\r\nfail_open_decisions:%" PRIu64 "\r\nfail_closed_decisions:%" PRIu64
                      "\r\n",
                      st.up, st.cluster, st.calls, st.near_cache, st.fail_open, st.fail_closed);
    info_reply(c, m, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void unknown(resp_buf *o, const resp_cmd *m)
{
    char args[256] = "";
    size_t n = 0;
    for (int i = 1; i < m->argc && n < sizeof args - 80; i++)
        n += (size_t)snprintf(args + n, sizeof args - n, "'%.*s' ",
                              (int)(m->argv[i].len > 64 ? 64 : m->argv[i].len), m->argv[i].p);
    resp_error(o, "ERR unknown command '%.*s', with args beginning with: %s",
               (int)(m->argv[0].len > 64 ? 64 : m->argv[0].len), m->argv[0].p, args);
}

/* Returns 1 when the connection must close after the replies. */
/* Does m change the configuration or the saved state (with --admin-token, only the admin
 * user may)? Reads (GET, LIST, ASSIGNED, ASSIGNMENTS), decisions and counters do not. */
static int changes_config(const resp_cmd *m)
{
    static const char *const admin[] = {"SL.RULE", "SL.TIER", "SL.DEFAULT", "SL.ADMISSION",
                                        "SL.WEIGHT"};
    if (resp_arg_is(&m->argv[0], "SL.SAVE"))
        return 1;
    for (size_t i = 0; i < sizeof admin / sizeof admin[0]; i++)
        if (resp_arg_is(&m->argv[0], admin[i]))
            return !(m->argc >= 2 &&
                     (resp_arg_is(&m->argv[1], "GET") || resp_arg_is(&m->argv[1], "LIST") ||
                      resp_arg_is(&m->argv[1], "ASSIGNED") ||
                      resp_arg_is(&m->argv[1], "ASSIGNMENTS")));
    return 0;
}

static int dispatch(sd_conn *c, const resp_cmd *m)
{
    resp_state *st = c->state;
    resp_buf *o = sd_reply_buf(c);
    const resp_arg *name = &m->argv[0];
    if (resp_arg_is(name, "SL.TAKE"))
        return cmd_take(c, m, 0), 0;
    if (resp_arg_is(name, "CL.THROTTLE"))
        return cmd_throttle(c, m), 0;
    if (resp_arg_is(name, "SL.PEEK"))
        return cmd_take(c, m, 1), 0;
    if (resp_arg_is(name, "QUIT")) {
        resp_simple(o, "OK");
        return 1;
    }
    if (resp_arg_is(name, "AUTH"))
        return cmd_auth(c, m), 0;
    if (resp_arg_is(name, "HELLO"))
        return cmd_hello(c, m), 0;
    if (!st->authed) {
        resp_error(o, "NOAUTH Authentication required.");
        return 0;
    }
    if (c->srv->cfg.admin_token[0] && !st->admin && changes_config(m)) {
        resp_error(o, "NOPERM this command changes the configuration: AUTH admin "
                      "<admin-token> first (--admin-token)");
        return 0;
    }
    if (resp_arg_is(name, "PING")) {
        if (m->argc > 2)
            arity(o, name);
        else if (m->argc == 2)
            resp_bulk(o, m->argv[1].p, m->argv[1].len);
        else
            resp_simple(o, "PONG");
    } else if (resp_arg_is(name, "ECHO")) {
        if (m->argc != 2)
            arity(o, name);
        else
            resp_bulk(o, m->argv[1].p, m->argv[1].len);
    } else if (resp_arg_is(name, "SL.RULE")) {
        cmd_rule(c, m);
    } else if (resp_arg_is(name, "SL.TIER")) {
        cmd_tier(c, m);
    } else if (resp_arg_is(name, "SL.DEFAULT")) {
        cmd_default(c, m);
    } else if (resp_arg_is(name, "SL.RELEASE")) {
        cmd_release(c, m);
    } else if (resp_arg_is(name, "SL.STATS")) {
        cmd_stats(c, m);
    } else if (resp_arg_is(name, "SL.SAVE")) { /* like Redis SAVE: this connection waits */
        if (m->argc != 1)
            return arity(o, name), 0;
        sd_save_result r = sd_state_save(c->srv);
        if (r.rc == SL_ENOTFOUND)
            resp_error(o, c->srv->rstore ? "ERR the Redis store keeps bucket state in Redis"
                                         : "ERR no --data-dir: bucket state is not kept on disk");
        else if (r.rc == SL_EIO)
            resp_error(o, "ERR snapshot not saved: %s", strerror(r.err));
        else if (r.rc != SL_OK)
            lib_error(o, r.rc);
        else
            resp_simple(o, "OK");
    } else if (resp_arg_is(name, "SL.ADMISSION")) {
        cmd_admission(c, m);
    } else if (resp_arg_is(name, "SL.WEIGHT")) {
        cmd_weight(c, m);
    } else if (resp_arg_is(name, "CLIENT")) {
        cmd_client(c, m);
    } else if (resp_arg_is(name, "SELECT")) {
        int64_t db;
        if (m->argc != 2)
            arity(o, name);
        else if (resp_arg_int(&m->argv[1], &db) != 0)
            resp_error(o, "ERR value is not an integer or out of range"); /* as Redis */
        else if (db != 0)
            resp_error(o, "ERR DB index is out of range");
        else
            resp_simple(o, "OK");
    } else if (resp_arg_is(name, "INFO")) {
        cmd_info(c, m);
    } else if (resp_arg_is(name, "COMMAND")) {
        if (m->argc >= 2 && resp_arg_is(&m->argv[1], "COUNT"))
            resp_int(o, 0);
        else
            resp_array(o, 0); /* no command table: clients fall back to plain commands */
    } else if (resp_arg_is(name, "CONFIG") && m->argc == 3 && resp_arg_is(&m->argv[1], "GET")) {
        /* redis-benchmark asks for these two; there is no other Redis configuration here */
        if (resp_arg_is(&m->argv[2], "save") || resp_arg_is(&m->argv[2], "appendonly")) {
            resp_array(o, 2);
            resp_bulk(o, m->argv[2].p, m->argv[2].len);
            resp_bulk_str(o, resp_arg_is(&m->argv[2], "save") ? "" : "no");
        } else {
            resp_array(o, 0);
        }
    } else {
        unknown(o, m);
    }
    return 0;
}

/* Commands that change (or report) what decisions depend on: rules, tiers, the default
 * policy, admission settings, weights, counters. Pipelined behind a decision of the same
 * connection, they run after it is decided, so that a pipeline means what it says in order
 * ("SL.TIER ASSIGN; SL.TAKE; SL.TIER UNASSIGN" takes under the tier). */
static int after_decisions(const resp_arg *name)
{
    static const char *const names[] = {"SL.RULE",      "SL.TIER",   "SL.DEFAULT",
                                        "SL.ADMISSION", "SL.WEIGHT", "SL.STATS"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (resp_arg_is(name, names[i]))
            return 1;
    return 0;
}

/* Decision commands are checked for auth here (dispatch checks the others). */
static size_t resp_feed(sd_conn *c)
{
    resp_state *st = c->state;
    size_t pos = 0;
    resp_cmd *m = &t_cmd;
    int partial = 0; /* stopped inside a command that has not arrived whole */
    c->ordered_wait = 0;
    while (c->items_waiting < SD_PIPELINE_MAX && sd_conn_reply_bytes(c) < SD_REPLY_HIGH) {
        const char *err = NULL;
        long n = resp_parse(c->in + pos, c->in_len - pos, m, &err);
        if (n == RESP_NEED_MORE) {
            partial = pos < c->in_len;
            break;
        }
        if (n == RESP_ERROR) {
            resp_error(sd_reply_buf(c), "ERR %s", err);
            atomic_fetch_add(&c->srv->m.resp_protocol_errors, 1);
            sd_info("conn %llu %s: %s; closing", (unsigned long long)c->id, c->peer, err);
            c->close_after_write = 1;
            pos = c->in_len;
            break;
        }
        if (m->argc > 0 && c->items_waiting && after_decisions(&m->argv[0])) {
            c->ordered_wait = 1; /* left unread: parsed again once they are decided */
            break;
        }
        pos += (size_t)n;
        if (m->argc == 0)
            continue;
        atomic_fetch_add_explicit(&c->srv->m.resp_commands, 1, memory_order_relaxed);
        if (!st->authed && (resp_arg_is(&m->argv[0], "SL.TAKE") ||
                            resp_arg_is(&m->argv[0], "SL.PEEK") ||
                            resp_arg_is(&m->argv[0], "CL.THROTTLE"))) {
            resp_error(sd_reply_buf(c), "NOAUTH Authentication required.");
            continue;
        }
        if (dispatch(c, m)) {
            c->close_after_write = 1;
            pos = c->in_len;
            break;
        }
    }
    sd_conn_request_timer(c, pos > 0, partial);
    return pos;
}

static int resp_open(sd_conn *c)
{
    resp_state *st = calloc(1, sizeof *st);
    if (!st)
        return -1;
    st->proto = 2;
    st->authed = c->srv->cfg.requirepass[0] == 0;
    c->state = st;
    return 0;
}

static void resp_close(sd_conn *c)
{
    free(c->state);
    c->state = NULL;
}

const sd_proto sd_proto_resp = {"resp", resp_open, resp_feed, resp_close, resp_emit,
                                 "-ERR max number of clients reached\r\n"}; /* as Redis */
