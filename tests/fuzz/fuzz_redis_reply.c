/*
 * fuzz_redis_reply.c — replies from a broken or malicious Redis server, as the Redis store
 * (src/store/redis.c) reads them: the input is the byte stream of the connection.
 *
 * The bytes go through hiredis's reader (redisReaderFeed / redisReaderGetReply, in two pieces
 * split at a position taken from the first byte), and every reply it produces is handed to
 *  - sl_rs_decode, as the reply of the store's Lua function, for policies of 1 to 4 limits;
 *  - sl_rs_apply_slots, as the reply to CLUSTER SLOTS;
 *  - sl_rs_finish, as the reply to each of four calls prepared with sl_rs_prepare (a take with
 *    two limits, a peek, a take holding a concurrency lease, a release), kept from one reply
 *    to the next as a transport keeps a call it resends;
 *  - sl_rs_finish_member, as the reply to a group of copies of the take (as many as the
 *    reply's elements, else 2).
 * The limiter is opened with the Redis store on 127.0.0.1 (nothing is sent: the store only
 * connects to decide, and nothing here decides through it).
 *
 * The reader is capped as the transports cap theirs (sl_rs_cap_reader): an array longer than
 * SL_RS_MAX_ARRAY fails the reader instead of costing hiredis 0.14 8 GB of address space for
 * its element pointers ("*1000000000\r\n", found by this target).
 *
 * Checked: decoded replies are within their documented ranges; every slot names a known node,
 * every node has a host and a port in 1..65535, each master a CLUSTER SLOTS reply names is a
 * node as named, and applying the same reply again changes nothing; a finished call's
 * decision names a limit of its policy; a resend goes to a known node and follows at most 5
 * redirections; a denial cached by the near cache is reported as such.
 */
#include <hiredis/hiredis.h>
#include <string.h>

#include "fuzz.h"
#include "limiter_int.h"
#include "redis.h"
#include "sluice.h"

#define MAX_REPLIES 16
#define MAX_REDIRECTS 5 /* redis.c's */
#define EXPLICIT_NOW INT64_C(1700000000000000000)

enum { C_TAKE, C_PEEK, C_LEASE, C_RELEASE, NCALLS };

typedef struct calls {
    sl_request req[NCALLS];
    sl_rcall call[NCALLS];
} calls;

static const sl_policy k_two = {2,
                                {{SL_TOKEN_BUCKET, 10, 5, 0, 0},
                                 {SL_SLIDING_WINDOW, 100, 0, 60, 0}}};
static const sl_policy k_lease = {2,
                                  {{SL_CONCURRENCY, 3, 0, 30, 0},
                                   {SL_FIXED_WINDOW, 50, 0, 1, 0}}};

static void check_decoded(const sl_rs_reply *r, unsigned nlimits)
{
    FUZZ_CHECK(r->allowed == 0 || r->allowed == 1);
    FUZZ_CHECK(r->index < nlimits);
    FUZZ_CHECK(r->remaining >= 0 && r->reset_after >= 0 && r->retry_after >= 0 &&
               r->delay >= 0 && r->lease >= 0 && r->now >= 0);
}

/* Every node is an address one could connect to (as the seeds and MOVED/ASK targets are
 * checked to be), every slot names one; *map gets the slot map. */
static void check_slots(sl_rstore *rs, uint8_t *map)
{
    int n = sl_rs_nnodes(rs);
    FUZZ_CHECK(n >= 1 && n <= SL_RS_MAX_NODES);
    for (int i = 0; i < n; i++) {
        const sl_rnode *a = sl_rs_node(rs, i);
        FUZZ_CHECK(a->host[0] && a->port >= 1 && a->port <= 65535);
    }
    for (int s = 0; s < SL_RS_SLOTS; s++) {
        map[s] = (uint8_t)sl_rs_slot_node(rs, (uint16_t)s);
        FUZZ_CHECK(map[s] < n);
    }
}

