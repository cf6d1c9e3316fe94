/* test_table_concurrency.c — the table under threads. Every operation adds 1 to a counter in
 * the entry (state[0]) under the shard lock; counters leave the table only through removal,
 * reclaim, eviction or sl_table_free, each of which hands the counter to a total. At the end
 * the totals must add up exactly: a lost update, an entry moved without its state, a double
 * drop or a missed drop breaks the sum. Prefetchers, a sweeper and a thread that grows and
 * shrinks shard indexes run alongside (ThreadSanitizer checks the lock-free paths).
 * sl_table_prefetch_entry, which reads indexes and chunk arrays without the lock, runs
 * against a writer that replaces and frees them, with retire through EBR. */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "ebr.h"
#include "memory.h"

#define NOW 1 /* every operation runs at now = 1; reclaimable entries are full at 0 */

static _Atomic uint64_t g_dropped[3]; /* counters handed over by drop(e, why) */
static _Atomic uint64_t g_drops[3];   /* number of drop calls */
static _Atomic int g_bad;             /* a hook saw something impossible */
static _Atomic int g_stop;

static int64_t full_at(void *ctx, const sl_entry *e)
{
    (void)ctx;
    return (int64_t)e->state[1];
}

static void drop(void *ctx, sl_entry *e, int why)
{
    (void)ctx;
    if (why == 0 && (int64_t)e->state[1] > NOW)
        atomic_store(&g_bad, 1);
    atomic_fetch_add(&g_dropped[why], e->state[0]);
    atomic_fetch_add(&g_drops[why], 1);
}

typedef struct worker {
    sl_table *t;
    unsigned id, ops, keys;
    uint64_t incr, removed; /* added to counters; taken out by removal */
} worker;

static size_t key_of(char *buf, unsigned k)
{
    if (k % 16 == 0) /* long keys too: their heap copy moves with the entry */
        return (size_t)sprintf(buf, "long-key-%u-................................", k);
    return (size_t)sprintf(buf, "c:%u", k);
}

static void *work(void *arg)
{
    worker *w = arg;
    uint64_t x = 0x9E3779B97F4A7C15ull * (w->id + 1);
    char k[96];
    for (unsigned op = 0; op < w->ops; op++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        /* overlapping ranges: thread i uses keys [i * keys / 4, i * keys / 4 + keys) */
        unsigned key = w->id * (w->keys / 4) + (unsigned)(x % w->keys);
        size_t len = key_of(k, key);
        uint64_t h = sl_table_hash(k, len);
        sl_table_prefetch(w->t, h);
        sl_shard *s = sl_table_shard(w->t, h);
        unsigned what = (unsigned)(x >> 40) % 10;
        sl_shard_lock(s);
        if (what < 8) {
            int created;
            sl_entry *e = sl_shard_upsert_locked(s, h, k, len, NOW, &created);
            if (!e) {
                atomic_store(&g_bad, 2);
            } else {
                if (created) /* a fifth of the keys are reclaimable as soon as they exist */
                    e->state[1] = key % 5 == 0 ? 0 : (uint64_t)INT64_MAX;
                e->state[0]++;
                w->incr++;
            }
        } else {
            sl_entry *e = sl_shard_find_locked(s, h, k, len);
            if (e && what == 8) {
                e->state[0]++;
                w->incr++;
            } else if (e) {
                w->removed += e->state[0];
                sl_shard_remove_locked(s, e);
            }
        }
        sl_shard_unlock(s);
    }
    return NULL;
}

/* Inserts a batch of private keys into the table and removes them again, over and over:
 * shard indexes double and shrink while everyone else probes and prefetches. */
static void *churn(void *arg)
{
    worker *w = arg;
    char k[32];
    for (unsigned round = 0; round < w->ops; round++) {
        for (int pass = 0; pass < 2; pass++)
            for (unsigned i = 0; i < w->keys; i++) {
                size_t len = (size_t)sprintf(k, "churn:%u", i);
                uint64_t h = sl_table_hash(k, len);
                sl_shard *s = sl_table_shard(w->t, h);
                sl_shard_lock(s);
                if (pass == 0) {
                    int created;
                    sl_entry *e = sl_shard_upsert_locked(s, h, k, len, NOW, &created);
                    if (e) {
                        if (created)
                            e->state[1] = (uint64_t)INT64_MAX;
                        e->state[0]++;
                        w->incr++;
                    }
                } else {
                    sl_entry *e = sl_shard_find_locked(s, h, k, len);
                    if (e) { /* may have been evicted meanwhile */
                        w->removed += e->state[0];
                        sl_shard_remove_locked(s, e);
                    }
                }
                sl_shard_unlock(s);
            }
    }
    return NULL;
}

