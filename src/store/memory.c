/*
 * memory.c — the in-process store (see memory.h).
 *
 * Layout of one shard:
 *
 *   index   sl_index: its mask, then uint32 slots[mask + 1]: 0 = empty, else
 *           tag << 24 | (entry number + 1), where the tag is hash bits 32..39 (the shard takes
 *           the top bits, the slot the low bits, so the tag is independent of both). Linear
 *           probing, load <= 7/8, backward-shift deletion: there are no tombstones, so a miss
 *           stops at the first empty slot.
 *   entries chunks of SL_CHUNK_ENTRIES sl_entry, numbered densely 0..count-1, reached through
 *           an sl_chunkvec (its capacity, then the chunk pointers; NULL beyond nchunks).
 *           Removal moves the last entry into the hole (its slot is found again by
 *           re-hashing its key), so growth never copies entries and a shard holds at most one
 *           spare chunk.
 *
 * Nothing is allocated except when a new key is inserted (and, rarely, when a shard's index
 * shrinks after mass removal). All memory an insert may need is obtained before anything
 * changes, so an allocation failure leaves the table exactly as it was.
 *
 * Lockless readers. sl_table_prefetch reads the index pointer and s->mask (relaxed atomics)
 * and only forms an address. sl_table_prefetch_entry goes further: it loads the index
 * pointer (acquire), the mask from that allocation's header, slots of the home cache line,
 * the chunk-vector pointer (acquire), its capacity from its header and one chunk pointer,
 * and prefetches the entry (never dereferencing it). So that this is safe and data-race
 * free:
 *   - a reader bounds every read by the header of the array it loaded, never by shard
 *     fields that may belong to another array;
 *   - index and chunk vectors are filled before they are published with a release store,
 *     and never resized in place (no realloc: alloc, copy, publish, retire);
 *   - every store to a slot of a published index or an element of a published chunk
 *     vector is a relaxed atomic store (a plain mov on x86); the locked paths keep plain
 *     loads, since every writer holds the lock too;
 *   - replaced indexes and chunk vectors and freed chunks go to hooks.retire, which frees
 *     them once no reader can still hold them (EBR in the limiter); a freed chunk's vector
 *     element is set to NULL first. A sweep retires the chunks it frees in one shard as one
 *     list (sl_grave), so that mass reclaim costs one retire per shard, not per chunk.
 * Every other field is plain and protected by the shard lock, except `count`, which
 * sl_table_count sums without locks.
 */
#include "memory.h"

#include <limits.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "inject.h"

/* XXH3 compiled into this file (same function as libxxhash's XXH3_64bits): short keys hash
 * without a call through the PLT. */
#define XXH_INLINE_ALL
#include <xxhash.h>

#define SL_CHUNK_SHIFT 6u /* 64 entries = 3 KiB per chunk */
#define SL_CHUNK_ENTRIES (1u << SL_CHUNK_SHIFT)
#define SL_CHUNK_MASK (SL_CHUNK_ENTRIES - 1u)
#define SL_CHUNK_BYTES (SL_CHUNK_ENTRIES * sizeof(sl_entry))
#define SL_MIN_SLOTS 8u            /* smallest index: 8 slots = 32 bytes */
#define SL_MAX_LOAD(cap) ((cap) - (cap) / 8u) /* most entries an index of cap slots holds */
#define SL_MAX_ENTRIES 0xFFFFFFu   /* entries per shard: entry number + 1 must fit 24 bits */
#define SL_MAX_SHARDS 65536u       /* shard bits (top 16) must not reach the tag (32..39) */
#define SL_SPIN_BEFORE_YIELD 100u  /* failed spins before a waiter gives up its time slice */
#define SL_SWEEP_BATCH 256u        /* entries examined per lock hold in sl_table_sweep */
#define SL_HOUSEKEEP_PER_INSERT 2u /* entries examined for reclaim per new key */

#define SL_TAG(h) ((uint32_t)((h) >> 32) & 0xFFu)
#define SL_SLOT(tag, n) ((tag) << 24 | ((n) + 1u))
#define SL_SLOT_ENTRY(v) (((v) & 0xFFFFFFu) - 1u)

_Static_assert(sizeof(sl_entry) == 48, "sl_entry must stay 48 bytes");

/* One allocation: the mask in front of the slots, so that a lockless reader bounds its probe
 * by the mask of the very array it loaded. Never resized; replaced whole and retired. */
typedef struct sl_index {
    uint32_t mask;   /* slots - 1; set before publication, never changed */
    uint32_t slot[]; /* 0 = empty, else tag << 24 | (entry number + 1) */
} sl_index;

