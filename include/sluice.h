/*
 * sluice.h — the one public header of libsluice, a multi-tenant rate limiter.
 *
 * Ten-minute tour
 * ---------------
 *   sl_limiter *l;
 *   sl_options o; sl_options_init(&o);          // defaults: in-memory store, internal clock,
 *   if (sl_open(&l, &o) != SL_OK) ...            // token bucket of 5, refilling 1/s
 *
 *   sl_key k = SL_KEY("acme", "login", "10.0.0.7");
 *   sl_decision d;
 *   int rc = sl_take(l, &k, 1, SL_NOW, &d);     // rc < 0: bad input, nothing changed
 *   if (rc == SL_OK && d.allowed) serve(); else reject(d.retry_after);
 *
 *   sl_policy p = SL_POLICY_TOKEN_BUCKET(100, 10.0);   // capacity 100, refill 10/s
 *   sl_rule_set(l, SL_SCOPE_ACTION, &k, &p);           // tenant "acme", action "login"
 *   sl_close(l);
 *
 * Conventions
 *  - Every function returning int returns SL_OK (0) or a negative SL_E* code; sl_strerror()
 *    names it. A call that fails changes nothing.
 *  - Time is int64_t nanoseconds. Pass SL_NOW to use the limiter's clock (monotonic, anchored
 *    to wall time at sl_open), or your own timestamp. A timestamp earlier than a key's last one
 *    counts as zero elapsed time: time going backwards never refills and never drains.
 *    Across keys, timestamps may arrive out of order by up to 1 s with exact results (idle
 *    full keys are reclaimed 1 s after they are full); a request more than 1 s older than
 *    a later timestamp that reclaimed its key finds the key new.
 *  - The caller owns every buffer it passes in; libsluice copies what it keeps.
 *  - Thread safety: every function taking an sl_limiter may be called from any number of
 *    threads at once, except sl_close (call it once, after all other calls have returned).
 *  - fork: a child may keep using a limiter opened before the fork only if no other thread
 *    was inside a libsluice call at that moment (its locks and read sections would stay
 *    held in the child).
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(SLUICE_BUILDING) && defined(__GNUC__)
#define SL_API __attribute__((visibility("default")))
#else
#define SL_API
#endif

/* ---- version ------------------------------------------------------------------------------
 * ABI rule: MINOR grows with additions; MAJOR changes when a struct layout or a signature
 * changes. sl_version() returns SLUICE_VERSION_HEX of the library actually loaded. */
#define SLUICE_VERSION_MAJOR 0
#define SLUICE_VERSION_MINOR 2
#define SLUICE_VERSION_PATCH 0
#define SLUICE_VERSION_HEX \
    ((SLUICE_VERSION_MAJOR << 16) | (SLUICE_VERSION_MINOR << 8) | SLUICE_VERSION_PATCH)
SL_API unsigned sl_version(void);
SL_API const char *sl_version_string(void); /* "MAJOR.MINOR.PATCH"; static storage */

/* ---- errors -------------------------------------------------------------------------------
 * One table generates the codes, their names and their messages. */
#define SL_ERRNO_MAP(XX)                                                                      \
    XX(EINVAL, -1, "invalid argument")                                                        \
    XX(ENOMEM, -2, "out of memory")                                                           \
    XX(ECAPACITY, -3, "capacity/limit must be a finite whole number between 1 and 1e9")       \
    XX(ERATE, -4, "rate must be finite, > 0, at most 1e9 per second, and refill the limit "  \
                  "within 2^62 ns (146 years)")                                             \
    XX(EWINDOW, -5, "window must be finite, between 1 ms and 366 days")                       \
    XX(ECOST, -6, "cost exceeds the capacity of the limit")                                   \
    XX(EKEYEMPTY, -7, "client id is empty")                                                   \
    XX(EKEYLONG, -8, "tenant, action or client id longer than 255 bytes")                     \
    XX(EALGORITHM, -9, "unknown algorithm")                                                   \
    XX(ETIER, -10, "unknown tier")                                                            \
    XX(ENOTFOUND, -11, "no such rule")                                                        \
    XX(ELIMITS, -12, "a policy holds 1 to 4 limits")                                          \
    XX(ETIERINUSE, -13, "tier is assigned to clients")                                        \
    XX(ELEASE, -14, "no such lease")                                                          \
    XX(ESCOPE, -15, "unknown rule scope")                                                     \
    XX(ELOGSIZE, -16, "sliding_log and concurrency limits are at most 100000")                \
    XX(ETOOMANY, -17, "too many distinct policies in use")                                  \
    XX(ESNAPSHOT, -18, "snapshot is truncated or corrupt")                                    \
    XX(EVERSION, -19, "snapshot written by a newer version of sluice")                        \
    XX(EIO, -20, "I/O error (see errno)")                                                     \
    XX(ESPAN, -21, "window or refill span over 2^52 ns (52 days): too long for the Redis store") \
    XX(ESTORE, -22, "the Redis store is unreachable")                                         \
    XX(EADDRESS, -23, "Redis address must be host:port[,host:port...]")

