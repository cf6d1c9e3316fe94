/* test_table.c — the in-memory store's table on its own: keys of every shape, block growth,
 * forced collisions, backward-shift removal, reclaim of idle full keys, the max_keys bound with CLOCK
 * eviction, memory per key, and out-of-memory at every allocation of an insert. The retire
 * hook: exactly the blocks a lockless reader may touch go through it, and the table never
 * touches one again (retired blocks are poisoned and held until the test frees them).
 *
 * sl_table_check (a test hook in memory.c) verifies every structural invariant; the tests
 * call it after each phase. */
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "memory.h"

#define FLOOD 10000000u /* distinct ids in the max_keys flood */

/* ---- hooks: full_at = state[1] (as int64), drops counted by reason ---- */

typedef struct held {
    void *p;
    void (*fn)(void *);
} held;

typedef struct hk {
    size_t drops[3];
    size_t full_calls;
    int64_t now;         /* the `now` of the current operation (drop(e,0) must be full) */
    const char *protect; /* a key that must never be dropped for reason 0 or 1 */
    size_t protect_len;
    size_t retired;      /* retire hook calls */
    held *held;          /* retired blocks not freed yet (retire_hold) */
    size_t nheld, capheld;
} hk;

static int64_t full_at_state(void *ctx, const sl_entry *e)
{
    ((hk *)ctx)->full_calls++;
    return (int64_t)e->state[1];
}

static int64_t full_never(void *ctx, const sl_entry *e)
{
    (void)e;
    ((hk *)ctx)->full_calls++;
    return INT64_MAX;
}

static void drop_count(void *ctx, sl_entry *e, int why)
{
    hk *h = ctx;
    if (why < 0 || why > 2)
        fail_msg("drop reason %d", why);
    if (why == 0 && (int64_t)e->state[1] > h->now)
        fail_msg("reclaimed an entry that is not full yet");
    if (why != 2 && h->protect) {
        size_t len;
        const char *k = sl_entry_key(e, &len);
        if (len == h->protect_len && memcmp(k, h->protect, len) == 0)
            fail_msg("the hot key was dropped (reason %d)", why);
    }
    h->drops[why]++;
}

/* Retire hook standing in for a grace period that has not ended yet: the block is poisoned
 * (a table still reading it would see garbage) and held until release_held. Its first 64
 * bytes (the header, S) stay: fn reads them to know the size. */
static void retire_hold(void *ctx, void *p, void (*fn)(void *), size_t bytes)
{
    hk *h = ctx;
    if (!p || !fn)
        fail_msg("retire(%p, %p)", p, (void *)fn);
    for (size_t i = 0; i < h->nheld; i++)
        if (h->held[i].p == p)
            fail_msg("block %p retired twice", p);
    if (h->nheld == h->capheld) {
        h->capheld = h->capheld ? 2 * h->capheld : 64;
        h->held = realloc(h->held, h->capheld * sizeof *h->held);
        assert_non_null(h->held);
    }
    if (bytes < 128)
        fail_msg("retire of a %zu-byte block", bytes);
    memset((char *)p + 64, 0xA5, bytes - 64);
    h->held[h->nheld++] = (held){p, fn};
    h->retired++;
}

/* The grace period ends: free what was retired. */
static void release_held(hk *h)
{
    for (size_t i = 0; i < h->nheld; i++)
        h->held[i].fn(h->held[i].p);
    free(h->held);
    h->held = NULL;
    h->nheld = h->capheld = 0;
}

static sl_table *mk(unsigned shards, size_t max_keys, hk *h, int reclaim)
{
    memset(h, 0, sizeof *h);
    sl_table_hooks hooks = {h, reclaim ? full_at_state : full_never, drop_count, NULL};
    sl_table *t = sl_table_new(shards, max_keys, &hooks);
    assert_non_null(t);
    return t;
}

/* ---- single-threaded helpers (pointers stay valid until the next table change) ---- */

static uint64_t (*g_hash)(const void *, size_t) = sl_table_hash;

static sl_entry *put(sl_table *t, const void *k, size_t n, int64_t now, int *created)
{
    uint64_t h = g_hash(k, n);
    sl_shard *s = sl_table_shard(t, h);
    int c;
    sl_shard_lock(s);
    sl_entry *e = sl_shard_upsert_locked(s, h, k, n, now, &c);
    sl_shard_unlock(s);
    if (created)
        *created = c;
    return e;
}

static sl_entry *get(sl_table *t, const void *k, size_t n)
{
    uint64_t h = g_hash(k, n);
    sl_shard *s = sl_table_shard(t, h);
    sl_shard_lock(s);
    sl_entry *e = sl_shard_find_locked(s, h, k, n);
    sl_shard_unlock(s);
    return e;
}

static int del(sl_table *t, const void *k, size_t n)
{
    uint64_t h = g_hash(k, n);
    sl_shard *s = sl_table_shard(t, h);
    sl_shard_lock(s);
    sl_entry *e = sl_shard_find_locked(s, h, k, n);
    if (e)
        sl_shard_remove_locked(s, e);
    sl_shard_unlock(s);
    return e != NULL;
}

