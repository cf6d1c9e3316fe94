/*
 * memory.h — the in-process store: a sharded concurrent hash table of keys -> state.
 *
 * Shards: a power of two, picked by the top bits of the key's 64-bit hash, each with its own
 * lock (held only around one lookup + one algorithm step). Inside a shard: one block of
 * open-addressing positions, a control byte each (8 bits of hash tag) followed by the 48-byte
 * entries themselves, so a lookup compares control bytes (small enough to stay in cache) and
 * then touches one entry: one cache miss for a key not in cache.
 *
 * Housekeeping is bounded on the decision path: each insert looks at most at a couple of
 * entries to reclaim idle full keys (hooks.full_at(e) <= now) and, when the shard is at its
 * share of max_keys, evicts with the CLOCK approximation of least-recently-used.
 *
 * Functions named *_locked require the shard lock. Entry pointers are valid only while it
 * is held, and only until the next upsert or remove on that shard (either may move entries).
 *
 * Two functions read without the lock. sl_table_prefetch only forms the address of the
 * key's control byte. sl_table_prefetch_entry reads the block's header and control bytes (it
 * never dereferences an entry), so the memory it reads must outlive it: the table hands every
 * block it replaces to hooks.retire, which frees it once no reader can still hold it (the
 * limiter retires through its epoch-based reclamation, and callers of
 * sl_table_prefetch_entry are inside sl_ebr_enter/leave). The lockless reads are C11
 * atomics, so ThreadSanitizer checks them.
 *
 * Every `hash` argument must be sl_table_hash(key, len): the table re-hashes stored keys when
 * it replaces a block (and when an entry's stored distance from home has saturated).
 */
#ifndef SL_MEMORY_H
#define SL_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#define SL_ENTRY_INLINE_KEY 24 /* keys up to this many bytes are stored in the entry */

enum {
    SL_ENTRY_HEAP = 1,    /* state[0] holds a pointer to a heap block owned by the entry */
    SL_ENTRY_REF = 2,     /* CLOCK reference bit: used since the hand last passed */
    SL_ENTRY_LONGKEY = 4  /* key.ext holds a heap copy of the key */
};

typedef struct sl_entry {
    uint64_t state[2]; /* algorithm state inline, or state[0] = (uintptr_t)heap block */
    uint32_t policy;   /* id of the compiled policy the state was written under; 0 = none */
    uint8_t flags;     /* SL_ENTRY_* */
    uint8_t klen;      /* inline key length when !SL_ENTRY_LONGKEY */
    uint16_t dist;     /* the table's: distance from the key's home position */
    union {
        char inl[SL_ENTRY_INLINE_KEY];
        struct {
            char *ptr;
            uint32_t len;
        } ext;
    } key;
} sl_entry; /* 48 bytes */

typedef struct sl_table_hooks {
    void *ctx;
    /* When the entry becomes indistinguishable from a new key (INT64_MAX: never). */
    int64_t (*full_at)(void *ctx, const sl_entry *e);
    /* The entry is leaving the table: free what its state owns. why: 0 reclaimed (idle and
     * full), 1 evicted by max_keys, 2 table being freed. Called with the shard lock held. */
    void (*drop)(void *ctx, sl_entry *e, int why);
    /* Call fn(p) once no thread can be inside a lockless read (sl_table_prefetch_entry) that
     * might have seen p; e.g. sl_ebr_retire_sized(ebr, p, fn, bytes). p (`bytes` long) is
     * already unreachable for new readers; its memory is fn's. The table retires every block
     * such a reader may touch (a shard's replaced block) and nothing else; sl_table_free
     * frees directly. Called with the shard lock held: must not call back into the table.
     * NULL: such blocks are freed at once, and sl_table_prefetch_entry must then not be
     * used (it could read freed memory whenever another thread changes the shard). */
    void (*retire)(void *ctx, void *p, void (*fn)(void *), size_t bytes);
} sl_table_hooks;

typedef struct sl_table sl_table;
typedef struct sl_shard sl_shard;

