/*
 * test_server_admission.c — the admission scheduler without a network: weighted round-robin
 * shares, FIFO per tenant, queue bounds, expiry, reply order per connection, connections that
 * close while their requests wait.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "net.h"

static sl_limiter *g_lim;
static sd_admission g_adm;

/* emit: "<client>:<state>;" so tests can read the order and outcome of every reply */
static void emit(sd_conn *c, sd_item *it, resp_buf *out)
{
    (void)c;
    char buf[300];
    const char *st = it->state == SD_ITEM_DONE ? (it->d.allowed ? "ok" : "no")
                     : it->state == SD_ITEM_REJECTED_FULL ? "full"
                                                           : "expired";
    int n = snprintf(buf, sizeof buf, "%.*s:%s;", (int)it->req.key.client_len,
                     it->req.key.client, st);
    resp_raw(out, buf, (size_t)n);
}

static const sd_proto k_proto = {"test", NULL, NULL, NULL, emit, ""};

/* The order in which clients were decided, from the ready callback's point of view. */
static char g_order[1 << 16];
static size_t g_order_len;
static void ready(sd_conn *c)
{
    sd_conn_drain(c);
    if (c->out.len && g_order_len + c->out.len < sizeof g_order) {
        memcpy(g_order + g_order_len, c->out.p, c->out.len);
        g_order_len += c->out.len;
    }
    resp_buf_reset(&c->out);
}

static void conn_init(sd_conn *c, sd_sched *s)
{
    memset(c, 0, sizeof *c);
    c->proto = &k_proto;
    c->sched = s;
}

static void submit(sd_sched *s, sd_conn *c, const char *tenant, const char *client, int64_t ms)
{
    sd_item *it = sd_item_new(c, tenant, strlen(tenant), "a", 1, client, strlen(client));
    assert_non_null(it);
    it->req.cost = 1;
    sd_sched_submit(s, it, ms);
}

static int setup(void **st)
{
    (void)st;
    g_order_len = 0;
    sd_admission_init(&g_adm);
    sl_options o;
    sl_options_init(&o);
    sl_policy p = SL_POLICY_TOKEN_BUCKET(1e6, 1e6);
    o.default_policy = &p;
    return sl_open(&g_lim, &o);
}

static int teardown(void **st)
{
    (void)st;
    sl_close(g_lim);
    sd_weight_set(&g_adm, "heavy", 5, 1);
    return 0;
}

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

static void test_fifo_and_reply_order(void **st)
{
    (void)st;
    sd_sched *s = sd_sched_new(&g_adm, g_lim);
    sd_conn c;
    conn_init(&c, s);
    submit(s, &c, "t1", "a1", 0);
    submit(s, &c, "t2", "b1", 0);
    resp_raw(sd_reply_buf(&c), "lit;", 4); /* an immediate reply behind undecided ones */
    submit(s, &c, "t1", "a2", 0);
    assert_int_equal(c.items_waiting, 3);
    assert_int_equal(c.out.len, 0); /* nothing may overtake the undecided requests */
    assert_int_equal(sd_sched_run(s, 0, ready), 0);
    g_order[g_order_len] = 0;
    assert_string_equal(g_order, "a1:ok;b1:ok;lit;a2:ok;");
    assert_null(c.items);
    resp_buf_free(&c.out);
    sd_sched_free(s);
}

/* With a global cap of 1 and other work in progress, nothing is decided: all waits. */
static void test_global_cap(void **st)
{
    (void)st;
    sd_sched *s = sd_sched_new(&g_adm, g_lim);
    sd_conn c;
    conn_init(&c, s);
    atomic_store(&g_adm.max_global_concurrent, 1);
    atomic_store(&g_adm.in_progress, 1); /* another worker holds the only slot */
    submit(s, &c, "t", "x", 0);
    assert_int_equal(sd_sched_run(s, 0, ready), 1);
    assert_int_equal(g_order_len, 0);
    atomic_store(&g_adm.in_progress, 0);
    assert_int_equal(sd_sched_run(s, 1, ready), 0);
    g_order[g_order_len] = 0;
    assert_string_equal(g_order, "x:ok;");
    resp_buf_free(&c.out);
    sd_sched_free(s);
}