static void assert_key(const sl_entry *e, const void *k, size_t n)
{
    size_t len;
    const char *p = sl_entry_key(e, &len);
    assert_int_equal(len, n);
    assert_true(n == 0 || memcmp(p, k, n) == 0);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

/* Key i of a family: short, 24-byte, 25-byte or long, by i % 7. Returns the length. */
static size_t key_of(char *buf, unsigned i)
{
    switch (i % 7) {
    case 0:
        return (size_t)sprintf(buf, "%u", i);
    case 1: /* exactly the inline limit */
        return (size_t)sprintf(buf, "%024u", i);
    case 2: /* one over it */
        return (size_t)sprintf(buf, "%025u", i);
    case 3: { /* long, with NUL bytes inside */
        size_t n = (size_t)sprintf(buf, "long-%u-", i);
        memset(buf + n, 0, 40);
        return n + 40;
    }
    case 4: /* 255 bytes */
        return (size_t)sprintf(buf, "%0255u", i);
    default:
        return (size_t)sprintf(buf, "k%u", i);
    }
}

/* ---- tests ---- */

static void test_new_arguments(void **st)
{
    (void)st;
    hk h = {0};
    sl_table_hooks hooks = {&h, full_never, drop_count, NULL};
    assert_null(sl_table_new(3, 0, &hooks));
    assert_null(sl_table_new(100, 0, &hooks));
    assert_null(sl_table_new(1u << 17, 0, &hooks));
    sl_table *t = sl_table_new(1u << 16, 0, &hooks);
    assert_non_null(t);
    assert_int_equal(sl_table_capacity(t), 0);
    sl_table_free(t);
    t = sl_table_new(0, 0, NULL); /* no hooks at all: nothing reclaimed, nothing reported */
    assert_non_null(t);
    assert_non_null(put(t, "a", 1, 0, NULL));
    assert_int_equal(sl_table_sweep(t, INT64_MAX, 100), 0);
    sl_table_free(t);
}

static void test_key_shapes(void **st)
{
    (void)st;
    hk h;
    sl_table *t = mk(0, 0, &h, 0);
    static char big[70000];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (char)(i * 31 + 7);
    struct {
        const char *k;
        size_t n;
    } keys[64];
    size_t nk = 0;
#define K(str, len) (keys[nk].k = (str), keys[nk].n = (len), nk++)
    K("", 0);
    K("\0", 1);
    K("\0\0", 2);
    K("a", 1);
    K("a\0", 2);
    K("a\0b", 3);
    K("a\0c", 3);
    K("abcdefghijklmnopqrstuvw", 23);
    K("abcdefghijklmnopqrstuvwx", 24);
    K("abcdefghijklmnopqrstuvwy", 24); /* differs in the last inline byte */
    K("abcdefghijklmnopqrstuvwxy", 25);
    K("abcdefghijklmnopqrstuvwxz", 25); /* differs in the last byte of a long key */
    K(big, 100);
    K(big, 255);
    K(big, 256);
    K(big, 1000);
    K(big, sizeof big);
    K(big + 1, sizeof big - 1);
#undef K
    for (size_t i = 0; i < nk; i++) {
        int c = 0;
        sl_entry *e = put(t, keys[i].k, keys[i].n, 0, &c);
        assert_non_null(e);
        assert_int_equal(c, 1);
        assert_int_equal(e->state[0], 0); /* new: zeroed except the key */
        assert_int_equal(e->state[1], 0);
        assert_int_equal(e->policy, 0);
        assert_int_equal(e->flags & ~SL_ENTRY_LONGKEY, 0);
        assert_int_equal(!!(e->flags & SL_ENTRY_LONGKEY), keys[i].n > SL_ENTRY_INLINE_KEY);
        assert_key(e, keys[i].k, keys[i].n);
        e->state[0] = i + 1;
    }
    assert_int_equal(sl_table_count(t), nk);
    for (size_t i = 0; i < nk; i++) {
        sl_entry *e = get(t, keys[i].k, keys[i].n);
        assert_non_null(e);
        assert_int_equal(e->state[0], i + 1);
        assert_true(e->flags & SL_ENTRY_REF); /* find sets the CLOCK bit */
        assert_key(e, keys[i].k, keys[i].n);
        int c = 1;
        assert_ptr_equal(put(t, keys[i].k, keys[i].n, 0, &c), e);
        assert_int_equal(c, 0);
    }
    /* prefixes and near misses are absent */
    assert_null(get(t, "ab", 2));
    assert_null(get(t, "\0\0\0", 3));
    assert_null(get(t, big, 101));
    assert_null(get(t, "abcdefghijklmnopqrstuvwx\0", 25));
    assert_int_equal(sl_table_check(t), 0);
    for (size_t i = 0; i < nk; i += 2)
        assert_true(del(t, keys[i].k, keys[i].n));
    for (size_t i = 0; i < nk; i++) {
        sl_entry *e = get(t, keys[i].k, keys[i].n);
        if (i % 2 == 0) {
            assert_null(e);
        } else {
            assert_non_null(e);
            assert_int_equal(e->state[0], i + 1);
        }
    }
    assert_int_equal(sl_table_check(t), 0);
    size_t left = sl_table_count(t);
    sl_table_free(t);
    assert_int_equal(h.drops[2], left); /* free reports every entry */
    assert_int_equal(h.drops[0] + h.drops[1], 0);
}

static void test_many_keys_and_growth(void **st)
{
    (void)st;
    hk h;
    /* One shard: its block grows 0 -> 8 -> 16 -> 32 -> 64 positions, then by 1/8 (rounded up
     * to a multiple of 8) whenever a key would leave fewer than 1/8 of them empty (and
     * always one). After each growth every key so far must still be found with its state. */
    sl_table *t = mk(1, 0, &h, 0);
    char k[300];
    const unsigned n = 300000;
    size_t growths = 0, cap = 0;
    for (unsigned i = 0; i < n; i++) {
        size_t len = key_of(k, i);
        int c;
        sl_entry *e = put(t, k, len, 0, &c);
        assert_non_null(e);
        assert_int_equal(c, 1);
        e->state[0] = i;
        e->state[1] = ~(uint64_t)i;
        if (i + 1 > (cap ? cap - cap / 8 - 1 : 0)) { /* this insert grew the block */
            cap = cap < 64 ? (cap ? 2 * cap : 8) : (cap + cap / 8 + 7) & ~(size_t)7;
            growths++;
            for (unsigned j = 0; (growths % 4 == 0 || cap < 4096) && j <= i; j++) {
                len = key_of(k, j);
                sl_entry *f = get(t, k, len);
                if (!f || f->state[0] != j || f->state[1] != ~(uint64_t)j)
                    fail_msg("key %u lost after growth at %u", j, i);
            }
            if (growths % 8 == 0)
                assert_int_equal(sl_table_check(t), 0);
        }
    }
    assert_int_equal(growths, 74); /* 0 -> 360936 positions */
    assert_int_equal(sl_table_count(t), n);
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
    assert_int_equal(h.drops[2], n);

    /* The default 256 shards: many keys, tags collide all the time (8 bits per position). */
    t = mk(0, 0, &h, 0);
    for (unsigned i = 0; i < 200000; i++) {
        size_t len = key_of(k, i);
        sl_entry *e = put(t, k, len, 0, NULL);
        assert_non_null(e);
        e->state[0] = i;
    }
    for (unsigned i = 0; i < 200000; i++) {
        size_t len = key_of(k, i);
        sl_entry *e = get(t, k, len);
        assert_non_null(e);
        assert_int_equal(e->state[0], i);
        assert_key(e, k, len);
    }
    for (unsigned i = 200000; i < 220000; i++) { /* never inserted: absent */
        size_t len = key_of(k, i);
        assert_null(get(t, k, len));
    }
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
}

/* ---- forced collisions through the hash override ---- */

static uint64_t hash_const(const void *k, size_t n) /* full 64-bit collisions */
{
    (void)k;
    (void)n;
    return 0x0123456789ABCDEFull;
}

static uint64_t hash_wrap(const void *k, size_t n) /* homes at the last position: runs wrap */
{
    uint64_t h = sl_table_hash(k, n);
    return (h & ~0xFFFFFFFFull) | 0xFFFFFFFCu | (h & 3);
}

static uint64_t hash_tag(const void *k, size_t n) /* one tag for all, homes spread */
{
    uint64_t h = sl_table_hash(k, n);
    return (h & ~0xFF00000000ull) | 0x5A00000000ull;
}

static void collide_with(uint64_t (*fn)(const void *, size_t), unsigned nkeys, unsigned ops)
{
    hk h;
    sl_table *t = mk(1, 0, &h, 0);
    sl_table_set_hash_fn(t, fn);
    g_hash = fn;
    char k[300];
    unsigned char *present = calloc(nkeys, 1);
    uint64_t *val = calloc(nkeys, sizeof *val);
    size_t live = 0;
    for (unsigned op = 0; op < ops; op++) {
        unsigned i = (unsigned)(rnd() % nkeys);
        size_t len = key_of(k, i);
        if (present[i] && rnd() % 3 == 0) {
            assert_true(del(t, k, len));
            present[i] = 0;
            live--;
        } else {
            int c;
            sl_entry *e = put(t, k, len, 0, &c);
            assert_non_null(e);
            assert_int_equal(c, !present[i]);
            if (present[i])
                assert_int_equal(e->state[0], val[i]);
            else
                live++;
            present[i] = 1;
            e->state[0] = val[i] = rnd();
        }
        if (op % 500 == 0 || op + 1 == ops) {
            assert_int_equal(sl_table_check(t), 0);
            assert_int_equal(sl_table_count(t), live);
            for (unsigned j = 0; j < nkeys; j++) {
                len = key_of(k, j);
                sl_entry *e = get(t, k, len);
                if (present[j]) {
                    assert_non_null(e);
                    assert_int_equal(e->state[0], val[j]);
                    assert_key(e, k, len);
                } else {
                    assert_null(e);
                }
            }
        }
    }
    /* remove everything in random order, checking as the runs collapse */
    for (unsigned j = 0; j < nkeys; j++) {
        unsigned i = (unsigned)(rnd() % nkeys);
        if (!present[i])
            continue;
        size_t len = key_of(k, i);
        assert_true(del(t, k, len));
        present[i] = 0;
        if (j % 64 == 0)
            assert_int_equal(sl_table_check(t), 0);
    }
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
    g_hash = sl_table_hash;
    free(present);
    free(val);
}

static void test_forced_collisions(void **st)
{
    (void)st;
    collide_with(hash_const, 600, 6000);
    collide_with(hash_wrap, 600, 6000);
    collide_with(hash_tag, 5000, 40000);
}

static void test_swap_remove_keeps_state(void **st)
{
    (void)st;
    const unsigned n = 60000;
    unsigned *order = malloc(n * sizeof *order);
    char k[300];
    for (unsigned shards = 1; shards <= 256; shards *= 256) {
        hk h;
        sl_table *t = mk(shards, 0, &h, 0);
        size_t empty = sl_table_bytes(t);
        for (unsigned i = 0; i < n; i++) {
            size_t len = key_of(k, i);
            sl_entry *e = put(t, k, len, 0, NULL);
            assert_non_null(e);
            e->state[0] = i;
            e->state[1] = (uint64_t)i * 0x9E3779B97F4A7C15ull;
            e->policy = i;
            order[i] = i;
        }
        size_t full = sl_table_bytes(t);
        for (unsigned i = n - 1; i > 0; i--) { /* shuffle */
            unsigned j = (unsigned)(rnd() % (i + 1)), x = order[i];
            order[i] = order[j];
            order[j] = x;
        }
        for (unsigned r = 0; r < n / 2; r++) {
            size_t len = key_of(k, order[r]);
            assert_true(del(t, k, len));
        }
        assert_int_equal(sl_table_check(t), 0);
        assert_int_equal(sl_table_count(t), n - n / 2);
        for (unsigned r = 0; r < n; r++) {
            unsigned i = order[r];
            size_t len = key_of(k, i);
            sl_entry *e = get(t, k, len);
            if (r < n / 2) {
                assert_null(e);
                continue;
            }
            assert_non_null(e);
            assert_key(e, k, len);
            if (e->state[0] != i || e->state[1] != (uint64_t)i * 0x9E3779B97F4A7C15ull ||
                e->policy != i)
                fail_msg("state of key %u damaged by removals", i);
        }
        /* removed keys come back as new, zeroed entries */
        for (unsigned r = 0; r < n / 2; r += 97) {
            size_t len = key_of(k, order[r]);
            int c;
            sl_entry *e = put(t, k, len, 0, &c);
            assert_int_equal(c, 1);
            assert_int_equal(e->state[0] | e->state[1] | e->policy, 0);
            del(t, k, len);
        }
        /* remove the rest: the blocks shrink */
        for (unsigned r = n / 2; r < n; r++) {
            size_t len = key_of(k, order[r]);
            assert_true(del(t, k, len));
        }
        assert_int_equal(sl_table_count(t), 0);
        assert_int_equal(sl_table_check(t), 0);
        size_t after = sl_table_bytes(t);
        /* each shard keeps its smallest block: 8 positions */
        assert_true(after <= empty + shards * (128 + 8 * sizeof(sl_entry)));
        assert_true(after < full);
        sl_table_free(t);
        assert_int_equal(h.drops[2], 0);
    }
    free(order);
}

static void test_reclaim_idle_full_keys(void **st)
{
    (void)st;
    hk h;
    char k[64];
    const unsigned n = 20000;
    sl_table *t = mk(4, 0, &h, 1);
    for (unsigned i = 0; i < n; i++) { /* even keys full at 100, odd keys never */
        size_t len = (size_t)sprintf(k, "a%u", i);
        sl_entry *e = put(t, k, len, h.now, NULL);
        assert_non_null(e);
        e->state[1] = i % 2 ? (uint64_t)INT64_MAX : 100;
    }
    assert_int_equal(h.drops[0], 0);
    assert_int_equal(sl_table_sweep(t, 99, SIZE_MAX), 0); /* nothing is full before 100 */
    assert_int_equal(sl_table_count(t), n);

    /* New keys at now = 200: each insert examines at most 2 entries and reclaims full ones. */
    h.now = 200;
    size_t calls = h.full_calls;
    for (unsigned i = 0; i < n; i++) {
        size_t len = (size_t)sprintf(k, "b%u", i);
        sl_entry *e = put(t, k, len, h.now, NULL);
        assert_non_null(e);
        e->state[1] = INT64_MAX;
    }
    assert_true(h.full_calls - calls <= 2 * n); /* bounded housekeeping */
    assert_true(h.drops[0] > n / 4);          /* the cursor went round: most are gone */
    assert_int_equal(sl_table_count(t), 2 * n - h.drops[0]);
    assert_int_equal(sl_table_check(t), 0);
    for (unsigned i = 1; i < n; i += 2) { /* not-yet-full keys all survive */
        size_t len = (size_t)sprintf(k, "a%u", i);
        assert_non_null(get(t, k, len));
    }

    /* A full sweep takes the rest, and only them. */
    size_t before = h.drops[0];
    size_t got = sl_table_sweep(t, 200, SIZE_MAX);
    assert_int_equal(h.drops[0] - before, got);
    assert_int_equal(before + got, n / 2);
    assert_int_equal(sl_table_count(t), n + n / 2);
    for (unsigned i = 0; i < n; i++) {
        size_t len = (size_t)sprintf(k, "a%u", i);
        sl_entry *e = get(t, k, len);
        assert_true(i % 2 ? e != NULL : e == NULL);
    }
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);

    /* Budgets: sweep examines at most `budget` entries, and repeated small sweeps get
     * everything eventually. */
    t = mk(0, 0, &h, 1);
    for (unsigned i = 0; i < n; i++) {
        size_t len = (size_t)sprintf(k, "c%u", i);
        sl_entry *e = put(t, k, len, 0, NULL);
        e->state[1] = i % 3 ? 50 : (uint64_t)INT64_MAX;
    }
    h.now = 50;
    size_t total = 0, rounds = 0;
    for (;;) {
        calls = h.full_calls;
        size_t r = sl_table_sweep(t, 50, 37);
        assert_true(h.full_calls - calls <= 37);
        assert_true(r <= 37);
        total += r;
        if (++rounds > 100000)
            fail_msg("small sweeps never finish");
        if (sl_table_count(t) == (n + 2) / 3) /* only the keys with i % 3 == 0 are left */
            break;
    }
    assert_int_equal(total, h.drops[0]);
    for (unsigned i = 0; i < n; i += 3) {
        size_t len = (size_t)sprintf(k, "c%u", i);
        assert_non_null(get(t, k, len));
    }
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
}