typedef enum sl_errno {
    SL_OK = 0,
#define SL_XX_ENUM(name, code, msg) SL_##name = (code),
    SL_ERRNO_MAP(SL_XX_ENUM)
#undef SL_XX_ENUM
} sl_errno;

/* Message for a code; "unknown error" for a code not in the table. Static storage. */
SL_API const char *sl_strerror(int err);
/* Name of a code ("SL_ECOST"). Static storage. */
SL_API const char *sl_err_name(int err);

/* ---- time --------------------------------------------------------------------------------- */
#define SL_NOW INT64_MIN          /* "use the limiter's clock" */
#define SL_SECOND INT64_C(1000000000)
typedef int64_t (*sl_clock_fn)(void *ctx); /* must be thread-safe; returns ns */

/* ---- policies ------------------------------------------------------------------------------ */
typedef enum sl_algorithm {
    SL_TOKEN_BUCKET = 1,  /* limit = capacity C, rate = refill r/s. New key full. Admitted cost
                             over any interval T starting full is <= C + r*T. */
    SL_LEAKY_BUCKET = 2,  /* limit = queue depth N, rate = leak r/s. Shaping: an admitted request
                             gets `delay`, the time it may proceed; output never exceeds r/s. */
    SL_FIXED_WINDOW = 3,  /* limit L per window W; windows aligned to multiples of W. */
    SL_SLIDING_WINDOW = 4,/* weighted two-window counter, O(1) state. Never more than L in an
                             aligned window, never more than 2L in any interval of length W. */
    SL_SLIDING_LOG = 5,   /* exactly <= L in every interval (t-W, t]; 8*L bytes per key. */
    SL_BURST_RESERVE = 6, /* limit = base per second B (a token bucket of B refilling B/s);
                             when it is exhausted, requests draw on a reserve that starts at 0,
                             grows `rate` per second up to `reserve_cap`. */
    SL_CONCURRENCY = 7    /* limit = max in flight N; window = lease TTL. sl_take acquires a
                             lease (decision.lease), sl_release frees it, expiry frees it too. */
} sl_algorithm;

/* Name <-> value ("token_bucket"). sl_algorithm_parse returns SL_EALGORITHM when unknown. */
SL_API const char *sl_algorithm_name(sl_algorithm a);
SL_API int sl_algorithm_parse(const char *name, size_t len, sl_algorithm *out);

typedef struct sl_limit {
    sl_algorithm algorithm;
    double limit;       /* whole number, 1..1e9 (see the algorithm for its meaning) */
    double rate;        /* per second: token/leaky refill, burst_reserve reserve refill;
                           > 0, at most 1e9, and one unit's refill at most 366 days */
    double window;      /* seconds: windows and the log; concurrency lease TTL (1 ms..366 d) */
    double reserve_cap; /* burst_reserve only: reserve ceiling, whole number */
} sl_limit;

#define SL_MAX_LIMITS 4
/* A policy is one to four limits, checked against one `now` and consumed all together or not
 * at all (stacked limits: "10/s and 1000/day"). */
typedef struct sl_policy {
    unsigned nlimits;
    sl_limit limits[SL_MAX_LIMITS];
} sl_policy;

#define SL_POLICY_TOKEN_BUCKET(cap, per_s) \
    ((sl_policy){1, {{SL_TOKEN_BUCKET, (cap), (per_s), 0, 0}}})