/* shards: power of two, at most 65536 (0 = 256). max_keys 0 = unbounded. With max_keys the
 * shard count is lowered so that each shard's share is at least 1; the shares add up to
 * max_keys exactly (floor(max_keys / shards), one more for the first max_keys % shards), so
 * the total never exceeds max_keys.
 * `hooks` is copied. NULL on out of memory or bad arguments. */
sl_table *sl_table_new(unsigned shards, size_t max_keys, const sl_table_hooks *hooks);
/* Calls hooks.drop(e, 2) for every entry, frees everything (directly, not through
 * hooks.retire: no thread may be using the table any more, lockless readers included). */
void sl_table_free(sl_table *t);

uint64_t sl_table_hash(const void *key, size_t len); /* XXH3 64 */

sl_shard *sl_table_shard(sl_table *t, uint64_t hash);
void sl_shard_lock(sl_shard *s);
void sl_shard_unlock(sl_shard *s);

/* Find a key; sets the CLOCK bit. NULL when absent. */
sl_entry *sl_shard_find_locked(sl_shard *s, uint64_t hash, const void *key, size_t len);
/* Find or insert. An existing entry gets its CLOCK bit set and *created = 0. A new entry is
 * zeroed except for its key (policy 0, flags 0 apart from SL_ENTRY_LONGKEY) and
 * *created = 1. Inserting may reclaim or evict other entries first (through the hooks); a
 * shard also never holds more than 2^24 - 1 entries, and at that size it evicts as if at
 * max_keys. NULL only when memory runs out or len > UINT32_MAX (nothing changed). */
sl_entry *sl_shard_upsert_locked(sl_shard *s, uint64_t hash, const void *key, size_t len,
                                 int64_t now, int *created);
/* `now` for an upsert that must not reclaim (a snapshot load: its states are not of the
 * caller's time base, whatever that is). */
#define SL_TABLE_NO_RECLAIM INT64_MIN
/* Remove an entry found under the same lock hold (does not call hooks.drop). */
void sl_shard_remove_locked(sl_shard *s, sl_entry *e);

/* Key bytes of an entry. */
static inline const char *sl_entry_key(const sl_entry *e, size_t *len)
{
    if (e->flags & SL_ENTRY_LONGKEY) {
        *len = e->key.ext.len;
        return e->key.ext.ptr;
    }
    *len = e->klen;
    return e->key.inl;
}

/* Start bringing the key's control byte (and shard) into cache. Needs no lock and no read
 * section; safe while other threads resize (it only computes an address). */
void sl_table_prefetch(sl_table *t, uint64_t hash);
/* The same, and the entry at the key's home position too: a guess (at 7/8 full a key is often
 * a few positions on), made when nothing else can overlap the wait for the control byte (a
 * single lookup), so that a key at or near its home costs one memory round trip, not two. */
void sl_table_prefetch_home(sl_table *t, uint64_t hash);

/* Second stage, some time after sl_table_prefetch(t, hash): read control bytes from the
 * key's home position on (at most 64, while they are non-empty) for one whose tag matches,
 * and start bringing that entry into cache. Answers nothing, changes nothing, never
 * dereferences an entry; the position it finds may be stale or belong to another key with
 * the same tag, which costs at most a useless prefetch. Needs no lock, but must be
 * called inside the read section that hooks.retire honours (sl_ebr_enter/leave for
 * sl_ebr_retire), and only on a table with a retire hook. */
void sl_table_prefetch_entry(sl_table *t, uint64_t hash);

/* Reclaim idle full keys, examining at most `budget` entries across shards (round robin).
 * Returns the number reclaimed. Takes each shard lock briefly. */
size_t sl_table_sweep(sl_table *t, int64_t now, size_t budget);

/* Visit every entry (for snapshots, tests). fn returns non-zero to stop. Each shard is
 * locked while it is visited. */
int sl_table_foreach(sl_table *t, int (*fn)(void *ctx, sl_entry *e), void *ctx);
/* The same for shard i only (0 <= i < sl_table_nshards): one lock hold. */
int sl_table_foreach_shard(sl_table *t, unsigned i, int (*fn)(void *ctx, sl_entry *e),
                           void *ctx);
