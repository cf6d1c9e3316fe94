/*
 * snapshot.c — bucket-state snapshots (see sluice.h).
 *
 * Format (little-endian, fixed width, no padding; docs/design.md "Snapshots"):
 *
 *   header   "SLUICESN" | u32 version (1) | u32 flags (0) | i64 wall ns written | u64 0
 *   record   u16 key length | key bytes (the limiter's key encoding) |
 *            u8 limits | limits x (u8 algorithm, f64 limit, rate, window, reserve_cap) |
 *            u32 state length | state bytes
 *   trailer  u64 total length of the file | u64 XXH64 (seed 0) of every byte before it
 *
 * Every later version keeps the magic, the version's place and the trailer, so that a reader
 * can tell a whole file of a newer version (SL_EVERSION) from a damaged one (SL_ESNAPSHOT).
 * Records are self-delimiting and streamed as shards are copied, so the header holds no
 * record count (it is not known until the end). Reading checks the length, the checksum and
 * every record before anything is applied.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* libxxhash's XXH64, called (not inlined: a snapshot is not a hot path); the state struct
 * is declared on the stack. */
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "algo.h"
#include "inject.h"
#include "limiter_int.h"
#include "memory.h"
#include "mono.h"
#include "policy.h"
#include "snapshot_int.h"

/* State bytes are the algorithms' layouts (algo.c) as they are in memory: fixed-width fields,
 * no padding, and little-endian only because the host is. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "snapshots store algorithm state as in memory: a big-endian host needs byte swaps here"
#endif

#define MAGIC "SLUICESN"
#define VERSION 1u
#define HEADER 32
#define TRAILER 16
#define OUTBUF (1u << 20)       /* output buffer: writes go out in pieces of this size */
#define LIMIT_BYTES 33
#define MAX_STATE (1u << 24)    /* a record's state: larger is corrupt (the largest, four
                                   concurrency limits of 100,000, is under 10 MB) */
#define SLICE_KEYS 32           /* keys copied per shard lock hold ... */
#define SLICE_BYTES (16u << 10) /* ... or bytes, whichever comes first */

/* ---- little-endian fields ---- */

/* The low n bytes of v, little-endian (the host's order: see above). */
static inline void put(unsigned char *p, uint64_t v, int n)
{
    memcpy(p, &v, (size_t)n);
}

static inline uint64_t get(const unsigned char *p, int n)
{
    uint64_t v = 0;
    memcpy(&v, p, (size_t)n);
    return v;
}

static uint64_t dbits(double d)
{
    uint64_t v;
    memcpy(&v, &d, 8);
    return v;
}

static double bitsd(uint64_t v)
{
    double d;
    memcpy(&d, &v, 8);
    return d;
}

/* ---- writing ---- */

static _Atomic long g_fail_writes = -1;

void sl_snapshot_fail_writes_after(long n)
{
    atomic_store(&g_fail_writes, n);
}

static int write_denied(void)
{
    return sl_inject_fails(&g_fail_writes);
}

static int64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * SL_SECOND + ts.tv_nsec;
}

typedef struct writer {
    int fd;
    unsigned char *buf; /* output, OUTBUF bytes */
    size_t len;
    XXH64_state_t h;
    uint64_t total;
    int err;            /* errno of a failed write */
    char *slice;        /* one slice's records, encoded under the shard lock */
    size_t slen, scap;
    size_t need;        /* a record that did not fit in `slice`: its size */
    uint64_t keys;
} writer;

static int flush_out(writer *w)
{
    size_t off = 0;
    while (off < w->len) {
        ssize_t n;
        if (write_denied())
            n = -1, errno = ENOSPC;
        else
            n = write(w->fd, w->buf + off, w->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            w->err = n < 0 ? errno : EIO;
            return -1;
        }
        off += (size_t)n;
    }
    w->len = 0;
    return 0;
}

static int emit(writer *w, const void *p, size_t n, int hashed)
{
    if (hashed)
        XXH64_update(&w->h, p, n);
    w->total += n;
    while (n) {
        size_t k = OUTBUF - w->len < n ? OUTBUF - w->len : n;
        memcpy(w->buf + w->len, p, k);
        w->len += k;
        p = (const char *)p + k;
        n -= k;
        if (w->len == OUTBUF && flush_out(w) != 0)
            return -1;
    }
    return 0;
}

/* Under the shard lock: append one record, encoded, to the slice. Returns 1 (not copied: end
 * the slice) when the slice has its SLICE_BYTES or the record does not fit; no allocation
 * happens under the lock. */
