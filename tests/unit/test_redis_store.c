/* test_redis_store.c — what only the Redis store has, through the public API on a private
 * redis-server: Redis's clock, the near cache, reloading the function library, key names and TTLs, spans
 * it refuses, bad addresses, the fail modes while Redis is down and recovery when it is back,
 * and a Redis Cluster of three masters (slot routing, ASK while a slot migrates, MOVED
 * after). */
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "redis.h"
#include "redis_fixture.h"
#include "sluice.h"

#define S SL_SECOND

static redis_fixture g_redis;

static int group_setup(void **st)
{
    (void)st;
    return redis_fixture_start(&g_redis, NULL);
}

static int group_teardown(void **st)
{
    (void)st;
    redis_fixture_stop(&g_redis);
    return 0;
}

typedef struct states {
    int ups, downs;
} states;

static void on_state(void *ctx, int up, const char *why)
{
    states *s = ctx;
    assert_non_null(why);
    if (up)
        s->ups++;
    else
        s->downs++;
}

static sl_limiter *open_redis(const char *servers, sl_fail_mode mode, const char *prefix,
                              states *st)
{
    sl_redis_options ro;
    sl_redis_options_init(&ro);
    ro.servers = servers;
    ro.fail_mode = mode;
    ro.key_prefix = prefix;
    ro.timeout_ms = 500;
    ro.on_state = st ? on_state : NULL;
    ro.on_state_ctx = st;
    sl_options o;
    sl_options_init(&o);
    o.redis = &ro;
    sl_limiter *l = NULL;
    assert_int_equal(sl_open(&l, &o), SL_OK);
    return l;
}

static redisReply *cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    return r;
}

/* Give acme/jobs a concurrency rule of `slots` and take one lease of u1 (its key *k). */
static sl_decision first_lease(sl_limiter *l, uint64_t slots, sl_key *k)
{
    sl_policy cc = SL_POLICY_WINDOW(SL_CONCURRENCY, (double)slots, 60);
    *k = SL_KEY("acme", "jobs", "u1");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, k, &cc), SL_OK);
    sl_decision d;
    assert_int_equal(sl_take(l, k, 1, SL_NOW, &d), SL_OK);
    assert_true(d.allowed && d.lease);
    return d;
}

