/*
 * config.c — durable configuration (see config.h).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "policy.h"
#include "policy_text.h"
#include "server.h"

#define CONFIG_FILE "config.json"
#define FORMAT_VERSION 1
#define KEY_MAX (16 + 3 * 3 * SL_MAX_ID_LEN) /* "rule/client/" + three encoded ids */

const sd_adm_field sd_adm_fields[3] = {
    {"max_global_concurrent_requests", 1, 100000000},
    {"max_tenant_queue_size", 0, 100000000},
    {"max_queue_wait_ms", 1, 3600000}, /* an hour */
};

static int adm_ok(int i, const json_t *v)
{
    return json_is_integer(v) && json_integer_value(v) >= sd_adm_fields[i].min &&
           json_integer_value(v) <= sd_adm_fields[i].max;
}

struct sd_config {
    pthread_mutex_t lock;
    json_t *base;    /* items of --config */
    json_t *overlay; /* items changed through the API (null = deleted) */
    char path[600];  /* <data-dir>/config.json, "" = not durable */
    char dir[520];
    const char *base_path; /* the --config file, while sd_config_open runs */
    int lock_fd;           /* DIR/lock, flock()ed while the server runs; -1: none */
};

static _Thread_local int t_errno;

int sd_config_errno(void)
{
    return t_errno;
}

/* ---- keys ------------------------------------------------------------------------------ */

static int unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

/* Append the percent-encoding of p[0..n) at *pos. */
static void pct(char *buf, size_t *pos, const char *p, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (unreserved(c)) {
            buf[(*pos)++] = (char)c;
        } else {
            buf[(*pos)++] = '%';
            buf[(*pos)++] = hex[c >> 4];
            buf[(*pos)++] = hex[c & 15];
        }
    }
    buf[*pos] = 0;
}

static void seg(char *buf, size_t *pos, const char *p, size_t n, int norm_default)
{
    if (norm_default)
        n = sl_norm_default(p, n); /* "default" and "" are the same tenant or action */
    buf[(*pos)++] = '/';
    pct(buf, pos, p, n);
}

static void rule_key(char *buf, sl_scope scope, const sl_key *k)
{
    size_t pos = 0;
    const char *s = scope == SL_SCOPE_TENANT ? "rule/tenant" : scope == SL_SCOPE_ACTION
                                                                   ? "rule/action"
                                                                   : "rule/client";
    memcpy(buf, s, strlen(s) + 1);
    pos = strlen(s);
    seg(buf, &pos, k->tenant, k->tenant_len, 1);
    if (scope != SL_SCOPE_TENANT)
        seg(buf, &pos, k->action, k->action_len, 1);
    if (scope == SL_SCOPE_CLIENT)
        seg(buf, &pos, k->client, k->client_len, 0);
}

static void tier_key(char *buf, const char *name)
{
    size_t pos = 4;
    memcpy(buf, "tier", 5);
    seg(buf, &pos, name, strlen(name), 0);
}

static void assign_key(char *buf, const sl_key *tc)
{
    size_t pos = 6;
    memcpy(buf, "assign", 7);
    seg(buf, &pos, tc->tenant, tc->tenant_len, 1);
    seg(buf, &pos, tc->client, tc->client_len, 0);
}

static void weight_key(char *buf, const char *tenant, size_t len)
{
    size_t pos = 6;
    memcpy(buf, "weight", 7);
    seg(buf, &pos, tenant, len, 1);
}

/* Decode one '/'-separated segment starting at *p; advances *p past it. -1 if malformed. */
static int unpct(const char **p, char *out, size_t *len)
{
    size_t n = 0;
    const char *s = *p;
    while (*s && *s != '/') {
        unsigned char c = (unsigned char)*s;
        if (c == '%') {
            int v = 0;
            for (int i = 1; i <= 2; i++) {
                int d = sd_hex_digit(s[i]);
                if (d < 0)
                    return -1;
                v = v * 16 + d;
            }
            c = (unsigned char)v;
            s += 3;
        } else if (unreserved(c)) {
            s++;
        } else {
            return -1;
        }
        if (n == SL_MAX_ID_LEN)
            return -1;
        out[n++] = (char)c;
    }
    out[n] = 0;
    *len = n;
    *p = s;
    return 0;
}

/* ---- policies as JSON -------------------------------------------------------------------- */

static json_t *policy_json(const sl_policy *p)
{
    json_t *limits = json_array();
    for (unsigned i = 0; i < p->nlimits; i++) {
        const sl_limit *l = &p->limits[i];
        json_t *o = json_object();
        json_object_set_new(o, "algorithm", json_string(sl_algorithm_name(l->algorithm)));
        json_object_set_new(o, "limit", json_real(l->limit));
        if (l->rate != 0)
            json_object_set_new(o, "rate", json_real(l->rate));
        if (l->window != 0)
            json_object_set_new(o, "window", json_real(l->window));
        if (l->reserve_cap != 0)
            json_object_set_new(o, "reserve_cap", json_real(l->reserve_cap));
        json_array_append_new(limits, o);
    }
    json_t *o = json_object();
    json_object_set_new(o, "limits", limits);
    return o;
}

