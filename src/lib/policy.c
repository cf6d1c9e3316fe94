/*
 * policy.c — policy compilation, the immutable rule maps and key encoding (see policy.h).
 */
#include "policy.h"

#include <stdlib.h>
#include <string.h>

#include "bytes.h"

int sl_policy_compile(const sl_policy *in, sl_policy *norm, sl_cpolicy *out)
{
    if (!in)
        return SL_EINVAL;
    if (in->nlimits < 1 || in->nlimits > SL_MAX_LIMITS)
        return SL_ELIMITS;
    sl_policy n;
    sl_cpolicy c;
    memset(&n, 0, sizeof n);
    memset(&c, 0, sizeof c);
    n.nlimits = in->nlimits;
    c.nlimits = in->nlimits;
    c.max_cost = UINT64_MAX;
    uint32_t off = 0;
    for (unsigned i = 0; i < in->nlimits; i++) {
        const sl_limit *s = &in->limits[i];
        sl_limit *d = &n.limits[i];
        d->algorithm = s->algorithm;
        d->limit = s->limit;
        switch (s->algorithm) {
        case SL_TOKEN_BUCKET:
        case SL_LEAKY_BUCKET:
            d->rate = s->rate;
            break;
        case SL_FIXED_WINDOW:
        case SL_SLIDING_WINDOW:
        case SL_SLIDING_LOG:
        case SL_CONCURRENCY:
            d->window = s->window;
            break;
        case SL_BURST_RESERVE:
            d->rate = s->rate;
            d->reserve_cap = s->reserve_cap;
            break;
        default:
            return SL_EALGORITHM;
        }
        int rc = sl_climit_compile(d, &c.lim[i]);
        if (rc != SL_OK)
            return rc;
        c.offs[i] = off;
        off += c.lim[i].state_size;
        if (c.lim[i].limit < c.max_cost)
            c.max_cost = c.lim[i].limit;
        if (s->algorithm == SL_CONCURRENCY)
            c.has_lease = 1;
    }
    c.state_size = off;
    c.heap = c.nlimits > 1 || off > 16;
    c.src = n;
    if (norm)
        *norm = n;
    if (out)
        *out = c;
    return SL_OK;
}

/* ---- immutable maps ---------------------------------------------------------------------- */

const sl_ient *sl_imap_get(const sl_imap *m, uint64_t h, const void *k, size_t len)
{
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        const sl_ient *e = m->s[i];
        if (!e)
            return NULL;
        if (e->h == h && e->klen == len && memcmp(e->data, k, len) == 0)
            return e;
    }
}

static void imap_place(sl_imap *m, sl_ient *e)
{
    size_t i = e->h & m->mask;
    while (m->s[i])
        i = (i + 1) & m->mask;
    m->s[i] = e;
    m->n++;
}

static sl_ient *ient_new(uint64_t h, const void *k, size_t klen, const sl_cpolicy *pol,
                         const void *v, size_t vlen)
{
    sl_ient *e = malloc(sizeof *e + klen + vlen);
    if (!e)
        return NULL;
    e->h = h;
    e->klen = (uint32_t)klen;
    e->vlen = (uint32_t)vlen;
    e->pol = pol;
    memcpy(e->data, k, klen);
    if (vlen)
        memcpy(e->data + klen, v, vlen);
    return e;
}

static void imap_destroy(sl_imap *m)
{
    for (size_t i = 0; i <= m->mask; i++)
        free(m->s[i]);
    free(m);
}

int sl_imap_with(const sl_imap *old, uint64_t h, const void *k, size_t klen,
                 const sl_cpolicy *pol, const void *v, size_t vlen, int del, sl_imap **out,
                 int *found)
{
    *found = old && sl_imap_get(old, h, k, klen) != NULL;
    size_t n = (old ? old->n : 0) - (size_t)*found + (del ? 0 : 1);
    *out = NULL;
    if (n == 0)
        return SL_OK;
    size_t cap = 8;
    while (cap < 2 * n)
        cap *= 2;
    sl_imap *m = calloc(1, sizeof *m + cap * sizeof(m->s[0]));
    if (!m)
        return SL_ENOMEM;
    atomic_init(&m->refs, 1);
    m->mask = cap - 1;
    for (size_t i = 0; old && i <= old->mask; i++) {
        const sl_ient *e = old->s[i];
        if (!e || (e->h == h && e->klen == klen && memcmp(e->data, k, klen) == 0))
            continue;
        sl_ient *c = ient_new(e->h, e->data, e->klen, e->pol, e->data + e->klen, e->vlen);
        if (!c)
            goto oom;
        imap_place(m, c);
    }
    if (!del) {
        sl_ient *c = ient_new(h, k, klen, pol, v, vlen);
        if (!c)
            goto oom;
        imap_place(m, c);
    }
    *out = m;
    return SL_OK;
oom:
    imap_destroy(m);
    return SL_ENOMEM;
}

void sl_imap_ref(sl_imap *m)
{
    if (m)
        atomic_fetch_add(&m->refs, 1);
}

void sl_imap_unref(sl_imap *m)
{
    if (m && atomic_fetch_sub(&m->refs, 1) == 1)
        imap_destroy(m);
}

void sl_rules_free(void *p)
{
    sl_rules *r = p;
    if (!r)
        return;
    sl_imap_unref(r->client);
    sl_imap_unref(r->action);
    sl_imap_unref(r->tenant);
    sl_imap_unref(r->assign);
    sl_imap_unref(r->tiers);
    free(r);
}

/* ---- key encoding ------------------------------------------------------------------------ */

size_t sl_key_encode(char *buf, const char *t, size_t tl, const char *a, size_t al,
                     const char *c, size_t cl)
{
    tl = sl_norm_default(t, tl);
    al = sl_norm_default(a, al);
    buf[0] = (char)(unsigned char)tl;
    buf[1] = (char)(unsigned char)al;
    sl_copy(buf + 2, t, tl);
    sl_copy(buf + 2 + tl, a, al);
    sl_copy(buf + 2 + tl + al, c, cl);
    return 2 + tl + al + cl;
}

void sl_key_decode(const char *buf, size_t len, sl_key *out)
{
    size_t tl = (unsigned char)buf[0], al = (unsigned char)buf[1];
    out->tenant = buf + 2;
    out->tenant_len = tl;
    out->action = buf + 2 + tl;
    out->action_len = al;
    out->client = buf + 2 + tl + al;
    out->client_len = len - 2 - tl - al;
}