static void test_clock_prefers_unreferenced(void **st)
{
    (void)st;
    hk h;
    sl_table *t = mk(1, 10, &h, 0);
    assert_int_equal(sl_table_capacity(t), 10);
    char k[16];
    for (int i = 0; i < 10; i++)
        assert_non_null(put(t, k, (size_t)sprintf(k, "k%d", i), 0, NULL));
    assert_non_null(get(t, "k0", 2)); /* referenced */
    assert_non_null(put(t, "new", 3, 0, NULL));
    assert_int_equal(h.drops[1], 1);
    assert_int_equal(sl_table_count(t), 10);
    assert_non_null(get(t, "k0", 2));
    assert_non_null(get(t, "new", 3));
    int gone = 0;
    for (int i = 1; i < 10; i++)
        gone += get(t, k, (size_t)sprintf(k, "k%d", i)) == NULL;
    assert_int_equal(gone, 1);
    /* Everything referenced: the hand clears the bits and still evicts exactly one. */
    assert_non_null(put(t, "new2", 4, 0, NULL));
    assert_int_equal(h.drops[1], 2);
    assert_int_equal(sl_table_count(t), 10);
    assert_non_null(get(t, "new2", 4));
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);

    /* A stream of new keys (never referenced again): each insert evicts exactly one, and a
     * key referenced since the hand last passed it is never the one. New keys are not
     * referenced (a key used once goes before one used twice). */
    t = mk(1, 10, &h, 0);
    size_t before = h.drops[1];
    for (int i = 0; i < 10; i++)
        assert_non_null(put(t, k, (size_t)sprintf(k, "k%d", i), 0, NULL));
    for (int i = 0; i < 200; i++) {
        assert_non_null(get(t, "k3", 2));
        assert_non_null(put(t, k, (size_t)sprintf(k, "n%d", i), 0, NULL));
        assert_int_equal(h.drops[1] - before, (size_t)i + 1);
        assert_int_equal(sl_table_count(t), 10);
    }
    assert_non_null(get(t, "k3", 2));
    assert_non_null(get(t, "n199", 4));
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
}