static int policy_from_json(const json_t *v, sl_policy *p, const char **why)
{
    memset(p, 0, sizeof *p);
    const json_t *limits = json_is_object(v) ? json_object_get(v, "limits") : NULL;
    if (!json_is_array(limits) || json_object_size(v) != 1) {
        *why = "a policy is {\"limits\": [...]}";
        return -1;
    }
    size_t i;
    const json_t *l;
    if (json_array_size(limits) < 1 || json_array_size(limits) > SL_MAX_LIMITS) {
        *why = sl_strerror(SL_ELIMITS);
        return -1;
    }
    json_array_foreach(limits, i, l)
    {
        sl_limit *x = &p->limits[p->nlimits++];
        const char *key;
        const json_t *f;
        if (!json_is_object(l)) {
            *why = "a limit is an object";
            return -1;
        }
        unsigned have = 0, takes, needs;
        json_object_foreach((json_t *)l, key, f)
        {
            static const char *const names[] = {"limit", "rate", "window", "reserve_cap"};
            double *fields[] = {&x->limit, &x->rate, &x->window, &x->reserve_cap};
            double *d = NULL;
            for (int k = 0; k < 4; k++)
                if (strcmp(key, names[k]) == 0) {
                    d = fields[k];
                    have |= 1u << k; /* SD_F_* in this order */
                }
            if (strcmp(key, "algorithm") == 0) {
                const char *a = json_string_value(f);
                if (!a || sl_algorithm_parse(a, strlen(a), &x->algorithm) != SL_OK) {
                    *why = sl_strerror(SL_EALGORITHM);
                    return -1;
                }
            } else if (d && json_is_number(f)) {
                *d = json_number_value(f);
            } else {
                *why = d ? "limit fields are numbers" : "unknown limit field";
                return -1;
            }
        }
        sd_policy_fields(x->algorithm, &takes, &needs); /* as RESP and HTTP take them */
        if (have & ~takes) {
            *why = "a field does not apply to the limit's algorithm (token and leaky buckets: "
                   "limit, rate; burst_reserve: limit, rate, reserve_cap; the others: limit, "
                   "window)";
            return -1;
        }
        if (needs & ~have) {
            *why = "a field the limit's algorithm needs is missing (token and leaky buckets: "
                   "limit, rate; burst_reserve: limit, rate; the others: limit, window)";
            return -1;
        }
    }
    int rc = sl_policy_validate(p);
    if (rc != SL_OK) {
        *why = sl_strerror(rc);
        return -1;
    }
    return 0;
}

/* ---- one item: check and apply --------------------------------------------------------------- */

typedef struct parsed {
    enum { I_RULE, I_TIER, I_ASSIGN, I_DEFAULT, I_ADMISSION, I_WEIGHT } kind;
    sl_scope scope;
    char a[SL_MAX_ID_LEN + 1], b[SL_MAX_ID_LEN + 1], c[SL_MAX_ID_LEN + 1];
    size_t al, bl, cl;
    int adm; /* I_ADMISSION: which setting */
} parsed;

static int parse_key(const char *key, parsed *x)
{
    memset(x, 0, sizeof *x);
    const char *p;
    int need = 0;
    if (strcmp(key, "default") == 0) {
        x->kind = I_DEFAULT;
        return 0;
    }
    if (strncmp(key, "admission/", 10) == 0) {
        for (int i = 0; i < 3; i++)
            if (strcmp(key + 10, sd_adm_fields[i].name) == 0) {
                x->kind = I_ADMISSION;
                x->adm = i;
                return 0;
            }
        return -1;
    }
    if (strncmp(key, "rule/tenant/", 12) == 0) {
        x->kind = I_RULE, x->scope = SL_SCOPE_TENANT, need = 1, p = key + 12;
    } else if (strncmp(key, "rule/action/", 12) == 0) {
        x->kind = I_RULE, x->scope = SL_SCOPE_ACTION, need = 2, p = key + 12;
    } else if (strncmp(key, "rule/client/", 12) == 0) {
        x->kind = I_RULE, x->scope = SL_SCOPE_CLIENT, need = 3, p = key + 12;
    } else if (strncmp(key, "tier/", 5) == 0) {
        x->kind = I_TIER, need = 1, p = key + 5;
    } else if (strncmp(key, "assign/", 7) == 0) {
        x->kind = I_ASSIGN, need = 2, p = key + 7;
    } else if (strncmp(key, "weight/", 7) == 0) {
        x->kind = I_WEIGHT, need = 1, p = key + 7;
    } else {
        return -1;
    }
    char *outs[3] = {x->a, x->b, x->c};
    size_t *lens[3] = {&x->al, &x->bl, &x->cl};
    for (int i = 0; i < need; i++) {
        if (i > 0 && *p++ != '/')
            return -1;
        if (unpct(&p, outs[i], lens[i]) != 0)
            return -1;
    }
    return *p ? -1 : 0;
}

/* The key in the form the server writes for the item x (parsed from any spelling: "default"
 * or "" for the default tenant and action, any percent-encoding of the same bytes). */
