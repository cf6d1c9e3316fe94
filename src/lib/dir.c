/*
 * dir.c — interned byte strings with lock-free readers (see dir.h).
 *
 * Open addressing with linear probing over an array of atomic item pointers. An item, once
 * published (release store), never changes. Growth copies the item pointers into an array
 * twice the size, publishes it, and retires the old array through EBR. Removal rebuilds the
 * array without the removed items (linear probing has no cheap in-place delete, and removals
 * come in batches), publishes it, and retires the old array and the items.
 */
#include "dir.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct item {
    uint64_t hash;
    size_t len;
    void *val;
    char key[];
} item;

typedef struct slots {
    size_t mask;
    _Atomic(item *) s[];
} slots;

struct sl_dir {
    _Atomic(slots *) cur;
    pthread_mutex_t lock; /* writers */
    size_t count, max;
    sl_ebr *ebr;
};

static slots *slots_new(size_t cap)
{
    slots *s = calloc(1, sizeof *s + cap * sizeof(s->s[0]));
    if (s)
        s->mask = cap - 1;
    return s;
}

sl_dir *sl_dir_new(sl_ebr *ebr, size_t max_entries)
{
    sl_dir *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    slots *s = slots_new(16);
    if (!s || pthread_mutex_init(&d->lock, NULL) != 0) {
        free(s);
        free(d);
        return NULL;
    }
    atomic_init(&d->cur, s);
    d->ebr = ebr;
    d->max = max_entries;
    return d;
}

void sl_dir_free(sl_dir *d, void (*free_val)(void *))
{
    if (!d)
        return;
    slots *s = atomic_load(&d->cur);
    for (size_t i = 0; i <= s->mask; i++) {
        item *it = atomic_load_explicit(&s->s[i], memory_order_relaxed);
        if (it) {
            if (free_val)
                free_val(it->val);
            free(it);
        }
    }
    free(s);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

static item *find(slots *s, uint64_t hash, const void *key, size_t len)
{
    for (size_t i = hash & s->mask;; i = (i + 1) & s->mask) {
        item *it = atomic_load_explicit(&s->s[i], memory_order_acquire);
        if (!it)
            return NULL;
        if (it->hash == hash && it->len == len && memcmp(it->key, key, len) == 0)
            return it;
    }
}

void *sl_dir_get(sl_dir *d, uint64_t hash, const void *key, size_t len)
{
    item *it = find(atomic_load_explicit(&d->cur, memory_order_acquire), hash, key, len);
    return it ? it->val : NULL;
}

static void place(slots *s, item *it)
{
    size_t i = it->hash & s->mask;
    while (atomic_load_explicit(&s->s[i], memory_order_relaxed))
        i = (i + 1) & s->mask;
    atomic_store_explicit(&s->s[i], it, memory_order_release);
}

void *sl_dir_intern(sl_dir *d, uint64_t hash, const void *key, size_t len, sl_dir_make_fn make,
                    void (*found)(void *ctx, void *val), void *ctx)
{
    void *val = NULL;
    pthread_mutex_lock(&d->lock);
    slots *s = atomic_load_explicit(&d->cur, memory_order_relaxed);
    item *it = find(s, hash, key, len);
    if (it) {
        val = it->val;
        if (found)
            found(ctx, val);
        goto out;
    }
    if (d->count >= d->max)
        goto out;
    if ((d->count + 1) * 2 > s->mask + 1) { /* keep load <= 1/2: short probes */
        slots *n = slots_new((s->mask + 1) * 2);
        if (!n)
            goto out;
        for (size_t i = 0; i <= s->mask; i++) {
            item *x = atomic_load_explicit(&s->s[i], memory_order_relaxed);
            if (x)
                place(n, x);
        }
        atomic_store_explicit(&d->cur, n, memory_order_release);
        sl_ebr_retire(d->ebr, s, free);
        s = n;
    }
    it = malloc(sizeof *it + len);
    if (!it)
        goto out;
    it->val = make(ctx, key, len);
    if (!it->val) {
        free(it);
        goto out;
    }
    it->hash = hash;
    it->len = len;
    memcpy(it->key, key, len);
    place(s, it);
    d->count++;
    val = it->val;
out:
    pthread_mutex_unlock(&d->lock);
    return val;
}

long sl_dir_remove_if(sl_dir *d, int (*doomed)(void *ctx, void *val),
                      void (*gone)(void *ctx, void *val), void *ctx)
{
    pthread_mutex_lock(&d->lock);
    slots *s = atomic_load_explicit(&d->cur, memory_order_relaxed);
    long removed = 0;
    for (size_t i = 0; i <= s->mask; i++) {
        item *x = atomic_load_explicit(&s->s[i], memory_order_relaxed);
        removed += x && doomed(ctx, x->val);
    }
    if (removed) {
        size_t cap = 16, k = 0;
        while ((d->count - (size_t)removed) * 2 > cap)
            cap *= 2;
        slots *n = slots_new(cap);
        item **dead = malloc((size_t)removed * sizeof *dead);
        if (!n || !dead) {
            free(n);
            free(dead);
            pthread_mutex_unlock(&d->lock);
            return -1;
        }
        for (size_t i = 0; i <= s->mask; i++) {
            item *x = atomic_load_explicit(&s->s[i], memory_order_relaxed);
            if (x && doomed(ctx, x->val))
                dead[k++] = x;
            else if (x)
                place(n, x);
        }
        atomic_store_explicit(&d->cur, n, memory_order_release);
        sl_ebr_retire(d->ebr, s, free);
        d->count -= (size_t)removed;
        for (size_t i = 0; i < k; i++) {
            gone(ctx, dead[i]->val);
            sl_ebr_retire(d->ebr, dead[i], free);
        }
        free(dead);
    }
    pthread_mutex_unlock(&d->lock);
    return removed;
}

int sl_dir_foreach(sl_dir *d, int (*fn)(void *ctx, const void *key, size_t len, void *val),
                   void *ctx)
{
    int rc = 0;
    if (sl_ebr_enter(d->ebr) != 0)
        return -1;
    slots *s = atomic_load_explicit(&d->cur, memory_order_acquire);
    for (size_t i = 0; i <= s->mask && !rc; i++) {
        item *it = atomic_load_explicit(&s->s[i], memory_order_acquire);
        if (it)
            rc = fn(ctx, it->key, it->len, it->val);
    }
    sl_ebr_leave(d->ebr);
    return rc;
}

size_t sl_dir_count(sl_dir *d)
{
    pthread_mutex_lock(&d->lock);
    size_t n = d->count;
    pthread_mutex_unlock(&d->lock);
    return n;
}