static int copy_key(void *ctx, const char *key, size_t klen, const sl_policy *p,
                    const void *state, size_t ss)
{
    writer *w = ctx;
    size_t need = 2 + klen + 1 + p->nlimits * LIMIT_BYTES + 4 + ss;
    if (w->slen >= SLICE_BYTES)
        return 1;
    if (w->scap - w->slen < need) {
        w->need = need;
        return 1;
    }
    unsigned char *o = (unsigned char *)w->slice + w->slen;
    put(o, klen, 2), o += 2;
    memcpy(o, key, klen), o += klen;
    *o++ = (unsigned char)p->nlimits;
    for (unsigned i = 0; i < p->nlimits; i++) {
        const sl_limit *l = &p->limits[i];
        *o++ = (unsigned char)l->algorithm;
        put(o, dbits(l->limit), 8), o += 8;
        put(o, dbits(l->rate), 8), o += 8;
        put(o, dbits(l->window), 8), o += 8;
        put(o, dbits(l->reserve_cap), 8), o += 8;
    }
    put(o, ss, 4), o += 4;
    memcpy(o, state, ss);
    w->slen += need;
    w->keys++;
    return 0;
}

/* Copy one shard a slice at a time (SLICE_KEYS keys or SLICE_BYTES, one lock hold each) and
 * write each slice out before taking the lock again. The shard is scanned by home position,
 * which concurrent removals and inserts cannot make skip an entry (memory.h). A slice that
 * stopped because a record did not fit is followed by a larger buffer, allocated outside the
 * lock. */
static int copy_shard(sl_limiter *l, unsigned i, writer *w)
{
    sl_slice c;
    int fnrc;
    for (int first = 1;; first = 0) {
        if (w->need > w->scap) {
            char *n = realloc(w->slice, w->need);
            if (!n)
                return SL_ENOMEM;
            memset(n, 0, w->need); /* fault its pages in now, not under the lock */
            w->slice = n;
            w->scap = w->need;
        }
        w->slen = w->need = 0;
        int st = sl_limiter_visit_slice(l, i, &c, first, SLICE_KEYS, copy_key, w,
                                        &fnrc);
        if (fnrc)
            return fnrc;
        if (emit(w, w->slice, w->slen, 1) != 0)
            return SL_EIO;
        if (st != SL_SLICE_MORE)
            return SL_OK;
    }
}

/* Write a snapshot to fd; on success fill keys, bytes and written_at. */
static int write_fd(sl_limiter *l, int fd, sl_snapshot_info *info)
{
    writer w = {.fd = fd, .scap = 2 * SLICE_BYTES};
    w.buf = malloc(OUTBUF);
    w.slice = malloc(w.scap);
    if (!w.buf || !w.slice) {
        free(w.buf);
        free(w.slice);
        return SL_ENOMEM;
    }
    memset(w.slice, 0, w.scap); /* fault its pages in now, not under a shard lock */
    XXH64_reset(&w.h, 0);
    unsigned char h[HEADER];
    int64_t at = wall_ns();
    memcpy(h, MAGIC, 8);
    put(h + 8, VERSION, 4);
    put(h + 12, 0, 4);
    put(h + 16, (uint64_t)at, 8);
    put(h + 24, 0, 8); /* reserved */
    int rc = emit(&w, h, HEADER, 1) == 0 ? SL_OK : SL_EIO;
    for (unsigned i = 0; rc == SL_OK && i < sl_limiter_nshards(l); i++)
        rc = copy_shard(l, i, &w);
    if (rc == SL_OK) {
        unsigned char t[TRAILER];
        put(t, w.total + TRAILER, 8);
        XXH64_update(&w.h, t, 8);
        put(t + 8, XXH64_digest(&w.h), 8);
        if (emit(&w, t, TRAILER, 0) != 0 || flush_out(&w) != 0)
            rc = SL_EIO;
    }
    free(w.buf);
    free(w.slice);
    if (rc == SL_EIO)
        errno = w.err;
    info->keys = w.keys;
    info->bytes = w.total;
    info->written_at = at;
    return rc;
}

int sl_snapshot_write(sl_limiter *l, int fd)
{
    if (!l || fd < 0)
        return SL_EINVAL;
    int64_t t0 = sl_mono_ns();
    sl_snapshot_info info;
    int rc = write_fd(l, fd, &info);
    if (rc == SL_OK) {
        info.duration = sl_mono_ns() - t0;
        sl_limiter_snapshot_note(l, SL_SNAPSHOT_WRITE, &info);
    }
    return rc;
}