#define SL_POLICY_WINDOW(alg, lim, win_s) ((sl_policy){1, {{(alg), (lim), 0, (win_s), 0}}})

/* Check a policy without using it: SL_OK or the specific error for the first bad field. */
SL_API int sl_policy_validate(const sl_policy *p);

/* ---- keys ----------------------------------------------------------------------------------
 * A key is (tenant, action, client), each a byte string of at most SL_MAX_ID_LEN bytes.
 * An empty (or NULL with length 0) tenant or action means "default", and so does the literal
 * "default". The client must not be empty. Bytes are compared exactly; NUL is allowed. */
#define SL_MAX_ID_LEN 255
typedef struct sl_key {
    const char *tenant;
    size_t tenant_len;
    const char *action;
    size_t action_len;
    const char *client;
    size_t client_len;
} sl_key;

static inline size_t sl_strlen_(const char *s)
{
    size_t n = 0;
    while (s && s[n])
        n++;
    return n;
}
/* A key from NUL-terminated strings (NULL = empty). A macro: each argument is evaluated
 * twice, so pass plain expressions (no i++). */
#define SL_KEY(t, a, c) ((sl_key){(t), sl_strlen_(t), (a), sl_strlen_(a), (c), sl_strlen_(c)})

/* ---- decisions ----------------------------------------------------------------------------- */
typedef enum sl_source {
    SL_SOURCE_STORE = 0,       /* the store (in-memory table, or the script on Redis) */
    SL_SOURCE_NEAR_CACHE = 1,  /* Redis store: denied locally, the key is known to be over its
                                  limit until its retry time (see sl_redis_options) */
    SL_SOURCE_FAIL_OPEN = 2,   /* Redis unreachable: allowed by fail_open */
    SL_SOURCE_FAIL_CLOSED = 3  /* Redis unreachable: denied by fail_closed */
} sl_source;

typedef struct sl_decision {
    int err;              /* SL_OK, or why this request was not decided (batch form) */
    int allowed;          /* 1 admitted (and consumed), 0 denied (nothing consumed) */
    uint64_t limit;       /* the reported limit's capacity/limit */
    uint64_t remaining;   /* whole units of the reported limit left after this request
                             (burst_reserve: base plus reserve, so it may exceed `limit`) */
    int64_t reset_after;  /* ns until the reported limit is back to full (burst_reserve: its
                             base; the reserve grows on its own) */
    int64_t retry_after;  /* ns until a request of this cost could pass; 0 when allowed */
    int64_t delay;        /* leaky_bucket: ns until the admitted request may proceed; else 0 */
    double tokens;        /* exact (fractional) units left of the reported limit */
    double reserve;       /* burst_reserve: reserve units left; else 0 */
    uint64_t lease;       /* concurrency: the lease acquired (0 when none); ids grow from the
                             wall clock in µs at sl_open, so a restarted limiter does not
                             hand out an id again */
    unsigned limit_index; /* which limit of the policy is reported (the most restrictive) */
    sl_algorithm algorithm;
    int64_t window;       /* ns: the reported limit's window or refill period (for headers) */
    sl_source source;     /* who decided: the store, or (Redis store) the near cache or the
                             fail mode while Redis is unreachable */
} sl_decision;

/* ---- the limiter --------------------------------------------------------------------------- */
typedef struct sl_limiter sl_limiter;

typedef struct sl_options {
    size_t max_keys;          /* hard bound on keys held; least recently used evicted first.
                                 0 = unbounded */
    unsigned shards;          /* power of two up to 65536 (else SL_EINVAL); 0 = 256 */
    sl_clock_fn clock;        /* NULL = internal monotonic clock anchored to wall time */
    void *clock_ctx;
    const sl_policy *default_policy; /* NULL = token bucket, capacity 5, refill 1/s (copied) */
    const struct sl_redis_options *redis; /* NULL = the in-memory store; else the Redis store
                                             (below). Copied. */
} sl_options;

SL_API void sl_options_init(sl_options *o);

/* Open a limiter. On success *out owns it; free with sl_close. `opts` may be NULL (defaults)
 * and is not kept. */
SL_API int sl_open(sl_limiter **out, const sl_options *opts);
/* Free everything. No other call on `l` may be running or follow. NULL is a no-op. */
SL_API void sl_close(sl_limiter *l);
/* The limiter's clock, in ns. */
SL_API int64_t sl_now(sl_limiter *l);

