/*
 * lib_bench.c — throughput, latency and memory of libsluice's in-process decision path,
 * measured against the physical floor of a random memory access in the same run.
 *
 * Scenarios: {token_bucket, sliding_window} x {one hot key, uniform random keys over a
 * population of --keys (default 1,000,000)} x {1, 2 threads}, single sl_take calls; plus, for
 * random keys, the batch form sl_take_batch (--batch requests per call, default 32).
 *
 * Every line the harness parses is
 *     RESULT name=<scenario> metric=<metric> value=<number>
 * with scenario names like token_bucket_random_2t or sliding_window_random_1t_batch32.
 * Metrics: decisions_per_s (all threads together), ns_per_decision (per thread: wall time x
 * threads / decisions), p50_ns / p99_ns (sampled single calls; batch: batch time / batch size),
 * allowed_fraction, bytes_per_key (RSS delta of populating the keys / keys), keys, cpu_share
 * (the threads' CPU time / (wall time x threads): well under 1 means another process took the
 * CPU during the run — noise, not the library).
 *
 * The floor: a dependent chain of loads through a random cyclic permutation of 64-byte nodes
 * over a malloc'd buffer as large as the limiter's memory at --keys keys (floor_<n>t,
 * ns_per_access; with 2 threads, two chains run at once). ratio_<scenario>_vs_floor is
 * ns_per_decision / ns_per_access for the same thread count: 1.0 means "as fast as one
 * cache-missing load per decision".
 *
 * Method: keys and the random sequence are generated before anything is timed (records of
 * 16 bytes read sequentially, so the harness adds no cache misses of its own). Both limiters
 * are populated with every key once at one fixed `now` (so that no key is idle-and-full, hence
 * reclaimable, before the measurement starts), then checked to hold exactly --keys keys.
 * Each scenario first runs a short pilot that fixes its number of decisions per thread (about
 * --seconds of work); the repetitions are interleaved across scenarios (rep 1 of everything,
 * then rep 2, ...) and the median of each metric is reported. Latency: every 16th single call
 * is bracketed by lfence;rdtsc (TSC calibrated against CLOCK_MONOTONIC); every batch is timed.
 *
 * The results are checked: no call may fail, random-key scenarios must be (almost) all
 * allowed, hot-key scenarios must admit what the limit allows and no more. A failed check
 * exits 1 with a message; a missed performance target never does (TARGET lines say MET or
 * MISSED).
 *
 *   lib_bench [--quick] [--keys N] [--seconds S] [--reps R] [--batch B] [--seed X]
 *             [--stream N] [--threads-max T] [--ops N] [--only SUBSTRING] [--no-floor]
 *
 * --quick: 10,000 keys, ~3 ms per scenario, one repetition (the smoke test).
 * --only and --no-floor are for profiling one scenario (perf record ... lib_bench --only
 * token_bucket_hot_1t --no-floor --seconds 5): only the limiters the chosen scenarios use are
 * populated.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define HAVE_TSC 1
#else
#define HAVE_TSC 0
#endif

#include "sluice.h"

/* ---- parameters --------------------------------------------------------------------------- */

#define TENANT "bench"
#define ACTION "api"
#define HOT_CLIENT "user:0"
#define LIMIT 1000000.0 /* token bucket: capacity and refill/s; sliding window: per window */
#define WINDOW_S 1.0
#define SAMPLE_EVERY 16 /* single calls: time one call in this many */
#define MAX_THREADS 8
#define MAX_BATCH 256
#define MAX_REPS 15

typedef struct params {
    uint64_t keys;     /* key population */
    double seconds;    /* target time per scenario repetition */
    int reps;          /* repetitions per scenario (median reported) */
    int batch;         /* requests per sl_take_batch */
    uint64_t seed;     /* random sequence */
    uint64_t stream;   /* length of the pre-generated key sequence (wraps) */
    int threads_max;   /* 1..threads_max threads */
    uint64_t ops;      /* fixed decisions per thread; 0 = from a pilot run */
    uint64_t pilot;    /* decisions per thread in the pilot */
    const char *only;  /* run only scenarios whose name contains this */
    int quick;
    int no_floor;      /* skip the floor (profiling a scenario) */
} params;

