/*
 * fuzz_http_api.c — the parsers of sluiced's HTTP endpoints (src/server/http_api.c) that take
 * a request's bytes: the check body's fast parser, JSON policy bodies, the request path, and
 * the JSON string writer that echoes ids. They are static functions of a file that otherwise
 * needs a running server (admission control, configuration), so the file is compiled into
 * this target whole and only those functions are called; no server is built.
 *
 * The input is used three ways, each checked:
 *  - as a POST /api/check_and_consume body: whenever fast_check accepts it, jansson (the
 *    path every other body takes) accepts it too, with the same ids, cost, max_requests and
 *    window (the fast path may only decline, never differ); then the inline policy h_check
 *    would build is validated as h_check does;
 *  - as a policy body (PUT .../rules): a policy that policy_from_json accepts is valid, and
 *    jpolicy writes it as JSON that parses back into the same policy;
 *  - as a request target: split_path's segments stay inside its buffer, and every route
 *    matches without writing past its captures;
 *  - as an id: jstr writes a JSON string that jansson reads back, equal to the id when the id
 *    is valid UTF-8.
 */
#include "http_api.c"

#include "fuzz.h"

/* h_check's fields (a local array there) */
static const char *const k_check_fields[] = {"tenant_id", "client_id", "action_type", "cost",
                                             "max_requests", "window_duration_seconds",
                                             NULL};

typedef struct check_body {
    seg key[3];
    json_int_t cost;
    int have_cost, have_max, have_win;
    double max, win;
} check_body;

/* The jansson path of h_check; 0 when it accepts the body. */
static int slow_check(json_t *o, check_body *b)
{
    char err[512];
    return !json_is_object(o) || only_fields(o, k_check_fields, "", err, sizeof err) ||
           key_fields(o, b->key, err, sizeof err) ||
           int_field(o, "cost", 0, JSON_INTEGER_MAX, &b->cost, &b->have_cost, err, sizeof err) ||
           num_field(o, "", "max_requests", &b->max, &b->have_max, err, sizeof err) ||
           num_field(o, "", "window_duration_seconds", &b->win, &b->have_win, err, sizeof err);
}

static void fuzz_check_body(const char *p, size_t n)
{
    check_body fast = {.cost = 1}, slow = {.cost = 1};
    int fast_ok = fast_check(p, n, fast.key, &fast.cost, &fast.have_cost, &fast.max,
                             &fast.have_max, &fast.win, &fast.have_win) == 0;
    json_error_t e;
    json_t *o = json_loadb(p, n, JSON_REJECT_DUPLICATES, &e);
    int slow_ok = o && slow_check(o, &slow) == 0;
    if (fast_ok) {
        FUZZ_CHECK(slow_ok);
        for (int i = 0; i < 3; i++) {
            FUZZ_CHECK(fast.key[i].p >= p && fast.key[i].p + fast.key[i].len <= p + n);
            FUZZ_CHECK(fast.key[i].len == slow.key[i].len &&
                       memcmp(fast.key[i].p, slow.key[i].p, fast.key[i].len) == 0);
        }
        FUZZ_CHECK(fast.have_cost == slow.have_cost && fast.cost == slow.cost);
        FUZZ_CHECK(fast.have_max == slow.have_max && fast.have_win == slow.have_win);
        FUZZ_CHECK(!fast.have_max || fast.max == slow.max);
        FUZZ_CHECK(!fast.have_win || fast.win == slow.win);
    }
    const check_body *b = fast_ok ? &fast : &slow;
    if ((fast_ok || slow_ok) && b->have_max && b->have_win && b->win > 0) {
        sl_policy pol = SL_POLICY_TOKEN_BUCKET(b->max, b->max / b->win);
        sl_policy_validate(&pol);
    }
    json_decref(o);
}

static void fuzz_policy_body(const char *p, size_t n)
{
    json_error_t e;
    json_t *v = json_loadb(p, n, JSON_REJECT_DUPLICATES, &e);
    if (!v)
        return;
    sl_policy pol;
    char err[512] = "";
    if (policy_from_json(v, "", &pol, err, sizeof err) != 0) {
        FUZZ_CHECK(err[0] != 0);
    } else {
        FUZZ_CHECK(sl_policy_validate(&pol) == SL_OK);
        resp_buf out = {0};
        jpolicy(&out, &pol);
        FUZZ_CHECK(!out.oom);
        json_t *again = json_loadb(out.p, out.len, JSON_REJECT_DUPLICATES, &e);
        FUZZ_CHECK(again);
        sl_policy back;
        FUZZ_CHECK(policy_from_json(again, "", &back, err, sizeof err) == 0);
        FUZZ_CHECK(fuzz_same_policy(&pol, &back));
        json_decref(again);
        resp_buf_free(&out);
    }
    json_decref(v);
}

static void fuzz_target(const char *p, size_t n)
{
    char *buf = malloc(n ? n : 1); /* as sd_api_dispatch's: decoded is never longer */
    seg segs[MAX_SEGS];
    FUZZ_CHECK(buf);
    int ns = split_path(p, n, buf, segs);
    FUZZ_CHECK(ns >= SPLIT_TOO_DEEP && ns <= MAX_SEGS);
    size_t total = 0;
    for (int i = 0; i < ns; i++) {
        FUZZ_CHECK(segs[i].p >= buf && segs[i].p + segs[i].len <= buf + n);
        total += segs[i].len;
    }
    FUZZ_CHECK(total <= n);
    ctx x;
    memset(&x, 0, sizeof x);
    for (size_t i = 0; ns >= 0 && i < NROUTES; i++)
        if (match(k_routes[i].pattern, segs, ns, &x))
            FUZZ_CHECK(x.nargs <= MAX_SEGS);
    free(buf);
}

static int valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0, k; i < n; i += k)
        if ((k = sd_utf8_len(s + i, n - i)) == 0)
            return 0;
    return 1;
}

static void fuzz_id(const char *p, size_t n)
{
    resp_buf out = {0};
    jid(&out, p, n);
    FUZZ_CHECK(!out.oom);
    json_error_t e;
    json_t *s = json_loadb(out.p, out.len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
    FUZZ_CHECK(s && json_is_string(s));
    if (n && valid_utf8((const unsigned char *)p, n))
        FUZZ_CHECK(json_string_length(s) == n && memcmp(json_string_value(s), p, n) == 0);
    json_decref(s);
    resp_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    fuzz_check_body(p, size);
    fuzz_policy_body(p, size);
    fuzz_target(p, size);
    fuzz_id(p, size);
    return 0;
}