/* After a CLUSTER SLOTS reply was applied, each master it names is a node, as named. */
static void check_masters(sl_rstore *rs, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_ARRAY)
        return;
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *m = rep->element[i]->element[2];
        int found = 0;
        for (int k = 0; k < sl_rs_nnodes(rs) && !found; k++) {
            const sl_rnode *a = sl_rs_node(rs, k);
            found = a->port == m->element[1]->integer && strlen(a->host) == m->element[0]->len &&
                    memcmp(a->host, m->element[0]->str, m->element[0]->len) == 0;
        }
        FUZZ_CHECK(found);
    }
}

/* A CLUSTER SLOTS reply applied twice changes nothing the second time: the node table must
 * not grow with every refresh of the same topology. */
static void apply_slots(sl_rstore *rs, const redisReply *rep)
{
    static uint8_t once[SL_RS_SLOTS], twice[SL_RS_SLOTS];
    int rc = sl_rs_apply_slots(rs, 0, rep);
    FUZZ_CHECK(rc == SL_OK || rc == SL_ESTORE);
    if (rc == SL_OK)
        check_masters(rs, rep);
    check_slots(rs, once);
    int n = sl_rs_nnodes(rs);
    FUZZ_CHECK(sl_rs_apply_slots(rs, 0, rep) == rc);
    check_slots(rs, twice);
    FUZZ_CHECK(sl_rs_nnodes(rs) == n && memcmp(once, twice, sizeof once) == 0);
}

/* Prepare call i afresh, as the transport does for its next request. */
static void prepare(sl_rstore *rs, calls *c, int i)
{
    sl_decision d;
    int rc = SL_OK;
    if (i == C_RELEASE) {
        FUZZ_CHECK(sl_rs_prepare_release(rs, &c->req[i].key, 7, SL_NOW, &c->call[i], &rc) == 0);
        return;
    }
    if (sl_rs_prepare(rs, &c->req[i], SL_NOW, &c->call[i], &d) == 1) {
        /* decided without Redis: only the near cache may, and only to deny */
        FUZZ_CHECK(d.err == SL_OK && d.source == SL_SOURCE_NEAR_CACHE && !d.allowed &&
                   d.retry_after > 0);
        FUZZ_CHECK(d.limit_index < c->call[i].cp.nlimits);
        /* an explicit `now` never uses the near cache: a call to send after all */
        FUZZ_CHECK(sl_rs_prepare(rs, &c->req[i], EXPLICIT_NOW, &c->call[i], &d) == 0);
    }
}

static void finish(sl_rstore *rs, calls *c, int i, const redisReply *rep)
{
    sl_rcall *call = &c->call[i];
    sl_decision d;
    int release_rc = SL_OK;
    memset(&d, 0, sizeof d);
    switch (sl_rs_finish(rs, call, rep, &d, &release_rc)) {
    case SL_RS_DONE:
        if (i == C_RELEASE) {
            FUZZ_CHECK(release_rc == SL_OK || release_rc == SL_ELEASE);
        } else {
            FUZZ_CHECK(d.limit_index < call->cp.nlimits && d.source == SL_SOURCE_STORE);
            FUZZ_CHECK(d.allowed == 0 || d.allowed == 1);
            FUZZ_CHECK(d.reset_after >= 0 && d.retry_after >= 0 && d.delay >= 0);
        }
        prepare(rs, c, i);
        break;
    case SL_RS_RESEND:
        FUZZ_CHECK(call->node >= 0 && call->node < sl_rs_nnodes(rs));
        FUZZ_CHECK(call->asking == 0 || call->asking == 1);
        FUZZ_CHECK(call->redirects >= 1 && call->redirects <= MAX_REDIRECTS);
        break;
    case SL_RS_NOTLOADED:
        break; /* the transport loads the library and resends */
    case SL_RS_FAILED:
        sl_rs_fallback(rs, call, &d, &release_rc);
        if (i == C_RELEASE)
            FUZZ_CHECK(release_rc == SL_ESTORE);
        else
            FUZZ_CHECK(d.source == SL_SOURCE_FAIL_CLOSED && !d.allowed);
        prepare(rs, c, i);
        break;
    default:
        FUZZ_CHECK(!"sl_rs_finish returned no SL_RS_* value");
    }
}

/* The reply as the reply to a group (sl_rs_finish_member) of n copies of the take call:
 * each member comes out decided, resent to a known node, or failed, and an array of the
 * wrong length fails every member. */