/* Decide one request: consume `cost` units if every limit of the key's policy allows it.
 * cost 0 consumes nothing, creates no key and is always allowed: it reports what is left now
 * (sl_peek instead asks whether a request of cost 1 would pass). On a concurrency policy a
 * successful take acquires a lease (d->lease). Errors (nothing changed): SL_EINVAL (NULL, or
 * `now` outside [0, 2^62) ns), SL_EKEYEMPTY, SL_EKEYLONG, SL_ECOST (cost above a limit's
 * capacity: the one error that fills `d`, as a take of cost 0 would, with allowed 0 and
 * retry_after 0, since no wait helps), SL_ENOMEM. A key whose policy changed is carried over
 * when it is next decided (remaining kept, clamped to the new capacity), so a peek before
 * that shows the clamp against the policy in effect at the time of the peek. */
SL_API int sl_take(sl_limiter *l, const sl_key *key, uint64_t cost, int64_t now,
                   sl_decision *d);
/* What sl_take of cost 1 would answer, consuming nothing and creating no key. */
SL_API int sl_peek(sl_limiter *l, const sl_key *key, int64_t now, sl_decision *d);
/* Release a concurrency lease early. SL_ELEASE if it is unknown or already expired. */
SL_API int sl_release(sl_limiter *l, const sl_key *key, uint64_t lease, int64_t now);

/* The batch form: many requests decided against one `now`, in order. The table prefetches
 * ahead so that cache misses overlap. out[i].err holds each request's own error (SL_ECOST
 * with the fields filled, as sl_take does; an invalid inline policy is an error even when a
 * rule would have been used instead); the return value is SL_OK unless an argument is NULL
 * or `now` is outside [0, 2^62) ns (SL_EINVAL). */
typedef struct sl_request {
    sl_key key;
    uint64_t cost;            /* units to take; 0 takes nothing (always allowed, shows what
                                 is left) */
    const sl_policy *inline_policy; /* used only when no rule, tenant default or tier
                                       matches; NULL = none. Not kept after the call. */
    int peek;                 /* 1: as sl_peek: would `cost` pass? Nothing is consumed */
} sl_request;
SL_API int sl_take_batch(sl_limiter *l, const sl_request *reqs, size_t n, int64_t now,
                         sl_decision *out);

/* ---- rules and tiers --------------------------------------------------------------------------
 * A key's policy is resolved, most specific first:
 *   client override (tenant, action, client) -> tenant+action rule -> tenant default ->
 *   tier of the client (tenant, client) -> inline policy of the request -> global default.
 * Changes take effect for the next decision; readers never block. A key whose policy changes
 * keeps its remaining units, clamped to the new capacity (a full key stays full), limit by
 * limit: each limit of the new policy carries over from a limit of the same algorithm in the
 * old one (same parameters first, then the same position), so limits may be added, removed or
 * reordered; a limit whose algorithm the old policy did not have takes the first old limit
 * left unused, of another algorithm, and keeps min(its whole units left, new capacity);
 * with none left it starts anew. Concurrency (leases, not units) carries only from
 * concurrency: across algorithms it starts anew. */
typedef enum sl_scope {
    SL_SCOPE_TENANT = 1, /* key.tenant: the tenant's default for every action */
    SL_SCOPE_ACTION = 2, /* key.tenant + key.action */
    SL_SCOPE_CLIENT = 3  /* key.tenant + key.action + key.client: a client override */
} sl_scope;

/* Set, read and delete a rule. Fields of `key` the scope does not use are ignored.
 * sl_rule_get/del return SL_ENOTFOUND when there is no such rule. */
SL_API int sl_rule_set(sl_limiter *l, sl_scope scope, const sl_key *key, const sl_policy *p);
SL_API int sl_rule_get(sl_limiter *l, sl_scope scope, const sl_key *key, sl_policy *out);
SL_API int sl_rule_del(sl_limiter *l, sl_scope scope, const sl_key *key);

/* Every rule, in no particular order, from one consistent snapshot. `fn` returns 0 to go on,
 * non-zero to stop (that value is returned). The key's strings live only during the call. */