/* Likewise the chunk-pointer array with its capacity in front. */
typedef struct sl_chunkvec {
    uint32_t cap;       /* elements; set before publication, never changed */
    sl_entry *chunk[];  /* nchunks in use, NULL beyond */
} sl_chunkvec;

/* Two cache lines: what the lockless prefetches read (changed only by a resize or a new chunk
 * vector) apart from what every decision writes (the lock) and inserts update. Sharing one
 * line made each thread's prefetch of a shard stall on the line the other core had just
 * written by taking the lock (2 threads, random keys: both touch every shard). */
struct sl_shard {
    /* read-mostly */
    alignas(64) _Atomic uint32_t mask; /* idx->mask, for the locked paths and sl_table_prefetch */
    uint32_t share;               /* most entries this shard may hold */
    _Atomic(sl_index *) idx;
    _Atomic(sl_chunkvec *) cv;    /* NULL until the first chunk */
    sl_table *t;
    /* written under the lock */
    alignas(64) atomic_uint lock;
    _Atomic uint32_t count;       /* entries 0..count-1 are live */
    uint32_t nchunks;
    uint32_t hand;            /* CLOCK hand (entry number) */
    uint32_t sweep;           /* reclaim cursor (entry number) */
    uint32_t removals;        /* bumped by every removal (entries move): sliced visits */
    size_t keybytes;          /* bytes of heap key copies */
};

_Static_assert(sizeof(struct sl_shard) == 128, "a shard is two cache lines");

struct sl_table {
    sl_shard *shards;
    unsigned nshards;
    unsigned shift;  /* shard = hash >> shift & smask */
    uint64_t smask;
    size_t capacity; /* enforced max_keys (0 = unbounded) */
    sl_table_hooks hooks;
    uint64_t (*hashfn)(const void *key, size_t len); /* NULL = XXH3 (tests may replace) */
    _Atomic size_t sweep_next;                       /* next shard for sl_table_sweep */
};

/* ---- allocation (with failure injection for tests) ---- */

static _Atomic long g_fail_after = -1;

void sl_table_fail_allocs_after(long n)
{
    atomic_store(&g_fail_after, n);
}

static bool alloc_denied(void)
{
    return sl_inject_fails(&g_fail_after);
}

static void *t_malloc(size_t n)
{
    return alloc_denied() ? NULL : malloc(n);
}

static void *t_calloc(size_t n, size_t size)
{
    return alloc_denied() ? NULL : calloc(n, size);
}

/* Free memory a lockless reader may still be looking at (an index, a chunk vector or a
 * chunk that is no longer reachable for new readers): through hooks.retire when set. */
static void retire_with(const sl_table *t, void *p, void (*fn)(void *))
{
    if (t->hooks.retire)
        t->hooks.retire(t->hooks.ctx, p, fn);
    else
        fn(p);
}

static void retire(const sl_table *t, void *p)
{
    retire_with(t, p, free);
}

/* Chunks freed by a sweep, linked through their first word (no reader ever reads chunk
 * memory, only prefetches it) and retired as one block: a sweep may free thousands of chunks
 * while its caller is itself inside a read section, and retiring each on its own would make
 * every retire walk an ever longer list of blocks that cannot be freed yet. */
typedef struct sl_grave {
    void *head;
} sl_grave;

static void free_chunk_list(void *p)
{
    while (p) {
        void *next = *(void **)p;
        free(p);
        p = next;
    }
}

static void grave_flush(const sl_table *t, sl_grave *g)
{
    if (g->head)
        retire_with(t, g->head, free_chunk_list);
    g->head = NULL;
}

/* A store into a published index or chunk vector: a lockless reader may load it. */
#define SL_STORE_SHARED(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

/* ---- lock ---- */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Test-and-test-and-set. Waiters spin on a plain load (no cache-line ping-pong) and yield
 * the CPU after SL_SPIN_BEFORE_YIELD failed spins, so that a preempted holder gets to run
 * when threads outnumber cores. */
void sl_shard_lock(sl_shard *s)
{
    for (;;) {
        if (!atomic_exchange_explicit(&s->lock, 1, memory_order_acquire))
            return;
        unsigned spins = 0;
        while (atomic_load_explicit(&s->lock, memory_order_relaxed)) {
            if (++spins >= SL_SPIN_BEFORE_YIELD) {
                sched_yield();
                spins = 0;
            } else {
                cpu_relax();
            }
        }
    }
}

void sl_shard_unlock(sl_shard *s)
{
    atomic_store_explicit(&s->lock, 0, memory_order_release);
}

/* ---- helpers (all *_locked: shard lock held) ---- */

uint64_t sl_table_hash(const void *key, size_t len)
{
    return XXH3_64bits(key, len);
}