static void canonical_key(const char *key, const parsed *x, char *out)
{
    sl_key k = {x->a, x->al, x->b, x->bl, x->c, x->cl};
    switch (x->kind) {
    case I_RULE:
        return rule_key(out, x->scope, &k);
    case I_TIER:
        return tier_key(out, x->a);
    case I_ASSIGN: {
        sl_key tc = {x->a, x->al, NULL, 0, x->b, x->bl};
        return assign_key(out, &tc);
    }
    case I_WEIGHT:
        return weight_key(out, x->a, x->al);
    default:
        snprintf(out, KEY_MAX, "%s", key);
    }
}

/* Apply the item's value (NULL: remove it) to the running server. */
static int apply(sd_server *s, const parsed *x, const json_t *v)
{
    sl_policy p;
    const char *why;
    sl_key k = {x->a, x->al, x->b, x->bl, x->c, x->cl};
    if ((x->kind == I_RULE || x->kind == I_TIER || x->kind == I_DEFAULT) && v &&
        policy_from_json(v, &p, &why) != 0)
        return SL_EINVAL;
    switch (x->kind) {
    case I_RULE:
        return v ? sl_rule_set(s->lim, x->scope, &k, &p) : sl_rule_del(s->lim, x->scope, &k);
    case I_TIER:
        return v ? sl_tier_set(s->lim, x->a, &p) : sl_tier_del(s->lim, x->a);
    case I_ASSIGN: {
        sl_key tc = {x->a, x->al, NULL, 0, x->b, x->bl};
        char tier[SL_MAX_ID_LEN + 1];
        size_t tl;
        const char *t = v ? json_string_value(v) : NULL;
        if (v && (!t || unpct(&t, tier, &tl) != 0 || *t || tl == 0 || memchr(tier, 0, tl)))
            return SL_ETIER;
        int rc = sl_tier_assign(s->lim, &tc, v ? tier : NULL);
        return rc == SL_ENOTFOUND && !v ? SL_OK : rc; /* deleting what is not there */
    }
    case I_DEFAULT:
        if (!v)
            p = SL_POLICY_TOKEN_BUCKET(5, 1); /* the built-in default */
        return sl_default_set(s->lim, &p);
    case I_ADMISSION: {
        static const int64_t dflt[3] = {10000, 1000, 1000};
        _Atomic int64_t *f[3] = {&s->adm.max_global_concurrent, &s->adm.max_tenant_queue,
                                 &s->adm.max_queue_wait_ms};
        json_int_t n = v ? json_integer_value(v) : dflt[x->adm];
        if (v && !adm_ok(x->adm, v))
            return SL_EINVAL;
        atomic_store(f[x->adm], (int64_t)n);
        return SL_OK;
    }
    case I_WEIGHT: {
        json_int_t w = v ? json_integer_value(v) : 1;
        if (v && (!json_is_integer(v) || w < 1 || w > 1000))
            return SL_EINVAL;
        return sd_weight_set(&s->adm, x->a, x->al, (unsigned)w) == 0 ? SL_OK : SL_ENOMEM;
    }
    }
    return SL_EINVAL;
}

/* ---- the configuration in effect ----------------------------------------------------------- */

/* The item's value in effect: the API's change if any, else --config's; NULL if absent. */
static json_t *effective(struct sd_config *c, const char *key)
{
    json_t *v = json_object_get(c->overlay, key);
    if (v)
        return json_is_null(v) ? NULL : v;
    return json_object_get(c->base, key);
}

/* Is tier `name` assigned to anyone in the configuration in effect? */
static int tier_in_use(struct sd_config *c, const char *name)
{
    char enc[3 * SL_MAX_ID_LEN + 1];
    size_t pos = 0;
    pct(enc, &pos, name, strlen(name));
    json_t *maps[2] = {c->overlay, c->base};
    for (int m = 0; m < 2; m++) {
        const char *key;
        json_t *v;
        json_object_foreach(maps[m], key, v)
        {
            if (strncmp(key, "assign/", 7) != 0 || (m == 1 && json_object_get(c->overlay, key)))
                continue; /* base items the API changed are judged by the overlay */
            const char *t = json_string_value(v);
            if (t && strcmp(t, enc) == 0)
                return 1;
        }
    }
    return 0;
}

/* ---- writing ------------------------------------------------------------------------------ */

/* Hook for tests: SLUICED_FAIL_CONFIG_WRITES=1 makes every configuration write fail with
 * ENOSPC (where a small filesystem cannot be made); =2 makes the directory's fsync fail with
 * EIO after the rename (where a failing disk cannot be made). Returns the digit, or 0. */
