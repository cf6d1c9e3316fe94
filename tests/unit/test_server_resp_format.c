/*
 * test_server_resp_format.c — the reply builder's integers and appends (src/server/resp.c),
 * checked against printf: every reply number goes through them.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "resp.h"

/* resp_dec and resp_int of v must read exactly as printf writes v. */
static void check_value(int64_t v)
{
    char want[64], got[64];
    resp_buf b = {0};
    resp_dec(&b, v);
    snprintf(want, sizeof want, "%lld", (long long)v);
    assert_int_equal(b.len, strlen(want));
    memcpy(got, b.p, b.len);
    got[b.len] = 0;
    assert_string_equal(got, want);
    resp_buf_reset(&b);
    resp_int(&b, v);
    snprintf(want, sizeof want, ":%lld\r\n", (long long)v);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.p, want, b.len);
    resp_buf_free(&b);
}

static void test_integers_as_printf(void **st)
{
    (void)st;
    for (int64_t v = -1000; v <= 100000; v++)
        check_value(v);
    /* every power of ten and its neighbours, both signs, and the extremes */
    for (int64_t p = 1; p <= INT64_MAX / 10; p *= 10)
        for (int64_t d = -1; d <= 1; d++) {
            check_value(p * 10 + d);
            check_value(-(p * 10 + d));
        }
    check_value(INT64_MAX);
    check_value(INT64_MIN);
    check_value(INT64_MIN + 1);
}

/* Appends grow the buffer as needed and keep every byte; a fixed buffer that is full stops
 * taking bytes and says so (oom), and stays that way. */
static void test_appends(void **st)
{
    (void)st;
    resp_buf b = {0};
    char want[20000];
    size_t n = 0;
    for (int i = 0; n + 64 < sizeof want; i++) {
        char piece[32];
        int k = snprintf(piece, sizeof piece, "%d,", i * 7919);
        resp_raw(&b, piece, (size_t)k);
        memcpy(want + n, piece, (size_t)k);
        n += (size_t)k;
    }
    resp_str(&b, "end");
    memcpy(want + n, "end", 3);
    n += 3;
    assert_int_equal(b.len, n);
    assert_false(b.oom);
    assert_memory_equal(b.p, want, n);
    resp_buf_free(&b);

    char small[8];
    resp_buf f = {small, 0, sizeof small, 0, 1};
    resp_str(&f, "12345");
    resp_str(&f, "678"); /* 8 bytes: exactly full */
    assert_int_equal(f.len, 8);
    assert_false(f.oom);
    resp_raw(&f, "9", 1);
    assert_true(f.oom);
    assert_int_equal(f.len, 8);
    resp_raw(&f, "", 0); /* nothing more once oom */
    assert_true(f.oom);
    assert_memory_equal(small, "12345678", 8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_integers_as_printf),
        cmocka_unit_test(test_appends),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