static inline uint32_t count_of(const sl_shard *s)
{
    return atomic_load_explicit(&s->count, memory_order_relaxed);
}

static inline void set_count(sl_shard *s, uint32_t n)
{
    atomic_store_explicit(&s->count, n, memory_order_relaxed);
}

/* Locked paths: the lock orders them after every writer, so relaxed loads (plain movs)
 * suffice, and the mask comes from the shard line rather than the index header. */
static inline uint32_t *index_of(const sl_shard *s, uint32_t *mask)
{
    *mask = atomic_load_explicit(&s->mask, memory_order_relaxed);
    return atomic_load_explicit(&s->idx, memory_order_relaxed)->slot;
}

static inline sl_chunkvec *chunks_of(const sl_shard *s)
{
    return atomic_load_explicit(&s->cv, memory_order_relaxed);
}

static inline sl_entry *entry_at(const sl_shard *s, uint32_t n)
{
    return &chunks_of(s)->chunk[n >> SL_CHUNK_SHIFT][n & SL_CHUNK_MASK];
}

/* A zeroed index of cap slots (a power of two), or NULL. */
static sl_index *index_new(uint32_t cap)
{
    sl_index *ix = t_calloc(1, sizeof(sl_index) + (size_t)cap * sizeof(uint32_t));
    if (ix)
        ix->mask = cap - 1;
    return ix;
}

static inline uint64_t rehash(const sl_table *t, const sl_entry *e)
{
    size_t len;
    const char *k = sl_entry_key(e, &len);
    return t->hashfn ? t->hashfn(k, len) : XXH3_64bits(k, len);
}

static inline bool key_equal(const sl_entry *e, const void *key, size_t len)
{
    if (len <= SL_ENTRY_INLINE_KEY)
        return !(e->flags & SL_ENTRY_LONGKEY) && e->klen == len && sl_equal(e->key.inl, key, len);
    return (e->flags & SL_ENTRY_LONGKEY) && e->key.ext.len == len &&
           memcmp(e->key.ext.ptr, key, len) == 0;
}

/* The slot holding entry n, whose key hashes to h. It must exist. */
static uint32_t slot_of_locked(const uint32_t *idx, uint32_t mask, uint64_t h, uint32_t n)
{
    uint32_t want = SL_SLOT(SL_TAG(h), n);
    uint32_t p = (uint32_t)h & mask;
    for (uint32_t i = 0; i <= mask; i++, p = (p + 1) & mask)
        if (idx[p] == want)
            return p;
    abort(); /* the index lost an entry: memory corruption */
}

static inline uint32_t first_empty(const uint32_t *idx, uint32_t mask, uint64_t h)
{
    uint32_t p = (uint32_t)h & mask;
    while (idx[p])
        p = (p + 1) & mask;
    return p;
}

/* Fill a fresh zeroed index from the entries, publish it, retire the old one. The new index
 * is private until the release store, so it is filled with plain stores. */
static void index_fill_locked(sl_shard *s, sl_index *ni)
{
    uint32_t n = count_of(s), newmask = ni->mask;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t h = rehash(s->t, entry_at(s, i));
        ni->slot[first_empty(ni->slot, newmask, h)] = SL_SLOT(SL_TAG(h), i);
    }
    sl_index *old = atomic_load_explicit(&s->idx, memory_order_relaxed);
    /* sl_table_prefetch may pair the old pointer with the new mask (or the reverse): it only
     * forms an address for a prefetch, which cannot fault. sl_table_prefetch_entry takes the
     * mask from the index it loaded. */
    atomic_store_explicit(&s->idx, ni, memory_order_release);
    atomic_store_explicit(&s->mask, newmask, memory_order_relaxed);
    retire(s->t, old);
}

/* After mass removal: halve the index (or more) once its load falls below 1/8, so that a
 * flood that went away does not pin its index. Failure to allocate just keeps the old one. */
static void index_shrink_locked(sl_shard *s)
{
    uint32_t mask;
    (void)index_of(s, &mask);
    uint32_t cap = mask + 1, n = count_of(s);
    if (cap <= SL_MIN_SLOTS || n >= cap / 8)
        return;
    uint32_t ncap = SL_MIN_SLOTS;
    while (ncap < 2 * n)
        ncap *= 2;
    sl_index *ni = index_new(ncap);
    if (ni)
        index_fill_locked(s, ni);
}

/* Backward-shift deletion: empty slot `hole`, then pull later members of its probe run back
 * so that every key stays reachable from its home without tombstones. Deciding whether a key
 * may move needs its home, i.e. its hash, i.e. its entry: the entries of the run are
 * prefetched first so that their cache misses overlap instead of adding up. */