static void test_max_keys_flood(void **st)
{
    (void)st;
    hk h;
    const size_t max = 100000;
    sl_table *t = mk(0, max, &h, 0);
    assert_int_equal(sl_table_capacity(t), max);
    h.protect = "hot";
    h.protect_len = 3;
    sl_entry *e = put(t, "hot", 3, 0, NULL);
    e->state[0] = 0xC0FFEE;
    char k[32];
    size_t created = 1;
    for (unsigned i = 1; i <= FLOOD; i++) {
        size_t len = (size_t)sprintf(k, "id:%u", i);
        int c;
        e = put(t, k, len, 0, &c);
        if (!e || !c)
            fail_msg("insert %u failed", i);
        created++;
        e->state[0] = i;
        if (i % 1000 == 0) {
            e = get(t, "hot", 3);
            if (!e || e->state[0] != 0xC0FFEE)
                fail_msg("hot key lost after %u inserts", i);
        }
        if (i % 100000 == 0) {
            size_t n = sl_table_count(t);
            if (n > max)
                fail_msg("%zu keys held, max_keys %zu", n, max);
            assert_int_equal(h.drops[1], created - n); /* every eviction reported */
        }
    }
    assert_int_equal(sl_table_count(t), max); /* every shard filled its share */
    assert_int_equal(h.drops[0], 0);
    assert_int_equal(h.drops[1], created - max);
    e = get(t, k, strlen(k)); /* the newest key is there too */
    assert_non_null(e);
    assert_int_equal(e->state[0], FLOOD);
    assert_int_equal(sl_table_check(t), 0);
    printf("# flood: %u distinct ids, max_keys %zu: held %zu, evicted %zu, %zu bytes\n",
           (unsigned)FLOOD, max, sl_table_count(t), h.drops[1], sl_table_bytes(t));
    sl_table_free(t);
}