static params P = {
    .keys = 1000000,
    .seconds = 1.0,
    .reps = 3,
    .batch = 32,
    .seed = 0x5eed5eed,
    .stream = 1u << 22,
    .threads_max = 2,
    .ops = 0,
    .pilot = 50000,
    .only = NULL,
    .quick = 0,
    .no_floor = 0,
};

/* ---- small utilities ---------------------------------------------------------------------- */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("lib_bench: FAILED: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The same generator (and the same mapping to [0, n)) as bench/go/peer.go, so that both see
 * the same key sequence. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t below(uint64_t r, uint64_t n) /* floor(r * n / 2^64) */
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static size_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, resident = 0;
    if (!f)
        die("cannot open /proc/self/statm: %s", strerror(errno));
    if (fscanf(f, "%lu %lu", &size, &resident) != 2)
        die("cannot parse /proc/self/statm");
    fclose(f);
    return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

static void result(const char *name, const char *metric, double v)
{
    int prec = 1;
    if (strcmp(metric, "ratio") == 0 || strcmp(metric, "allowed_fraction") == 0 ||
        strcmp(metric, "cpu_share") == 0 ||
        strcmp(metric, "ticks_per_ns") == 0)
        prec = 4;
    else if (strcmp(metric, "decisions_per_s") == 0 || strcmp(metric, "keys") == 0 ||
             strcmp(metric, "bytes") == 0)
        prec = 0;
    printf("RESULT name=%s metric=%s value=%.*f\n", name, metric, prec, v);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
    double s[MAX_REPS];
    memcpy(s, v, sizeof(double) * (size_t)n);
    qsort(s, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/* k-th smallest of a[0..n) (reorders a). */
static uint32_t select_kth(uint32_t *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        uint32_t pivot = a[lo + (hi - lo) / 2];
        size_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                uint32_t t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                if (j == 0)
                    break;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return a[k];
    }
    return a[k];
}

/* ---- time stamp counter ------------------------------------------------------------------- */

static double tsc_per_ns = 1.0;

static inline uint64_t ticks(void)
{
#if HAVE_TSC
    _mm_lfence();
    uint64_t t = __rdtsc();
    _mm_lfence();
    return t;
#else
    return (uint64_t)mono_ns();
#endif
}

static void tsc_calibrate(void)
{
#if HAVE_TSC
    double r[3];
    for (int attempt = 0; attempt < 3; attempt++) {
        int64_t n0 = mono_ns();
        uint64_t t0 = ticks();
        int64_t n1;
        do
            n1 = mono_ns();
        while (n1 - n0 < (P.quick ? 5000000 : 50000000)); /* 50 ms (quick: 5 ms) */
        uint64_t t1 = ticks();
        r[attempt] = (double)(t1 - t0) / (double)(n1 - n0);
    }
    double best = median(r, 3);
    if (!(best > 0.05 && best < 100))
        die("TSC calibration gave %.4f ticks/ns", best);
    tsc_per_ns = best;
#endif
}

/* Median cost of the timing bracket itself (two ticks() calls), in ns. */
static double timer_overhead_ns(void)
{
    enum { N = 10001 };
    static uint32_t s[N];
    for (int i = 0; i < N; i++) {
        uint64_t a = ticks();
        uint64_t b = ticks();
        s[i] = (uint32_t)(b - a);
    }
    return select_kth(s, N, N / 2) / tsc_per_ns;
}

/* ---- keys ----------------------------------------------------------------------------------- */

typedef struct rec {
    char s[15];
    uint8_t len;
} rec; /* one client id of the sequence: "user:<n>" */

static rec *stream; /* P.stream records: the random sequence, read sequentially */
static rec hot;

static void make_client(rec *r, uint64_t n)
{
    int len = snprintf(r->s, sizeof r->s, "user:%llu", (unsigned long long)n);
    if (len <= 0 || len >= (int)sizeof r->s)
        die("client id too long");
    r->len = (uint8_t)len;
}

static void make_stream(void)
{
    uint64_t s = P.seed;
    stream = xmalloc(sizeof(rec) * P.stream);
    for (uint64_t i = 0; i < P.stream; i++)
        make_client(&stream[i], below(splitmix64(&s), P.keys));
    make_client(&hot, 0);
}

static inline sl_key key_of(const rec *r)
{
    sl_key k = {TENANT, sizeof TENANT - 1, ACTION, sizeof ACTION - 1, r->s, r->len};
    return k;
}

/* ---- limiters ------------------------------------------------------------------------------- */

typedef struct algo {
    const char *name;
    sl_policy policy;
    sl_limiter *l;
    double bytes_per_key;
    size_t bytes;
} algo;

static algo algos[2];

static void open_and_populate(algo *a)
{
    size_t rss0 = rss_bytes();
    sl_options o;
    sl_options_init(&o);
    o.default_policy = &a->policy;
    int rc = sl_open(&a->l, &o);
    if (rc != SL_OK)
        die("sl_open(%s): %s", a->name, sl_strerror(rc));

    /* Touch every key once, all at one `now`: a key whose state was just written is not yet
     * "idle and full", so inserting later keys cannot reclaim earlier ones. */
    int64_t now = sl_now(a->l);
    int64_t t0 = mono_ns();
    for (uint64_t n = 0; n < P.keys; n++) {
        rec r;
        make_client(&r, n);
        sl_key k = key_of(&r);
        sl_decision d;
        rc = sl_take(a->l, &k, 1, now, &d);
        if (rc != SL_OK)
            die("warm-up sl_take(%s, user:%llu): %s", a->name, (unsigned long long)n,
                sl_strerror(rc));
        if (!d.allowed)
            die("warm-up sl_take(%s, user:%llu) denied", a->name, (unsigned long long)n);
    }
    int64_t t1 = mono_ns();
    size_t rss1 = rss_bytes();

    sl_stats st;
    rc = sl_stats_get(a->l, NULL, 0, &st);
    if (rc != SL_OK)
        die("sl_stats_get(%s): %s", a->name, sl_strerror(rc));
    if (st.keys != P.keys)
        die("%s: sl_stats keys = %llu after touching %llu keys (reclaimed %llu, evicted %llu)",
            a->name, (unsigned long long)st.keys, (unsigned long long)P.keys,
            (unsigned long long)st.reclaimed, (unsigned long long)st.evicted);
    if (st.allowed != P.keys || st.denied != 0)
        die("%s: sl_stats allowed %llu denied %llu after warm-up of %llu keys", a->name,
            (unsigned long long)st.allowed, (unsigned long long)st.denied,
            (unsigned long long)P.keys);

    a->bytes = rss1 > rss0 ? rss1 - rss0 : 0;
    a->bytes_per_key = (double)a->bytes / (double)P.keys;
    char name[64];
    snprintf(name, sizeof name, "%s_populate", a->name);
    result(name, "keys", (double)st.keys);
    result(name, "bytes", (double)a->bytes);
    result(name, "bytes_per_key", a->bytes_per_key);
    result(name, "ns_per_insert", (double)(t1 - t0) / (double)P.keys);
}

/* ---- scenarios ------------------------------------------------------------------------------ */

typedef struct scenario {
    char name[64];
    algo *a;
    int hot;
    int threads;
    int batch; /* 0 = single calls */
    uint64_t ops; /* per thread */
    double dps[MAX_REPS], nspd[MAX_REPS], p50[MAX_REPS], p99[MAX_REPS], allowed[MAX_REPS];
    double cpu[MAX_REPS];
} scenario;

typedef struct worker {
    const scenario *sc;
    size_t start;       /* position in the stream */
    uint64_t ops;
    uint32_t *samples;  /* ticks per (sampled) decision */
    size_t nsamples;
    uint64_t allowed, errors;
    int first_err;
    int64_t cpu_ns;     /* thread CPU time spent in the loop */
    atomic_int *go;
    atomic_int *ready;
    pthread_t th;
} worker;

/* noinline: callgrind_lib.sh counts run_single's and run_batch's inclusive instructions. */
__attribute__((noinline)) static void run_single(worker *w)
{
    sl_limiter *l = w->sc->a->l;
    size_t pos = w->start;
    uint64_t allowed = 0, errors = 0;
    size_t ns = 0;
    for (uint64_t i = 0; i < w->ops; i++) {
        const rec *r = w->sc->hot ? &hot : &stream[pos];
        if (++pos == P.stream)
            pos = 0;
        sl_key k = key_of(r);
        sl_decision d;
        int rc;
        if (i % SAMPLE_EVERY == 0) {
            uint64_t t0 = ticks();
            rc = sl_take(l, &k, 1, SL_NOW, &d);
            uint64_t t1 = ticks();
            uint64_t dt = t1 - t0;
            w->samples[ns++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
        } else {
            rc = sl_take(l, &k, 1, SL_NOW, &d);
        }
        if (rc == SL_OK) {
            allowed += (unsigned)d.allowed;
        } else {
            if (!errors)
                w->first_err = rc;
            errors++;
        }
    }
    w->nsamples = ns;
    w->allowed = allowed;
    w->errors = errors;
}

__attribute__((noinline)) static void run_batch(worker *w)
{
    sl_limiter *l = w->sc->a->l;
    size_t b = (size_t)w->sc->batch;
    size_t pos = w->start;
    uint64_t allowed = 0, errors = 0;
    size_t ns = 0;
    sl_request reqs[MAX_BATCH];
    sl_decision out[MAX_BATCH];
    for (uint64_t i = 0; i < w->ops; i += b) {
        for (size_t j = 0; j < b; j++) {
            const rec *r = w->sc->hot ? &hot : &stream[pos];
            if (++pos == P.stream)
                pos = 0;
            reqs[j].key = key_of(r);
            reqs[j].cost = 1;
            reqs[j].inline_policy = NULL;
        }
        uint64_t t0 = ticks();
        int rc = sl_take_batch(l, reqs, b, SL_NOW, out);
        uint64_t t1 = ticks();
        uint64_t dt = (t1 - t0) / b;
        w->samples[ns++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
        if (rc != SL_OK) {
            if (!errors)
                w->first_err = rc;
            errors += b;
            continue;
        }
        for (size_t j = 0; j < b; j++) {
            if (out[j].err == SL_OK) {
                allowed += (unsigned)out[j].allowed;
            } else {
                if (!errors)
                    w->first_err = out[j].err;
                errors++;
            }
        }
    }
    w->nsamples = ns;
    w->allowed = allowed;
    w->errors = errors;
}

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    atomic_fetch_add(w->ready, 1);
    while (!atomic_load_explicit(w->go, memory_order_acquire))
        ;
    int64_t c0 = thread_cpu_ns();
    if (w->sc->batch)
        run_batch(w);
    else
        run_single(w);
    w->cpu_ns = thread_cpu_ns() - c0;
    return NULL;
}

typedef struct outcome {
    double wall_s, dps, nspd, p50, p99, allowed_fraction;
    double cpu_share; /* thread CPU time / (wall time x threads): < 1 = preempted (noise) */
    uint64_t total, allowed;
} outcome;

/* Run `ops` decisions per thread; check the outcome. */
static outcome run_scenario(const scenario *sc, uint64_t ops, int check)
{
    worker w[MAX_THREADS];
    atomic_int go = 0, ready = 0;
    size_t per_sample = sc->batch ? (size_t)sc->batch : SAMPLE_EVERY;
    for (int t = 0; t < sc->threads; t++) {
        w[t] = (worker){.sc = sc,
                        .start = (size_t)((P.stream / (uint64_t)sc->threads) * (uint64_t)t),
                        .ops = ops,
                        .samples = xmalloc(sizeof(uint32_t) * (size_t)(ops / per_sample + 2)),
                        .go = &go,
                        .ready = &ready};
        if (pthread_create(&w[t].th, NULL, worker_main, &w[t]) != 0)
            die("pthread_create");
    }
    while (atomic_load(&ready) < sc->threads)
        sched_yield(); /* let every worker get to its start line (not timed) */
    int64_t t0 = mono_ns();
    atomic_store_explicit(&go, 1, memory_order_release);
    for (int t = 0; t < sc->threads; t++)
        pthread_join(w[t].th, NULL);
    int64_t t1 = mono_ns();

    outcome o = {0};
    size_t nsamp = 0;
    uint64_t errors = 0;
    int first_err = 0;
    int64_t cpu = 0;
    for (int t = 0; t < sc->threads; t++) {
        cpu += w[t].cpu_ns;
        o.total += w[t].ops;
        o.allowed += w[t].allowed;
        errors += w[t].errors;
        if (w[t].errors && !first_err)
            first_err = w[t].first_err;
        nsamp += w[t].nsamples;
    }
    if (errors)
        die("%s: %llu of %llu decisions failed (first: %s)", sc->name,
            (unsigned long long)errors, (unsigned long long)o.total, sl_err_name(first_err));
    uint32_t *all = xmalloc(sizeof(uint32_t) * (nsamp + 1));
    size_t k = 0;
    for (int t = 0; t < sc->threads; t++) {
        memcpy(all + k, w[t].samples, sizeof(uint32_t) * w[t].nsamples);
        k += w[t].nsamples;
        free(w[t].samples);
    }
    if (nsamp == 0)
        die("%s: no latency samples", sc->name);
    o.p50 = select_kth(all, nsamp, nsamp / 2) / tsc_per_ns;
    o.p99 = select_kth(all, nsamp, (size_t)((double)(nsamp - 1) * 0.99)) / tsc_per_ns;
    free(all);

    o.wall_s = (double)(t1 - t0) / 1e9;
    o.dps = (double)o.total / o.wall_s;
    o.nspd = (double)(t1 - t0) * sc->threads / (double)o.total;
    o.allowed_fraction = (double)o.allowed / (double)o.total;
    o.cpu_share = (double)cpu / ((double)(t1 - t0) * sc->threads);

    if (check) {
        /* Random keys: every key sees a handful of requests per second against a limit of a
         * million, so (nearly) everything must pass. Hot key: the limit must hold, and what it
         * allows must be admitted. Token bucket: <= C + r*T, and at least a good part of r*T;
         * sliding window (weighted two-window counter): <= L per aligned window touched. */
        if (!sc->hot) {
            if (o.allowed_fraction < 0.999)
                die("%s: only %.4f of decisions on random keys allowed (expected ~1)", sc->name,
                    o.allowed_fraction);
        } else {
            double T = o.wall_s + 0.002;
            double hi, lo;
            if (sc->a->policy.limits[0].algorithm == SL_TOKEN_BUCKET) {
                hi = LIMIT + LIMIT * T + 1;
                lo = 0.25 * LIMIT * o.wall_s;
            } else {
                /* The window the run starts in may already be full (the previous run used
                 * this key), and one that starts near the end adds little: only a window
                 * lying wholly inside the run is sure to admit about L. */
                hi = LIMIT * (floor(T / WINDOW_S) + 2);
                lo = 0.5 * LIMIT * floor(o.wall_s / WINDOW_S - 1);
                if (lo < 0)
                    lo = 0;
            }
            if (lo > (double)o.total)
                lo = (double)o.total;
            if ((double)o.allowed > hi)
                die("%s: %llu allowed in %.3f s, above the limit's bound %.0f", sc->name,
                    (unsigned long long)o.allowed, o.wall_s, hi);
            if ((double)o.allowed < lo)
                die("%s: only %llu allowed in %.3f s (expected >= %.0f)", sc->name,
                    (unsigned long long)o.allowed, o.wall_s, lo);
        }
    }
    return o;
}

/* ---- the floor: dependent random reads ----------------------------------------------------- */

typedef struct node {
    struct node *next;
    char pad[56];
} node;

typedef struct chase {
    node *start;
    uint64_t steps;
    node *end; /* keeps the loop alive */
    atomic_int *go, *ready;
    pthread_t th;
} chase;

static void *chase_main(void *arg)
{
    chase *c = arg;
    atomic_fetch_add(c->ready, 1);
    while (!atomic_load_explicit(c->go, memory_order_acquire))
        ;
    node *p = c->start;
    for (uint64_t i = 0; i < c->steps; i++)
        p = p->next;
    c->end = p;
    return NULL;
}

typedef struct floorbuf {
    node *nodes;
    size_t n;
    double ns[MAX_THREADS + 1][MAX_REPS];
    uint64_t steps[MAX_THREADS + 1];
} floorbuf;

static floorbuf FB;

static void floor_build(size_t bytes)
{
    size_t n = bytes / sizeof(node);
    if (n < 16384)
        n = 16384; /* at least 1 MiB */
    FB.n = n;
    FB.nodes = xmalloc(sizeof(node) * n); /* malloc, like the table */
    uint32_t *perm = xmalloc(sizeof(uint32_t) * n);
    for (size_t i = 0; i < n; i++)
        perm[i] = (uint32_t)i;
    uint64_t s = P.seed ^ 0xf100f100;
    for (size_t i = n - 1; i > 0; i--) { /* Sattolo: one cycle through every node */
        size_t j = (size_t)below(splitmix64(&s), i);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (size_t i = 0; i < n; i++) {
        FB.nodes[i].next = &FB.nodes[perm[i]];
        memset(FB.nodes[i].pad, (int)(i & 0xff), sizeof FB.nodes[i].pad);
    }
    free(perm);
    /* check: the cycle visits every node */
    node *p = &FB.nodes[0];
    size_t len = 0;
    do {
        p = p->next;
        len++;
    } while (p != &FB.nodes[0] && len <= n);
    if (len != n)
        die("floor: permutation is not one cycle (%zu of %zu)", len, n);
}

/* ns per dependent access per thread, `threads` chains at once */
static double floor_run(int threads, uint64_t steps)
{
    chase c[MAX_THREADS];
    atomic_int go = 0, ready = 0;
    for (int t = 0; t < threads; t++) {
        c[t] = (chase){.start = &FB.nodes[(FB.n / (size_t)threads) * (size_t)t],
                       .steps = steps,
                       .go = &go,
                       .ready = &ready};
        if (pthread_create(&c[t].th, NULL, chase_main, &c[t]) != 0)
            die("pthread_create");
    }
    while (atomic_load(&ready) < threads)
        sched_yield();
    int64_t t0 = mono_ns();
    atomic_store_explicit(&go, 1, memory_order_release);
    for (int t = 0; t < threads; t++)
        pthread_join(c[t].th, NULL);
    int64_t t1 = mono_ns();
    for (int t = 0; t < threads; t++)
        if (c[t].end == NULL)
            die("floor: chain broken");
    return (double)(t1 - t0) / (double)steps;
}

/* ---- main ----------------------------------------------------------------------------------- */

static uint64_t parse_u64(const char *s, const char *opt)
{
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 0);
    if (errno || *e || e == s)
        die("bad value for %s: %s", opt, s);
    return v;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: lib_bench [--quick] [--keys N] [--seconds S] [--reps R] [--batch B]\n"
            "                 [--seed X] [--stream N] [--threads-max T] [--ops N]\n"
            "                 [--only SUBSTRING] [--no-floor]\n");
    exit(2);
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quick") == 0) {
            P.quick = 1;
            P.keys = 10000;
            P.seconds = 0.003;
            P.reps = 1;
            P.stream = 1u << 16;
            P.pilot = 2000;
            continue;
        }
        if (strcmp(a, "--no-floor") == 0) {
            P.no_floor = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || !v)
            usage();
        i++;
        if (strcmp(a, "--keys") == 0)
            P.keys = parse_u64(v, a);
        else if (strcmp(a, "--seconds") == 0)
            P.seconds = atof(v);
        else if (strcmp(a, "--reps") == 0)
            P.reps = (int)parse_u64(v, a);
        else if (strcmp(a, "--batch") == 0)
            P.batch = (int)parse_u64(v, a);
        else if (strcmp(a, "--seed") == 0)
            P.seed = parse_u64(v, a);
        else if (strcmp(a, "--stream") == 0)
            P.stream = parse_u64(v, a);
        else if (strcmp(a, "--threads-max") == 0)
            P.threads_max = (int)parse_u64(v, a);
        else if (strcmp(a, "--ops") == 0)
            P.ops = parse_u64(v, a);
        else if (strcmp(a, "--only") == 0)
            P.only = v;
        else
            usage();
    }
    if (P.keys < 1 || P.keys > 100000000 || !(P.seconds > 0) || P.reps < 1 ||
        P.reps > MAX_REPS || P.batch < 1 || P.batch > MAX_BATCH || P.stream < 1024 ||
        P.threads_max < 1 || P.threads_max > MAX_THREADS)
        die("parameters out of range (see the header of bench/lib_bench.c)");
}

