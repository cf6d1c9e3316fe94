/*
 * snapshot.c — bucket-state snapshots (see sluice.h).
 *
 * Format (little-endian, fixed width, no padding):
 *
 *   header   "SLUICESN" | u32 version (1) | u32 flags (0) | i64 wall ns written | u64 0
 *   record   u16 key length | key bytes (the limiter's key encoding) |
 *            u8 limits | limits x (u8 algorithm, f64 limit, rate, window, reserve_cap) |
 *            u32 state length | state bytes
 *   trailer  u64 total length of the file | u64 XXH64 (seed 0) of every byte before it
 *
 * Reading checks the length, the checksum and every record before anything is applied.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "limiter_int.h"
#include "memory.h"
#include "policy.h"

#define MAGIC "SLUICESN"
#define VERSION 1u
#define HEADER 32
#define TRAILER 16
#define OUTBUF (1u << 20)
#define LIMIT_BYTES 33
#define MAX_STATE (1u << 24)

/* ---- little-endian fields ---- */

static void put(unsigned char *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
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

typedef struct writer {
    int fd;
    unsigned char *buf;
    size_t len;
    XXH64_state_t h;
    uint64_t total;
    int err;       /* errno of a failed write */
    char *shard;   /* one shard's raw copy */
    size_t slen, scap;
    uint64_t keys;
} writer;

static int flush_out(writer *w)
{
    size_t off = 0;
    while (off < w->len) {
        ssize_t n = write(w->fd, w->buf + off, w->len - off);
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

/* Under the shard lock: append one record, encoded, to the shard copy. */
static int copy_key(void *ctx, const char *key, size_t klen, const sl_policy *p,
                    const void *state, size_t ss)
{
    writer *w = ctx;
    size_t need = 2 + klen + 1 + p->nlimits * LIMIT_BYTES + 4 + ss;
    if (w->scap - w->slen < need) {
        size_t cap = w->scap ? w->scap * 2 : 65536;
        while (cap - w->slen < need)
            cap *= 2;
        char *n = realloc(w->shard, cap);
        if (!n)
            return SL_ENOMEM;
        w->shard = n;
        w->scap = cap;
    }
    unsigned char *o = (unsigned char *)w->shard + w->slen;
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

/* Copy one shard's keys, SLICE entries per lock hold, so that no decision on the shard waits
 * for more than a few microseconds. A removal between slices moves entries: then the shard
 * is copied again, and after MAX_RESTARTS in one lock hold (churn that heavy is rare: keys
 * are removed only when idle-full or evicted). */
#define SLICE 32
#define MAX_RESTARTS 3
static int copy_shard(sl_limiter *l, unsigned i, writer *w)
{
    for (int attempt = 0; attempt < MAX_RESTARTS; attempt++) {
        uint32_t pos, stamp;
        int st = SL_SLICE_MORE, fnrc = 0;
        w->slen = 0;
        for (int first = 1; st == SL_SLICE_MORE; first = 0) {
            st = sl_limiter_visit_slice(l, i, &pos, &stamp, first, SLICE, copy_key, w, &fnrc);
            if (fnrc)
                return fnrc;
        }
        if (st == SL_SLICE_DONE)
            return SL_OK;
    }
    w->slen = 0;
    return sl_limiter_visit_shard(l, i, copy_key, w);
}

int sl_snapshot_write(sl_limiter *l, int fd)
{
    if (!l || fd < 0)
        return SL_EINVAL;
    writer w = {.fd = fd};
    if (!(w.buf = malloc(OUTBUF)))
        return SL_ENOMEM;
    XXH64_reset(&w.h, 0);
    unsigned char h[HEADER];
    memcpy(h, MAGIC, 8);
    put(h + 8, VERSION, 4);
    put(h + 12, 0, 4);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    put(h + 16, (uint64_t)((int64_t)ts.tv_sec * SL_SECOND + ts.tv_nsec), 8);
    put(h + 24, 0, 8); /* reserved: records are self-delimiting, streamed as shards are copied */
    int rc = emit(&w, h, HEADER, 1) == 0 ? SL_OK : SL_EIO;
    for (unsigned i = 0; rc == SL_OK && i < sl_limiter_nshards(l); i++) {
        rc = copy_shard(l, i, &w);
        if (rc == SL_OK && emit(&w, w.shard, w.slen, 1) != 0)
            rc = SL_EIO;
    }
    if (rc == SL_OK) {
        unsigned char t[TRAILER];
        put(t, w.total + TRAILER, 8);
        XXH64_update(&w.h, t, 8);
        put(t + 8, XXH64_digest(&w.h), 8);
        if (emit(&w, t, TRAILER, 0) != 0 || flush_out(&w) != 0)
            rc = SL_EIO;
    }
    free(w.buf);
    free(w.shard);
    if (rc == SL_EIO)
        errno = w.err;
    return rc;
}

int sl_snapshot_save(sl_limiter *l, const char *path)
{
    if (!l || !path)
        return SL_EINVAL;
    size_t n = strlen(path);
    char *tmp = malloc(n + 32), *dir = malloc(n + 2);
    if (!tmp || !dir) {
        free(tmp);
        free(dir);
        return SL_ENOMEM;
    }
    snprintf(tmp, n + 32, "%s.tmp.%ld", path, (long)getpid());
    memcpy(dir, path, n + 1);
    char *slash = strrchr(dir, '/');
    if (slash)
        slash == dir ? (void)(slash[1] = 0) : (void)(*slash = 0);
    else
        memcpy(dir, ".", 2);
    int rc = SL_EIO, e = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        e = errno;
    } else {
        rc = sl_snapshot_write(l, fd);
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
    if (rc == SL_OK) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) != 0)
            rc = SL_EIO, e = errno;
        if (dfd >= 0)
            close(dfd);
    }
    free(tmp);
    free(dir);
    errno = e;
    return rc;
}

/* ---- reading ---- */

/* Parse (and with apply, restore) every record of a verified image. */
static int records(sl_limiter *l, const unsigned char *p, size_t n, int apply)
{
    size_t i = HEADER, end = n - TRAILER;
    while (i < end) {
        if (end - i < 3)
            return SL_ESNAPSHOT;
        size_t klen = (size_t)get(p + i, 2);
        i += 2;
        if (klen < 3 || klen > SL_KEY_MAX || end - i < klen + 1)
            return SL_ESNAPSHOT;
        const char *key = (const char *)p + i;
        size_t tl = (unsigned char)key[0], al = (unsigned char)key[1];
        if (2 + tl + al >= klen) /* the client must not be empty */
            return SL_ESNAPSHOT;
        i += klen;
        sl_policy pol;
        memset(&pol, 0, sizeof pol);
        pol.nlimits = p[i++];
        if (pol.nlimits < 1 || pol.nlimits > SL_MAX_LIMITS ||
            end - i < pol.nlimits * LIMIT_BYTES + 4)
            return SL_ESNAPSHOT;
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
            return SL_ESNAPSHOT;
        if (!apply) {
            sl_policy norm;
            sl_cpolicy cp;
            if (sl_policy_compile(&pol, &norm, &cp) != SL_OK || cp.state_size != ss)
                return SL_ESNAPSHOT;
        } else {
            int rc = sl_limiter_restore(l, key, klen, &pol, p + i, ss);
            if (rc != SL_OK)
                return rc;
        }
        i += ss;
    }
    return i == end ? SL_OK : SL_ESNAPSHOT;
}

static int verify(const unsigned char *p, size_t n)
{
    if (n < 8 || memcmp(p, MAGIC, 8) != 0)
        return SL_ESNAPSHOT;
    if (n < HEADER + TRAILER || get(p + n - TRAILER, 8) != n ||
        XXH64(p, n - 8, 0) != get(p + n - 8, 8))
        return SL_ESNAPSHOT;
    if (get(p + 8, 4) > VERSION) /* whole and checksummed, but not ours to read */
        return SL_EVERSION;
    return get(p + 8, 4) == VERSION ? SL_OK : SL_ESNAPSHOT;
}

int sl_snapshot_read(sl_limiter *l, int fd)
{
    if (!l || fd < 0)
        return SL_EINVAL;
    size_t cap = 1 << 16, n = 0;
    unsigned char *p = malloc(cap);
    if (!p)
        return SL_ENOMEM;
    for (;;) {
        if (n == cap) {
            unsigned char *q = realloc(p, cap * 2);
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
    int rc = verify(p, n);
    if (rc == SL_OK)
        rc = records(l, p, n, 0); /* every record checked before any is applied */
    if (rc == SL_OK)
        rc = records(l, p, n, 1);
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
