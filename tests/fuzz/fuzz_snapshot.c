/*
 * fuzz_snapshot.c — loading bucket-state snapshots (src/lib/snapshot.c): a file in
 * --data-dir that may be damaged, truncated, or written by someone else.
 *
 * The input is loaded twice, each time into a fresh limiter: as it is, and with its trailer
 * (length and XXH64) rewritten to match, so that mutations inside the records get past the
 * checksum and reach the record parser and the state checks (sl_algo_state_valid).
 *
 * Checked for every input, whatever sl_snapshot_read returns:
 *  - it returns SL_OK, SL_ESNAPSHOT, SL_EVERSION or SL_ENOMEM;
 *  - the limiter stays usable: every key it holds (under a rule giving it the policy it was
 *    saved with, so that the algorithms start from the loaded state), and a fixed key, is
 *    peeked, taken at several times (now, later, the last valid ns, earlier than its state)
 *    and at several costs, its lease released, swept; decisions are consistent (allowed
 *    means no retry, remaining within the limit, no negative times);
 *  - whatever state that left, a snapshot of it is written and loads into another limiter;
 *  - sl_close frees everything (LeakSanitizer).
 */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "fuzz.h"
#include "limiter_int.h"
#include "memory.h"
#include "policy.h"
#include "sluice.h"

#define FUZZ_T0 INT64_C(1700000000000000000) /* the seeds' clock (make_seeds.c) */
#define LAST_NS ((INT64_C(1) << 62) - 1)     /* the last `now` the library takes */
#define MAX_KEYS 16                          /* keys exercised per limiter */
#define TRAILER 16

static int64_t fixed_clock(void *ctx)
{
    (void)ctx;
    return FUZZ_T0;
}

static sl_limiter *open_limiter(void)
{
    sl_options o;
    sl_options_init(&o);
    o.shards = 4;
    o.max_keys = 64; /* small: loading may evict */
    o.clock = fixed_clock;
    sl_limiter *l;
    FUZZ_CHECK(sl_open(&l, &o) == SL_OK);
    return l;
}

/* A memfd holding p[0..n), at offset 0. */
static int memfd_with(const void *p, size_t n)
{
    int fd = memfd_create("fuzz_snapshot", MFD_CLOEXEC);
    FUZZ_CHECK(fd >= 0);
    FUZZ_CHECK(n == 0 || write(fd, p, n) == (ssize_t)n);
    FUZZ_CHECK(lseek(fd, 0, SEEK_SET) == 0);
    return fd;
}

/* ---- the keys a limiter holds ---- */

typedef struct keys {
    int n;
    size_t len[MAX_KEYS];
    char enc[MAX_KEYS][SL_KEY_MAX];
    sl_policy policy[MAX_KEYS];
} keys;

static int collect(void *ctx, const char *key, size_t klen, const sl_policy *p,
                   const void *state, size_t ss)
{
    keys *k = ctx;
    (void)state, (void)ss;
    if (k->n == MAX_KEYS)
        return -1; /* enough */
    FUZZ_CHECK(klen <= SL_KEY_MAX);
    memcpy(k->enc[k->n], key, klen);
    k->policy[k->n] = *p;
    k->len[k->n++] = klen;
    return 0;
}

static void collect_keys(sl_limiter *l, keys *k)
{
    k->n = 0;
    for (unsigned s = 0; s < sl_limiter_nshards(l) && k->n < MAX_KEYS; s++) {
        sl_slice c;
        int fnrc = 0;
        for (int first = 1;; first = 0)
            if (sl_limiter_visit_slice(l, s, &c, first, 8, collect, k, &fnrc) !=
                    SL_SLICE_MORE ||
                fnrc)
                break;
    }
}

/* ---- using the limiter ---- */