static void test_redis_clock_and_near_cache(void **st)
{
    (void)st;
    sl_limiter *l = open_redis(g_redis.addr, SL_FAIL_CLOSED, "nc:", NULL);
    sl_key k = SL_KEY("acme", "login", "u1");
    sl_decision d;
    for (int i = 0; i < 5; i++) { /* the default policy: 5, refilling 1/s (Redis's TIME) */
        assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
        assert_true(d.allowed);
        assert_int_equal(d.source, SL_SOURCE_STORE);
        assert_int_equal(d.remaining, (uint64_t)(4 - i));
    }
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    assert_true(d.retry_after > 0 && d.retry_after <= S);
    /* known to be over its limit: answered here until its retry time, never allowed */
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_NEAR_CACHE);
    assert_true(d.retry_after > 0 && d.retry_after <= S);
    assert_int_equal(d.limit, 5);
    sl_store_stats ss;
    assert_int_equal(sl_store_stats_get(l, &ss), SL_OK);
    assert_true(ss.redis && ss.up && !ss.cluster);
    assert_int_equal(ss.calls, 6);
    assert_int_equal(ss.near_cache, 1);
    sl_stats t;
    assert_int_equal(sl_stats_get(l, "acme", 4, &t), SL_OK);
    assert_int_equal(t.allowed, 5);
    assert_int_equal(t.denied, 2);
    /* after the retry time Redis decides again: one unit has refilled */
    usleep((useconds_t)(d.retry_after / 1000) + 20000);
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_STORE);

    /* the key's name and its TTL (the time until it is full again, in ms) */
    redisContext *c = redis_fixture_connect(&g_redis);
    assert_non_null(c);
    redisReply *r = cmd(c, "PTTL nc:4:acme:5:login:u1");
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    assert_true(r->integer > 4000 && r->integer <= 5000);
    freeReplyObject(r);
    /* a policy with a concurrency limit never uses the near cache (a release frees early) */
    sl_key kc;
    sl_decision a = first_lease(l, 1, &kc);
    assert_int_equal(sl_take(l, &kc, 1, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(sl_release(l, &kc, a.lease, SL_NOW), SL_OK);
    assert_int_equal(sl_take(l, &kc, 1, SL_NOW, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    redisFree(c);
    sl_close(l);
}

/* A lease id no take can have issued (the script's ids stay below 2^53) is unknown, as on
 * the in-memory store: SL_ELEASE, not SL_ESTORE ("Redis unreachable") from the script's
 * refusal of an argument it cannot hold exactly, and no error counted. */
static void test_release_of_an_impossible_lease(void **st)
{
    (void)st;
    sl_limiter *l = open_redis(g_redis.addr, SL_FAIL_CLOSED, "rl:", NULL);
    sl_key k;
    sl_decision d = first_lease(l, 2, &k);
    sl_store_stats ss;
    assert_int_equal(sl_store_stats_get(l, &ss), SL_OK);
    uint64_t errors = ss.errors;
    const uint64_t bad[] = {(UINT64_C(1) << 53), (UINT64_C(1) << 53) + 1, UINT64_C(1) << 61,
                            UINT64_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(sl_release(l, &k, bad[i], SL_NOW), SL_ELEASE);
    assert_int_equal(sl_store_stats_get(l, &ss), SL_OK);
    assert_int_equal(ss.errors, errors);
    assert_true(ss.up);
    assert_int_equal(sl_release(l, &k, d.lease, SL_NOW), SL_OK); /* the real one still works */
    sl_close(l);
}

/* A near-cache answer shows what Redis would: a denial of cost c whose `remaining` is below
 * c - 1 may see `remaining` grow before its retry time (a bucket refills unit by unit), so it
 * is not cached; one left c - 1 short cannot change before it passes, and is. */
static void test_near_cache_remaining(void **st)
{
    (void)st;
    sl_limiter *l = open_redis(g_redis.addr, SL_FAIL_CLOSED, "ncr:", NULL);
    sl_policy tb = SL_POLICY_TOKEN_BUCKET(10, 10); /* a unit every 100 ms */
    sl_key k = SL_KEY("acme", "bulk", "u1");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k, &tb), SL_OK);
    sl_decision d;
    assert_int_equal(sl_take(l, &k, 10, SL_NOW, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(sl_take(l, &k, 5, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    assert_int_equal(d.remaining, 0);
    assert_true(d.retry_after > 300 * 1000000 && d.retry_after <= 500 * 1000000);
    usleep(300 * 1000); /* three units back, still short of five */
    assert_int_equal(sl_take(l, &k, 5, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_true(d.remaining >= 2 && d.remaining <= 4); /* not the 0 of 300 ms ago */
    assert_int_equal(d.source, SL_SOURCE_STORE);

    /* one unit short: nothing can change before the retry time, the near cache answers */
    sl_policy slow = SL_POLICY_TOKEN_BUCKET(10, 1);
    sl_key k2 = SL_KEY("acme", "slow", "u1");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &k2, &slow), SL_OK);
    assert_int_equal(sl_take(l, &k2, 9, SL_NOW, &d), SL_OK);
    assert_true(d.allowed);
    assert_int_equal(sl_take(l, &k2, 2, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    assert_int_equal(d.remaining, 1);
    assert_int_equal(sl_take(l, &k2, 2, SL_NOW, &d), SL_OK);
    assert_false(d.allowed);
    assert_int_equal(d.source, SL_SOURCE_NEAR_CACHE);
    assert_int_equal(d.remaining, 1);
    sl_close(l);
}

static void test_library_reload_and_spans(void **st)
{
    (void)st;
    sl_limiter *l = open_redis(g_redis.addr, SL_FAIL_CLOSED, "ns:", NULL);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    sl_store_stats ss;
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    sl_store_stats_get(l, &ss);
    uint64_t loads = ss.script_loads;
    redisContext *c = redis_fixture_connect(&g_redis);
    freeReplyObject(cmd(c, "FUNCTION FLUSH"));
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK); /* not found: load, resend */
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 3);
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.script_loads, loads + 1);
    assert_int_equal(ss.fail_closed, 0);
    /* 60 days do not fit the store's exact arithmetic: refused, nothing sent */
    sl_policy big = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 10, 60 * 86400.0);
    sl_key kb = SL_KEY("t", "big", "c");
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &kb, &big), SL_OK);
    assert_int_equal(sl_take(l, &kb, 1, SL_NOW, &d), SL_ESPAN);
    sl_policy month = SL_POLICY_WINDOW(SL_FIXED_WINDOW, 10, 31 * 86400.0);
    assert_int_equal(sl_rule_set(l, SL_SCOPE_ACTION, &kb, &month), SL_OK);
    assert_int_equal(sl_take(l, &kb, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(d.remaining, 9);
    /* bad input is refused before Redis, as with the in-memory store */
    sl_key empty = SL_KEY("t", "a", "");
    assert_int_equal(sl_take(l, &empty, 1, SL_NOW, &d), SL_EKEYEMPTY);
    /* a cost above the capacity asks Redis only what is left (test_limiter.c) */
    assert_int_equal(sl_take(l, &k, 6, SL_NOW, &d), SL_ECOST);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    redisFree(c);
    sl_close(l);
}

/* FCALLs since `c`'s last CONFIG RESETSTAT. */
static long long fcalls(redisContext *c)
{
    redisReply *r = cmd(c, "INFO commandstats");
    const char *p = strstr(r->str, "cmdstat_fcall:calls=");
    long long n = p ? atoll(p + strlen("cmdstat_fcall:calls=")) : 0;
    freeReplyObject(r);
    return n;
}

/* A batch's requests alike in all but the key go as a few calls of many keys, answered as one
 * call per key would be (each key: exactly its capacity, a key twice in one call included).
 * After FUNCTION FLUSH the call is answered "Function not found": the library is loaded and
 * each request sent again alone, none counted twice. */
static void test_batch_groups(void **st)
{
    (void)st;
    sl_limiter *l = open_redis(g_redis.addr, SL_FAIL_CLOSED, "bg:", NULL);
    sl_policy two = SL_POLICY_TOKEN_BUCKET(2, 1.0 / 3600);
    assert_int_equal(sl_default_set(l, &two), SL_OK);
    enum { KEYS = 40, N = 3 * KEYS };
    char names[KEYS][16];
    sl_request reqs[N];
    sl_decision ds[N];
    for (int i = 0; i < N; i++) {
        snprintf(names[i % KEYS], sizeof names[0], "u%d", i % KEYS);
        memset(&reqs[i], 0, sizeof reqs[i]);
        reqs[i].key = (sl_key)SL_KEY("t", "a", names[i % KEYS]);
        reqs[i].cost = 1;
    }
    sl_decision d;
    sl_key warm = SL_KEY("t", "warm", "x");
    assert_int_equal(sl_take(l, &warm, 1, SL_NOW, &d), SL_OK); /* topology, library */
    redisContext *c = redis_fixture_connect(&g_redis);
    freeReplyObject(cmd(c, "CONFIG RESETSTAT"));
    assert_int_equal(sl_take_batch(l, reqs, N, SL_NOW, ds), SL_OK);
    int allowed[KEYS] = {0};
    for (int i = 0; i < N; i++) {
        assert_int_equal(ds[i].err, SL_OK);
        assert_int_equal(ds[i].source, SL_SOURCE_STORE);
        allowed[i % KEYS] += ds[i].allowed;
    }
    for (int k = 0; k < KEYS; k++)
        assert_int_equal(allowed[k], 2);
    assert_true(fcalls(c) <= 3); /* 120 requests: chunks of 64, one call each */

    sl_policy one = SL_POLICY_TOKEN_BUCKET(1, 1.0 / 3600);
    assert_int_equal(sl_default_set(l, &one), SL_OK);
    for (int i = 0; i < KEYS; i++)
        reqs[i].key = (sl_key)SL_KEY("t", "fresh", names[i]);
    freeReplyObject(cmd(c, "FUNCTION FLUSH"));
    assert_int_equal(sl_take_batch(l, reqs, KEYS, SL_NOW, ds), SL_OK);
    for (int i = 0; i < KEYS; i++)
        assert_true(ds[i].err == SL_OK && ds[i].allowed && ds[i].source == SL_SOURCE_STORE);
    assert_int_equal(sl_take_batch(l, reqs, KEYS, SL_NOW, ds), SL_OK);
    for (int i = 0; i < KEYS; i++)
        assert_true(ds[i].err == SL_OK && !ds[i].allowed);
    sl_store_stats ss;
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.fail_closed, 0);

    /* A key of another type in the middle of a call: that request alone goes to the fail
     * mode; the keys around it are decided once (not again), as alone. */
    freeReplyObject(cmd(c, "HSET bg:1:t:2:wt:bad f v"));
    sl_request three[3] = {{.key = SL_KEY("t", "wt", "u0"), .cost = 1},
                           {.key = SL_KEY("t", "wt", "bad"), .cost = 1},
                           {.key = SL_KEY("t", "wt", "u2"), .cost = 1}};
    assert_int_equal(sl_default_set(l, &two), SL_OK);
    freeReplyObject(cmd(c, "CONFIG RESETSTAT"));
    assert_int_equal(sl_take_batch(l, three, 3, SL_NOW, ds), SL_OK);
    assert_int_equal(fcalls(c), 1);
    assert_true(ds[0].allowed && ds[0].source == SL_SOURCE_STORE && ds[0].remaining == 1);
    assert_true(!ds[1].allowed && ds[1].source == SL_SOURCE_FAIL_CLOSED);
    assert_true(ds[2].allowed && ds[2].source == SL_SOURCE_STORE && ds[2].remaining == 1);
    assert_int_equal(sl_take(l, &three[0].key, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(d.remaining, 0); /* the second of 2: the first was counted once */

    /* No memory for a group's command: every request of the round goes alone, decided as
     * it would be in a group */
    for (int i = 0; i < N; i++)
        reqs[i].key = (sl_key)SL_KEY("t", "oom", names[i % KEYS]);
    freeReplyObject(cmd(c, "CONFIG RESETSTAT"));
    sl_rs_fail_group_allocs_after(0);
    assert_int_equal(sl_take_batch(l, reqs, N, SL_NOW, ds), SL_OK);
    sl_rs_fail_group_allocs_after(-1);
    int got[KEYS] = {0};
    for (int i = 0; i < N; i++) {
        assert_int_equal(ds[i].err, SL_OK);
        assert_int_equal(ds[i].source, SL_SOURCE_STORE);
        assert_int_equal(ds[i].allowed, i < 2 * KEYS); /* each key's first two */
        got[i % KEYS] += ds[i].allowed;
    }
    for (int k = 0; k < KEYS; k++)
        assert_int_equal(got[k], 2);
    assert_int_equal(fcalls(c), N); /* one call per request */
    redisFree(c);
    sl_close(l);
}

/* Redis Cluster's key hashing (cluster spec): CRC16/XMODEM, and only a non-empty {tag}. */
static void test_slots(void **st)
{
    (void)st;
    assert_int_equal(sl_rs_slot("123456789", 9), 0x31C3); /* the CRC's check value */
    assert_int_equal(sl_rs_slot("foo", 3), 12182);
    assert_int_equal(sl_rs_slot("bar", 3), 5061);
    assert_int_equal(sl_rs_slot("{user1000}.following", 20), sl_rs_slot("user1000", 8));
    assert_int_not_equal(sl_rs_slot("foo{}{bar}", 10), sl_rs_slot("bar", 3)); /* empty {} */
    assert_int_equal(sl_rs_slot("foo{{bar}}zap", 13), sl_rs_slot("{bar", 4));
    assert_int_equal(sl_rs_slot("foo{bar}{zap}", 13), sl_rs_slot("bar", 3));
}

static void test_bad_addresses(void **st)
{
    (void)st;
    const char *bad[] = {"", "nohost", "h:", ":1", "h:0", "h:65536", "h:1x", "h:1,", "h:1,,h:2"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sl_redis_options ro;
        sl_redis_options_init(&ro);
        ro.servers = bad[i];
        sl_options o;
        sl_options_init(&o);
        o.redis = &ro;
        sl_limiter *l = NULL;
        assert_int_equal(sl_open(&l, &o), SL_EADDRESS);
        assert_null(l);
    }
    sl_redis_options ro;
    sl_redis_options_init(&ro);
    sl_options o;
    sl_options_init(&o);
    o.redis = &ro; /* no servers */
    sl_limiter *l = NULL;
    assert_int_equal(sl_open(&l, &o), SL_EINVAL);
}

/* Redis goes away: decisions by the fail mode at once, one state change reported; it comes
 * back on the same port: Redis decides again within its back-off (at most 2 s). */
static void outage(sl_fail_mode mode)
{
    redis_fixture r;
    assert_int_equal(redis_fixture_start(&r, NULL), 0);
    states st = {0, 0};
    sl_limiter *l = open_redis(r.addr, mode, "out:", &st);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    redis_fixture_stop(&r);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
        assert_int_equal(d.allowed, mode == SL_FAIL_OPEN);
        assert_int_equal(d.source, mode == SL_FAIL_OPEN ? SL_SOURCE_FAIL_OPEN
                                                        : SL_SOURCE_FAIL_CLOSED);
        if (mode == SL_FAIL_CLOSED)
            assert_int_equal(d.retry_after, S);
    }
    /* a cost above the capacity never passes, whatever the fail mode */
    assert_int_equal(sl_take(l, &k, 6, SL_NOW, &d), SL_ECOST);
    assert_false(d.allowed);
    assert_int_equal(d.limit, 5);
    sl_key k2 = SL_KEY("t", "a", "other");
    assert_int_equal(sl_release(l, &k2, 1, SL_NOW), SL_ESTORE);
    assert_int_equal(st.downs, 1); /* once per change, not per request */
    sl_store_stats ss;
    sl_store_stats_get(l, &ss);
    assert_false(ss.up);
    assert_int_equal(mode == SL_FAIL_OPEN ? ss.fail_open : ss.fail_closed, 100);

    assert_int_equal(redis_fixture_restart(&r), 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        usleep(10000);
        assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
        clock_gettime(CLOCK_MONOTONIC, &t1);
    } while (d.source != SL_SOURCE_STORE && t1.tv_sec - t0.tv_sec < 5);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    assert_true(d.allowed); /* a new Redis: the key is new */
    assert_int_equal(st.ups, 1);
    sl_store_stats_get(l, &ss);
    assert_true(ss.up);
    sl_close(l);
    redis_fixture_stop(&r);
}

/* A Redis that stops answering with its connections open: the call gives up after the
 * timeout (500 ms here) and the fail mode decides; then at once while the node backs off. */
/* A server that answers every connection's first bytes with one huge array header, the way a
 * broken or hostile Redis could: hiredis 0.14 would allocate 8 GB of element pointers for it. */
typedef struct huge_server {
    int fd, port;
    pthread_t thread;
} huge_server;

static void *huge_serve(void *arg)
{
    huge_server *h = arg;
    for (int i = 0; i < 8; i++) { /* bounded: the test makes a few connections */
        int c = accept(h->fd, NULL, NULL);
        if (c < 0)
            break;
        char buf[4096];
        if (read(c, buf, sizeof buf) > 0) {
            static const char huge[] = "*1000000000\r\n:1\r\n";
            ssize_t w = write(c, huge, sizeof huge - 1);
            (void)w;
            if (read(c, buf, sizeof buf) < 0) /* until the client drops it */
                (void)0;
        }
        close(c);
    }
    return NULL;
}

static long vm_peak_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmPeak: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

/* Every connection's reader refuses arrays longer than SL_RS_MAX_ARRAY: the request is decided
 * by the fail mode, at once, and no huge allocation is made. */
static void test_huge_array_reply(void **st)
{
    (void)st;
    redisReader *rd = redisReaderCreate();
    sl_rs_cap_reader(rd);
    void *rep = NULL;
    redisReaderFeed(rd, "*3\r\n:1\r\n:2\r\n:3\r\n", 16);
    assert_int_equal(redisReaderGetReply(rd, &rep), REDIS_OK);
    assert_non_null(rep);
    assert_int_equal(((redisReply *)rep)->elements, 3);
    freeReplyObject(rep);
    redisReaderFeed(rd, "*1000000000\r\n", 13);
    assert_int_equal(redisReaderGetReply(rd, &rep), REDIS_ERR);
    redisReaderFree(rd);

    huge_server h;
    h.fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(h.fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(h.fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(h.fd, (struct sockaddr *)&a, &al), 0);
    assert_int_equal(listen(h.fd, 8), 0);
    h.port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&h.thread, NULL, huge_serve, &h), 0);

    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", h.port);
    long peak0 = vm_peak_kb();
    sl_limiter *l = open_redis(addr, SL_FAIL_CLOSED, "huge:", NULL);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(d.source, SL_SOURCE_FAIL_CLOSED);
    assert_int_equal(d.allowed, 0);
    long peak1 = vm_peak_kb();
    if (peak0 > 0 && peak1 > 0)
        assert_true(peak1 - peak0 < 1024 * 1024); /* not the 8 GB hiredis would reserve */
    sl_close(l);
    shutdown(h.fd, SHUT_RDWR);
    close(h.fd);
    pthread_join(h.thread, NULL);
}

static void test_redis_hangs(void **st)
{
    (void)st;
    redis_fixture r;
    assert_int_equal(redis_fixture_start(&r, NULL), 0);
    sl_limiter *l = open_redis(r.addr, SL_FAIL_CLOSED, "hang:", NULL);
    sl_key k = SL_KEY("t", "a", "c");
    sl_decision d;
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    kill(r.pid, SIGSTOP);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double waited = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    assert_int_equal(d.source, SL_SOURCE_FAIL_CLOSED);
    assert_true(waited >= 0.4 && waited < 2.0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(sl_take(l, &k, 1, SL_NOW, &d), SL_OK); /* backing off: no wait */
    clock_gettime(CLOCK_MONOTONIC, &t1);
    assert_int_equal(d.source, SL_SOURCE_FAIL_CLOSED);
    assert_true(t1.tv_sec - t0.tv_sec < 1 && (t1.tv_sec > t0.tv_sec || t1.tv_nsec - t0.tv_nsec < 100000000));
    kill(r.pid, SIGCONT);
    do {
        usleep(20000);
        assert_int_equal(sl_take(l, &k, 0, SL_NOW, &d), SL_OK);
        clock_gettime(CLOCK_MONOTONIC, &t1);
    } while (d.source != SL_SOURCE_STORE && t1.tv_sec - t0.tv_sec < 5);
    assert_int_equal(d.source, SL_SOURCE_STORE);
    /* 4 after the one take before the hang, or 3: the take that timed out was already in
     * Redis's socket buffer and may still run when Redis resumes. A timeout can only cost
     * the client a unit (fail_closed denied it), never admit one more. */
    assert_true(d.remaining == 3 || d.remaining == 4);
    sl_close(l);
    redis_fixture_stop(&r);
}

static void test_fail_closed(void **st)
{
    (void)st;
    outage(SL_FAIL_CLOSED);
}

static void test_fail_open(void **st)
{
    (void)st;
    outage(SL_FAIL_OPEN);
}

/* Three masters; the limiter is given one of them and learns the rest (CLUSTER SLOTS). */
/* The node of n[0..3) holding keys of `slot` (-1: none), and how many it holds. */
static int slot_holder(redis_fixture *n, long long slot, long long *count)
{
    int holder = -1;
    for (int i = 0; i < 3 && holder < 0; i++) {
        redisContext *c = redis_fixture_connect(&n[i]);
        redisReply *r = cmd(c, "CLUSTER COUNTKEYSINSLOT %lld", slot);
        if (r->integer > 0) {
            holder = i;
            *count = r->integer;
        }
        freeReplyObject(r);
        redisFree(c);
    }
    return holder;
}

static void test_cluster(void **st)
{
    (void)st;
    redis_fixture n[3];
    const char *args[] = {"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "2000", NULL};
    char create[512] = "redis-cli --cluster create";
    for (int i = 0; i < 3; i++) {
        assert_int_equal(redis_fixture_start_cluster_node(&n[i], args), 0);
        size_t len = strlen(create);
        snprintf(create + len, sizeof create - len, " %s", n[i].addr);
    }
    strcat(create, " --cluster-replicas 0 --cluster-yes >/dev/null 2>&1");
    assert_int_equal(system(create), 0);
    int ok = 0;
    for (int tries = 0; tries < 200 && !ok; tries++) {
        ok = 1;
        for (int i = 0; i < 3; i++) {
            redisContext *c = redis_fixture_connect(&n[i]);
            redisReply *r = cmd(c, "CLUSTER INFO");
            ok &= strstr(r->str, "cluster_state:ok") != NULL;
            freeReplyObject(r);
            redisFree(c);
        }
        if (!ok)
            usleep(50000);
    }
    assert_true(ok);

    sl_limiter *l = open_redis(n[1].addr, SL_FAIL_CLOSED, "cl:", NULL);
    enum { KEYS = 60 };
    sl_request rq[KEYS];
    sl_decision d[KEYS];
    char names[KEYS][16];
    for (int round = 0; round < 6; round++) {
        for (int i = 0; i < KEYS; i++) {
            snprintf(names[i], sizeof names[i], "u%d", i);
            rq[i] = (sl_request){.key = SL_KEY("t", "a", names[i]), .cost = 1};
        }
        assert_int_equal(sl_take_batch(l, rq, KEYS, SL_NOW, d), SL_OK);
        for (int i = 0; i < KEYS; i++) {
            assert_int_equal(d[i].err, SL_OK);
            assert_int_equal(d[i].allowed, round < 5); /* exactly 5 per key */
        }
    }
    sl_store_stats ss;
    sl_store_stats_get(l, &ss);
    assert_true(ss.cluster && ss.up);
    assert_int_equal(ss.fail_closed, 0);
    long long held = 0, nodes_with_keys = 0;
    for (int i = 0; i < 3; i++) {
        redisContext *c = redis_fixture_connect(&n[i]);
        redisReply *r = cmd(c, "DBSIZE");
        held += r->integer;
        nodes_with_keys += r->integer > 0;
        freeReplyObject(r);
        redisFree(c);
    }
    assert_int_equal(held, KEYS);
    assert_int_equal(nodes_with_keys, 3);

    /* Move the slot of one key (with the key) to another master, as redis-cli --cluster
     * reshard does; decisions follow and the key keeps its state (still exhausted). */
    sl_key k = SL_KEY("t", "a", "u0");
    redisContext *c0 = redis_fixture_connect(&n[0]);
    redisReply *r = cmd(c0, "CLUSTER KEYSLOT %s", "cl:1:t:1:a:u0");
    long long slot = r->integer;
    freeReplyObject(r);
    char ids[3][64];
    for (int i = 0; i < 3; i++) {
        redisContext *c = redis_fixture_connect(&n[i]);
        r = cmd(c, "CLUSTER MYID");
        snprintf(ids[i], sizeof ids[i], "%s", r->str);
        freeReplyObject(r);
        redisFree(c);
    }
    long long count;
    int from = slot_holder(n, slot, &count);
    assert_true(from >= 0);
    int to = (from + 1) % 3;
    redisContext *cf = redis_fixture_connect(&n[from]), *ct = redis_fixture_connect(&n[to]);
    freeReplyObject(cmd(ct, "CLUSTER SETSLOT %lld IMPORTING %s", slot, ids[from]));
    freeReplyObject(cmd(cf, "CLUSTER SETSLOT %lld MIGRATING %s", slot, ids[to]));
    freeReplyObject(cmd(cf, "MIGRATE 127.0.0.1 %d %s 0 5000", n[to].port, "cl:1:t:1:a:u0"));
    /* mid-migration: the source answers ASK, the request goes to the target after ASKING */
    sl_decision e; /* cost 0: below the near cache's denial of cost 1, so Redis is asked */
    assert_int_equal(sl_take(l, &k, 0, SL_NOW, &e), SL_OK);
    assert_int_equal(e.source, SL_SOURCE_STORE);
    assert_int_equal(e.remaining, 0); /* the state moved with the key */
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.redirects, 1);
    for (int i = 0; i < 3; i++) {
        redisContext *c = redis_fixture_connect(&n[i]);
        freeReplyObject(cmd(c, "CLUSTER SETSLOT %lld NODE %s", slot, ids[to]));
        redisFree(c);
    }
    /* the move is done: MOVED, and the slot map learns the new owner */
    assert_int_equal(sl_take(l, &k, 0, SL_NOW, &e), SL_OK);
    assert_int_equal(e.remaining, 0);
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.redirects, 2);
    assert_int_equal(sl_take(l, &k, 0, SL_NOW, &e), SL_OK); /* straight there now */
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.redirects, 2);
    assert_int_equal(ss.fail_closed, 0);

    /* Two keys of one slot (a hash tag), the slot half migrated (one key moved, the other
     * not). Redis would refuse a call of both with TRYAGAIN; on a cluster requests go one
     * key per call: one is decided where it is, one after ASK, none by the fail mode. */
    sl_request two[2] = {{.key = SL_KEY("t", "a", "{h}x"), .cost = 1},
                         {.key = SL_KEY("t", "a", "{h}y"), .cost = 1}};
    assert_int_equal(sl_take_batch(l, two, 2, SL_NOW, d), SL_OK);
    assert_true(d[0].allowed && d[1].allowed);
    r = cmd(c0, "CLUSTER KEYSLOT {h}");
    long long hs = r->integer;
    freeReplyObject(r);
    int hfrom = slot_holder(n, hs, &count);
    assert_true(hfrom >= 0);
    assert_int_equal(count, 2);
    int hto = (hfrom + 1) % 3;
    redisContext *hf = redis_fixture_connect(&n[hfrom]), *ht = redis_fixture_connect(&n[hto]);
    freeReplyObject(cmd(ht, "CLUSTER SETSLOT %lld IMPORTING %s", hs, ids[hfrom]));
    freeReplyObject(cmd(hf, "CLUSTER SETSLOT %lld MIGRATING %s", hs, ids[hto]));
    freeReplyObject(cmd(hf, "MIGRATE 127.0.0.1 %d %s 0 5000", n[hto].port, "cl:1:t:1:a:{h}x"));
    uint64_t errors = ss.errors, redirects = ss.redirects;
    assert_int_equal(sl_take_batch(l, two, 2, SL_NOW, d), SL_OK);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(d[i].err, SL_OK);
        assert_int_equal(d[i].source, SL_SOURCE_STORE);
        assert_true(d[i].allowed);
        assert_int_equal(d[i].remaining, 3); /* the second unit of 5, state kept */
    }
    sl_store_stats_get(l, &ss);
    assert_int_equal(ss.fail_closed, 0);
    assert_int_equal(ss.errors, errors); /* no TRYAGAIN */
    assert_int_equal(ss.redirects, redirects + 1); /* the moved key's ASK */
    redisFree(hf);
    redisFree(ht);
    redisFree(cf);
    redisFree(ct);
    redisFree(c0);
    sl_close(l);
    for (int i = 0; i < 3; i++)
        redis_fixture_stop(&n[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redis_clock_and_near_cache),
        cmocka_unit_test(test_near_cache_remaining),
        cmocka_unit_test(test_library_reload_and_spans),
        cmocka_unit_test(test_release_of_an_impossible_lease),
        cmocka_unit_test(test_batch_groups),
        cmocka_unit_test(test_slots),
        cmocka_unit_test(test_bad_addresses),
        cmocka_unit_test(test_redis_hangs),
        cmocka_unit_test(test_huge_array_reply),
        cmocka_unit_test(test_fail_closed),
        cmocka_unit_test(test_fail_open),
        cmocka_unit_test(test_cluster),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