typedef int (*sl_rule_fn)(void *ctx, sl_scope scope, const sl_key *key, const sl_policy *p);
SL_API int sl_rule_list(sl_limiter *l, sl_rule_fn fn, void *ctx);

/* Global default policy (the last step of resolution). */
SL_API int sl_default_set(sl_limiter *l, const sl_policy *p);
SL_API int sl_default_get(sl_limiter *l, sl_policy *out);

/* Tiers are named policies; a (tenant, client) may be assigned one. Names are 1..255 bytes.
 * sl_tier_del refuses a tier still assigned (SL_ETIERINUSE); sl_tier_assign with tier NULL
 * removes the assignment (SL_ENOTFOUND if there was none); an unknown tier is SL_ETIER.
 * sl_tier_assignment copies the tier assigned to (tenant, client) into `tier` (cap > 255
 * bytes, NUL-terminated), or returns SL_ENOTFOUND; sl_tier_assignments visits every
 * assignment like sl_rule_list (the key's action is empty). */
SL_API int sl_tier_set(sl_limiter *l, const char *name, const sl_policy *p);
SL_API int sl_tier_get(sl_limiter *l, const char *name, sl_policy *out);
SL_API int sl_tier_del(sl_limiter *l, const char *name);
SL_API int sl_tier_assign(sl_limiter *l, const sl_key *tenant_client, const char *tier);
SL_API int sl_tier_assignment(sl_limiter *l, const sl_key *tenant_client, char *tier,
                              size_t cap);
typedef int (*sl_tier_fn)(void *ctx, const char *name, const sl_policy *p);
SL_API int sl_tier_list(sl_limiter *l, sl_tier_fn fn, void *ctx);
typedef int (*sl_assign_fn)(void *ctx, const sl_key *tenant_client, const char *tier);
SL_API int sl_tier_assignments(sl_limiter *l, sl_assign_fn fn, void *ctx);

/* ---- counters and housekeeping ------------------------------------------------------------ */
typedef struct sl_stats {
    uint64_t allowed, denied, evicted; /* evicted: keys dropped by the max_keys bound */
    uint64_t keys;                     /* keys held (whole limiter only) */
    uint64_t reclaimed;                /* idle full keys dropped losslessly (whole limiter only) */
} sl_stats;
/* Counters of one tenant (SL_ENOTFOUND if it was never seen) or, with tenant NULL, of all.
 * At most 65,536 tenants are counted apart; later ones are counted under "_overflow" (and
 * are SL_ENOTFOUND here). */
SL_API int sl_stats_get(sl_limiter *l, const char *tenant, size_t tenant_len, sl_stats *out);
typedef int (*sl_tenant_fn)(void *ctx, const char *tenant, size_t len, const sl_stats *s);
SL_API int sl_stats_list(sl_limiter *l, sl_tenant_fn fn, void *ctx);

/* Reclaim idle full keys (keys indistinguishable from new ones), looking at no more than
 * `budget` keys. Decisions already do this a little at a time; call it from a timer of your
 * own to do more. Returns how many keys were reclaimed. */
SL_API size_t sl_sweep(sl_limiter *l, int64_t now, size_t budget);

/* ---- snapshots of bucket state ------------------------------------------------------------
 * A snapshot holds every key with its policy (by value, normalised: it is interned again on
 * load, since policy ids belong to one limiter) and its algorithm state, so that a limiter
 * that loads it decides, at the same `now`, exactly as the one that wrote it: an exhausted
 * key stays exhausted, a half-full window stays half full, leases stay held (and can be
 * released; lease ids issued after a load are above every id loaded, and a snapshot with
 * an id of 2^62 or more is refused: new ids could wrap round). Rules, tiers,
 * defaults and counters are not in it.
 *
 * Time: states hold timestamps of the limiter's clock. The internal clock is monotonic but
 * anchored to wall time at sl_open, so these are wall-clock ns and stay meaningful in another
 * process after a restart; a key whose state is later than the loading limiter's clock (the
 * wall clock was set back) neither refills nor drains until the clock passes it, as for any
 * timestamp that goes backwards. With your own clock (sl_options.clock), keep one time base
 * for the limiter that writes and the one that loads.
 *
 * Format: versioned and checksummed (XXH64), little-endian, fixed-width fields; described in
 * docs/design.md ("Snapshots"). Errors of these functions besides SL_EINVAL (NULL, fd < 0)
 * and SL_ENOMEM: SL_EIO (a system call failed; errno says why and is left set),
 * SL_ESNAPSHOT (truncated, corrupt, empty, not a snapshot), SL_EVERSION (whole, but from a
 * newer sluice). Every function is thread-safe: it may run beside decisions, rule changes
 * and other snapshot calls on the same limiter. */