static void index_delete_locked(sl_shard *s, uint32_t *idx, uint32_t mask, uint32_t hole)
{
    for (uint32_t j = (hole + 1) & mask, k = 0; idx[j] && k < 16; j = (j + 1) & mask, k++)
        __builtin_prefetch(entry_at(s, SL_SLOT_ENTRY(idx[j])));
    uint32_t i = hole, j = hole;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t v = idx[j];
        if (!v)
            break;
        uint32_t home = (uint32_t)rehash(s->t, entry_at(s, SL_SLOT_ENTRY(v))) & mask;
        /* The key at j may move to i when i lies on its probe path home..j. */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            SL_STORE_SHARED(&idx[i], v);
            i = j;
        }
    }
    SL_STORE_SHARED(&idx[i], 0);
}

/* Remove entry n whose index slot is p: free its key copy, delete the slot, move the last
 * entry into the hole. A trailing chunk is freed when a second one falls empty: keeping one
 * spare means a count oscillating around a chunk boundary does not malloc/free each time.
 * The chunk is retired at once, or put in `grave` (when not NULL) for the caller to retire. */
static void remove_at_locked(sl_shard *s, uint32_t n, uint32_t p, sl_grave *grave)
{
    uint32_t mask;
    uint32_t *idx = index_of(s, &mask);
    uint32_t last = count_of(s) - 1;
    __builtin_prefetch(entry_at(s, last)); /* needed after the shift: overlap its miss */
    sl_entry *e = entry_at(s, n);
    if (e->flags & SL_ENTRY_LONGKEY) {
        s->keybytes -= e->key.ext.len;
        free(e->key.ext.ptr);
    }
    index_delete_locked(s, idx, mask, p);
    s->removals++;
    if (n != last) {
        sl_entry *l = entry_at(s, last);
        uint32_t q = slot_of_locked(idx, mask, rehash(s->t, l), last);
        SL_STORE_SHARED(&idx[q], (idx[q] & 0xFF000000u) | (n + 1u));
        *e = *l;
    }
    set_count(s, last);
    uint32_t used = (last + SL_CHUNK_MASK) >> SL_CHUNK_SHIFT;
    if (s->nchunks > used + 1) {
        sl_chunkvec *cv = chunks_of(s);
        sl_entry *c = cv->chunk[--s->nchunks];
        SL_STORE_SHARED(&cv->chunk[s->nchunks], NULL); /* unlink, then retire */
        if (grave) {
            *(void **)c = grave->head;
            grave->head = c;
        } else {
            retire(s->t, c);
        }
    }
    if (s->hand >= last)
        s->hand = 0;
    if (s->sweep >= last)
        s->sweep = 0;
}

static void remove_entry_locked(sl_shard *s, uint32_t n, sl_grave *grave)
{
    uint32_t mask;
    uint32_t *idx = index_of(s, &mask);
    remove_at_locked(s, n, slot_of_locked(idx, mask, rehash(s->t, entry_at(s, n)), n), grave);
}

/* Examine the entry at the sweep cursor; reclaim it if it is idle and full. Returns 1 when
 * reclaimed (the cursor then stays: the entry moved into the hole is examined next). */
static int reclaim_one_locked(sl_shard *s, int64_t now, sl_grave *grave)
{
    const sl_table_hooks *hk = &s->t->hooks;
    uint32_t c = s->sweep;
    if (c >= count_of(s))
        c = 0;
    sl_entry *e = entry_at(s, c);
    if (hk->full_at(hk->ctx, e) <= now) {
        if (hk->drop)
            hk->drop(hk->ctx, e, 0);
        remove_entry_locked(s, c, grave);
        s->sweep = c;
        return 1;
    }
    s->sweep = c + 1;
    return 0;
}

/* CLOCK: advance the hand, clearing reference bits, and evict the first entry without one.
 * The hand then moves past the hole, so the entry just moved there (the newest) gets a full
 * revolution before it is considered. Needs count >= 1. */
static void evict_one_locked(sl_shard *s)
{
    const sl_table_hooks *hk = &s->t->hooks;
    uint32_t n = count_of(s), h = s->hand;
    sl_entry *e;
    for (;;) {
        if (h >= n)
            h = 0;
        e = entry_at(s, h);
        if (!(e->flags & SL_ENTRY_REF))
            break;
        e->flags &= (uint8_t)~SL_ENTRY_REF;
        h++;
    }
    if (hk->drop)
        hk->drop(hk->ctx, e, 1);
    remove_entry_locked(s, h, NULL);
    s->hand = h + 1;
}

/* ---- table ---- */