static int injected_failure(void)
{
    const char *e = getenv("SLUICED_FAIL_CONFIG_WRITES");
    return e && (*e == '1' || *e == '2') ? *e - '0' : 0;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Replace `path` with `data` atomically and durably: temp file, fsync, rename, fsync dir. */
/* Replace `path` (in `dir`) with data: temp file, fsync, rename, directory fsync. 0; -1 with
 * errno, the file as it was; or -2 with errno when only the directory's fsync failed: the file
 * holds the new data, but maybe not after a crash. The directory is opened first, so a
 * directory that cannot be opened fails before anything changes. */
static int write_atomic(const char *dir, const char *path, const char *data, size_t n)
{
    static _Atomic unsigned long seq;
    char tmp[700];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* with the pid: unique even when pids are reused */
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%lu.%lx", path, (long)getpid(),
             atomic_fetch_add(&seq, 1), (unsigned long)ts.tv_nsec);
    int inject = injected_failure();
    if (inject == 1) {
        errno = ENOSPC;
        return -1;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644), rc = -1, e;
    if (fd >= 0 && write_all(fd, data, n) == 0 && fsync(fd) == 0) {
        rc = close(fd);
        fd = -1;
        if (rc == 0 && (rc = rename(tmp, path)) == 0 && (inject == 2 || fsync(dfd) != 0)) {
            if (inject == 2)
                errno = EIO;
            rc = -2;
        }
    }
    e = errno;
    if (fd >= 0)
        close(fd);
    if (rc == -1)
        unlink(tmp);
    close(dfd);
    errno = e;
    return rc;
}

static int persist(struct sd_config *c, json_t *overlay)
{
    if (!c->path[0])
        return 0;
    json_t *doc = json_pack("{s:i, s:O}", "sluice_config", FORMAT_VERSION, "items", overlay);
    char *text = doc ? json_dumps(doc, JSON_INDENT(1) | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text) {
        errno = ENOMEM;
        return -1;
    }
    size_t n = strlen(text);
    text[n] = '\n'; /* json_dumps's NUL becomes the last line's end */
    int rc = write_atomic(c->dir, c->path, text, n + 1);
    int e = errno;
    free(text);
    errno = e;
    return rc;
}

/* ---- a change -------------------------------------------------------------------------------- */

typedef struct change {
    char key[KEY_MAX];
    json_t *val; /* new value (reference owned), NULL = remove */
} change;

/* Write the changed configuration, then apply it; all or nothing. Takes the values'
 * references. The caller holds c->lock and has checked the changes. */
static int commit(sd_server *s, change *ch, int n)
{
    struct sd_config *c = s->config;
    json_t *next = json_deep_copy(c->overlay);
    int rc = next ? SL_OK : SL_ENOMEM;
    for (int i = 0; rc == SL_OK && i < n; i++) {
        if (ch[i].val)
            json_object_set(next, ch[i].key, ch[i].val);
        else if (json_object_get(c->base, ch[i].key))
            json_object_set_new(next, ch[i].key, json_null()); /* deleted over --config */
        else
            json_object_del(next, ch[i].key);
    }
    int w = rc == SL_OK ? persist(c, next) : 0;
    if (w != 0) {
        t_errno = errno;
        /* -2: the file holds the change, but its directory entry may not survive a crash;
         * put the old file back so that "nothing changed" is true of the file too */
        if (w == -2 && persist(c, c->overlay) == -1)
            sd_error("configuration: %s holds a change reported as not saved, and could not "
                     "be put back: %s", c->path, strerror(errno));
        sd_error("configuration not saved to %s: %s; nothing changed", c->path,
                 strerror(t_errno));
        rc = SD_EPERSIST;
    }
    int applied = 0;
    for (; rc == SL_OK && applied < n; applied++) {
        parsed x;
        if (parse_key(ch[applied].key, &x) != 0 || (rc = apply(s, &x, ch[applied].val)) != SL_OK)
            break;
    }
    if (rc != SL_OK && rc != SD_EPERSIST) {
        /* Written but not applied (out of memory in the library): put back what was. */
        for (int i = 0; i < applied; i++) {
            parsed x;
            parse_key(ch[i].key, &x);
            apply(s, &x, effective(c, ch[i].key));
        }
        if (persist(c, c->overlay) != 0)
            sd_error("configuration: could not restore %s after a failed change: %s", c->path,
                     strerror(errno));
    }
    if (rc == SL_OK) {
        json_decref(c->overlay);
        c->overlay = next;
    } else {
        json_decref(next);
    }
    for (int i = 0; i < n; i++)
        json_decref(ch[i].val);
    return rc;
}

static int commit_one(sd_server *s, change *ch)
{
    int rc = commit(s, ch, 1);
    pthread_mutex_unlock(&s->config->lock);
    return rc;
}

int sd_cfg_rule_set(sd_server *s, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    sl_policy tmp;
    int rc = sl_rule_get(s->lim, scope, k, &tmp); /* the library's checks of the key */
    if (rc != SL_OK && rc != SL_ENOTFOUND)
        return rc;
    if ((rc = sl_policy_validate(p)) != SL_OK)
        return rc;
    change ch;
    rule_key(ch.key, scope, k);
    ch.val = policy_json(p);
    pthread_mutex_lock(&s->config->lock);
    return commit_one(s, &ch);
}