static void *prefetcher(void *arg)
{
    sl_table *t = arg;
    uint64_t x = 12345, n = 0;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        sl_table_prefetch(t, x);
        if (++n % 4096 == 0) {
            (void)sl_table_count(t);
            (void)sl_table_bytes(t);
        }
    }
    return NULL;
}

static void *sweeper(void *arg)
{
    sl_table *t = arg;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed))
        if (sl_table_sweep(t, NOW, 300) == 0)
            sched_yield();
    return NULL;
}

static int sum_live(void *ctx, sl_entry *e)
{
    *(uint64_t *)ctx += e->state[0];
    return 0;
}

static void run(unsigned shards, size_t max_keys, unsigned nworkers, unsigned ops,
                unsigned keys)
{
    for (int i = 0; i < 3; i++) {
        atomic_store(&g_dropped[i], 0);
        atomic_store(&g_drops[i], 0);
    }
    atomic_store(&g_stop, 0);
    sl_table_hooks hooks = {NULL, full_at, drop, NULL};
    sl_table *t = sl_table_new(shards, max_keys, &hooks);
    assert_non_null(t);
    worker w[16] = {0};
    pthread_t th[16], pf[2], sw, ch;
    for (unsigned i = 0; i < nworkers; i++) {
        w[i] = (worker){t, i, ops, keys, 0, 0};
        assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
    }
    worker cw = {t, 99, 6, 3000, 0, 0};
    assert_int_equal(pthread_create(&ch, NULL, churn, &cw), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&pf[i], NULL, prefetcher, t), 0);
    assert_int_equal(pthread_create(&sw, NULL, sweeper, t), 0);

    for (unsigned i = 0; i < nworkers; i++)
        pthread_join(th[i], NULL);
    pthread_join(ch, NULL);
    atomic_store(&g_stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(pf[i], NULL);
    pthread_join(sw, NULL);

    assert_int_equal(atomic_load(&g_bad), 0);
    assert_int_equal(sl_table_check(t), 0);
    if (max_keys)
        assert_true(sl_table_count(t) <= max_keys);
    uint64_t incr = cw.incr, removed = cw.removed, live = 0;
    for (unsigned i = 0; i < nworkers; i++) {
        incr += w[i].incr;
        removed += w[i].removed;
    }
    assert_int_equal(sl_table_foreach(t, sum_live, &live), 0);
    uint64_t reclaimed = atomic_load(&g_dropped[0]), evicted = atomic_load(&g_dropped[1]);
    printf("# %u shards, max_keys %zu: %llu increments = %llu live + %llu removed + "
           "%llu reclaimed (%llu keys) + %llu evicted (%llu keys)\n",
           shards, max_keys, (unsigned long long)incr, (unsigned long long)live,
           (unsigned long long)removed, (unsigned long long)reclaimed,
           (unsigned long long)atomic_load(&g_drops[0]), (unsigned long long)evicted,
           (unsigned long long)atomic_load(&g_drops[1]));
    assert_int_equal(incr, live + removed + reclaimed + evicted);
    assert_true(atomic_load(&g_drops[0]) > 0); /* reclaim really ran concurrently */
    if (max_keys)
        assert_true(atomic_load(&g_drops[1]) > 0);
    size_t count = sl_table_count(t);
    sl_table_free(t);
    assert_int_equal(atomic_load(&g_drops[2]), count);
    assert_int_equal(atomic_load(&g_dropped[2]), live);
}

static void test_counters_add_up_unbounded(void **st)
{
    (void)st;
    run(4, 0, 8, 40000, 6000); /* few shards: indexes grow to thousands of slots */
}

static void test_counters_add_up_with_eviction(void **st)
{
    (void)st;
    run(16, 1000, 8, 40000, 6000); /* a tight max_keys: evictions all the time */
}

/* Many more threads than cores hammering a handful of keys: the lock must hand over without
 * losing updates, and yield so that a preempted holder gets to finish. */
static sl_table *g_hot;

static void *hot(void *arg)
{
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        char k[8];
        size_t len = (size_t)sprintf(k, "h%d", i % 3);
        uint64_t h = sl_table_hash(k, len);
        sl_shard *s = sl_table_shard(g_hot, h);
        int created;
        sl_shard_lock(s);
        sl_entry *e = sl_shard_upsert_locked(s, h, k, len, NOW, &created);
        if (created)
            e->state[1] = (uint64_t)INT64_MAX;
        e->state[0]++;
        sl_shard_unlock(s);
    }
    return NULL;
}