sl_table *sl_table_new(unsigned shards, size_t max_keys, const sl_table_hooks *hooks)
{
    if (shards == 0)
        shards = 256;
    if ((shards & (shards - 1)) != 0 || shards > SL_MAX_SHARDS)
        return NULL;
    if (max_keys)
        while (shards > max_keys)
            shards >>= 1;
    sl_table *t = t_calloc(1, sizeof *t);
    if (!t)
        return NULL;
    if (hooks)
        t->hooks = *hooks;
    t->nshards = shards;
    unsigned bits = 0;
    while ((1u << bits) < shards)
        bits++;
    t->shift = bits ? 64 - bits : 63; /* with one shard smask = 0 picks it */
    t->smask = shards - 1;
    atomic_init(&t->sweep_next, 0);
    t->shards = alloc_denied() ? NULL : aligned_alloc(64, shards * sizeof(sl_shard));
    if (!t->shards)
        goto fail_table;
    memset(t->shards, 0, shards * sizeof(sl_shard));
    /* Shares add up to max_keys exactly: the first max_keys % shards shards take one more. */
    size_t base = max_keys / shards, extra = max_keys % shards;
    if (max_keys) {
        size_t cap = max_keys;
        if (base >= SL_MAX_ENTRIES)
            cap = (size_t)SL_MAX_ENTRIES * shards;
        t->capacity = cap;
    }
    unsigned i;
    for (i = 0; i < shards; i++) {
        sl_shard *s = &t->shards[i];
        sl_index *idx = index_new(SL_MIN_SLOTS);
        if (!idx)
            goto fail_shards;
        atomic_init(&s->lock, 0);
        atomic_init(&s->idx, idx);
        atomic_init(&s->mask, SL_MIN_SLOTS - 1);
        atomic_init(&s->cv, NULL);
        atomic_init(&s->count, 0);
        s->t = t;
        size_t share = max_keys ? base + (i < extra) : SL_MAX_ENTRIES;
        s->share = share > SL_MAX_ENTRIES ? SL_MAX_ENTRIES : (uint32_t)share;
    }
    return t;

fail_shards:
    while (i-- > 0)
        free(atomic_load(&t->shards[i].idx));
    free(t->shards);
fail_table:
    free(t);
    return NULL;
}

void sl_table_free(sl_table *t)
{
    if (!t)
        return;
    for (unsigned i = 0; i < t->nshards; i++) {
        sl_shard *s = &t->shards[i];
        uint32_t n = count_of(s);
        for (uint32_t j = 0; j < n; j++) {
            sl_entry *e = entry_at(s, j);
            if (t->hooks.drop)
                t->hooks.drop(t->hooks.ctx, e, 2);
            if (e->flags & SL_ENTRY_LONGKEY)
                free(e->key.ext.ptr);
        }
        /* No lockless reader may be left (see memory.h): free directly, not through retire. */
        sl_chunkvec *cv = chunks_of(s);
        for (uint32_t j = 0; j < s->nchunks; j++)
            free(cv->chunk[j]);
        free(cv);
        free(atomic_load(&s->idx));
    }
    free(t->shards);
    free(t);
}

void sl_table_set_hash_fn(sl_table *t, uint64_t (*fn)(const void *key, size_t len))
{
    t->hashfn = fn;
}

sl_shard *sl_table_shard(sl_table *t, uint64_t hash)
{
    return &t->shards[hash >> t->shift & t->smask];
}

void sl_table_prefetch(sl_table *t, uint64_t hash)
{
    sl_shard *s = &t->shards[hash >> t->shift & t->smask];
    __builtin_prefetch(&s->lock, 1, 3);
    uintptr_t idx = (uintptr_t)atomic_load_explicit(&s->idx, memory_order_relaxed);
    uint32_t mask = atomic_load_explicit(&s->mask, memory_order_relaxed);
    /* Integer arithmetic: the pair (idx, mask) may be torn by a concurrent resize, and the
     * address is only ever prefetched, never dereferenced. */
    __builtin_prefetch((const void *)(idx + offsetof(sl_index, slot) +
                                      (uintptr_t)(hash & mask) * sizeof(uint32_t)),
                       0, 3);
}

/* Lockless, inside the caller's retire read section (memory.h). Every bound comes from the
 * header of the array just loaded; the values read may be stale (a slot of an index already
 * replaced, an entry number already moved), which costs at most a useless prefetch. */