static uint64_t ops_for(const scenario *sc)
{
    uint64_t unit = sc->batch ? (uint64_t)sc->batch : 1;
    uint64_t ops;
    if (P.ops) {
        ops = P.ops;
    } else {
        uint64_t pilot = (P.pilot + unit - 1) / unit * unit;
        outcome o = run_scenario(sc, pilot, 0);
        double per_thread_rate = (double)pilot / o.wall_s;
        double want = per_thread_rate * P.seconds;
        ops = want < (double)pilot ? pilot : (uint64_t)want;
        if (ops > 2000000000ull)
            ops = 2000000000ull;
    }
    return (ops + unit - 1) / unit * unit;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    setvbuf(stdout, NULL, _IOLBF, 0);

    time_t now = time(NULL);
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    printf("# lib_bench libsluice %s, %s, keys=%llu seconds=%.3f reps=%d batch=%d seed=%llu "
           "stream=%llu threads<=%d%s\n",
           sl_version_string(), date, (unsigned long long)P.keys, P.seconds, P.reps, P.batch,
           (unsigned long long)P.seed, (unsigned long long)P.stream, P.threads_max,
           P.quick ? " (quick)" : "");

    tsc_calibrate();
    result("tsc", "ticks_per_ns", tsc_per_ns);
    result("timer", "overhead_ns", timer_overhead_ns());

    make_stream();

    algos[0] = (algo){.name = "token_bucket", .policy = SL_POLICY_TOKEN_BUCKET(LIMIT, LIMIT)};
    algos[1] = (algo){.name = "sliding_window",
                      .policy = SL_POLICY_WINDOW(SL_SLIDING_WINDOW, LIMIT, WINDOW_S)};

    /* scenarios */
    enum { MAXSC = 2 * 2 * MAX_THREADS * 2 };
    static scenario sc[MAXSC];
    int nsc = 0;
    for (int ai = 0; ai < 2; ai++)
        for (int hotk = 1; hotk >= 0; hotk--)
            for (int th = 1; th <= P.threads_max; th++)
                for (int b = 0; b <= (hotk ? 0 : 1); b++) {
                    scenario *s = &sc[nsc];
                    memset(s, 0, sizeof *s);
                    s->a = &algos[ai];
                    s->hot = hotk;
                    s->threads = th;
                    s->batch = b ? P.batch : 0;
                    if (b)
                        snprintf(s->name, sizeof s->name, "%s_%s_%dt_batch%d", s->a->name,
                                 hotk ? "hot" : "random", th, P.batch);
                    else
                        snprintf(s->name, sizeof s->name, "%s_%s_%dt", s->a->name,
                                 hotk ? "hot" : "random", th);
                    if (P.only && !strstr(s->name, P.only))
                        continue;
                    nsc++;
                }

    if (nsc == 0)
        die("no scenario matches --only %s", P.only);

    /* populate the limiters the scenarios use */
    int used[2] = {0, 0};
    for (int i = 0; i < nsc; i++)
        used[sc[i].a - algos] = 1;
    for (int i = 0; i < 2; i++) {
        int rc = sl_policy_validate(&algos[i].policy);
        if (rc != SL_OK)
            die("policy %s: %s", algos[i].name, sl_strerror(rc));
        if (used[i])
            open_and_populate(&algos[i]);
    }

    /* the floor's buffer: as large as the larger limiter at this many keys */
    if (!P.no_floor) {
        size_t fbytes = algos[0].bytes > algos[1].bytes ? algos[0].bytes : algos[1].bytes;
        floor_build(fbytes);
        result("floor", "bytes", (double)(FB.n * sizeof(node)));
    }

    for (int i = 0; i < nsc; i++)
        sc[i].ops = ops_for(&sc[i]);
    for (int th = 1; th <= P.threads_max && !P.no_floor; th++) { /* ~P.seconds / 2 each */
        uint64_t pilot = P.quick ? 20000 : 200000;
        double ns = floor_run(th, pilot);
        double want = P.seconds * 0.5 * 1e9 / ns;
        FB.steps[th] = want < (double)pilot ? pilot : (uint64_t)want;
    }

    /* repetitions, interleaved across scenarios */
    for (int r = 0; r < P.reps; r++) {
        for (int th = 1; th <= P.threads_max && !P.no_floor; th++)
            FB.ns[th][r] = floor_run(th, FB.steps[th]);
        for (int i = 0; i < nsc; i++) {
            outcome o = run_scenario(&sc[i], sc[i].ops, 1);
            sc[i].dps[r] = o.dps;
            sc[i].nspd[r] = o.nspd;
            sc[i].p50[r] = o.p50;
            sc[i].p99[r] = o.p99;
            sc[i].allowed[r] = o.allowed_fraction;
            sc[i].cpu[r] = o.cpu_share;
            fprintf(stderr, "# rep %d %-40s %12.0f decisions/s  %7.1f ns/decision/thread  "
                    "p50 %6.1f  p99 %7.1f ns  allowed %.4f  cpu %.2f\n",
                    r + 1, sc[i].name, o.dps, o.nspd, o.p50, o.p99, o.allowed_fraction,
                    o.cpu_share);
        }
    }

    /* report medians */
    for (int th = 1; th <= P.threads_max && !P.no_floor; th++) {
        char name[32];
        snprintf(name, sizeof name, "floor_%dt", th);
        result(name, "ns_per_access", median(FB.ns[th], P.reps));
    }
    for (int ai = 0; ai < 2; ai++) {
        if (!algos[ai].l)
            continue;
        char name[64];
        sl_stats st;
        if (sl_stats_get(algos[ai].l, NULL, 0, &st) != SL_OK)
            die("sl_stats_get");
        snprintf(name, sizeof name, "%s_end", algos[ai].name);
        result(name, "keys", (double)st.keys);
        result(name, "reclaimed", (double)st.reclaimed);
        result(name, "evicted", (double)st.evicted);
    }
    for (int i = 0; i < nsc; i++) {
        scenario *s = &sc[i];
        result(s->name, "decisions_per_s", median(s->dps, P.reps));
        result(s->name, "ns_per_decision", median(s->nspd, P.reps));
        result(s->name, "p50_ns", median(s->p50, P.reps));
        result(s->name, "p99_ns", median(s->p99, P.reps));
        result(s->name, "allowed_fraction", median(s->allowed, P.reps));
        result(s->name, "cpu_share", median(s->cpu, P.reps));
        result(s->name, "ops_per_thread", (double)s->ops);
        result(s->name, "bytes_per_key", s->a->bytes_per_key);
    }
    /* ratios to the floor: per repetition (same rep's floor), then the median */
    for (int i = 0; i < nsc && !P.no_floor; i++) {
        scenario *s = &sc[i];
        if (s->hot)
            continue;
        double rr[MAX_REPS];
        for (int r = 0; r < P.reps; r++)
            rr[r] = s->nspd[r] / FB.ns[s->threads][r];
        char name[96];
        snprintf(name, sizeof name, "ratio_%.63s_vs_floor", s->name);
        result(name, "ratio", median(rr, P.reps));
    }

    /* targets (informational: a miss never fails the run) */
    int met = 0, total = 0;
#define TARGET(cond, ...)                                                                    \
    do {                                                                                     \
        int ok_ = (cond);                                                                    \
        total++;                                                                             \
        met += ok_;                                                                          \
        printf("TARGET %s ", ok_ ? "MET   " : "MISSED");                                     \
        printf(__VA_ARGS__);                                                                 \
        putchar('\n');                                                                       \
    } while (0)
    for (int i = 0; i < nsc; i++) {
        scenario *s = &sc[i];
        double p99 = median(s->p99, P.reps);
        if (!s->hot && !P.no_floor) {
            double rr[MAX_REPS];
            for (int r = 0; r < P.reps; r++)
                rr[r] = s->nspd[r] / FB.ns[s->threads][r];
            double ratio = median(rr, P.reps);
            if (s->batch)
                TARGET(ratio <= 1.0, "%s: %.3fx the random-access floor per decision (<= 1)",
                       s->name, ratio);
            else
                TARGET(ratio <= 2.0, "%s: %.3fx the random-access floor per decision (<= 2)",
                       s->name, ratio);
        }
        TARGET(p99 < 1000.0, "%s: p99 %.1f ns (< 1000)", s->name, p99);
    }
    for (int ai = 0; ai < 2; ai++)
        if (algos[ai].l)
            TARGET(algos[ai].bytes_per_key <= 64.0, "%s: %.1f bytes/key at %llu keys (<= 64)",
                   algos[ai].name, algos[ai].bytes_per_key, (unsigned long long)P.keys);
    printf("# lib_bench targets met: %d of %d\n", met, total);

    for (int ai = 0; ai < 2; ai++)
        sl_close(algos[ai].l);
    free(FB.nodes);
    free(stream);
    return 0;
}