static void test_hot_keys_many_threads(void **st)
{
    (void)st;
    for (int i = 0; i < 3; i++)
        atomic_store(&g_dropped[i], 0);
    sl_table_hooks hooks = {NULL, full_at, drop, NULL};
    g_hot = sl_table_new(1, 0, &hooks); /* one shard, one lock */
    assert_non_null(g_hot);
    enum { N = 64 };
    pthread_t th[N];
    for (int i = 0; i < N; i++)
        assert_int_equal(pthread_create(&th[i], NULL, hot, NULL), 0);
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    uint64_t live = 0;
    sl_table_foreach(g_hot, sum_live, &live);
    assert_int_equal(live, (uint64_t)N * 2000);
    assert_int_equal(sl_table_count(g_hot), 3);
    sl_table_free(g_hot);
}

/* One shard whose index is grown from 8 to 32768 slots and shrunk back, again and again,
 * while other threads prefetch (reading the index pointer and mask without the lock). */
static void *resizer(void *arg)
{
    sl_table *t = arg;
    char k[32];
    for (int round = 0; round < 8; round++) {
        for (int pass = 0; pass < 2; pass++)
            for (unsigned i = 0; i < 20000; i++) {
                size_t len = (size_t)sprintf(k, "r:%u", i);
                uint64_t h = sl_table_hash(k, len);
                sl_shard *s = sl_table_shard(t, h);
                sl_shard_lock(s);
                if (pass == 0) {
                    int created;
                    if (!sl_shard_upsert_locked(s, h, k, len, NOW, &created))
                        atomic_store(&g_bad, 3);
                } else {
                    sl_entry *e = sl_shard_find_locked(s, h, k, len);
                    if (e)
                        sl_shard_remove_locked(s, e);
                    else
                        atomic_store(&g_bad, 4);
                }
                sl_shard_unlock(s);
            }
        if (sl_table_bytes(t) > 16384) /* all removed: the index (128 KiB at its peak) shrank */
            atomic_store(&g_bad, 5);
    }
    return NULL;
}

static void test_prefetch_during_resizes(void **st)
{
    (void)st;
    atomic_store(&g_stop, 0);
    atomic_store(&g_bad, 0);
    sl_table *t = sl_table_new(1, 0, NULL);
    assert_non_null(t);
    pthread_t r, pf[2];
    assert_int_equal(pthread_create(&r, NULL, resizer, t), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&pf[i], NULL, prefetcher, t), 0);
    pthread_join(r, NULL);
    atomic_store(&g_stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(pf[i], NULL);
    assert_int_equal(atomic_load(&g_bad), 0);
    assert_int_equal(sl_table_count(t), 0);
    sl_table_free(t);
}

/* ---- sl_table_prefetch_entry during growth, shrinking and chunk churn ---- */

#define PE_KEYS 6000       /* writer's keys: 3000 per shard, indexes 8 <-> 4096 slots */
#define PE_ROUNDS 40       /* at most this many fill + empty rounds ... */
#define PE_SECONDS 1.0     /* ... and no more rounds after this long (at least 2 run) */
#define PE_READERS 3

static sl_ebr *g_ebr;
static uint64_t g_pe_hash[PE_KEYS]; /* written before the threads start */
static _Atomic uint64_t g_retired, g_freed, g_pe_calls;
static pthread_barrier_t g_pe_start;

typedef struct held {
    void *p;
    void (*fn)(void *);
    size_t bytes;
} held;

/* Runs when EBR decides no reader can hold the block any more: poison it first, so that a
 * reader still using it would see garbage (and ThreadSanitizer a write racing its read).
 * The header (64 bytes: S) stays, for fn. */
static void poison_then_free(void *arg)
{
    held *h = arg;
    memset((char *)h->p + 64, 0xA5, h->bytes - 64);
    h->fn(h->p);
    free(h);
    atomic_fetch_add(&g_freed, 1);
}

/* hooks.retire, as the limiter wires it: sl_ebr_retire_sized. */
static void retire_ebr(void *ctx, void *p, void (*fn)(void *), size_t bytes)
{
    held *h = malloc(sizeof *h);
    if (!h)
        abort();
    *h = (held){p, fn, bytes};
    atomic_fetch_add(&g_retired, 1);
    sl_ebr_retire_sized(ctx, h, poison_then_free, bytes);
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) * 1e-9;
}

static int64_t pe_full_at(void *ctx, const sl_entry *e)
{
    (void)ctx;
    return (int64_t)e->state[1];
}

/* Fills the table with PE_KEYS keys and empties it again, round after round: indexes double
 * and shrink, chunks and chunk arrays come and go. Even rounds remove key by key (in a
 * different order each time), odd rounds reclaim everything with one sweep (which retires
 * the chunks it frees as one list per shard). */