/* Write a snapshot of `l` to `fd` (a file, pipe or socket, blocking; not closed, not
 * fsync'd). Runs beside decisions: each shard is copied 32 keys (or 16 KiB of state) per hold
 * of its lock, about a microsecond (a single key with a very large sliding_log or
 * concurrency state is copied in one hold), and encoded and written outside the lock. A key
 * is saved as of the moment its slice was copied, so the snapshot is not one instant across
 * keys: a key decided after its slice was copied is saved as before that decision; a key
 * created meanwhile may be missing; a key whose shard removed entries (eviction, reclaim)
 * while it was being copied may appear twice, the later (newer) copy winning on load.
 * Memory: one slice and a 1 MiB output buffer. On error part of a snapshot may have been
 * written (it will not load: the checksum comes last). */
SL_API int sl_snapshot_write(sl_limiter *l, int fd);
/* Write a snapshot to `path` atomically: a new temp file in the same directory
 * ("<path>.tmp.<pid>.<n>"), written, fsync'd, renamed over `path`, and the directory fsync'd.
 * On failure `path` is untouched (the old snapshot, if any, stays) and the temp file is
 * removed; except that when only the last step, the directory's fsync, fails (SL_EIO), the
 * new snapshot is in place but might not survive a power cut. Concurrent saves to one path
 * are safe: each has its own temp file, the last rename wins. */
SL_API int sl_snapshot_save(sl_limiter *l, const char *path);
/* Load a snapshot from `fd`, read to its end. The whole input is read into memory (its size:
 * 56 bytes plus the key per single-limit key with inline state) and checked first: length, magic,
 * version, checksum, then every record (key encoding, policy, state consistent with the
 * policy). A bad input is SL_ESNAPSHOT or SL_EVERSION and changes nothing. Then every key in
 * it gets its saved policy and state, replacing what the key had; keys not in the snapshot
 * are left alone. Inserting obeys max_keys (it may evict, least recently used first, as any
 * insert does). If the key's rule changed since the save, the usual carry-over applies at
 * its next decision (remaining units kept, clamped to the new capacity). Exceptions to
 * "changes nothing on failure": memory running out while restoring (SL_ENOMEM), or the
 * limiter holding 2^20 distinct policies in use (SL_ETOOMANY), leaves the keys restored so
 * far restored. Counters (sl_stats: allowed, denied) do not change; keys do. */
SL_API int sl_snapshot_read(sl_limiter *l, int fd);
/* sl_snapshot_read of the file at `path`; a missing file is SL_EIO with errno ENOENT. */
SL_API int sl_snapshot_load(sl_limiter *l, const char *path);

/* What the last successful snapshot call of each kind did on this limiter. */
typedef enum sl_snapshot_op {
    SL_SNAPSHOT_WRITE = 0, /* sl_snapshot_write or sl_snapshot_save */
    SL_SNAPSHOT_READ = 1   /* sl_snapshot_read or sl_snapshot_load */
} sl_snapshot_op;
typedef struct sl_snapshot_info {
    uint64_t keys;      /* records written or restored (a key written twice counts twice) */
    uint64_t bytes;     /* length of the snapshot */
    int64_t written_at; /* wall clock (ns since the Unix epoch) when it was written */
    int64_t duration;   /* ns the call took (for a save: including fsync and rename) */
} sl_snapshot_info;
/* Copy out the info of the most recent successful call of kind `op` (the one that finished
 * last, if several ran at once). SL_ENOTFOUND if there was none yet. */
SL_API int sl_snapshot_last(sl_limiter *l, sl_snapshot_op op, sl_snapshot_info *out);

