/*
 * ebr.c — epoch-based reclamation (see ebr.h).
 *
 * One process-wide epoch counter and one record per thread that ever read. A reader stores
 * the epoch it saw in its record (seq_cst) before touching shared memory and clears it when
 * done. A writer retires an object at epoch E and bumps the epoch; the object may be freed
 * once every record is either idle (0) or shows an epoch > E: such a reader entered after
 * the bump, hence after the unlink, and cannot see the object.
 *
 * Records outlive their threads (a pthread key destructor marks them free for reuse), so a
 * writer's scan never races with a free. Retire lists belong to a domain (one per limiter).
 *
 * Asymmetric fences. The reader's store must be ordered before its reads of shared memory:
 * a full fence (a locked instruction on x86, ~12 ns, 15% of a hot-key decision). Where
 * the kernel has membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) (Linux >= 4.16), readers
 * store with a plain (relaxed) store and only a compiler barrier, and the rare writer that
 * is about to free something calls membarrier before it scans the records: every thread of
 * the process then executes a full barrier at some point X. If X came after a reader's
 * store, the scan sees the store; if before, the reader's reads after X see the unlink, so
 * it cannot reach the object. (The user-space RCU "memb" flavour rests on the same
 * argument.) A reader whose epoch load saw the writer's bump reads after the unlink anyway:
 * that load is an acquire. Without membarrier, readers store and fence. If the kernel starts
 * refusing the barrier later (a seccomp filter installed after the first limiter was opened;
 * ENOMEM), nothing is freed while it does: memory is kept, never freed early.
 *
 * fork: a child may go on using a domain only if no other thread of the parent was inside a
 * read section or a retire at the fork (the same holds for every lock in the library).
 */
#include "ebr.h"

#include <linux/membarrier.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Retired blocks before a retire scans the list (and, with membarrier, may fence every
 * thread: ~1-16 us here, possibly under the caller's lock). */
#define EBR_COLLECT_MIN 64
#define EBR_COLLECT_MIN_BYTES ((size_t)1 << 20)

typedef struct rec {
    _Atomic uint64_t active; /* 0 = not reading, else the epoch seen at entry */
    _Atomic int in_use;
    unsigned nest;           /* touched only by the owning thread */
    struct rec *next;        /* immutable once published */
    char pad[64 - 2 * sizeof(uint64_t) - sizeof(void *)];
} rec;
_Static_assert(sizeof(rec) == 64, "a record is one cache line");

static _Atomic uint64_t g_epoch = 1;
static int g_asym; /* readers store relaxed, writers call membarrier; set in ebr_init */
static _Atomic(rec *) g_recs;
static pthread_mutex_t g_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t g_key;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static _Thread_local rec *t_rec;

typedef struct retired {
    void *p;
    void (*fn)(void *);
    uint64_t epoch;
    size_t bytes;
    struct retired *next;
} retired;

struct sl_ebr {
    pthread_mutex_t lock;
    retired *head;
    size_t count;
    size_t collect_at; /* retire collects when count reaches this: amortised O(1) per retire */
    size_t bytes;      /* sizes given to sl_ebr_retire_sized, of what is waiting */
    size_t bytes_at;   /* ... and when bytes reach this */
};

static void thread_gone(void *arg)
{
    rec *r = arg;
    atomic_store(&r->active, 0);
    atomic_store(&r->in_use, 0);
    /* Another thread may take the record over now: a later destructor of this thread that
     * reads must register again, not share it. */
    t_rec = NULL;
}

#if defined(__NR_membarrier) && !defined(SL_EBR_FENCE_ONLY) /* the latter: for a test */
static long membarrier(int cmd) { return syscall(__NR_membarrier, cmd, 0, 0); }
#else
static long membarrier(int cmd) { (void)cmd; return -1; } /* readers fence */
#endif

static void init_once(void)
{
    (void)pthread_key_create(&g_key, thread_gone);
    long cmds = membarrier(MEMBARRIER_CMD_QUERY);
    g_asym = cmds > 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
             membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
}

/* Every reader (register_thread) and every domain (sl_ebr_new) passes here first, so g_asym
 * is settled before anyone reads it. */
static void ebr_init(void) { pthread_once(&g_once, init_once); }

static rec *register_thread(void)
{
    ebr_init();
    rec *r;
    pthread_mutex_lock(&g_reg_lock);
    for (r = atomic_load(&g_recs); r; r = r->next)
        if (!atomic_load(&r->in_use))
            break;
    if (!r) {
        /* A line of its own: two threads' records must not share the line both write. */
        r = aligned_alloc(64, sizeof *r);
        if (!r) {
            pthread_mutex_unlock(&g_reg_lock);
            return NULL;
        }
        memset(r, 0, sizeof *r);
        r->next = atomic_load(&g_recs);
        atomic_store(&r->in_use, 1);
        atomic_store(&g_recs, r);
    } else {
        atomic_store(&r->in_use, 1);
    }
    pthread_mutex_unlock(&g_reg_lock);
    r->nest = 0;
    (void)pthread_setspecific(g_key, r);
    t_rec = r;
    return r;
}