static void *pe_writer(void *arg)
{
    sl_table *t = arg;
    char k[32];
    pthread_barrier_wait(&g_pe_start);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned round = 0; round < PE_ROUNDS; round++) {
        for (int pass = 0; pass < (round % 2 == 0 ? 2 : 1); pass++)
            for (unsigned j = 0; j < PE_KEYS; j++) {
                unsigned i = pass == 0 ? j : (j * 7919u + round * 101u) % PE_KEYS;
                size_t len = (size_t)sprintf(k, "pe:%u", i);
                uint64_t h = sl_table_hash(k, len);
                if (h != g_pe_hash[i])
                    atomic_store(&g_bad, 7);
                sl_shard *s = sl_table_shard(t, h);
                sl_shard_lock(s);
                if (pass == 0) {
                    int created;
                    sl_entry *e = sl_shard_upsert_locked(s, h, k, len, NOW, &created);
                    if (!e || !created)
                        atomic_store(&g_bad, 8);
                    else
                        e->state[1] = NOW + 1; /* full (reclaimable) from NOW + 1 on */
                } else {
                    sl_entry *e = sl_shard_find_locked(s, h, k, len);
                    if (e)
                        sl_shard_remove_locked(s, e);
                    else
                        atomic_store(&g_bad, 9);
                }
                sl_shard_unlock(s);
            }
        if (round % 2 == 1 && sl_table_sweep(t, NOW + 1, SIZE_MAX) != PE_KEYS)
            atomic_store(&g_bad, 11);
        if (round >= 1 && seconds_since(&t0) > PE_SECONDS)
            break;
    }
    atomic_store(&g_stop, 1);
    return NULL;
}

/* Prefetches the entries of the writer's keys (and of random hashes) inside read sections,
 * as sl_take_batch does. Short sections, so that EBR gets to free blocks meanwhile. */
static void *pe_reader(void *arg)
{
    sl_table *t = arg;
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (uintptr_t)arg ^ (uint64_t)pthread_self(), n = 0;
    pthread_barrier_wait(&g_pe_start);
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        if (sl_ebr_enter(g_ebr) != 0) {
            atomic_store(&g_bad, 10);
            break;
        }
        for (int i = 0; i < 32; i++, n++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            uint64_t h = (x & 3) ? g_pe_hash[(x >> 16) % PE_KEYS] : x;
            sl_table_prefetch(t, h);
            sl_table_prefetch_entry(t, h);
        }
        sl_ebr_leave(g_ebr);
    }
    atomic_fetch_add(&g_pe_calls, n);
    return NULL;
}

static void test_prefetch_entry_during_churn(void **st)
{
    (void)st;
    atomic_store(&g_stop, 0);
    atomic_store(&g_bad, 0);
    g_ebr = sl_ebr_new();
    assert_non_null(g_ebr);
    sl_table_hooks hooks = {g_ebr, pe_full_at, NULL, retire_ebr};
    sl_table *t = sl_table_new(2, 0, &hooks);
    assert_non_null(t);
    char k[32];
    for (unsigned i = 0; i < PE_KEYS; i++)
        g_pe_hash[i] = sl_table_hash(k, (size_t)sprintf(k, "pe:%u", i));
    assert_int_equal(pthread_barrier_init(&g_pe_start, NULL, PE_READERS + 1), 0);
    pthread_t w, r[PE_READERS];
    for (int i = 0; i < PE_READERS; i++)
        assert_int_equal(pthread_create(&r[i], NULL, pe_reader, t), 0);
    assert_int_equal(pthread_create(&w, NULL, pe_writer, t), 0);
    pthread_join(w, NULL);
    for (int i = 0; i < PE_READERS; i++)
        pthread_join(r[i], NULL);
    pthread_barrier_destroy(&g_pe_start);

    assert_int_equal(atomic_load(&g_bad), 0);
    assert_int_equal(sl_table_count(t), 0);
    assert_int_equal(sl_table_check(t), 0);
    uint64_t retired = atomic_load(&g_retired);
    printf("# prefetch_entry: %llu calls by %d readers; %llu blocks retired, %llu freed while "
           "running\n",
           (unsigned long long)atomic_load(&g_pe_calls), PE_READERS,
           (unsigned long long)retired, (unsigned long long)atomic_load(&g_freed));
    assert_true(atomic_load(&g_pe_calls) > 0);
    /* Two rounds at least, per shard: 2 x 9 doublings, ~46 chunks freed one by one (even
     * round), a chunk list (odd round), shrinks. */
    assert_true(retired >= 2 * (2 * 9 + 40));
    assert_int_equal(sl_ebr_collect(g_ebr), 0); /* no reader left: everything is freed */
    assert_int_equal(atomic_load(&g_freed), retired);
    sl_table_free(t);
    assert_int_equal(atomic_load(&g_retired), retired); /* freeing the table retires nothing */
    sl_ebr_free(g_ebr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counters_add_up_unbounded),
        cmocka_unit_test(test_counters_add_up_with_eviction),
        cmocka_unit_test(test_hot_keys_many_threads),
        cmocka_unit_test(test_prefetch_during_resizes),
        cmocka_unit_test(test_prefetch_entry_during_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