/* ---- the Redis store (distributed mode) ----------------------------------------------------
 * Several processes share their limits through Redis or Redis Cluster: every decision is one
 * atomic Lua function call on the key's Redis node (the script is a Redis Function library:
 * Redis >= 7.0; loaded once per node, reloaded if Redis lost it), which takes its time from Redis (TIME), so no two processes' clocks can
 * disagree. Each key is one Redis string, given a TTL equal to its time to refill (to
 * disappear when it is indistinguishable from a new key). Same algorithms and contracts as
 * the in-memory store, with two differences: spans (window, capacity / rate, reserve cap /
 * reserve rate, lease TTL) are at most 2^52 ns (about 52 days; longer is SL_ESPAN when the
 * policy is used), and lease ids are per key (see docs/design.md).
 *
 * Rules, tiers and defaults stay in each process (give every process the same ones); a
 * decision sends the resolved policy with the request. Counters (sl_stats) count this
 * process's decisions; keys and evictions are Redis's (sl_stats.keys is 0).
 *
 * Calls block: sl_take / sl_peek / sl_release wait for one round trip, sl_take_batch sends
 * its whole batch pipelined (one round trip per Redis node it touches). Connections are
 * pooled (one per calling thread at most, per node). An explicit `now` is sent to the
 * script (tests, replays); SL_NOW uses Redis's clock.
 *
 * Redis unreachable (connection refused, timeout, a node down): decisions are made by the
 * fail mode, without waiting for Redis again until a back-off (50 ms doubling to 2 s) has
 * passed: fail_closed (the default: abuse protection) denies with retry_after = 1 s, and
 * fail_open allows; d.source says which. sl_release returns SL_ESTORE. A request that timed
 * out may still run on Redis when it resumes (fail_closed: a unit counted that the caller
 * was denied; never one more admitted).
 *
 * The in-memory table's own features do not apply: max_keys and sl_sweep (Redis expires
 * keys itself), snapshots (a snapshot of a Redis limiter holds no keys: Redis keeps the
 * state; use its persistence). */
typedef enum sl_fail_mode { SL_FAIL_CLOSED = 0, SL_FAIL_OPEN = 1 } sl_fail_mode;
typedef struct sl_redis_options {
    const char *servers;   /* "host:port[,host:port...]": one Redis, or seed nodes of a
                              cluster (detected: CLUSTER SLOTS is asked) */
    const char *password;  /* NULL = no AUTH */
    unsigned db;           /* SELECT db (not in a cluster) */
    sl_fail_mode fail_mode;
    unsigned timeout_ms;   /* connect and reply timeout; 0 = 1000 */
    int no_near_cache;     /* 1 disables the near cache: a key Redis denied is denied here
                              without asking Redis again until its retry time. It never
                              allows; not used for policies with a concurrency limit (a
                              release frees slots early) nor with an explicit `now` */
    const char *key_prefix;/* prefix of every Redis key; NULL = "sl:" */
    /* Called once per change between "reachable" and "unreachable" (from a deciding thread;
       must be quick and thread-safe). NULL = none. */
    void (*on_state)(void *ctx, int up, const char *why);
    void *on_state_ctx;
} sl_redis_options;
/* Defaults: no servers (set them), fail_closed, 1000 ms, near cache on, prefix "sl:". */
SL_API void sl_redis_options_init(sl_redis_options *o);

/* What the Redis store did, counted since sl_open (all 0 for the in-memory store). */
typedef struct sl_store_stats {
    int redis;               /* 1 when the limiter uses the Redis store */
    int up;                  /* 1 while every known node is reachable */
    int cluster;             /* 1 when the servers are a Redis Cluster */
    uint64_t calls;          /* script calls answered by Redis */
    uint64_t near_cache;     /* decisions denied by the near cache */
    uint64_t fail_open;      /* decisions allowed by fail_open */
    uint64_t fail_closed;    /* decisions denied by fail_closed */
    uint64_t errors;         /* connection or protocol failures */
    uint64_t reconnects;     /* connections (re)opened */
    uint64_t script_loads;   /* FUNCTION LOADs of the script (a node did not have it) */
    uint64_t redirects;      /* MOVED and ASK redirections followed */
    uint64_t fallback_ms_ago; /* ms since the fail mode last decided (Redis unreachable or
                                 answering with an error: out of memory, a key of another
                                 type, ...); UINT64_MAX: never */
} sl_store_stats;
SL_API int sl_store_stats_get(sl_limiter *l, sl_store_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* SLUICE_H */