sl_ebr *sl_ebr_new(void)
{
    ebr_init();
    sl_ebr *d = calloc(1, sizeof *d);
    if (d && pthread_mutex_init(&d->lock, NULL) != 0) {
        free(d);
        return NULL;
    }
    return d;
}

void sl_ebr_free(sl_ebr *d)
{
    if (!d)
        return;
    for (retired *x = d->head, *n; x; x = n) {
        n = x->next;
        x->fn(x->p);
        free(x);
    }
    pthread_mutex_destroy(&d->lock);
    free(d);
}

int sl_ebr_enter(sl_ebr *d)
{
    (void)d;
    rec *r = t_rec;
    if (!r && !(r = register_thread()))
        return -1;
    if (r->nest++ == 0) {
        uint64_t e = atomic_load_explicit(&g_epoch, memory_order_acquire);
        atomic_store_explicit(&r->active, e, memory_order_relaxed);
        /* Order the store before this section's reads: membarrier makes the compiler
         * barrier a fence; without it, a fence (a seq_cst store alone would not order later
         * acquire loads: C11, AArch64's ldapr). */
        if (g_asym)
            atomic_signal_fence(memory_order_seq_cst);
        else
            atomic_thread_fence(memory_order_seq_cst);
    }
    return 0;
}

void sl_ebr_leave(sl_ebr *d)
{
    (void)d;
    rec *r = t_rec;
    if (--r->nest == 0)
        atomic_store_explicit(&r->active, 0, memory_order_release);
}

/* Smallest epoch any reader is in; UINT64_MAX when none is reading. */
static uint64_t oldest_reader(void)
{
    uint64_t min = UINT64_MAX;
    for (rec *r = atomic_load(&g_recs); r; r = r->next) {
        uint64_t a = atomic_load(&r->active);
        if (a && a < min)
            min = a;
    }
    return min;
}

/* A full barrier in every thread of the process; 0, or -1 when the kernel refuses. */
static int fence_all(void)
{
    if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0)
        return 0;
    /* refused (EPERM) in a forked child on kernels that do not carry the registration over
     * fork: register this address space and try again */
    return membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 &&
                   membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
               ? 0
               : -1;
}

static int any_before(const sl_ebr *d, uint64_t epoch)
{
    for (const retired *x = d->head; x; x = x->next)
        if (x->epoch < epoch)
            return 1;
    return 0;
}

static size_t collect_locked(sl_ebr *d)
{
    atomic_thread_fence(memory_order_seq_cst); /* pairs with the readers' fence (no membarrier) */
    uint64_t oldest = oldest_reader();
    if (g_asym) {
        /* Without the barrier a reader's store may not show yet: the scan may only say what
         * cannot be freed. When something might be, fence every thread and scan again. */
        if (!any_before(d, oldest))
            return d->count;
        if (fence_all() != 0)
            return d->count; /* cannot trust the scan: free later */
        oldest = oldest_reader();
    }
    retired **pp = &d->head;
    while (*pp) {
        retired *x = *pp;
        if (x->epoch < oldest) {
            *pp = x->next;
            x->fn(x->p);
            d->count--;
            d->bytes -= x->bytes;
            free(x);
        } else {
            pp = &x->next;
        }
    }
    return d->count;
}

/* After a scan: the next one once what is left has doubled, in number or in bytes. */
static void set_thresholds_locked(sl_ebr *d)
{
    d->collect_at = d->count * 2 > EBR_COLLECT_MIN ? d->count * 2 : EBR_COLLECT_MIN;
    d->bytes_at = d->bytes * 2 > EBR_COLLECT_MIN_BYTES ? d->bytes * 2 : EBR_COLLECT_MIN_BYTES;
}

void sl_ebr_retire(sl_ebr *d, void *p, void (*fn)(void *))
{
    sl_ebr_retire_sized(d, p, fn, 0);
}

void sl_ebr_retire_sized(sl_ebr *d, void *p, void (*fn)(void *), size_t bytes)
{
    retired *x = malloc(sizeof *x);
    uint64_t e = atomic_fetch_add(&g_epoch, 1);
    if (!x)
        return; /* out of memory for the bookkeeping: leaking `p` is safe, freeing is not */
    x->p = p;
    x->fn = fn;
    x->epoch = e;
    x->bytes = bytes;
    pthread_mutex_lock(&d->lock);
    x->next = d->head;
    d->head = x;
    d->count++;
    d->bytes += bytes;
    /* A scan is O(count): scanning on every retire made a burst of n retires inside a read
     * section (nothing freeable) cost O(n^2). Scan when the list (or its bytes) has doubled
     * instead. */
    if (d->count >= d->collect_at || d->bytes >= d->bytes_at) {
        collect_locked(d);
        set_thresholds_locked(d);
    }
    pthread_mutex_unlock(&d->lock);
}

size_t sl_ebr_collect(sl_ebr *d)
{
    pthread_mutex_lock(&d->lock);
    size_t n = collect_locked(d);
    set_thresholds_locked(d);
    pthread_mutex_unlock(&d->lock);
    return n;
}
