/*
 * memory.c — the in-process store (see memory.h).
 *
 * Layout of one shard: one block (sl_block), replaced whole when the shard grows or shrinks:
 *
 *   header  S (positions 0..S-1) and H (home positions 0..H-1, H = S - S/16)
 *   ctl     S control bytes, padded to a cache line: 0 = empty, else the key's tag (hash
 *           bits 32..39, 0 read as 1)
 *   entry   S sl_entry of 48 bytes: position p's entry is live iff ctl[p] != 0
 *
 * A key's home is the low 32 bits of its hash scaled to [0, S) by a multiply-shift (the shard
 * takes the top bits, the tag bits 32..39: all three are independent). Linear probing,
 * wrapping at the end. Entries <= 7/8 of S, and always one empty position; a shard grows
 * by 1/8, so it is between 7/9 and 7/8 full once past a few hundred keys: 56-63 bytes per
 * key. (15/16 saved 4 bytes per key, but made probe runs so long that deleting, which
 * reads the rest of a run, made a flood of new keys at max_keys about 1.5x slower.) Lookups
 * compare control bytes (1 byte per position: at a million keys 1.1 MB in all, which stays in
 * cache) and touch an entry only when its tag matches, so a key not in cache costs one miss:
 * its entry. (The layout before 2026-12-07 kept 32-bit index slots over densely numbered
 * entries: two dependent misses.) Each entry keeps its distance from home (`dist`, saturating
 * at 0xFFFF = "re-hash the key"), so that backward-shift deletion (a miss stops at the first
 * empty position) decides moves without re-hashing. Entries move when one is deleted (the
 * rest of its run shifts towards home) and when the block is replaced (every entry is
 * re-hashed into the new one); a key's home only changes with the block, and then in the
 * order of its hash, which is what sliced visits rely on.
 *
 * Nothing is allocated except when a new key is inserted (a new block when the shard must
 * grow, a heap copy of a long key) and, rarely, when a shard shrinks after mass removal. All
 * memory an insert may need is obtained before anything changes, so an allocation failure
 * leaves the table exactly as it was. An empty shard points at its table's shared empty block
 * (S = 0), never written or freed before the table.
 *
 * Lockless readers. sl_table_prefetch reads the block pointer and s->homes (relaxed atomics)
 * and only forms an address. sl_table_prefetch_entry loads the block pointer (acquire), takes
 * S and H from that block's header, reads control bytes from the key's home on and prefetches
 * the entry whose tag matches (never dereferencing it). So that this is safe and data-race
 * free:
 *   - a reader bounds every read by the header of the block it loaded;
 *   - a block is filled before it is published with a release store and never resized in
 *     place; a replaced block goes to hooks.retire, which frees it once no reader can still
 *     hold it (EBR in the limiter);
 *   - every store to a control byte of a published block is a relaxed atomic store (a plain
 *     mov on x86); the locked paths keep plain loads, since every writer holds the lock too.
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
#include <sys/mman.h>

#include "bytes.h"
#include "inject.h"
#include "mono.h"

/* XXH3 compiled into this file (same function as libxxhash's XXH3_64bits): short keys hash
 * without a call through the PLT. */
#define XXH_INLINE_ALL
#include <xxhash.h>

#define SL_MIN_SLOTS 8u            /* smallest block that holds entries */
#define SL_HAND_SHIFT 16u          /* shifts (in groups) a hand stride is judged for */
#define SL_HAND_TRIES 64u          /* strides tried either side of 0.618 S/8 */
#define SL_MAX_ENTRIES 0xFFFFFFu   /* entries per shard (keeps S well inside 32 bits) */
#define SL_MAX_SHARDS 65536u       /* shard bits (top 16) must not reach the tag (32..39) */
#define SL_LOCK_WAIT_NS 1000       /* a lock waiter first leaves the lock alone this long */
#define SL_LOCK_SPINS 200u         /* polls after it before the waiter yields the CPU */
#define SL_SWEEP_BATCH 256u        /* entries examined per lock hold in sl_table_sweep */
#define SL_HOUSEKEEP_PER_INSERT 2u /* entries examined for reclaim per new key */
#define SL_RECLAIM_SKIP 64u        /* empty positions a per-insert reclaim step skips at most */
#define SL_PREFETCH_SCAN 64u       /* control bytes sl_table_prefetch_entry reads at most */
#define SL_DIST_UNKNOWN 0xFFFFu    /* dist too large to store: re-hash the key */
#define SL_MMAP_BYTES (4u << 10)   /* blocks this large are mapped: freeing one returns it... */
#define SL_MMAP_SHARDS 16384u      /* ...in tables of at most this many shards (one mapping
                                      each: the kernel allows a process ~65,000) */