static void check_decision(int rc, const sl_decision *d)
{
    FUZZ_CHECK(rc == SL_OK || rc == SL_ECOST || rc == SL_ENOMEM);
    if (rc != SL_OK)
        return;
    FUZZ_CHECK(d->limit_index < SL_MAX_LIMITS);
    if (d->algorithm == SL_BURST_RESERVE) /* the base's units and the reserve's (+1: d->reserve
                                             is a double, rounded) */
        FUZZ_CHECK(d->reserve >= 0 && d->remaining <= d->limit + (uint64_t)d->reserve + 1);
    else
        FUZZ_CHECK(d->remaining <= d->limit);
    FUZZ_CHECK(d->reset_after >= 0 && d->retry_after >= 0 && d->delay >= 0);
    FUZZ_CHECK(!d->allowed || d->retry_after == 0);
}

static void exercise_key(sl_limiter *l, const sl_key *k)
{
    static const int64_t times[] = {FUZZ_T0, FUZZ_T0 + 1000000000, LAST_NS, 0};
    sl_decision d;
    check_decision(sl_peek(l, k, FUZZ_T0, &d), &d);
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
        int rc = sl_take(l, k, 1, times[i], &d);
        check_decision(rc, &d);
        if (rc == SL_OK && d.lease)
            FUZZ_CHECK(sl_release(l, k, d.lease, times[i]) == SL_OK);
        if (rc == SL_OK)
            check_decision(sl_take(l, k, d.limit, times[i], &d), &d);
    }
    check_decision(sl_take(l, k, UINT64_MAX, FUZZ_T0, &d), &d);
    check_decision(sl_take(l, k, 0, FUZZ_T0, &d), &d);
}

static void exercise(sl_limiter *l)
{
    keys *k = malloc(sizeof *k);
    FUZZ_CHECK(k);
    collect_keys(l, k);
    for (int i = 0; i < k->n; i++) {
        sl_key key;
        sl_key_decode(k->enc[i], k->len[i], &key);
        /* a key is decided under the policy its rules give it now: give it the one it was
           saved with, so that the restored state is what the algorithms work on */
        FUZZ_CHECK(sl_rule_set(l, SL_SCOPE_CLIENT, &key, &k->policy[i]) == SL_OK);
        exercise_key(l, &key);
    }
    sl_key fixed = SL_KEY("acme", "login", "alice");
    exercise_key(l, &fixed);
    sl_sweep(l, FUZZ_T0, 64);
    sl_sweep(l, LAST_NS, 64);
    free(k);
}

/* Whatever state the limiter is in, its snapshot loads. */
static void round_trip(sl_limiter *l)
{
    int fd = memfd_create("fuzz_snapshot_out", MFD_CLOEXEC);
    FUZZ_CHECK(fd >= 0);
    FUZZ_CHECK(sl_snapshot_write(l, fd) == SL_OK);
    sl_snapshot_info wrote, read;
    FUZZ_CHECK(sl_snapshot_last(l, SL_SNAPSHOT_WRITE, &wrote) == SL_OK);
    FUZZ_CHECK(lseek(fd, 0, SEEK_SET) == 0);
    sl_limiter *l2 = open_limiter();
    FUZZ_CHECK(sl_snapshot_read(l2, fd) == SL_OK);
    FUZZ_CHECK(sl_snapshot_last(l2, SL_SNAPSHOT_READ, &read) == SL_OK);
    FUZZ_CHECK(read.keys == wrote.keys && read.bytes == wrote.bytes);
    sl_close(l2);
    close(fd);
}

static void load(const uint8_t *p, size_t n)
{
    sl_limiter *l = open_limiter();
    int fd = memfd_with(p, n);
    int rc = sl_snapshot_read(l, fd);
    close(fd);
    FUZZ_CHECK(rc == SL_OK || rc == SL_ESNAPSHOT || rc == SL_EVERSION || rc == SL_ENOMEM);
    exercise(l);
    round_trip(l);
    sl_close(l);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    load(data, size);
    if (size >= TRAILER) { /* again, with a trailer that matches */
        uint8_t *fixed = malloc(size);
        FUZZ_CHECK(fixed);
        memcpy(fixed, data, size);
        uint64_t total = size;
        memcpy(fixed + size - TRAILER, &total, 8); /* little-endian hosts only, as snapshot.c */
        uint64_t sum = XXH64(fixed, size - 8, 0);
        memcpy(fixed + size - 8, &sum, 8);
        load(fixed, size);
        free(fixed);
    }
    return 0;
}