int sd_cfg_rule_del(sd_server *s, sl_scope scope, const sl_key *k)
{
    sl_policy tmp;
    int rc = sl_rule_get(s->lim, scope, k, &tmp);
    if (rc != SL_OK && rc != SL_ENOTFOUND)
        return rc;
    change ch = {.val = NULL};
    rule_key(ch.key, scope, k);
    pthread_mutex_lock(&s->config->lock);
    if (!effective(s->config, ch.key)) {
        pthread_mutex_unlock(&s->config->lock);
        return SL_ENOTFOUND;
    }
    return commit_one(s, &ch);
}

int sd_cfg_tier_set(sd_server *s, const char *name, const sl_policy *p)
{
    sl_policy tmp;
    int rc = sl_tier_get(s->lim, name, &tmp); /* checks the name */
    if (rc != SL_OK && rc != SL_ETIER)
        return rc;
    if ((rc = sl_policy_validate(p)) != SL_OK)
        return rc;
    change ch;
    tier_key(ch.key, name);
    ch.val = policy_json(p);
    pthread_mutex_lock(&s->config->lock);
    return commit_one(s, &ch);
}

int sd_cfg_tier_del(sd_server *s, const char *name)
{
    sl_policy tmp;
    int rc = sl_tier_get(s->lim, name, &tmp);
    if (rc != SL_OK && rc != SL_ETIER)
        return rc;
    change ch = {.val = NULL};
    tier_key(ch.key, name);
    pthread_mutex_lock(&s->config->lock);
    rc = !effective(s->config, ch.key)        ? SL_ETIER
         : tier_in_use(s->config, name) ? SL_ETIERINUSE
                                        : SL_OK;
    if (rc != SL_OK) {
        pthread_mutex_unlock(&s->config->lock);
        return rc;
    }
    return commit_one(s, &ch);
}

int sd_cfg_tier_assign(sd_server *s, const sl_key *tc, const char *tier)
{
    sl_key k = {tc->tenant, tc->tenant_len, NULL, 0, tc->client, tc->client_len};
    sl_policy tmp;
    int rc = sl_rule_get(s->lim, SL_SCOPE_CLIENT, &k, &tmp); /* checks tenant and client */
    if (rc != SL_OK && rc != SL_ENOTFOUND)
        return rc;
    if (tier && (rc = sl_tier_get(s->lim, tier, &tmp)) != SL_OK && rc != SL_ETIER)
        return rc;
    change ch = {.val = NULL};
    assign_key(ch.key, tc);
    if (tier) {
        char enc[3 * SL_MAX_ID_LEN + 1];
        size_t n = 0;
        pct(enc, &n, tier, strlen(tier));
        ch.val = json_string(enc);
    }
    pthread_mutex_lock(&s->config->lock);
    if (tier) {
        char tk[KEY_MAX];
        tier_key(tk, tier);
        if (!effective(s->config, tk)) {
            pthread_mutex_unlock(&s->config->lock);
            json_decref(ch.val);
            return SL_ETIER;
        }
    } else if (!effective(s->config, ch.key)) {
        pthread_mutex_unlock(&s->config->lock);
        return SL_ENOTFOUND; /* not assigned: nothing to do */
    }
    return commit_one(s, &ch);
}

int sd_cfg_weight_set(sd_server *s, const char *tenant, size_t len, unsigned weight)
{
    if (weight < 1 || weight > 1000)
        return SL_EINVAL;
    if (len > SL_MAX_ID_LEN)
        return SL_EKEYLONG;
    change ch;
    weight_key(ch.key, tenant, len);
    ch.val = weight == 1 ? NULL : json_integer(weight);
    pthread_mutex_lock(&s->config->lock);
    return commit_one(s, &ch);
}

int sd_cfg_global_set(sd_server *s, const sl_policy *deflt, const int64_t vals[3],
                      const int set[3])
{
    change ch[4];
    int n = 0;
    if (deflt) {
        int rc = sl_policy_validate(deflt);
        if (rc != SL_OK)
            return rc;
        snprintf(ch[n].key, sizeof ch[n].key, "default");
        ch[n++].val = policy_json(deflt);
    }
    for (int i = 0; i < 3; i++) {
        if (!set[i])
            continue;
        if (vals[i] < sd_adm_fields[i].min || vals[i] > sd_adm_fields[i].max) {
            for (int j = 0; j < n; j++)
                json_decref(ch[j].val);
            return SL_EINVAL;
        }
        snprintf(ch[n].key, sizeof ch[n].key, "admission/%s", sd_adm_fields[i].name);
        ch[n++].val = json_integer(vals[i]);
    }
    if (n == 0)
        return SL_OK;
    pthread_mutex_lock(&s->config->lock);
    int rc = commit(s, ch, n);
    pthread_mutex_unlock(&s->config->lock);
    return rc;
}

/* ---- loading ------------------------------------------------------------------------------- */

/* A reader of a JSON file's text that knows where it is: line and column (columns count
 * characters, as jansson's do: UTF-8 continuation bytes do not move it). */
typedef struct {
    FILE *f;
    int line, col;
} jreader;