/* The hand's jump over a block of n groups of 8 positions: coprime with n (so n jumps visit
 * every group once), and no short way back: for d = 1..16, neither do d jumps bring the hand
 * within n/32 groups of where it was, nor is a key passed and then shifted back d groups met
 * again within n/32 jumps. Both found by walking the hand, for every n up to 4,096 and a
 * sample beyond. */
static void check_stride(uint32_t n)
{
    uint32_t k = sl_table_hand_stride(n);
    if (k < 1 || k >= (n > 1 ? n : 2))
        fail_msg("n %u: stride %u", n, k);
    uint8_t *seen = calloc(n, 1);
    assert_non_null(seen);
    uint32_t p = 0;
    for (uint32_t i = 0; i < n; i++, p = (uint32_t)(((uint64_t)p + k) % n)) {
        if (seen[p]++)
            fail_msg("n %u, stride %u: group %u visited twice in %u jumps", n, k, p, i);
    }
    free(seen);
    if (n < 64)
        return;
    uint32_t bound = n / 32;
    for (uint32_t d = 1; d <= 16; d++) {
        uint64_t away = (uint64_t)d * k % n;
        if (away < bound || n - away < bound)
            fail_msg("n %u, stride %u: %u jumps end %llu groups from the start", n, k, d,
                     (unsigned long long)(away < n - away ? away : n - away));
        /* the key was in group d when the hand passed it; it is now in group 0 */
        uint32_t q = d;
        for (uint32_t steps = 1; steps < bound; steps++)
            if ((q = (uint32_t)(((uint64_t)q + k) % n)) == 0)
                fail_msg("n %u, stride %u: a key shifted back %u groups is met again after "
                         "%u jumps", n, k, d, steps);
    }
}

static void test_hand_stride(void **st)
{
    (void)st;
    for (uint32_t n = 1; n <= 4096; n++)
        check_stride(n);
    for (int i = 0; i < 40; i++)
        check_stride(4096 + (uint32_t)(rnd() % (1u << 21))); /* up to ~16M positions */
}