/* Weighted shares: while both tenants wait, "heavy" (weight 3) gets 3 per turn of "light". */
static void test_weighted_round_robin(void **st)
{
    (void)st;
    assert_int_equal(sd_weight_set(&g_adm, "heavy", 5, 3), 0);
    assert_int_equal(sd_weight_get(&g_adm, "heavy", 5), 3);
    assert_int_not_equal(sd_weight_set(&g_adm, "heavy", 5, 0), 0);
    assert_int_not_equal(sd_weight_set(&g_adm, "heavy", 5, 1001), 0);
    atomic_store(&g_adm.max_global_concurrent, 1); /* one decision per batch */
    /* Each tenant on its own connection: ready() then sees the decision order. */
    sd_sched *s = sd_sched_new(&g_adm, g_lim);
    sd_conn cl, ch;
    conn_init(&cl, s);
    conn_init(&ch, s);
    g_order_len = 0;
    for (int i = 0; i < 400; i++) {
        submit(s, &cl, "light", "L", 0);
        submit(s, &ch, "heavy", "H", 0);
    }
    while (sd_sched_run(s, 0, ready)) /* a run decides at most 512 */
        ;
    g_order[g_order_len] = 0;
    /* cap 1: one decision per batch, so g_order is the decision order: H H H L repeating
     * (light was first in the ring but heavy's turn is 3) until light has 300 left. */
    char first[64] = "";
    memcpy(first, g_order, 40);
    first[40] = 0;
    assert_string_equal(first, "L:ok;H:ok;H:ok;H:ok;L:ok;H:ok;H:ok;H:ok;");
    /* of the first 400 decisions, 100 are light's and 300 heavy's */
    g_order[400 * 5] = 0; /* every reply is 5 bytes: "L:ok;" */
    assert_int_equal(count(g_order, "L:"), 100);
    assert_int_equal(count(g_order, "H:"), 300);
    atomic_store(&g_adm.max_global_concurrent, 10000);
    resp_buf_free(&cl.out);
    resp_buf_free(&ch.out);
    sd_sched_free(s);
}

/* Over the queue bound: the newest are rejected at once; the oldest keep their place. */
static void test_queue_bound_and_expiry(void **st)
{
    (void)st;
    sd_sched *s = sd_sched_new(&g_adm, g_lim);
    sd_conn c;
    conn_init(&c, s);
    atomic_store(&g_adm.max_tenant_queue, 2);
    atomic_store(&g_adm.max_queue_wait_ms, 100);
    atomic_store(&g_adm.in_progress, 10000); /* nothing can be decided */
    for (int i = 0; i < 5; i++) {
        char id[8];
        snprintf(id, sizeof id, "q%d", i);
        submit(s, &c, "t", id, 0);
    }
    assert_int_equal(sd_sched_run(s, 0, ready), 2);
    g_order[g_order_len] = 0;
    assert_string_equal(g_order, ""); /* q0, q1 wait; rejections must keep request order */
    assert_int_equal(atomic_load(&g_adm.rejected_full), 3);
    /* 100 ms later the two still waiting expire */
    assert_int_equal(sd_sched_run(s, 100, ready), 0);
    g_order[g_order_len] = 0;
    assert_string_equal(g_order, "q0:expired;q1:expired;q2:full;q3:full;q4:full;");
    atomic_store(&g_adm.in_progress, 0);
    atomic_store(&g_adm.max_tenant_queue, 1000);
    atomic_store(&g_adm.max_queue_wait_ms, 1000);
    resp_buf_free(&c.out);
    sd_sched_free(s);
}

/* A connection that closes while its requests wait: they are dropped, nothing leaks (ASan),
 * and other connections are served. */
static void test_orphans(void **st)
{
    (void)st;
    sd_sched *s = sd_sched_new(&g_adm, g_lim);
    sd_conn gone, stays;
    conn_init(&gone, s);
    conn_init(&stays, s);
    atomic_store(&g_adm.in_progress, 10000);
    submit(s, &gone, "t", "g1", 0);
    resp_raw(sd_reply_buf(&gone), "lit", 3);
    submit(s, &gone, "t", "g2", 0);
    submit(s, &stays, "t", "s1", 0);
    assert_int_equal(sd_sched_run(s, 0, ready), 3);
    sd_conn_forget(&gone);
    atomic_store(&g_adm.in_progress, 0);
    assert_int_equal(sd_sched_run(s, 1, ready), 0);
    g_order[g_order_len] = 0;
    assert_string_equal(g_order, "s1:ok;");
    /* freeing a scheduler with orphans still queued frees them too */
    atomic_store(&g_adm.in_progress, 10000);
    sd_conn late;
    conn_init(&late, s);
    submit(s, &late, "t", "l1", 0);
    sd_conn_forget(&late);
    sd_sched_free(s);
    atomic_store(&g_adm.in_progress, 0);
    resp_buf_free(&stays.out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fifo_and_reply_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_global_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_weighted_round_robin, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queue_bound_and_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_orphans, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