static int jr_get(jreader *r)
{
    int ch = fgetc(r->f);
    if (ch == '\n') {
        r->line++;
        r->col = 0;
    } else if (ch != EOF && (ch & 0xC0) != 0x80) {
        r->col++;
    }
    return ch;
}

static void put_utf8(char *buf, size_t cap, size_t *n, unsigned long cp)
{
    unsigned char u[4];
    size_t len;
    if (cp < 0x80) {
        u[0] = (unsigned char)cp;
        len = 1;
    } else if (cp < 0x800) {
        u[0] = (unsigned char)(0xC0 | cp >> 6);
        u[1] = (unsigned char)(0x80 | (cp & 0x3F));
        len = 2;
    } else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xE0 | cp >> 12);
        u[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp & 0x3F));
        len = 3;
    } else {
        u[0] = (unsigned char)(0xF0 | cp >> 18);
        u[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        u[3] = (unsigned char)(0x80 | (cp & 0x3F));
        len = 4;
    }
    for (size_t i = 0; i < len; i++, (*n)++)
        if (*n < cap)
            buf[*n] = (char)u[i];
}

static long jr_hex4(jreader *r)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int d = sd_hex_digit(jr_get(r));
        if (d < 0)
            return -1;
        v = v << 4 | d;
    }
    return v;
}

/* The rest of a string whose opening quote was just read, decoded into buf (bytes beyond
 * cap are counted, not stored): its decoded length, or -1 if the text is not JSON. */
static long jr_string(jreader *r, char *buf, size_t cap)
{
    size_t n = 0;
    for (;;) {
        int ch = jr_get(r);
        if (ch == EOF)
            return -1;
        if (ch == '"')
            return (long)n;
        if (ch != '\\') { /* the file's own bytes, UTF-8 already */
            if (n < cap)
                buf[n] = (char)ch;
            n++;
            continue;
        }
        ch = jr_get(r);
        const char *esc = strchr("\"\\/bfnrt", ch);
        if (ch != EOF && ch != 0 && esc) {
            put_utf8(buf, cap, &n, (unsigned long)"\"\\/\b\f\n\r\t"[esc - "\"\\/bfnrt"]);
            continue;
        }
        long cp = ch == 'u' ? jr_hex4(r) : -1;
        if (cp >= 0xD800 && cp < 0xDC00) { /* a surrogate pair's first half */
            long lo = jr_get(r) == '\\' && jr_get(r) == 'u' ? jr_hex4(r) : -1;
            if (lo < 0xDC00 || lo > 0xDFFF)
                return -1;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp < 0)
            return -1;
        put_utf8(buf, cap, &n, (unsigned long)cp);
    }
}

/* Is the member name written[0..n) the item `key` (an item's key in the server's form), in
 * any spelling the file may use ("assign/%a0/b" for "assign/%A0/b")? */
static int same_item(const char *written, size_t n, const char *key)
{
    if (n == strlen(key) && memcmp(written, key, n) == 0)
        return 1;
    char w[KEY_MAX + 1], ck[KEY_MAX];
    parsed x;
    if (n > KEY_MAX || memchr(written, 0, n))
        return 0;
    memcpy(w, written, n);
    w[n] = 0;
    if (parse_key(w, &x) != 0)
        return 0;
    canonical_key(w, &x, ck);
    return strcmp(ck, key) == 0;
}

/* Line and column (1-based) of the first object member named `key` (as jansson decodes it:
 * escapes count; at depth 2, an item's key in any spelling) at nesting `depth` (1: the
 * top-level object's members); 0, or -1. */
static int file_position(const char *path, int depth, const char *key, int *line, int *col)
{
    *line = *col = 0;
    jreader r = {fopen(path, "r"), 1, 0};
    if (!r.f)
        return -1;
    size_t kl = strlen(key);
    char buf[KEY_MAX + 1];
    int d = 0, found = -1, ch;
    while (found < 0 && (ch = jr_get(&r)) != EOF) {
        if (ch == '{' || ch == '[') {
            d++;
        } else if (ch == '}' || ch == ']') {
            d--;
        } else if (ch == '"') {
            int sl = r.line, sc = r.col;
            long n = jr_string(&r, buf, sizeof buf);
            if (n < 0)
                break;
            while ((ch = jr_get(&r)) == ' ' || ch == '\t' || ch == '\r' || ch == '\n')
                ;
            if (ch == ':' && d == depth && (size_t)n <= KEY_MAX &&
                (depth == 2 ? same_item(buf, (size_t)n, key)
                            : (size_t)n == kl && memcmp(buf, key, kl) == 0)) {
                *line = sl;
                *col = sc;
                found = 0;
            } else if (ch == '{' || ch == '[') {
                d++;
            } else if (ch == '}' || ch == ']') {
                d--;
            }
        }
    }
    fclose(r.f);
    return found;
}

void sd_file_where(char *out, size_t n, const char *prefix, const char *path, int depth,
                   const char *key)
{
    int line, col;
    if (file_position(path, depth, key, &line, &col) == 0)
        snprintf(out, n, "%s%s: line %d, column %d", prefix, path, line, col);
    else
        snprintf(out, n, "%s%s", prefix, path);
}

