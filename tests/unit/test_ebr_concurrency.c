/* test_ebr_concurrency.c — epoch-based reclamation and the lock-free directory under threads.
 * A reclamation bug shows up as a reader seeing a poisoned value, or as a use-after-free that
 * AddressSanitizer / ThreadSanitizer report. */
#include <pthread.h>
#include <stdarg.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "dir.h"
#include "ebr.h"

#define MAGIC 0x5eed5eedu

typedef struct obj {
    _Atomic unsigned magic;
    unsigned seq;
} obj;

static sl_ebr *g_ebr;
static _Atomic(obj *) g_cur;
static _Atomic int g_stop;
static _Atomic uint64_t g_reads, g_freed;

static void poison_free(void *p)
{
    obj *o = p;
    atomic_store(&o->magic, 0xdeadu);
    atomic_fetch_add(&g_freed, 1);
    free(o);
}

static void *reader(void *arg)
{
    (void)arg;
    while (!atomic_load(&g_stop)) {
        if (sl_ebr_enter(g_ebr) != 0 || sl_ebr_enter(g_ebr) != 0) /* nesting */
            abort();
        obj *o = atomic_load(&g_cur);
        sl_ebr_leave(g_ebr);
        for (int i = 0; i < 50; i++)
            if (atomic_load(&o->magic) != MAGIC)
                abort();
        sl_ebr_leave(g_ebr);
        atomic_fetch_add_explicit(&g_reads, 1, memory_order_relaxed);
    }
    return NULL;
}

static void *writer(void *arg)
{
    (void)arg;
    for (unsigned i = 1; i <= 100000; i++) {
        obj *o = malloc(sizeof *o);
        atomic_init(&o->magic, MAGIC);
        o->seq = i;
        obj *old = atomic_exchange(&g_cur, o);
        sl_ebr_retire(g_ebr, old, poison_free);
    }
    return NULL;
}

static void test_retired_objects_outlive_readers(void **st)
{
    (void)st;
    g_ebr = sl_ebr_new();
    obj *first = malloc(sizeof *first);
    atomic_init(&first->magic, MAGIC);
    atomic_store(&g_cur, first);
    pthread_t r[4], w[2];
    for (int i = 0; i < 4; i++)
        pthread_create(&r[i], NULL, reader, NULL);
    for (int i = 0; i < 2; i++)
        pthread_create(&w[i], NULL, writer, NULL);
    for (int i = 0; i < 2; i++) /* writers stop after a fixed number of swaps */
        pthread_join(w[i], NULL);
    atomic_store(&g_stop, 1);
    for (int i = 0; i < 4; i++)
        pthread_join(r[i], NULL);
    assert_true(atomic_load(&g_reads) > 0);
    assert_true(atomic_load(&g_freed) > 0); /* reclamation happens while readers run */
    assert_int_equal(sl_ebr_collect(g_ebr), 0); /* nobody reads now: everything goes */
    free(atomic_load(&g_cur));
    sl_ebr_free(g_ebr);
}

/* A forked child inherits the process's choice of fences; whether it keeps the kernel's
 * membarrier registration depends on the kernel (6.18 here keeps it). Either way its writers
 * must free what they retire, not keep it forever because the barrier is refused. */
static _Atomic unsigned g_child_freed;
static void count_free(void *p)
{
    atomic_fetch_add(&g_child_freed, 1);
    free(p);
}

static void test_a_forked_child_still_frees(void **st)
{
    (void)st;
    sl_ebr *parent = sl_ebr_new(); /* the process has chosen its fences */
    assert_int_equal(sl_ebr_enter(parent), 0);
    sl_ebr_leave(parent);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        sl_ebr *d = sl_ebr_new();
        if (sl_ebr_enter(d) != 0)
            _exit(3);
        sl_ebr_leave(d);
        for (int i = 0; i < 64; i++)
            sl_ebr_retire(d, malloc(16), count_free);
        size_t left = sl_ebr_collect(d);
        sl_ebr_free(d);
        _exit(left == 0 && atomic_load(&g_child_freed) == 64 ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0); /* 1: the child kept what it retired */
    sl_ebr_free(parent);
}

/* ---- directory ---- */

static sl_dir *g_dir;

static void *make_val(void *ctx, const void *key, size_t len)
{
    (void)ctx;
    char *v = malloc(len + 1);
    memcpy(v, key, len);
    v[len] = 0;
    return v;
}

static uint64_t hash(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static void *dir_worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    char k[32];
    for (int i = 0; i < 20000; i++) {
        seed = seed * 1103515245u + 12345u;
        int n = snprintf(k, sizeof k, "tenant-%u", (seed >> 8) % 3000);
        if (sl_ebr_enter(g_ebr) != 0)
            abort();
        char *v = sl_dir_get(g_dir, hash(k, (size_t)n), k, (size_t)n);
        if (!v)
            v = sl_dir_intern(g_dir, hash(k, (size_t)n), k, (size_t)n, make_val, NULL, NULL);
        if (!v || strcmp(v, k) != 0) /* the value belongs to this key, whoever made it */
            abort();
        sl_ebr_leave(g_ebr);
    }
    return NULL;
}

static void test_dir_interns_once_under_concurrency(void **st)
{
    (void)st;
    g_ebr = sl_ebr_new();
    g_dir = sl_dir_new(g_ebr, 100000);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, dir_worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    size_t n = sl_dir_count(g_dir);
    assert_true(n > 2500 && n <= 3000); /* each distinct key exactly once */
    sl_dir *small = sl_dir_new(g_ebr, 2); /* max_entries is honoured */
    assert_int_equal(sl_ebr_enter(g_ebr), 0);
    assert_non_null(sl_dir_intern(small, 1, "a", 1, make_val, NULL, NULL));
    assert_non_null(sl_dir_intern(small, 2, "b", 1, make_val, NULL, NULL));
    assert_null(sl_dir_intern(small, 3, "c", 1, make_val, NULL, NULL));
    assert_non_null(sl_dir_intern(small, 1, "a", 1, make_val, NULL, NULL)); /* existing: fine */
    sl_ebr_leave(g_ebr);
    sl_dir_free(small, free);
    sl_dir_free(g_dir, free);
    sl_ebr_free(g_ebr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retired_objects_outlive_readers),
        cmocka_unit_test(test_a_forked_child_still_frees),
        cmocka_unit_test(test_dir_interns_once_under_concurrency),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