void sl_table_prefetch_entry(sl_table *t, uint64_t hash)
{
    sl_shard *s = &t->shards[hash >> t->shift & t->smask];
    const sl_index *ix = atomic_load_explicit(&s->idx, memory_order_acquire);
    uint32_t mask = ix->mask, tag = SL_TAG(hash), v;
    const uint32_t *p = &ix->slot[(uint32_t)hash & mask], *end = &ix->slot[mask] + 1;
    /* The home slot, then the rest of its cache line (already fetched by sl_table_prefetch)
     * while the probe run goes on; the first tag match wins. */
    for (;;) {
        v = __atomic_load_n(p, __ATOMIC_RELAXED);
        if (!v)
            return;
        if (v >> 24 == tag)
            break;
        if (++p == end || ((uintptr_t)p & 63u) == 0)
            return;
    }
    uint32_t n = SL_SLOT_ENTRY(v), c = n >> SL_CHUNK_SHIFT;
    const sl_chunkvec *cv = atomic_load_explicit(&s->cv, memory_order_acquire);
    if (!cv || c >= cv->cap)
        return;
    const sl_entry *chunk = __atomic_load_n(&cv->chunk[c], __ATOMIC_RELAXED);
    if (!chunk)
        return;
    /* 48-byte entries straddle cache lines: fetch both ends (for writing: the decision
     * updates the state). */
    const char *e = (const char *)&chunk[n & SL_CHUNK_MASK];
    __builtin_prefetch(e, 1, 3);
    __builtin_prefetch(e + sizeof(sl_entry) - 1, 1, 3);
}

sl_entry *sl_shard_find_locked(sl_shard *s, uint64_t hash, const void *key, size_t len)
{
    uint32_t mask;
    const uint32_t *idx = index_of(s, &mask);
    uint32_t tag = SL_TAG(hash);
    /* The load factor stays <= 7/8, so an empty slot ends every probe run. */
    for (uint32_t p = (uint32_t)hash & mask;; p = (p + 1) & mask) {
        uint32_t v = idx[p];
        if (!v)
            return NULL;
        if (v >> 24 == tag) {
            sl_entry *e = entry_at(s, SL_SLOT_ENTRY(v));
            if (key_equal(e, key, len)) {
                if (!(e->flags & SL_ENTRY_REF))
                    e->flags |= SL_ENTRY_REF;
                return e;
            }
        }
    }
}

sl_entry *sl_shard_upsert_locked(sl_shard *s, uint64_t hash, const void *key, size_t len,
                                 int64_t now, int *created)
{
    *created = 0;
    sl_entry *e = sl_shard_find_locked(s, hash, key, len);
    if (e)
        return e;
    if (len > UINT32_MAX)
        return NULL;

    /* Reserve first: entries this shard may hold once the new key is in. Housekeeping only
     * removes, so after it everything needed is already there. */
    uint32_t n = count_of(s);
    uint32_t need = n < s->share ? n + 1 : s->share;
    uint32_t mask;
    (void)index_of(s, &mask);
    uint32_t ncap = mask + 1;
    while (need > SL_MAX_LOAD(ncap))
        ncap *= 2;
    sl_chunkvec *cv = chunks_of(s);
    uint32_t chunk_cap = cv ? cv->cap : 0;
    bool new_chunk = need > s->nchunks * SL_CHUNK_ENTRIES;
    bool new_array = new_chunk && s->nchunks == chunk_cap;

    char *kcopy = NULL;
    sl_entry *chunk = NULL;
    sl_index *ni = NULL;
    sl_chunkvec *ncv = NULL;
    if (len > SL_ENTRY_INLINE_KEY && !(kcopy = t_malloc(len)))
        goto fail;
    if (new_chunk && !(chunk = t_malloc(SL_CHUNK_BYTES)))
        goto fail;
    if (ncap != mask + 1 && !(ni = index_new(ncap)))
        goto fail;
    if (new_array) { /* a copy, not realloc: readers may be in the old one */
        uint32_t cap = chunk_cap ? chunk_cap * 2 : 4;
        if (!(ncv = t_malloc(sizeof(sl_chunkvec) + (size_t)cap * sizeof(sl_entry *))))
            goto fail;
        ncv->cap = cap;
        for (uint32_t i = 0; i < cap; i++)
            ncv->chunk[i] = i < s->nchunks ? cv->chunk[i] : NULL;
    }
    /* Everything is in hand: from here on nothing fails. */
    if (ncv) {
        ncv->chunk[s->nchunks++] = chunk; /* still private: a plain store */
        atomic_store_explicit(&s->cv, ncv, memory_order_release);
        if (cv)
            retire(s->t, cv);
    } else if (chunk) {
        SL_STORE_SHARED(&cv->chunk[s->nchunks++], chunk);
    }
    if (ni)
        index_fill_locked(s, ni);

    /* Bounded housekeeping: reclaim idle full keys at the cursor, then make room. */
    if (s->t->hooks.full_at && now != SL_TABLE_NO_RECLAIM)
        for (unsigned i = 0; i < SL_HOUSEKEEP_PER_INSERT && count_of(s) > 0; i++)
            reclaim_one_locked(s, now, NULL);
    if (count_of(s) >= s->share)
        evict_one_locked(s);

    n = count_of(s);
    e = entry_at(s, n);
    memset(e, 0, sizeof *e);
    if (kcopy) {
        memcpy(kcopy, key, len);
        e->flags = SL_ENTRY_LONGKEY;
        e->key.ext.ptr = kcopy;
        e->key.ext.len = (uint32_t)len;
        s->keybytes += len;
    } else {
        if (len)
            memcpy(e->key.inl, key, len);
        e->klen = (uint8_t)len;
    }
    uint32_t *idx = index_of(s, &mask);
    SL_STORE_SHARED(&idx[first_empty(idx, mask, hash)], SL_SLOT(SL_TAG(hash), n));
    set_count(s, n + 1);
    *created = 1;
    return e;

fail: /* nothing was published: free directly */
    free(ncv);
    free(ni);
    free(chunk);
    free(kcopy);
    return NULL;
}