/* One shard at its bound, flooded with new keys: a key referenced at least every max/40
 * inserts (at random intervals) is never evicted, whatever the block's size (the hand's
 * stride varies with it), although evictions keep shifting it back towards its home. A hand
 * that does not visit each position once per cycle loses it. */
static void test_clock_keeps_hot_key_in_any_block(void **st)
{
    (void)st;
    static const size_t maxes[] = {40, 300, 1000, 2900, 7000, 20000};
    for (size_t m = 0; m < sizeof maxes / sizeof *maxes; m++) {
        hk h;
        sl_table *t = mk(1, maxes[m], &h, 0);
        h.protect = "hot";
        h.protect_len = 3;
        unsigned most = (unsigned)maxes[m] / 40, n = 30 * (unsigned)maxes[m], next = 0;
        char k[32];
        assert_non_null(put(t, "hot", 3, 0, NULL));
        for (unsigned i = 0; i < n; i++) {
            assert_non_null(put(t, k, (size_t)sprintf(k, "n%u", i), 0, NULL));
            if (i == next) {
                assert_non_null(get(t, "hot", 3));
                next = i + 1 + (unsigned)(rnd() % most);
            }
        }
        assert_int_equal(sl_table_count(t), maxes[m]);
        assert_int_equal(h.drops[1], n + 1 - maxes[m]);
        assert_int_equal(sl_table_check(t), 0);
        sl_table_free(t);
    }
}

static void test_small_max_keys_exact(void **st)
{
    (void)st;
    static const size_t maxes[] = {1, 2, 3, 7, 100, 257, 1000};
    char k[32];
    for (size_t m = 0; m < sizeof maxes / sizeof maxes[0]; m++) {
        size_t max = maxes[m];
        hk h;
        sl_table *t = mk(0, max, &h, 0);
        assert_int_equal(sl_table_capacity(t), max);
        size_t inserts = 20 * max + 2000;
        for (size_t i = 0; i < inserts; i++) {
            size_t len = (size_t)sprintf(k, "x%zu", i);
            int c;
            sl_entry *e = put(t, k, len, 0, &c);
            assert_non_null(e);
            assert_int_equal(c, 1);
            if (sl_table_count(t) > max)
                fail_msg("max_keys %zu: %zu held", max, sl_table_count(t));
            assert_non_null(get(t, k, len)); /* the new key survives its own insert */
        }
        assert_int_equal(sl_table_count(t), max); /* the bound is reached, not just obeyed */
        assert_int_equal(h.drops[1], inserts - max);
        assert_int_equal(sl_table_check(t), 0);
        sl_table_free(t);
        assert_int_equal(h.drops[2], max);
    }
    /* max_keys 1: only the newest key */
    hk h;
    sl_table *t = mk(64, 1, &h, 0);
    assert_non_null(put(t, "a", 1, 0, NULL));
    assert_non_null(put(t, "b", 1, 0, NULL));
    assert_null(get(t, "a", 1));
    assert_non_null(get(t, "b", 1));
    sl_table_free(t);
}

static void test_memory_per_key(void **st)
{
    (void)st;
    hk h;
    const unsigned n = 1000000;
    struct mallinfo2 m0 = mallinfo2();
    sl_table *t = mk(0, 0, &h, 0);
    char k[32];
    for (unsigned i = 0; i < n; i++) {
        size_t len = (size_t)sprintf(k, "user:%06u", i);
        assert_non_null(put(t, k, len, 0, NULL));
    }
    struct mallinfo2 m1 = mallinfo2();
    size_t bytes = sl_table_bytes(t), count = sl_table_count(t);
    assert_int_equal(count, n);
    size_t heap = (m1.uordblks + m1.hblkhd) - (m0.uordblks + m0.hblkhd);
    printf("# memory: %zu keys, sl_table_bytes %zu = %.2f bytes/key (malloc heap %.2f)\n", count,
           bytes, (double)bytes / (double)count, (double)heap / (double)count);
    assert_true(bytes <= 64 * count);
    sl_table_free(t);
}

struct acc {
    uint64_t sum;
    size_t n, stop;
};

static int visit(void *ctx, sl_entry *e)
{
    struct acc *a = ctx;
    a->sum += e->state[0];
    return ++a->n == a->stop ? 7 : 0;
}

static void test_foreach_and_prefetch(void **st)
{
    (void)st;
    hk h;
    sl_table *t = mk(16, 0, &h, 0);
    char k[32];
    uint64_t sum = 0;
    for (unsigned i = 1; i <= 5000; i++) {
        sl_entry *e = put(t, k, (size_t)sprintf(k, "f%u", i), 0, NULL);
        e->state[0] = i;
        sum += i;
        sl_table_prefetch(t, rnd());
        sl_table_prefetch(t, sl_table_hash(k, strlen(k)));
    }
    struct acc a = {0, 0, 0};
    assert_int_equal(sl_table_foreach(t, visit, &a), 0);
    assert_int_equal(a.n, 5000);
    assert_int_equal(a.sum, sum);
    a = (struct acc){0, 0, 10};
    assert_int_equal(sl_table_foreach(t, visit, &a), 7); /* stops at the first non-zero */
    assert_int_equal(a.n, 10);
    sl_table_free(t);
}

/* Sliced visits while keys come and go between slices: a key present from the first slice to
 * the last is visited (exactly once unless the visit says SL_SLICE_REPEATS), with runs that
 * wrap past the end of the block, blocks that grow and shrink, and fn ending slices. */
typedef struct vis {
    unsigned char *seen;
    unsigned nkeys, refuse; /* refuse: fn answers 1 (not visited) every refuse-th call */
    unsigned calls;
} vis;