unsigned sl_table_nshards(const sl_table *t);
/* Visit shard i a slice at a time, the keys of `max` home positions per lock hold (fewer than
 * max on average: a shard is at most 7/8 full; first: start afresh in *c). The visit goes
 * down the shard by home position. A key keeps its home until the shard gets a new block, and
 * moves only towards it, so removals and inserts between slices make no key visited twice or
 * missed. A new block (the shard grew or shrank) re-maps the cursor by hash: no key is
 * missed, some may be visited again. The last slice returns SL_SLICE_REPEATS instead of
 * SL_SLICE_DONE when that may have happened (or when fn ended a slice and the shard changed
 * before the next, so its range is visited again). Entries inserted after the first slice
 * may or may not be visited. fn returns 0 (visited: go on), > 0 (not visited: end this
 * slice; the entry comes first in the next one) or < 0 (stop; *fnrc holds it, and the shard
 * is not done). */
enum { SL_SLICE_DONE = 0, SL_SLICE_MORE = 1, SL_SLICE_REPEATS = 2 };
typedef struct sl_slice { /* the cursor: the table's, opaque to callers */
    uint32_t home;    /* homes below this one are still to visit... */
    uint32_t slots;   /* ...in a block of this many positions */
    uint32_t gen;     /* the shard's block generation at the last slice */
    uint32_t lo;      /* the range being visited: homes [lo, home) */
    uint32_t resume;  /* where fn ended the last slice in that range (UINT32_MAX: none) */
    uint32_t removals; /* the shard's removal count then */
    uint32_t repeats; /* some entry may have been visited twice */
} sl_slice;
int sl_table_visit_slice(sl_table *t, unsigned i, sl_slice *c, int first, uint32_t max,
                         int (*fn)(void *ctx, sl_entry *e), void *ctx, int *fnrc);

/* Make room for `keys` more keys spread evenly over the shards (6% more per shard, and 16,
 * for the unevenness of hashing), so that inserting them does not grow a block: keys that
 * come in hash order (a snapshot's) would otherwise crowd the homes of a block sized for
 * fewer, in long probe runs. Never beyond a shard's share of max_keys. A block that cannot
 * be allocated is left as it was (the inserts then grow it, or fail, as usual). Keys that
 * turn out to be present already were reserved for all the same: a snapshot loaded into a
 * limiter that holds its keys leaves blocks about twice the size they need. */
void sl_table_reserve(sl_table *t, size_t keys);

size_t sl_table_count(sl_table *t);       /* keys held (racy sum, exact when quiescent) */
size_t sl_table_bytes(sl_table *t);       /* bytes of memory the table holds (locks each shard) */
size_t sl_table_capacity(sl_table *t);    /* the enforced bound (0 = unbounded) */

/* ---- test hooks ---- */

/* The CLOCK hand's jump, in groups of 8 positions, for a block of n such groups: coprime with
 * n, near 0.618 n, chosen so that a key shifted back by deletions soon after the hand passed
 * it is not met again soon (memory.c, evict_one_locked). */
uint32_t sl_table_hand_stride(uint32_t n);

/* Replace the hash the table uses when it re-hashes stored keys (block replaced, removal).
 * Callers must then pass hashes from the same function. Set before the first insert. Lets
 * tests force tag, home-slot and full 64-bit collisions. */
void sl_table_set_hash_fn(sl_table *t, uint64_t (*fn)(const void *key, size_t len));
/* Verify every invariant of every shard (block size and load, reachability from home,
 * tags, shard choice, stored distances, count and key-byte accounting). 0 when all hold, else a code > 0 naming
 * the first broken one. Locks each shard in turn; leaves CLOCK bits as they were. */
int sl_table_check(sl_table *t);
/* Process-wide allocation failure injection for this module: after `n` more successful
 * allocations every allocation fails; n < 0 turns it off (the default). */
void sl_table_fail_allocs_after(long n);

#endif