_Static_assert(sizeof(sl_entry) == 48, "sl_entry must stay 48 bytes");

/* One allocation per shard, replaced whole (never resized in place) and retired. */
typedef struct sl_block {
    uint32_t slots;        /* S; set before publication, never changed */
    uint32_t mapped;       /* allocated with mmap (else aligned_alloc) */
    uint32_t unused[14];   /* the control bytes start on their own cache line */
    uint8_t ctl[];         /* S + 1 (padded to 64): 0 = empty, else the tag; then entries */
} sl_block;

_Static_assert(offsetof(sl_block, ctl) == 64, "control bytes start a cache line");

/* Two cache lines: what the lockless prefetches read (changed only when the block is
 * replaced) apart from what every decision writes (the lock) and inserts update. Sharing one
 * line made each thread's prefetch of a shard stall on the line the other core had just
 * written by taking the lock (2 threads, random keys: both touch every shard). */
struct sl_shard {
    /* read-mostly */
    alignas(64) _Atomic(sl_block *) blk;
    _Atomic uint32_t slots;   /* blk->slots, for the locked paths and sl_table_prefetch */
    uint32_t share;           /* most entries this shard may hold */
    sl_table *t;
    /* written under the lock */
    alignas(64) atomic_uint lock;
    _Atomic uint32_t count;   /* live entries */
    uint32_t hand;            /* CLOCK hand (position) */
    uint32_t stride;          /* the hand's jump: sl_table_hand_stride(S / 8), 0 until used */
    uint32_t sweep;           /* reclaim cursor (position) */
    uint32_t removals;        /* bumped by every removal (the only thing that moves entries
                                 within a block) */
    uint32_t gen;             /* bumped when the block is replaced */
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
    sl_block *empty;                                 /* S = 0: every shard's first block */
    bool map_blocks;                                 /* nshards <= SL_MMAP_SHARDS */
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


/* A store into a published block's control bytes: a lockless reader may load them. */
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

/* Test-and-set with one back-off. A waiter that finds the lock taken first leaves its cache
 * line alone for SL_LOCK_WAIT_NS: meanwhile the holder takes and releases the lock and
 * writes the key's entry without either line moving between cores. That is what limits two
 * threads on one hot key: waiters that polled at once made every decision hand both lines
 * over (bench/RESULTS.md, 2026-12-07 16:43). Then it polls (a plain load: the line is shared,
 * not fought over) and takes the lock as soon as it is free, so a wait is about
 * SL_LOCK_WAIT_NS, not a multiple of it. After SL_LOCK_SPINS polls it yields the CPU, so
 * that a preempted holder gets to run when threads outnumber cores, and starts again. */
__attribute__((noinline)) static void lock_slow(sl_shard *s)
{
    for (;;) {
        int64_t until = sl_mono_ns() + SL_LOCK_WAIT_NS;
        while (sl_mono_ns() < until)
            cpu_relax();
        for (unsigned spins = 0; spins < SL_LOCK_SPINS; spins++) {
            if (!atomic_load_explicit(&s->lock, memory_order_relaxed) &&
                !atomic_exchange_explicit(&s->lock, 1, memory_order_acquire))
                return;
            cpu_relax();
        }
        sched_yield();
    }
}

void sl_shard_lock(sl_shard *s)
{
    if (__builtin_expect(!atomic_exchange_explicit(&s->lock, 1, memory_order_acquire), 1))
        return;
    lock_slow(s);
}

void sl_shard_unlock(sl_shard *s)
{
    atomic_store_explicit(&s->lock, 0, memory_order_release);
}

/* ---- blocks and positions ---- */

uint64_t sl_table_hash(const void *key, size_t len)
{
    return XXH3_64bits(key, len);
}

static inline uint32_t count_of(const sl_shard *s)
{
    return atomic_load_explicit(&s->count, memory_order_relaxed);
}

static inline uint32_t slots_of(const sl_shard *s)
{
    return atomic_load_explicit(&s->slots, memory_order_relaxed);
}

static inline void set_count(sl_shard *s, uint32_t n)
{
    atomic_store_explicit(&s->count, n, memory_order_relaxed);
}

/* Bytes in front of the entries: header, then S + 1 control bytes rounded up to a line. */
static inline size_t entries_offset(uint32_t slots)
{
    return offsetof(sl_block, ctl) + (((size_t)slots + 64u) & ~(size_t)63u);
}

static inline size_t block_bytes(uint32_t slots)
{
    return entries_offset(slots) + (size_t)slots * sizeof(sl_entry);
}

static inline sl_entry *entries_of(sl_block *b, uint32_t slots)
{
    return (sl_entry *)((char *)b + entries_offset(slots));
}

/* Most entries a block of S positions holds: 7/8 of them, and always one empty position
 * (it ends every probe run). */
static inline uint32_t max_load(uint32_t slots)
{
    return slots ? slots - slots / 8u - 1u : 0u;
}

/* The next size up: doubling while small, then by 1/8 (a multiple of 8), so that a shard
 * stays between 7/9 and 7/8 full. */
static inline uint32_t grow_size(uint32_t slots)
{
    if (slots < 64u)
        return slots ? 2u * slots : SL_MIN_SLOTS;
    return (slots + slots / 8u + 7u) & ~7u;
}

/* The home position: the low 32 bits of the hash scaled to [0, S) (multiply-shift). */
static inline uint32_t home_of(uint64_t h, uint32_t slots)
{
    return (uint32_t)(((uint64_t)(uint32_t)h * slots) >> 32);
}

static inline uint8_t tag_of(uint64_t h)
{
    uint8_t t = (uint8_t)(h >> 32);
    return (uint8_t)(t | (t == 0)); /* 0 marks an empty position */
}

static inline uint32_t next_pos(uint32_t p, uint32_t slots)
{
    return p + 1u == slots ? 0u : p + 1u;
}

static inline uint32_t distance(uint32_t home, uint32_t p, uint32_t slots)
{
    return p >= home ? p - home : p + slots - home;
}

static inline void set_dist(sl_entry *e, uint32_t d)
{
    e->dist = (uint16_t)(d < SL_DIST_UNKNOWN ? d : SL_DIST_UNKNOWN);
}

/* Locked paths: the lock orders them after every writer, so relaxed loads (plain movs)
 * suffice, and S comes from the shard line rather than the block header. */
typedef struct view {
    sl_block *b;
    uint8_t *ctl;
    sl_entry *e;
    uint32_t slots;
} view;

static inline view view_of(const sl_shard *s)
{
    view v;
    v.b = atomic_load_explicit(&s->blk, memory_order_relaxed);
    v.slots = slots_of(s);
    v.ctl = v.b->ctl;
    v.e = entries_of(v.b, v.slots);
    return v;
}

/* A block of `slots` positions, all empty, or NULL. Blocks of a page or more are mapped
 * (zeroed, and populated now rather than faulted in a page at a time under the shard lock)
 * when `map`: a shard grows by 1/8 at a time, and the heap keeps the holes its old blocks
 * leave (at a million keys, 8 bytes per key more than the table holds). */
static sl_block *block_new(uint32_t slots, bool map)
{
    size_t bytes = block_bytes(slots);
    sl_block *b = NULL;
    if (alloc_denied())
        return NULL;
    if (map && bytes >= SL_MMAP_BYTES) {
        void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        b = m == MAP_FAILED ? NULL : m; /* (out of mappings, say: then the heap) */
    }
    bool mapped = b != NULL;
    if (!b && (b = aligned_alloc(64, bytes)))
        memset(b, 0, entries_offset(slots)); /* (a mapping comes zeroed) */
    if (!b)
        return NULL;
    b->slots = slots;
    b->mapped = mapped;
    return b;
}

/* Frees a block; reads only its header. */
static void block_free(void *p)
{
    const sl_block *b = p;
    if (b->mapped)
        munmap(p, block_bytes(b->slots));
    else
        free(p);
}

/* Free a replaced block, which a lockless reader may still be looking at: through
 * hooks.retire when set. */
static void retire(const sl_table *t, sl_block *b)
{
    if (t->hooks.retire)
        t->hooks.retire(t->hooks.ctx, b, block_free, block_bytes(b->slots));
    else
        block_free(b);
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

/* Distance of the entry at p from its home. */
static inline uint32_t dist_at(const sl_table *t, const view *v, uint32_t p)
{
    const sl_entry *e = &v->e[p];
    if (e->dist != SL_DIST_UNKNOWN)
        return e->dist;
    return distance(home_of(rehash(t, e), v->slots), p, v->slots);
}

/* The first empty position from p on. */
static inline uint32_t first_free(const uint8_t *ctl, uint32_t slots, uint32_t p)
{
    while (ctl[p])
        p = next_pos(p, slots);
    return p;
}

/* Move every entry of the current block into nb (fresh, private: plain stores), publish it,
 * retire the old one. Old positions are read in order and multiply-shift homes keep that
 * order, so both blocks are walked almost sequentially. Cursors keep their relative place. */
static void block_fill_locked(sl_shard *s, sl_block *nb)
{
    view o = view_of(s);
    uint32_t ns = nb->slots;
    sl_entry *ne = entries_of(nb, ns);
    for (uint32_t p = 0; p < o.slots; p++) {
        if (!(o.ctl[p]))
            continue;
        uint32_t home = home_of(rehash(s->t, &o.e[p]), ns), q = first_free(nb->ctl, ns, home);
        nb->ctl[q] = o.ctl[p];
        ne[q] = o.e[p];
        set_dist(&ne[q], distance(home, q, ns));
    }
    /* sl_table_prefetch may pair the old pointer with the new size (or the reverse): it only
     * forms an address for a prefetch, which cannot fault. sl_table_prefetch_entry takes the
     * size from the block it loaded. */
    atomic_store_explicit(&s->blk, nb, memory_order_release);
    atomic_store_explicit(&s->slots, ns, memory_order_relaxed);
    s->hand = o.slots ? (uint32_t)((uint64_t)s->hand * ns / o.slots) : 0;
    s->stride = 0; /* chosen at the first eviction: most blocks never evict */
    s->sweep = o.slots ? (uint32_t)((uint64_t)s->sweep * ns / o.slots) : 0;
    s->gen++;
    if (o.b != s->t->empty)
        retire(s->t, o.b);
}

/* Give the shard a block of ns positions (its entries moved in). 0 when it cannot be
 * allocated: then nothing changed. */
static int replace_locked(sl_shard *s, uint32_t ns)
{
    sl_block *nb = block_new(ns, s->t->map_blocks);
    if (nb)
        block_fill_locked(s, nb);
    return nb != NULL;
}

/* The size a block of S positions grows to so as to hold `need` entries (S if it does). */
static uint32_t size_for(uint32_t slots, size_t need)
{
    while (need > max_load(slots))
        slots = grow_size(slots);
    return slots;
}

/* After mass removal: shrink the block once its load falls below 1/8, so that a flood that
 * went away does not pin its memory. Failure to allocate just keeps the old one. */
static void shrink_locked(sl_shard *s)
{
    uint32_t slots = slots_of(s), n = count_of(s);
    if (slots <= SL_MIN_SLOTS || n >= slots / 8u)
        return;
    uint32_t ns = (2u * n + 7u) & ~7u;
    (void)replace_locked(s, ns < SL_MIN_SLOTS ? SL_MIN_SLOTS : ns);
}

/* Delete the entry at p: free its key copy, then backward-shift deletion: later members of
 * its probe run move towards their home into the hole, so that every key stays reachable
 * from its home without tombstones. (Entries keep their home: sliced visits go by home.) */
static void delete_at_locked(sl_shard *s, uint32_t p)
{
    view v = view_of(s);
    sl_entry *e = &v.e[p];
    if (e->flags & SL_ENTRY_LONGKEY) {
        s->keybytes -= e->key.ext.len;
        free(e->key.ext.ptr);
    }
    uint32_t i = p;
    for (uint32_t j = next_pos(p, v.slots); v.ctl[j]; j = next_pos(j, v.slots)) {
        uint32_t d = dist_at(s->t, &v, j), gap = distance(i, j, v.slots);
        /* The key at j may move to i when i lies on its probe path home..j. */
        if (d >= gap) {
            v.e[i] = v.e[j];
            set_dist(&v.e[i], d - gap);
            SL_STORE_SHARED(&v.ctl[i], v.ctl[j]);
            i = j;
        }
    }
    SL_STORE_SHARED(&v.ctl[i], (uint8_t)0);
    set_count(s, count_of(s) - 1);
    s->removals++;
}

/* Examine the entry at the sweep cursor (skipping at most SL_RECLAIM_SKIP empty positions);
 * reclaim it if it is idle and full. Returns 1 when reclaimed (the cursor then stays: the
 * entry moved into the hole is examined next). */
static int reclaim_one_locked(sl_shard *s, int64_t now)
{
    const sl_table_hooks *hk = &s->t->hooks;
    view v = view_of(s);
    uint32_t c = s->sweep < v.slots ? s->sweep : 0;
    for (unsigned k = 0; !(v.ctl[c]); k++) {
        c = next_pos(c, v.slots);
        if (k == SL_RECLAIM_SKIP) {
            s->sweep = c;
            return 0;
        }
    }
    sl_entry *e = &v.e[c];
    if (hk->full_at(hk->ctx, e) <= now) {
        if (hk->drop)
            hk->drop(hk->ctx, e, 0);
        delete_at_locked(s, c);
        s->sweep = c;
        return 1;
    }
    s->sweep = c + 1;
    return 0;
}

/* The inverse of k modulo n (n >= 2), by the extended Euclidean algorithm; 0 when k and n
 * are not coprime (then there is none). */
static uint32_t inverse_mod(uint32_t k, uint32_t n)
{
    int64_t r0 = n, r1 = k, t0 = 0, t1 = 1;
    while (r1) {
        int64_t q = r0 / r1, r = r0 - q * r1, t = t0 - q * t1;
        r0 = r1, r1 = r, t0 = t1, t1 = t;
    }
    if (r0 != 1)
        return 0;
    return (uint32_t)(t0 < 0 ? t0 + n : t0);
}

/* How good a stride k (inv = k^-1 mod n) is for the hand over n groups (see
 * evict_one_locked): the least of, for d = 1..16, the steps before the hand meets again a
 * group it just left, if a key there was shifted back d groups (d * -inv mod n), and how near
 * d steps bring the hand back to where it was (d * k mod n, either way round). */
static uint32_t stride_score(uint32_t k, uint32_t inv, uint32_t n)
{
    uint32_t back = n - inv, wait = 0, step = 0, worst = n;
    for (unsigned d = 1; d <= SL_HAND_SHIFT; d++) {
        wait += back;
        wait -= wait >= n ? n : 0;
        step += k;
        step -= step >= n ? n : 0;
        uint32_t near = step < n - step ? step : n - step;
        worst = wait < worst ? wait : worst;
        worst = near < worst ? near : worst;
    }
    return worst;
}

uint32_t sl_table_hand_stride(uint32_t n)
{
    if (n < 3)
        return 1;
    uint32_t c = (uint32_t)(((uint64_t)n * 2654435769u) >> 32) | 1u; /* ~0.618 n, odd */
    uint32_t lo = c > SL_HAND_TRIES ? c - SL_HAND_TRIES : 1, best = 1, score = 0;
    for (uint32_t k = lo | 1u; k < n && k <= c + SL_HAND_TRIES; k += 2) {
        uint32_t inv = inverse_mod(k, n);
        if (!inv)
            continue; /* not coprime with n: not a permutation */
        uint32_t v = stride_score(k, inv, n);
        if (v > score)
            best = k, score = v;
    }
    return best;
}

/* The position after h in the hand's order: the next one in h's group of 8 (S is a multiple
 * of 8), or the first of the group `stride` groups on, mod S/8. */
static inline uint32_t hand_next(uint32_t h, uint32_t stride, uint32_t groups)
{
    if ((h & 7u) != 7u)
        return h + 1u;
    uint32_t g = (h >> 3) + stride;
    return (g >= groups ? g - groups : g) << 3;
}

/* CLOCK: advance the hand, clearing reference bits, and evict the first entry without one.
 *
 * The hand's order is a permutation of the positions, so it passes each once per S steps: it
 * goes through a group of 8 positions, then jumps k groups on (mod S/8; k coprime with S/8,
 * about 0.618 of it). Going from each position to the next one would follow the backward
 * shift of its own deletions: the hole is filled from behind, the hand evicts at the front
 * of the run again, and one run travels with the hand, gathering the inserts whose homes it
 * covers (at a million keys each eviction then read ~650 positions). The jump leaves the run
 * behind. A key shifted back out of its group by deletions lands in a group that the hand
 * may reach sooner than a whole cycle after its last pass (so it can be evicted sooner);
 * groups keep that to the keys at a group's start, and k is chosen so that a key shifted
 * back up to 16 groups is not met again within n/32 groups, nor do 16 jumps come within n/32
 * groups of where they started (tests/unit/test_table.c checks both). Needs count >= 1. */
static void evict_one_locked(sl_shard *s)
{
    const sl_table_hooks *hk = &s->t->hooks;
    view v = view_of(s);
    uint32_t groups = v.slots / 8u;
    if (!s->stride)
        s->stride = sl_table_hand_stride(groups);
    uint32_t h = s->hand, k = s->stride; /* hand_next and re-scaling keep it below S */
    sl_entry *e;
    for (;; h = hand_next(h, k, groups)) {
        if (!(v.ctl[h]))
            continue;
        e = &v.e[h];
        if (!(e->flags & SL_ENTRY_REF))
            break;
        e->flags &= (uint8_t)~SL_ENTRY_REF;
    }
    if (hk->drop)
        hk->drop(hk->ctx, e, 1);
    delete_at_locked(s, h);
    s->hand = hand_next(h, k, groups);
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
    t->map_blocks = shards <= SL_MMAP_SHARDS;
    if (!(t->empty = block_new(0, false)))
        goto fail_table;
    t->shards = alloc_denied() ? NULL : aligned_alloc(64, shards * sizeof(sl_shard));
    if (!t->shards)
        goto fail_empty;
    memset(t->shards, 0, shards * sizeof(sl_shard));
    /* Shares add up to max_keys exactly: the first max_keys % shards shards take one more. */
    size_t base = max_keys / shards, extra = max_keys % shards;
    if (max_keys) {
        size_t cap = max_keys;
        if (base >= SL_MAX_ENTRIES)
            cap = (size_t)SL_MAX_ENTRIES * shards;
        t->capacity = cap;
    }
    for (unsigned i = 0; i < shards; i++) {
        sl_shard *s = &t->shards[i];
        atomic_init(&s->lock, 0);
        atomic_init(&s->blk, t->empty);
        atomic_init(&s->slots, 0);
        atomic_init(&s->count, 0);
        s->t = t;
        size_t share = max_keys ? base + (i < extra) : SL_MAX_ENTRIES;
        s->share = share > SL_MAX_ENTRIES ? SL_MAX_ENTRIES : (uint32_t)share;
    }
    return t;

fail_empty:
    block_free(t->empty);
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
        view v = view_of(s);
        for (uint32_t p = 0; p < v.slots; p++) {
            if (!(v.ctl[p]))
                continue;
            sl_entry *e = &v.e[p];
            if (t->hooks.drop)
                t->hooks.drop(t->hooks.ctx, e, 2);
            if (e->flags & SL_ENTRY_LONGKEY)
                free(e->key.ext.ptr);
        }
        /* No lockless reader may be left (see memory.h): free directly, not through retire. */
        if (v.b != t->empty)
            block_free(v.b);
    }
    block_free(t->empty);
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

/* The shard's lock line, the key's control byte and, with `entry`, the entry at its home. */
static inline void prefetch_home(sl_table *t, uint64_t hash, bool entry)
{
    sl_shard *s = &t->shards[hash >> t->shift & t->smask];
    __builtin_prefetch(&s->lock, 1, 3);
    uintptr_t b = (uintptr_t)atomic_load_explicit(&s->blk, memory_order_relaxed);
    uint32_t slots = atomic_load_explicit(&s->slots, memory_order_relaxed);
    uint32_t home = home_of(hash, slots);
    /* Integer arithmetic: the pair (b, slots) may be torn by a concurrent resize, and the
     * addresses are only ever prefetched, never dereferenced. */
    __builtin_prefetch((const void *)(b + offsetof(sl_block, ctl) + home), 0, 3);
    if (entry)
        __builtin_prefetch(
            (const void *)(b + entries_offset(slots) + (size_t)home * sizeof(sl_entry)), 1, 3);
}

void sl_table_prefetch(sl_table *t, uint64_t hash)
{
    prefetch_home(t, hash, false);
}

void sl_table_prefetch_home(sl_table *t, uint64_t hash)
{
    prefetch_home(t, hash, true);
}

/* Lockless, inside the caller's retire read section (memory.h). Every bound comes from the
 * header of the block just loaded; the control bytes read may be stale (a key just moved or
 * removed), which costs at most a useless prefetch. */
void sl_table_prefetch_entry(sl_table *t, uint64_t hash)
{
    sl_shard *s = &t->shards[hash >> t->shift & t->smask];
    sl_block *b = atomic_load_explicit(&s->blk, memory_order_acquire);
    uint32_t slots = b->slots;
    if (!slots)
        return;
    uint32_t p = home_of(hash, slots);
    uint8_t tag = tag_of(hash);
    for (unsigned k = 0;; k++) {
        uint8_t c = __atomic_load_n(&b->ctl[p], __ATOMIC_RELAXED);
        if (!c || k == SL_PREFETCH_SCAN)
            return;
        if (c == tag)
            break;
        p = next_pos(p, slots);
    }
    /* 48-byte entries straddle cache lines: fetch both ends (for writing: the decision
     * updates the state). */
    const char *e = (const char *)&entries_of(b, slots)[p];
    __builtin_prefetch(e, 1, 3);
    __builtin_prefetch(e + sizeof(sl_entry) - 1, 1, 3);
}

/* Position of the key's entry, or UINT32_MAX. */
static inline uint32_t find_pos_locked(const view *v, uint64_t hash, const void *key, size_t len)
{
    uint8_t tag = tag_of(hash);
    /* At most 7/8 full: an empty position ends every probe run. */
    for (uint32_t p = home_of(hash, v->slots);; p = next_pos(p, v->slots)) {
        uint8_t c = v->ctl[p];
        if (!c)
            return UINT32_MAX;
        if (c == tag && key_equal(&v->e[p], key, len))
            return p;
    }
}

sl_entry *sl_shard_find_locked(sl_shard *s, uint64_t hash, const void *key, size_t len)
{
    view v = view_of(s);
    uint32_t p = find_pos_locked(&v, hash, key, len);
    if (p == UINT32_MAX)
        return NULL;
    sl_entry *e = &v.e[p];
    if (!(e->flags & SL_ENTRY_REF))
        e->flags |= SL_ENTRY_REF;
    return e;
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
    uint32_t slots = slots_of(s), ns = size_for(slots, need);
    char *kcopy = NULL;
    if (len > SL_ENTRY_INLINE_KEY && !(kcopy = t_malloc(len)))
        goto fail;
    if (ns != slots && !replace_locked(s, ns))
        goto fail;
    /* Everything is in hand: from here on nothing fails. */

    /* Bounded housekeeping: reclaim idle full keys at the cursor, then make room. */
    if (s->t->hooks.full_at && now != SL_TABLE_NO_RECLAIM)
        for (unsigned i = 0; i < SL_HOUSEKEEP_PER_INSERT && count_of(s) > 0; i++)
            reclaim_one_locked(s, now);
    if (count_of(s) >= s->share)
        evict_one_locked(s);

    view v = view_of(s);
    uint32_t home = home_of(hash, v.slots), p = first_free(v.ctl, v.slots, home);
    e = &v.e[p];
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
    set_dist(e, distance(home, p, v.slots));
    SL_STORE_SHARED(&v.ctl[p], tag_of(hash));
    set_count(s, count_of(s) + 1);
    *created = 1;
    return e;

fail: /* nothing changed */
    free(kcopy);
    return NULL;
}

void sl_shard_remove_locked(sl_shard *s, sl_entry *e)
{
    view v = view_of(s);
    if (e < v.e || e >= v.e + v.slots || !(v.ctl[e - v.e]))
        abort(); /* not an entry of this shard */
    delete_at_locked(s, (uint32_t)(e - v.e));
    shrink_locked(s);
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
        /* A whole pass (charged the shard's count) starts after an empty position and goes
         * round to it: no probe run crosses it, so a removal at the cursor only moves entries
         * not yet examined down to the cursor, and each entry is examined once (unless
         * another thread changes the shard between two batches). Otherwise `budget` entries
         * from the cursor on. */
        bool whole = count_of(s) <= budget;
        uint32_t start = 0, wslots = 0;
        if (whole) {
            view v = view_of(s);
            uint32_t e0 = 0;
            while (v.ctl[e0])
                e0++;
            budget -= count_of(s);
            start = s->sweep = next_pos(e0, v.slots);
            wslots = v.slots;
        }
        for (unsigned batch = 0; count_of(s) > 0;) {
            view v = view_of(s);
            uint32_t c = s->sweep < v.slots ? s->sweep : 0;
            if (whole ? v.slots != wslots || distance(start, c, v.slots) == v.slots - 1
                      : budget == 0)
                break;
            if (!v.ctl[c]) {
                s->sweep = c + 1;
                continue;
            }
            s->sweep = c;
            reclaimed += (size_t)reclaim_one_locked(s, now);
            budget -= !whole;
            if (++batch == SL_SWEEP_BATCH) { /* let waiters in between batches */
                batch = 0;
                sl_shard_unlock(s);
                sl_shard_lock(s);
            }
        }
        shrink_locked(s);
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
    view v = view_of(s);
    for (uint32_t p = 0; p < v.slots && !rc; p++)
        if ((v.ctl[p]))
            rc = fn(ctx, &v.e[p]);
    sl_shard_unlock(s);
    return rc;
}

/* Home of the entry at p (from its stored distance, or its hash when that saturated). */
static inline uint32_t home_at(const sl_table *t, const view *v, uint32_t p)
{
    uint32_t d = dist_at(t, v, p);
    return p >= d ? p - d : p + v->slots - d;
}

int sl_table_visit_slice(sl_table *t, unsigned i, sl_slice *c, int first, uint32_t max,
                         int (*fn)(void *ctx, sl_entry *e), void *ctx, int *fnrc)
{
    sl_shard *s = &t->shards[i];
    int rc = 0;
    sl_shard_lock(s);
    view v = view_of(s);
    if (first) {
        *c = (sl_slice){.home = v.slots, .slots = v.slots, .gen = s->gen, .resume = UINT32_MAX};
    } else if (c->gen != s->gen) {
        /* A new block: homes below c->home held the hashes below h (the low 32 bits); in the
         * new block those have homes up to that of h - 1, which may also hold keys visited
         * already. */
        uint64_t h = c->slots ? (((uint64_t)c->home << 32) + c->slots - 1) / c->slots : 0;
        c->home = h ? home_of(h - 1, v.slots) + 1 : 0;
        c->slots = v.slots;
        c->gen = s->gen;
        c->resume = UINT32_MAX;
        c->repeats = 1;
    } else if (c->resume != UINT32_MAX && c->removals != s->removals) {
        /* Entries moved: the range again from its start, but only its upper half (at least
         * one home), so that removals between every two slices cannot stop the visit from
         * getting on (inserts move nothing: the visit just goes on). */
        c->lo = c->home - (c->home - c->lo + 1) / 2;
        c->resume = c->lo;
        c->repeats = 1;
    }
    /* One range of `max` homes [lo, c->home) per slice (fewer keys than that on average: the
     * block is at most 7/8 full): their keys lie from position lo on, up to the first empty
     * position at or after c->home - 1 (wrapping at the end). */
    if (c->home > 0) {
        if (c->resume == UINT32_MAX) {
            uint32_t k = max < 1 ? 1 : max;
            c->lo = c->home > k ? c->home - k : 0;
            c->resume = c->lo;
        }
        uint32_t p = c->resume, last = c->home - 1;
        /* (at most once round the block: a run may wrap back to lo) */
        for (uint32_t step = distance(c->lo, p, v.slots); step < v.slots; step++) {
            if (!v.ctl[p]) {
                if (step >= last - c->lo)
                    break; /* range done */
            } else {
                uint32_t h = home_at(t, &v, p);
                if (h >= c->lo && h <= last && (rc = fn(ctx, &v.e[p])) != 0)
                    break;
            }
            p = next_pos(p, v.slots);
        }
        if (rc != 0) { /* go on from p next time (this entry first), if nothing changes */
            c->resume = p;
            c->removals = s->removals;
        } else {
            c->home = c->lo;
            c->resume = UINT32_MAX;
        }
    }
    int st = c->home > 0 || rc < 0 ? SL_SLICE_MORE
             : c->repeats ? SL_SLICE_REPEATS : SL_SLICE_DONE;
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

void sl_table_reserve(sl_table *t, size_t keys)
{
    size_t each = keys / t->nshards;
    each = each > SIZE_MAX / 2 ? SIZE_MAX / 2 : each + each / 16 + 16;
    for (unsigned i = 0; i < t->nshards; i++) {
        sl_shard *s = &t->shards[i];
        sl_shard_lock(s);
        size_t want = count_of(s) + each;
        if (want > s->share)
            want = s->share;
        uint32_t slots = slots_of(s), ns = size_for(slots, want);
        if (ns != slots)
            (void)replace_locked(s, ns);
        sl_shard_unlock(s);
    }
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
    size_t b = sizeof *t + t->nshards * sizeof(sl_shard) + block_bytes(0);
    for (unsigned i = 0; i < t->nshards; i++) {
        sl_shard *s = &t->shards[i];
        sl_shard_lock(s);
        uint32_t slots = slots_of(s);
        b += (slots ? block_bytes(slots) : 0) + s->keybytes;
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
        view v = view_of(s);
        uint32_t n = count_of(s), used = 0;
        size_t keybytes = 0;
        if ((v.slots == 0) != (v.b == t->empty) ||
            (v.slots && (v.slots < SL_MIN_SLOTS || v.slots % 8u)) || n > max_load(v.slots))
            rc = 1; /* block size (a multiple of 8: the hand's groups) or load */
        else if (n > s->share)
            rc = 2; /* over the share */
        else if (v.ctl[v.slots] != 0)
            rc = 3; /* the padding after the last position is not empty */
        else if (v.b->slots != v.slots)
            rc = 11; /* the block header disagrees with the shard */
        for (uint32_t p = 0; p < v.slots && !rc; p++) {
            if (!(v.ctl[p]))
                continue;
            used++;
            sl_entry *e = &v.e[p];
            uint64_t h = rehash(t, e);
            uint32_t home = home_of(h, v.slots), d = distance(home, p, v.slots);
            if (tag_of(h) != v.ctl[p] || (h >> t->shift & t->smask) != i) {
                rc = 5; /* wrong tag or wrong shard */
                break;
            }
            if (e->dist != (d < SL_DIST_UNKNOWN ? d : SL_DIST_UNKNOWN)) {
                rc = 4; /* stored distance from home is wrong */
                break;
            }
            for (uint32_t q = home; q != p; q = next_pos(q, v.slots))
                if (!v.ctl[q]) {
                    rc = 6; /* unreachable from its home */
                    break;
                }
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
            if (!rc && sl_shard_find_locked(s, h, k, len) != e)
                rc = 9; /* find does not return the entry */
            e->flags = flags;
        }
        if (!rc && used != n)
            rc = 7; /* positions and count disagree */
        if (!rc && keybytes != s->keybytes)
            rc = 10;
        sl_shard_unlock(s);
    }
    return rc;
}