static int visit_count(void *ctx, sl_entry *e)
{
    vis *v = ctx;
    if (v->refuse && ++v->calls % v->refuse == 0)
        return 1;
    if (e->state[0] >= v->nkeys)
        fail_msg("visited a stranger");
    if (v->seen[e->state[0]] < 255)
        v->seen[e->state[0]]++;
    return 0;
}

static void visits_with(uint64_t (*fn)(const void *, size_t), unsigned nkeys)
{
    char k[300];
    unsigned outcomes[3] = {0, 0, 0};
    unsigned char *present = calloc(nkeys, 1), *stayed = calloc(nkeys, 1);
    vis v = {calloc(nkeys, 1), nkeys, 0, 0};
    for (unsigned trial = 0; trial < 60; trial++) {
        hk h;
        sl_table *t = mk(1, 0, &h, 0);
        sl_table_set_hash_fn(t, fn);
        g_hash = fn;
        memset(present, 0, nkeys);
        for (unsigned i = 0; i < nkeys / 2; i++) {
            unsigned j = (unsigned)(rnd() % nkeys);
            sl_entry *e = put(t, k, key_of(k, j), 0, NULL);
            e->state[0] = j;
            present[j] = 1;
        }
        memcpy(stayed, present, nkeys);
        memset(v.seen, 0, nkeys);
        v.refuse = trial % 3 == 0 ? 5 : 0;
        sl_slice c;
        int st = SL_SLICE_MORE, fnrc;
        for (int first = 1; st == SL_SLICE_MORE; first = 0) {
            st = sl_table_visit_slice(t, 0, &c, first, 1 + (uint32_t)(rnd() % 30), visit_count,
                                      &v, &fnrc);
            assert_int_equal(fnrc, 0);
            /* between slices: removals (some trials only), or inserts that may grow it */
            for (unsigned n = (unsigned)(rnd() % 8); n > 0; n--) {
                unsigned j = (unsigned)(rnd() % nkeys);
                size_t len = key_of(k, j);
                if (present[j] && trial % 2) {
                    assert_true(del(t, k, len));
                    present[j] = stayed[j] = 0;
                } else if (!present[j] && trial % 4 == 2) {
                    sl_entry *e = put(t, k, len, 0, NULL);
                    e->state[0] = j;
                    present[j] = 1;
                }
            }
        }
        for (unsigned j = 0; j < nkeys; j++) {
            if (stayed[j] && !v.seen[j])
                fail_msg("trial %u: key %u missed", trial, j);
            if (st == SL_SLICE_DONE && v.seen[j] > 1)
                fail_msg("trial %u: key %u visited %u times, and DONE", trial, j, v.seen[j]);
        }
        outcomes[st]++;
        assert_int_equal(sl_table_check(t), 0);
        sl_table_free(t);
        g_hash = sl_table_hash;
    }
    assert_true(outcomes[SL_SLICE_DONE] > 0);
    free(present);
    free(stayed);
    free(v.seen);
}

static void test_sliced_visits(void **st)
{
    (void)st;
    visits_with(sl_table_hash, 3000);
    visits_with(hash_wrap, 300);
    visits_with(hash_const, 100);
}

/* Out of memory at each allocation an insert can make (key copy, new block): NULL, and the table exactly as before — no key, no reclaim, no eviction. */
static void oom_inserts(sl_table *t, hk *h, unsigned n, int64_t now)
{
    char k[300];
    unsigned failures = 0;
    for (unsigned i = 0; i < n; i++) {
        size_t len = key_of(k, i + 7 * 100000);
        for (long budget = 0;; budget++) {
            size_t count = sl_table_count(t), bytes = sl_table_bytes(t);
            size_t drops = h->drops[0] + h->drops[1], calls = h->full_calls;
            size_t retired = h->retired;
            sl_table_fail_allocs_after(budget);
            int c;
            sl_entry *e = put(t, k, len, now, &c);
            sl_table_fail_allocs_after(-1);
            if (e) {
                e->state[1] = (uint64_t)now; /* full right away: reclaimable next time */
                break;
            }
            failures++;
            assert_int_equal(sl_table_count(t), count);
            assert_int_equal(sl_table_bytes(t), bytes);
            assert_int_equal(h->drops[0] + h->drops[1], drops);
            assert_int_equal(h->full_calls, calls);
            assert_int_equal(h->retired, retired); /* nothing replaced or freed either */
            assert_null(get(t, k, len));
            if (budget > 8)
                fail_msg("insert needs more than 8 allocations");
        }
    }
    assert_true(failures >= n / 7); /* at least every long key could fail */
    assert_int_equal(sl_table_check(t), 0);
}

static void test_out_of_memory(void **st)
{
    (void)st;
    hk h;
    sl_table_hooks hooks = {&h, full_never, drop_count, NULL};
    for (long budget = 0;; budget++) { /* sl_table_new cleans up at every failure point */
        sl_table_fail_allocs_after(budget);
        sl_table *t = sl_table_new(64, 0, &hooks);
        sl_table_fail_allocs_after(-1);
        if (t) {
            assert_int_equal(budget, 3); /* the table, its empty block, the shards */
            sl_table_free(t);
            break;
        }
    }
    sl_table *t = mk(1, 0, &h, 0);
    oom_inserts(t, &h, 3000, 0); /* crosses 35 growths of the block */
    sl_table_free(t);
    t = mk(1, 500, &h, 0); /* at the bound: eviction must not happen when the insert fails */
    oom_inserts(t, &h, 2000, 0);
    assert_true(h.drops[1] > 0);
    sl_table_free(t);
    t = mk(2, 0, &h, 1); /* reclaim must not happen when the insert fails */
    h.now = 10;
    oom_inserts(t, &h, 2000, 10);
    assert_true(h.drops[0] > 0);
    sl_table_free(t);
    /* With a retire hook: a failed insert replaces and retires nothing; the successful ones
     * grow the block. */
    memset(&h, 0, sizeof h);
    sl_table_hooks rh = {&h, full_never, drop_count, retire_hold};
    t = sl_table_new(1, 0, &rh);
    assert_non_null(t);
    oom_inserts(t, &h, 3000, 0);
    assert_int_equal(h.retired, 34); /* 35 growths to 3632 positions; the first replaced
                                          the table's shared empty block, never retired */
    sl_table_free(t);
    release_held(&h);
}