static void finish_group(sl_rstore *rs, const calls *c, const redisReply *rep, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        sl_rcall m = c->call[C_TAKE];
        sl_decision d;
        int release_rc = SL_OK;
        memset(&d, 0, sizeof d);
        int st = sl_rs_finish_member(rs, &m, rep, i, n, &d, &release_rc);
        int whole = rep->type == REDIS_REPLY_ARRAY && rep->elements == n;
        if (!whole && rep->type != REDIS_REPLY_ERROR)
            FUZZ_CHECK(st == SL_RS_FAILED);
        if (st == SL_RS_DONE)
            FUZZ_CHECK(whole && d.limit_index < m.cp.nlimits && d.source == SL_SOURCE_STORE &&
                       (d.allowed == 0 || d.allowed == 1) && d.retry_after >= 0);
        else if (st == SL_RS_RESEND)
            FUZZ_CHECK(m.node >= 0 && m.node < sl_rs_nnodes(rs) && m.redirects >= 1);
        else
            FUZZ_CHECK(st == SL_RS_FAILED || st == SL_RS_NOTLOADED);
    }
}

static void handle(sl_rstore *rs, calls *c, const redisReply *rep)
{
    finish_group(rs, c, rep, rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 &&
                                     rep->elements <= SL_RS_GROUP_MAX ? rep->elements : 2);
    if (rep->type == REDIS_REPLY_STRING)
        for (unsigned n = 1; n <= SL_MAX_LIMITS; n++) {
            sl_rs_reply r;
            if (sl_rs_decode(rep->str, rep->len, n, &r))
                check_decoded(&r, n);
        }
    apply_slots(rs, rep);
    for (int i = 0; i < NCALLS; i++)
        finish(rs, c, i, rep);
}

/* A reader as the transports make one: hiredis's reply objects, arrays capped by
 * sl_rs_cap_reader (see above). */
static redisReader *reader_new(void)
{
    redisReader *rd = redisReaderCreate();
    FUZZ_CHECK(rd);
    sl_rs_cap_reader(rd);
    return rd;
}

/* Feed p[0..n) to the reader and handle what it completes; 0 once the reader failed or
 * enough replies were handled. */
static int feed(redisReader *rd, const char *p, size_t n, sl_rstore *rs, calls *c, int *replies)
{
    if (n && redisReaderFeed(rd, p, n) != REDIS_OK)
        return 0;
    for (;;) {
        void *rep = NULL;
        if (redisReaderGetReply(rd, &rep) != REDIS_OK)
            return 0;
        if (!rep)
            return 1;
        handle(rs, c, rep);
        freeReplyObject(rep);
        if (++*replies == MAX_REPLIES)
            return 0;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sl_redis_options ro;
    sl_redis_options_init(&ro);
    ro.servers = "127.0.0.1:6379,127.0.0.1:6380";
    sl_options o;
    sl_options_init(&o);
    o.redis = &ro;
    o.shards = 1;
    sl_limiter *l;
    FUZZ_CHECK(sl_open(&l, &o) == SL_OK);
    sl_rstore *rs = sl_limiter_rstore(l);
    FUZZ_CHECK(rs);

    calls *c = calloc(1, sizeof *c);
    FUZZ_CHECK(c);
    c->req[C_TAKE] = (sl_request){SL_KEY("t", "two", "c"), 1, &k_two, 0};
    c->req[C_PEEK] = (sl_request){SL_KEY("t", "two", "c"), 1, &k_two, 1};
    c->req[C_LEASE] = (sl_request){SL_KEY("t", "lease", "c"), 1, &k_lease, 0};
    c->req[C_RELEASE] = (sl_request){SL_KEY("t", "lease", "c"), 0, NULL, 0};
    for (int i = 0; i < NCALLS; i++)
        prepare(rs, c, i);

    redisReader *rd = reader_new();
    size_t split = size ? (size_t)data[0] * (size + 1) / 256 : 0;
    int replies = 0;
    if (feed(rd, (const char *)data, split, rs, c, &replies))
        feed(rd, (const char *)data + split, size - split, rs, c, &replies);
    redisReaderFree(rd);
    free(c);
    sl_close(l);
    return 0;
}