/* Check every item of `items` (from `path`); 0 or -1 with err set. */
static int check_items(const json_t *items, const char *prefix, const char *path, char *err,
                       size_t errlen)
{
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)items, key, v)
    {
        parsed x;
        const char *why = NULL;
        char whybuf[96];
        sl_policy p;
        if (parse_key(key, &x) != 0) {
            why = "unknown item (rule/..., tier/..., assign/..., default, admission/..., "
                  "weight/...)";
        } else if (json_is_null(v)) {
            continue; /* a deletion */
        } else if ((x.kind == I_RULE || x.kind == I_TIER || x.kind == I_DEFAULT) &&
                   policy_from_json(v, &p, &why) != 0) {
            /* why says what is wrong with the policy */
        } else if (x.kind == I_ASSIGN && !json_is_string(v)) {
            why = "an assignment is a tier name (a string)";
        } else if (x.kind == I_ADMISSION && !adm_ok(x.adm, v)) {
            snprintf(whybuf, sizeof whybuf, "must be a whole number from %lld to %lld",
                     (long long)sd_adm_fields[x.adm].min, (long long)sd_adm_fields[x.adm].max);
            why = whybuf;
        } else if (x.kind == I_WEIGHT && (!json_is_integer(v) || json_integer_value(v) < 1 ||
                                          json_integer_value(v) > 1000)) {
            why = "a weight is a whole number from 1 to 1000";
        } else if ((x.kind == I_RULE && x.scope == SL_SCOPE_CLIENT && x.cl == 0) ||
                   (x.kind == I_ASSIGN && x.bl == 0)) {
            why = sl_strerror(SL_EKEYEMPTY);
        } else if (x.kind == I_TIER && (x.al == 0 || memchr(x.a, 0, x.al))) {
            why = "tier names are 1 to 255 bytes without NUL";
        }
        if (why) {
            char where[700];
            sd_file_where(where, sizeof where, prefix, path, 2, key);
            snprintf(err, errlen, "%s: item \"%s\": %s", where, key, why);
            return -1;
        }
    }
    return 0;
}

/* The checked `items` (from `path`; the reference is taken) with every key in the server's own
 * form, so that a change or deletion made through the API finds an item however the file
 * spelled it. Two spellings of one item are refused, but for one case: an older sluiced
 * kept the default tenant's weight under "weight/" and "weight/default" as two tenants, and
 * its config.json may hold both. They are one item now, and the "default" spelling wins,
 * wherever it is in the file: it is the one the API showed (GET .../tenant/default/weight)
 * and the one an operator sets on purpose (the empty id needs "//" or ""), and, as files are
 * written with sorted keys, the later of the two. The other is dropped with a warning, and
 * the next change rewrites the file without it. NULL with err set. */
static json_t *canonical_items(json_t *items, const char *prefix, const char *path, char *err,
                               size_t errlen)
{
    json_t *out = json_object();
    const char *key;
    json_t *v;
    const char *dflt_weight = NULL; /* the key of the "default" spelling of weight/, if any */
    json_object_foreach(items, key, v)
    {
        parsed x;
        char ck[KEY_MAX];
        if (!out)
            break;
        parse_key(key, &x); /* checked already */
        canonical_key(key, &x, ck);
        int dw = x.kind == I_WEIGHT && ck[7] == 0; /* the default tenant's weight */
        int spelt = dw && x.al != 0;               /* ... spelt "default" */
        if (json_object_get(out, ck) && dw && spelt == !dflt_weight) {
            /* "weight/" and a "default" spelling, in either order: keep the latter's value */
            const char *used = spelt ? key : dflt_weight;
            sd_warn("%s%s: items \"weight/\" and \"%s\" are one (the default tenant's "
                    "weight, written two ways by an older sluiced): \"%s\" is used",
                    prefix, path, used, used);
            if (!spelt)
                continue;
        } else if (json_object_get(out, ck)) {
            char where[700];
            sd_file_where(where, sizeof where, prefix, path, 2, key);
            snprintf(err, errlen, "%s: item \"%s\": the same item as \"%s\", written another way",
                     where, key, ck);
            json_decref(out);
            json_decref(items);
            return NULL;
        }
        if (spelt)
            dflt_weight = key;
        if (json_object_set(out, ck, v) != 0) {
            json_decref(out);
            out = NULL;
        }
    }
    json_decref(items);
    if (!out)
        snprintf(err, errlen, "out of memory");
    return out;
}

