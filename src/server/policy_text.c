/*
 * policy_text.c — policies as words (see policy_text.h).
 */
#include "policy_text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(char *err, size_t errlen, const char *msg, const resp_arg *at)
{
    if (at)
        snprintf(err, errlen, "%s: '%.*s'", msg, (int)(at->len > 64 ? 64 : at->len), at->p);
    else
        snprintf(err, errlen, "%s", msg);
    return -1;
}

static const char *const k_field_names[] = {"LIMIT", "RATE", "WINDOW", "RESERVE"};

/* A stray field is a mistake, not something to ignore (HTTP refuses them too). */
void sd_policy_fields(sl_algorithm a, unsigned *takes, unsigned *needs)
{
    switch (a) {
    case SL_TOKEN_BUCKET:
    case SL_LEAKY_BUCKET:
        *takes = *needs = SD_F_LIMIT | SD_F_RATE;
        return;
    case SL_BURST_RESERVE:
        *takes = SD_F_LIMIT | SD_F_RATE | SD_F_RESERVE;
        *needs = SD_F_LIMIT | SD_F_RATE;
        return;
    default: /* the windows, the log, concurrency (WINDOW: the lease's time to live) */
        *takes = *needs = SD_F_LIMIT | SD_F_WINDOW;
        return;
    }
}

int sd_policy_parse(const resp_arg *argv, int argc, sl_policy *out, char *err, size_t errlen)
{
    sl_policy p;
    memset(&p, 0, sizeof p);
    int i = 0;
    if (argc == 0)
        return fail(err, errlen, "missing policy (e.g. token_bucket LIMIT 10 RATE 1)", NULL);
    for (;;) {
        if (p.nlimits == SL_MAX_LIMITS)
            return fail(err, errlen, "a policy holds at most 4 limits", NULL);
        if (i >= argc)
            return fail(err, errlen, "missing algorithm after AND", NULL);
        sl_limit *l = &p.limits[p.nlimits++];
        sl_algorithm a;
        if (sl_algorithm_parse(argv[i].p, argv[i].len, &a) != SL_OK)
            return fail(err, errlen, "unknown algorithm", &argv[i]);
        l->algorithm = a;
        i++;
        unsigned takes, needs, have = 0;
        sd_policy_fields(a, &takes, &needs);
        while (i < argc && !resp_arg_is(&argv[i], "AND")) {
            const resp_arg *kw = &argv[i];
            double *fields[] = {&l->limit, &l->rate, &l->window, &l->reserve_cap};
            int f = -1;
            for (int k = 0; k < 4; k++)
                if (resp_arg_is(kw, k_field_names[k]))
                    f = k;
            if (f < 0)
                return fail(err, errlen, "unknown policy field (LIMIT, RATE, WINDOW, RESERVE)",
                            kw);
            if (!(takes & 1u << f)) {
                snprintf(err, errlen, "%s takes no %s", sl_algorithm_name(a), k_field_names[f]);
                return -1;
            }
            if (have & 1u << f)
                return fail(err, errlen, "policy field given twice", kw);
            if (i + 1 >= argc)
                return fail(err, errlen, "missing value after", kw);
            if (resp_arg_double(&argv[i + 1], fields[f]) != 0)
                return fail(err, errlen, "not a number", &argv[i + 1]);
            have |= 1u << f;
            i += 2;
        }
        for (int k = 0; k < 4; k++)
            if ((needs & ~have) & 1u << k) {
                snprintf(err, errlen, "%s needs %s <n>", sl_algorithm_name(a), k_field_names[k]);
                return -1;
            }
        if (i >= argc)
            break;
        i++; /* AND */
    }
    int rc = sl_policy_validate(&p);
    if (rc != SL_OK)
        return fail(err, errlen, sl_strerror(rc), NULL);
    *out = p;
    return 0;
}

/* The shortest of %.15g..%.17g that reads back as the same double. */
static const char *num(double v, char *buf, size_t len)
{
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

size_t sd_policy_format(const sl_policy *p, char *buf, size_t len)
{
    size_t n = 0;
    if (len)
        buf[0] = 0;
    for (unsigned i = 0; i < p->nlimits; i++) {
        const sl_limit *l = &p->limits[i];
        char part[256], a[32], b[32], c[32], d[32];
        int k = snprintf(part, sizeof part, "%s%s LIMIT %s", i ? " AND " : "",
                         sl_algorithm_name(l->algorithm), num(l->limit, a, sizeof a));
        if (l->rate != 0)
            k += snprintf(part + k, sizeof part - (size_t)k, " RATE %s", num(l->rate, b, sizeof b));
        if (l->window != 0)
            k += snprintf(part + k, sizeof part - (size_t)k, " WINDOW %s",
                          num(l->window, c, sizeof c));
        if (l->reserve_cap != 0)
            k += snprintf(part + k, sizeof part - (size_t)k, " RESERVE %s",
                          num(l->reserve_cap, d, sizeof d));
        if (n + (size_t)k < len)
            memcpy(buf + n, part, (size_t)k + 1);
        n += (size_t)k;
    }
    return n;
}