int sl_snapshot_save(sl_limiter *l, const char *path)
{
    static _Atomic unsigned long g_seq;
    if (!l || !path)
        return SL_EINVAL;
    int64_t t0 = sl_mono_ns();
    size_t n = strlen(path);
    char *tmp = malloc(n + 48), *dir = malloc(n + 2);
    if (!tmp || !dir) {
        free(tmp);
        free(dir);
        return SL_ENOMEM;
    }
    /* unique per process and call (concurrent saves never share a temp file), and with the
     * time, so that a leftover of an earlier process with the same pid (pid 1 in a container)
     * is never in the way */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(tmp, n + 48, "%s.tmp.%ld.%lu.%lx", path, (long)getpid(),
             atomic_fetch_add(&g_seq, 1), (unsigned long)ts.tv_nsec);
    memcpy(dir, path, n + 1);
    char *slash = strrchr(dir, '/');
    if (slash)
        slash == dir ? (void)(slash[1] = 0) : (void)(*slash = 0);
    else
        memcpy(dir, ".", 2);
    sl_snapshot_info info;
    int rc = SL_EIO, e = 0;
    /* the directory first: one that cannot be opened fails before the file is replaced */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fd = dfd < 0 ? -1 : open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        e = errno;
    } else {
        rc = write_fd(l, fd, &info);
        e = errno;
        if (rc == SL_OK && fsync(fd) != 0)
            rc = SL_EIO, e = errno;
        if (close(fd) != 0 && rc == SL_OK)
            rc = SL_EIO, e = errno;
        if (rc == SL_OK && rename(tmp, path) != 0)
            rc = SL_EIO, e = errno;
        if (rc != SL_OK)
            unlink(tmp);
    }
    if (rc == SL_OK && fsync(dfd) != 0) /* renamed: the new snapshot is in place, but its */
        rc = SL_EIO, e = errno;          /* directory entry may not survive a crash */
    if (dfd >= 0)
        close(dfd);
    free(tmp);
    free(dir);
    if (rc == SL_OK) {
        info.duration = sl_mono_ns() - t0;
        sl_limiter_snapshot_note(l, SL_SNAPSHOT_WRITE, &info);
    }
    errno = e;
    return rc;
}

/* ---- reading ---- */

/* Is this the limiter's encoding of a key sl_take could have made? (Lengths within bounds,
 * a client, "default" already normalised to "".) */
static int key_ok(const unsigned char *k, size_t klen)
{
    if (klen < 3)
        return 0;
    size_t tl = k[0], al = k[1];
    if (2 + tl + al >= klen || klen - 2 - tl - al > SL_MAX_ID_LEN)
        return 0;
    return !(tl == 7 && memcmp(k + 2, "default", 7) == 0) &&
           !(al == 7 && memcmp(k + 2 + tl, "default", 7) == 0);
}

/* Does a record's state fit its policy? Checked on an aligned copy (`scratch`, grown as
 * needed: the image's states are at any offset). */
static int state_ok(const sl_cpolicy *cp, const unsigned char *state, size_t ss,
                    uint64_t **scratch, size_t *cap)
{
    if (ss > *cap) {
        uint64_t *n = realloc(*scratch, ss);
        if (!n)
            return SL_ENOMEM;
        *scratch = n;
        *cap = ss;
    }
    memcpy(*scratch, state, ss);
    uint64_t lease = 0;
    for (unsigned k = 0; k < cp->nlimits; k++)
        if (!sl_algo_state_valid(&cp->lim[k], (char *)*scratch + cp->offs[k], &lease))
            return SL_ESNAPSHOT;
    return SL_OK;
}