void sl_shard_remove_locked(sl_shard *s, sl_entry *e)
{
    size_t len;
    const char *k = sl_entry_key(e, &len);
    uint64_t h = s->t->hashfn ? s->t->hashfn(k, len) : XXH3_64bits(k, len);
    uint32_t mask;
    const uint32_t *idx = index_of(s, &mask);
    uint32_t tag = SL_TAG(h);
    for (uint32_t p = (uint32_t)h & mask;; p = (p + 1) & mask) {
        uint32_t v = idx[p];
        if (!v)
            abort(); /* not an entry of this shard */
        if (v >> 24 == tag && entry_at(s, SL_SLOT_ENTRY(v)) == e) {
            remove_at_locked(s, SL_SLOT_ENTRY(v), p, NULL);
            index_shrink_locked(s);
            return;
        }
    }
}

size_t sl_table_sweep(sl_table *t, int64_t now, size_t budget)
{
    if (!t->hooks.full_at)
        return 0;
    size_t reclaimed = 0;
    for (unsigned visited = 0; visited < t->nshards && budget > 0; visited++) {
        size_t i = atomic_fetch_add_explicit(&t->sweep_next, 1, memory_order_relaxed);
        sl_shard *s = &t->shards[i & t->smask];
        if (count_of(s) == 0)
            continue;
        sl_shard_lock(s);
        sl_grave grave = {NULL};
        size_t todo = count_of(s);
        if (todo <= budget)
            s->sweep = 0; /* a whole pass from 0 examines every entry exactly once */
        else
            todo = budget;
        budget -= todo;
        while (todo > 0) {
            size_t batch = todo < SL_SWEEP_BATCH ? todo : SL_SWEEP_BATCH;
            for (size_t k = 0; k < batch && count_of(s) > 0; k++)
                reclaimed += (size_t)reclaim_one_locked(s, now, &grave);
            todo -= batch;
            if (todo > 0) { /* let waiters in between batches */
                sl_shard_unlock(s);
                sl_shard_lock(s);
            }
        }
        index_shrink_locked(s);
        grave_flush(t, &grave);
        sl_shard_unlock(s);
    }
    return reclaimed;
}

unsigned sl_table_nshards(const sl_table *t)
{
    return t->nshards;
}

int sl_table_foreach_shard(sl_table *t, unsigned i, int (*fn)(void *ctx, sl_entry *e),
                           void *ctx)
{
    sl_shard *s = &t->shards[i];
    int rc = 0;
    sl_shard_lock(s);
    uint32_t n = count_of(s);
    for (uint32_t j = 0; j < n && !rc; j++)
        rc = fn(ctx, entry_at(s, j));
    sl_shard_unlock(s);
    return rc;
}

int sl_table_visit_slice(sl_table *t, unsigned i, uint32_t *pos, uint32_t *stamp, int first,
                         uint32_t max, int (*fn)(void *ctx, sl_entry *e), void *ctx, int *fnrc)
{
    sl_shard *s = &t->shards[i];
    int rc = 0;
    sl_shard_lock(s);
    uint32_t n = count_of(s);
    if (first) {
        *pos = n;
        *stamp = s->removals;
    } else if (*pos > n) {
        *pos = n; /* removals shrank the shard: entries past its end are gone or moved down */
    }
    uint32_t lo = *pos > max ? *pos - max : 0;
    while (*pos > lo && (rc = fn(ctx, entry_at(s, *pos - 1))) == 0)
        --*pos;
    int st = *pos > 0 || rc < 0 ? SL_SLICE_MORE
             : *stamp != s->removals ? SL_SLICE_REPEATS : SL_SLICE_DONE;
    sl_shard_unlock(s);
    *fnrc = rc < 0 ? rc : 0;
    return st;
}