static json_t *load_overlay(const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: not a regular file", path);
        return NULL;
    }
    json_error_t e;
    json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &e);
    if (!doc) {
        snprintf(err, errlen, "%s: line %d, column %d: %s", path, e.line, e.column, e.text);
        return NULL;
    }
    json_t *items = json_object_get(doc, "items");
    json_t *ver = json_object_get(doc, "sluice_config");
    if (!json_is_object(doc) || !json_is_object(items) || !json_is_integer(ver) ||
        json_object_size(doc) != 2) {
        snprintf(err, errlen, "%s: line 1, column 1: expected {\"sluice_config\": %d, "
                              "\"items\": {...}}",
                 path, FORMAT_VERSION);
        json_decref(doc);
        return NULL;
    }
    if (json_integer_value(ver) != FORMAT_VERSION) {
        char where[700];
        sd_file_where(where, sizeof where, "", path, 1, "sluice_config");
        snprintf(err, errlen, "%s: field \"sluice_config\": version %" JSON_INTEGER_FORMAT
                              " is not %d (written by another version of sluiced)",
                 where, json_integer_value(ver), FORMAT_VERSION);
        json_decref(doc);
        return NULL;
    }
    json_incref(items);
    json_decref(doc);
    if (check_items(items, "", path, err, errlen) != 0) {
        json_decref(items);
        return NULL;
    }
    items = canonical_items(items, "", path, err, errlen);
    return items;
}

/* Apply every item in effect: tiers first (assignments name them). */
static int apply_all(sd_server *s, char *err, size_t errlen)
{
    struct sd_config *c = s->config;
    for (int pass = 0; pass < 2; pass++) {
        json_t *maps[2] = {c->base, c->overlay};
        for (int m = 0; m < 2; m++) {
            const char *key;
            json_t *v;
            json_object_foreach(maps[m], key, v)
            {
                if (m == 0 && json_object_get(c->overlay, key))
                    continue; /* the data dir's value wins */
                if (json_is_null(v) || (strncmp(key, "tier/", 5) == 0) != (pass == 0))
                    continue;
                parsed x;
                int rc = parse_key(key, &x) == 0 ? apply(s, &x, v) : SL_EINVAL;
                if (rc != SL_OK) {
                    char where[700];
                    sd_file_where(where, sizeof where, m ? "" : "--config ",
                                  m ? c->path : c->base_path, 2, key);
                    snprintf(err, errlen, "%s: item \"%s\": %s", where, key, sl_strerror(rc));
                    return -1;
                }
            }
        }
    }
    return 0;
}

/* Take the data dir for this process: an exclusive lock on DIR/lock, held until exit, so
 * that two sluiced never rewrite each other's files (each would lose the other's changes).
 * Then remove temp files that a crash left (ours alone now): a crash loop would otherwise
 * fill the disk with them. */
static int lock_data_dir(struct sd_config *c, char *err, size_t errlen)
{
    char path[600];
    snprintf(path, sizeof path, "%s/lock", c->dir);
    c->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (c->lock_fd < 0) {
        snprintf(err, errlen, "--data-dir %s: %s: %s", c->dir, path, strerror(errno));
        return -1;
    }
    if (flock(c->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        snprintf(err, errlen, "--data-dir %s: %s (another sluiced uses it)", c->dir,
                 errno == EWOULDBLOCK ? "in use" : strerror(errno));
        return -1;
    }
    DIR *d = opendir(c->dir);
    struct dirent *de;
    int removed = 0;
    while (d && (de = readdir(d)) != NULL)
        if ((strncmp(de->d_name, CONFIG_FILE ".tmp.", sizeof CONFIG_FILE + 4) == 0 ||
             strncmp(de->d_name, "state.snap.tmp.", 15) == 0) &&
            unlinkat(dirfd(d), de->d_name, 0) == 0)
            removed++;
    if (d)
        closedir(d);
    if (removed)
        sd_info("data dir %s: removed %d temp files left by a crash", c->dir, removed);
    return 0;
}

int sd_config_open(sd_server *srv, json_t *base, const char *base_path, char *err,
                   size_t errlen)
{
    struct sd_config *c = calloc(1, sizeof *c);
    if (!c) {
        json_decref(base);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    pthread_mutex_init(&c->lock, NULL);
    c->lock_fd = -1;
    srv->config = c;
    c->base = base ? base : json_object();
    c->overlay = NULL;
    c->base_path = base_path;
    if (base && check_items(base, "--config ", base_path, err, errlen) != 0)
        return -1;
    if (base && !(c->base = canonical_items(base, "--config ", base_path, err, errlen)))
        return -1;
    const char *dir = srv->cfg.data_dir;
    if (dir[0]) {
        struct stat st;
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            snprintf(err, errlen, "--data-dir %s: %s", dir, strerror(errno));
            return -1;
        }
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "--data-dir %s: not a directory", dir);
            return -1;
        }
        snprintf(c->dir, sizeof c->dir, "%s", dir);
        if (lock_data_dir(c, err, errlen) != 0)
            return -1;
        snprintf(c->path, sizeof c->path, "%s/%s", dir, CONFIG_FILE);
        if (access(c->path, F_OK) == 0 && !(c->overlay = load_overlay(c->path, err, errlen)))
            return -1;
    }
    if (!c->overlay)
        c->overlay = json_object();
    return apply_all(srv, err, errlen);
}

void sd_config_close(sd_server *srv)
{
    struct sd_config *c = srv->config;
    if (!c)
        return;
    json_decref(c->base);
    json_decref(c->overlay);
    if (c->lock_fd >= 0)
        close(c->lock_fd); /* releases the flock */
    pthread_mutex_destroy(&c->lock);
    free(c);
    srv->config = NULL;
}