/* Parse every record of a verified image; check each (apply 0) or restore each (apply 1). */
static int records(sl_limiter *l, const unsigned char *p, size_t n, int apply, uint64_t *count)
{
    size_t i = HEADER, end = n - TRAILER, cap = 0;
    const unsigned char *prev = NULL; /* the last policy compiled: runs of one policy are usual */
    size_t prevlen = 0;
    sl_cpolicy cp;
    uint64_t *scratch = NULL;
    int rc = SL_OK;
    *count = 0;
    while (rc == SL_OK && i < end) {
        rc = SL_ESNAPSHOT;
        if (end - i < 3)
            break;
        size_t klen = (size_t)get(p + i, 2);
        i += 2;
        if (klen > SL_KEY_MAX || end - i < klen + 1 || !key_ok(p + i, klen))
            break;
        const char *key = (const char *)p + i;
        i += klen;
        const unsigned char *praw = p + i;
        sl_policy pol;
        memset(&pol, 0, sizeof pol);
        pol.nlimits = p[i++];
        size_t plen = 1 + pol.nlimits * LIMIT_BYTES;
        if (pol.nlimits < 1 || pol.nlimits > SL_MAX_LIMITS || end - i < plen - 1 + 4)
            break;
        for (unsigned k = 0; k < pol.nlimits; k++) {
            sl_limit *x = &pol.limits[k];
            x->algorithm = (sl_algorithm)p[i];
            x->limit = bitsd(get(p + i + 1, 8));
            x->rate = bitsd(get(p + i + 9, 8));
            x->window = bitsd(get(p + i + 17, 8));
            x->reserve_cap = bitsd(get(p + i + 25, 8));
            i += LIMIT_BYTES;
        }
        size_t ss = (size_t)get(p + i, 4);
        i += 4;
        if (ss > MAX_STATE || end - i < ss)
            break;
        if (!apply) {
            if (!prev || plen != prevlen || memcmp(praw, prev, plen) != 0) {
                sl_policy norm;
                if (sl_policy_compile(&pol, &norm, &cp) != SL_OK)
                    break;
                prev = praw;
                prevlen = plen;
            }
            if (cp.state_size != ss)
                break;
            rc = state_ok(&cp, p + i, ss, &scratch, &cap);
        } else {
            rc = sl_limiter_restore(l, key, klen, &pol, p + i, ss);
        }
        i += ss;
        ++*count;
    }
    free(scratch);
    if (rc == SL_OK && i != end)
        rc = SL_ESNAPSHOT;
    return rc;
}

static int verify(const unsigned char *p, size_t n)
{
    if (n < 8 || memcmp(p, MAGIC, 8) != 0)
        return SL_ESNAPSHOT;
    if (n < HEADER + TRAILER || get(p + n - TRAILER, 8) != n ||
        XXH64(p, n - 8, 0) != get(p + n - 8, 8))
        return SL_ESNAPSHOT;
    /* whole and checksummed: a version or flags this reader does not know are newer */
    uint64_t version = get(p + 8, 4), flags = get(p + 12, 4);
    if (version > VERSION || (version == VERSION && flags != 0))
        return SL_EVERSION;
    return version == VERSION ? SL_OK : SL_ESNAPSHOT;
}

/* Read fd to its end into *out (malloc'd). A regular file is read into one buffer of its
 * size (one more byte to see the end); anything else grows by doubling. */
static int read_all(int fd, unsigned char **out, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        off_t at = lseek(fd, 0, SEEK_CUR);
        if (at >= 0 && st.st_size >= at && (uint64_t)(st.st_size - at) < SIZE_MAX)
            cap = (size_t)(st.st_size - at) + 1;
    }
    unsigned char *p = malloc(cap);
    if (!p)
        return SL_ENOMEM;
    for (;;) {
        if (n == cap) {
            unsigned char *q = cap <= SIZE_MAX / 2 ? realloc(p, cap * 2) : NULL;
            if (!q) {
                free(p);
                return SL_ENOMEM;
            }
            p = q;
            cap *= 2;
        }
        ssize_t r = read(fd, p + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            free(p);
            errno = e;
            return SL_EIO;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    *out = p;
    *len = n;
    return SL_OK;
}

int sl_snapshot_read(sl_limiter *l, int fd)
{
    if (!l || fd < 0)
        return SL_EINVAL;
    int64_t t0 = sl_mono_ns();
    unsigned char *p;
    size_t n;
    int rc = read_all(fd, &p, &n);
    if (rc != SL_OK)
        return rc;
    uint64_t keys = 0;
    rc = verify(p, n);
    if (rc == SL_OK)
        rc = records(l, p, n, 0, &keys); /* every record checked before any is applied */
    if (rc == SL_OK) {
        sl_limiter_reserve(l, keys); /* records come in hash order: see sl_table_reserve */
        rc = records(l, p, n, 1, &keys);
    }
    if (rc == SL_OK) {
        sl_snapshot_info info = {keys, n, (int64_t)get(p + 16, 8), sl_mono_ns() - t0};
        sl_limiter_snapshot_note(l, SL_SNAPSHOT_READ, &info);
    }
    free(p);
    return rc;
}

int sl_snapshot_load(sl_limiter *l, const char *path)
{
    if (!l || !path)
        return SL_EINVAL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return SL_EIO;
    int rc = sl_snapshot_read(l, fd);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}