int sl_table_foreach(sl_table *t, int (*fn)(void *ctx, sl_entry *e), void *ctx)
{
    int rc = 0;
    for (unsigned i = 0; i < t->nshards && !rc; i++)
        rc = sl_table_foreach_shard(t, i, fn, ctx);
    return rc;
}

size_t sl_table_count(sl_table *t)
{
    size_t n = 0;
    for (unsigned i = 0; i < t->nshards; i++)
        n += count_of(&t->shards[i]);
    return n;
}

size_t sl_table_bytes(sl_table *t)
{
    size_t b = sizeof *t + t->nshards * sizeof(sl_shard);
    for (unsigned i = 0; i < t->nshards; i++) {
        sl_shard *s = &t->shards[i];
        uint32_t mask;
        sl_shard_lock(s);
        (void)index_of(s, &mask);
        sl_chunkvec *cv = chunks_of(s);
        b += sizeof(sl_index) + ((size_t)mask + 1) * sizeof(uint32_t) +
             (cv ? sizeof(sl_chunkvec) + (size_t)cv->cap * sizeof(sl_entry *) : 0) +
             (size_t)s->nchunks * SL_CHUNK_BYTES + s->keybytes;
        sl_shard_unlock(s);
    }
    return b;
}

size_t sl_table_capacity(sl_table *t)
{
    return t->capacity;
}

/* Test hook: every invariant of every shard. 0 when all hold, else a code naming the first
 * broken one. Locks each shard in turn. */
int sl_table_check(sl_table *t)
{
    int rc = 0;
    for (unsigned i = 0; i < t->nshards && !rc; i++) {
        sl_shard *s = &t->shards[i];
        sl_shard_lock(s);
        uint32_t mask;
        const uint32_t *idx = index_of(s, &mask);
        const sl_chunkvec *cv = chunks_of(s);
        uint32_t n = count_of(s), cap = mask + 1, used = 0;
        size_t keybytes = 0;
        if (cap < SL_MIN_SLOTS || (cap & mask) || n > SL_MAX_LOAD(cap))
            rc = 1; /* index size or load */
        else if (n > s->share)
            rc = 2; /* over the share */
        else if (s->nchunks * SL_CHUNK_ENTRIES < n ||
                 s->nchunks > ((n + SL_CHUNK_MASK) >> SL_CHUNK_SHIFT) + 1 ||
                 s->nchunks > (cv ? cv->cap : 0))
            rc = 3; /* chunk accounting */
        else if (atomic_load_explicit(&s->idx, memory_order_relaxed)->mask != mask)
            rc = 11; /* the index header disagrees with the shard */
        for (uint32_t j = 0; cv && j < cv->cap && !rc; j++)
            if ((cv->chunk[j] != NULL) != (j < s->nchunks))
                rc = 12; /* a chunk in use missing, or a stale pointer beyond nchunks */
        for (uint32_t p = 0; p < cap && !rc; p++) {
            uint32_t v = idx[p];
            if (!v)
                continue;
            used++;
            uint32_t en = SL_SLOT_ENTRY(v);
            if (en >= n) {
                rc = 4; /* slot names a dead entry */
                break;
            }
            sl_entry *e = entry_at(s, en);
            uint64_t h = rehash(t, e);
            if (SL_TAG(h) != v >> 24 || (h >> t->shift & t->smask) != i) {
                rc = 5; /* wrong tag or wrong shard */
                break;
            }
            for (uint32_t q = (uint32_t)h & mask; q != p; q = (q + 1) & mask)
                if (!idx[q]) {
                    rc = 6; /* unreachable from its home */
                    break;
                }
        }
        if (!rc && used != n)
            rc = 7; /* slots and entries disagree (duplicate or missing) */
        for (uint32_t j = 0; j < n && !rc; j++) {
            sl_entry *e = entry_at(s, j);
            size_t len;
            const char *k = sl_entry_key(e, &len);
            if (e->flags & SL_ENTRY_LONGKEY) {
                keybytes += len;
                if (len <= SL_ENTRY_INLINE_KEY)
                    rc = 8; /* long flag on a short key */
            } else if (len > SL_ENTRY_INLINE_KEY) {
                rc = 8;
            }
            uint8_t flags = e->flags; /* find sets the CLOCK bit: leave it as it was */
            if (!rc && sl_shard_find_locked(s, rehash(t, e), k, len) != e)
                rc = 9; /* find does not return the entry */
            e->flags = flags;
        }
        if (!rc && keybytes != s->keybytes)
            rc = 10;
        sl_shard_unlock(s);
    }
    return rc;
}