/* Every block the table replaces goes through hooks.retire exactly once, and the table never touches it again: retired blocks
 * are poisoned while held, so a later read of one would break lookups or sl_table_check.
 * sl_table_prefetch_entry runs throughout (single-threaded here: it must stay in bounds,
 * which AddressSanitizer checks; the concurrent case is in test_table_concurrency.c). */
static void test_retire_hook(void **st)
{
    (void)st;
    hk h = {0};
    sl_table_hooks hooks = {&h, full_never, drop_count, retire_hold};
    sl_table *t = sl_table_new(1, 0, &hooks);
    assert_non_null(t);
    char k[300];
    const unsigned n = 20000;
    for (unsigned i = 0; i < n; i++) {
        size_t len = key_of(k, i);
        sl_entry *e = put(t, k, len, 0, NULL);
        assert_non_null(e);
        e->state[0] = i;
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
        len = key_of(k, (unsigned)(rnd() % (i + 1)));
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
        sl_table_prefetch_entry(t, rnd());
        if (i % 2000 == 0)
            assert_int_equal(sl_table_check(t), 0);
    }
    /* 20000 keys: the block grew 51 times, to 24008 positions; the first growth replaced
     * the shared empty block, which is not retired. */
    assert_int_equal(h.retired, 50);
    for (unsigned i = 0; i < n; i++) { /* still held and poisoned: nothing uses them */
        size_t len = key_of(k, i);
        sl_entry *e = get(t, k, len);
        assert_non_null(e);
        assert_int_equal(e->state[0], i);
    }
    assert_int_equal(sl_table_check(t), 0);
    release_held(&h);

    /* Remove everything: the block shrinks (to 1/4 of its positions or less, each time the
     * load falls below 1/8). */
    size_t before = h.retired;
    for (unsigned i = 0; i < n; i++) {
        size_t len = key_of(k, i);
        assert_true(del(t, k, len));
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
        len = key_of(k, (unsigned)(i + rnd() % (n - i)));
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
        if (i % 2000 == 0)
            assert_int_equal(sl_table_check(t), 0);
    }
    assert_int_equal(sl_table_count(t), 0);
    assert_int_equal(sl_table_check(t), 0);
    assert_true(h.retired - before >= 3); /* at least three shrinks */
    assert_true(sl_table_bytes(t) < 16384);

    /* Fill again (control bytes are stored into a published block). */
    for (unsigned i = 0; i < 1000; i++) {
        size_t len = key_of(k, i);
        assert_non_null(put(t, k, len, 0, NULL));
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
    }
    assert_int_equal(sl_table_check(t), 0);
    for (unsigned i = 0; i < 1000; i++) {
        size_t len = key_of(k, i);
        assert_non_null(get(t, k, len));
    }
    before = h.retired;
    sl_table_free(t); /* frees directly: no reader may be left */
    assert_int_equal(h.retired, before);
    release_held(&h);

    /* A sweep that empties a shard shrinks its block once, at the end of the pass. */
    memset(&h, 0, sizeof h);
    hooks.full_at = full_at_state;
    t = sl_table_new(1, 0, &hooks);
    assert_non_null(t);
    for (unsigned i = 0; i < n; i++) {
        size_t len = key_of(k, i);
        sl_entry *e = put(t, k, len, 0, NULL);
        assert_non_null(e);
        e->state[1] = 5; /* full at 5: not reclaimable by the inserts (now = 0) */
    }
    before = h.retired;
    h.now = 5;
    assert_int_equal(sl_table_sweep(t, 5, SIZE_MAX), n);
    assert_int_equal(h.drops[0], n);
    assert_int_equal(h.retired - before, 1); /* the old block */
    assert_int_equal(sl_table_check(t), 0);
    for (unsigned i = 0; i < 100; i++) {
        size_t len = key_of(k, i);
        assert_non_null(put(t, k, len, 0, NULL));
        sl_table_prefetch_entry(t, sl_table_hash(k, len));
    }
    assert_int_equal(sl_table_check(t), 0);
    sl_table_free(t);
    release_held(&h); /* LeakSanitizer checks that every retired block is freed */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_arguments),
        cmocka_unit_test(test_key_shapes),
        cmocka_unit_test(test_many_keys_and_growth),
        cmocka_unit_test(test_forced_collisions),
        cmocka_unit_test(test_swap_remove_keeps_state),
        cmocka_unit_test(test_reclaim_idle_full_keys),
        cmocka_unit_test(test_clock_prefers_unreferenced),
        cmocka_unit_test(test_max_keys_flood),
        cmocka_unit_test(test_hand_stride),
        cmocka_unit_test(test_clock_keeps_hot_key_in_any_block),
        cmocka_unit_test(test_small_max_keys_exact),
        cmocka_unit_test(test_memory_per_key),
        cmocka_unit_test(test_foreach_and_prefetch),
        cmocka_unit_test(test_sliced_visits),
        cmocka_unit_test(test_out_of_memory),
        cmocka_unit_test(test_retire_hook),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
