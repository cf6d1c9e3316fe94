/*
 * driver.c — runs a fuzz target without libFuzzer, in every build (ctest label "fuzz").
 *
 *   fuzz_<target> [--count N] [--seconds S] [--seed X] [--dict FILE] PATH...
 *
 * Every file given, and every file in every directory given (sorted by name), is run once.
 * Then, if a directory was given, N (default 20,000) inputs are made from those files by
 * deterministic pseudo-random mutations (the same seed gives the same inputs: bit flips,
 * bytes inserted, deleted, duplicated, truncation, splicing two inputs, interesting integers
 * in decimal and in binary, tokens of the target's libFuzzer dictionary) and run, stopping
 * early after S seconds (default 10). With only files given, only they run, each named on
 * stderr as it starts: that is how a saved input is replayed.
 *
 * Each input is handed to the target in a buffer of exactly its size (so the sanitizers see
 * any read past it). An input that runs longer than 10 s aborts the run. When a directory is
 * run, whatever ends the run early (a failed check, a sanitizer report, a signal, the
 * timeout) leaves the input that was running in `<program>.crash` in the current directory:
 * replay it with `fuzz_<target> <program>.crash`, and add it to the target's corpus once the
 * bug is fixed.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define SL_DRIVER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SL_DRIVER_ASAN 1
#endif
#endif
#ifdef SL_DRIVER_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#include "fuzz.h"
#include "rng.h"

#define INPUT_MAX (1u << 20)  /* inputs (seeds and mutants) are cut to this */
#define INPUT_TIMEOUT 10      /* seconds one input may take */
#define SLOW_SECONDS 0.5      /* an input slower than this is reported */
#define POOL 16               /* recent mutants, mutated again now and then */
#define MAX_DICT 512

typedef struct blob {
    unsigned char *p;
    size_t n;
    const char *name; /* seeds: the file */
} blob;

static blob *g_seeds;
static size_t g_nseeds;
static blob g_dict[MAX_DICT];
static size_t g_ndict;

/* ---- keeping the input that is running ----
 * When a directory is run, each input is written to <program>.crash (in the current
 * directory) before it runs; the file is removed when the run ends well. So whatever ends the
 * process — a failed check, a sanitizer report, a signal, ctest's timeout — the input that
 * did it is left there. Files given one by one (a replay) are named as they run instead. */

static int g_crash_fd = -1;
static char g_crash_path[512];

static void keep_input(const unsigned char *p, size_t n)
{
    if (g_crash_fd < 0)
        return;
    if (pwrite(g_crash_fd, p, n, 0) != (ssize_t)n || ftruncate(g_crash_fd, (off_t)n) != 0) {
        fprintf(stderr, "fuzz driver: cannot write %s: %s\n", g_crash_path, strerror(errno));
        exit(1);
    }
}

static void say_where(void)
{
    static const char msg[] = "fuzz driver: the input that failed is in ";
    if (g_crash_fd < 0)
        return;
    if (write(2, msg, sizeof msg - 1) < 0 || write(2, g_crash_path, strlen(g_crash_path)) < 0 ||
        write(2, "\n", 1) < 0)
        return;
}

static void on_signal(int sig)
{
    if (sig == SIGALRM) {
        static const char msg[] = "fuzz driver: one input ran longer than 10 s\n";
        if (write(2, msg, sizeof msg - 1) < 0)
            (void)0;
    }
    say_where();
    signal(sig, SIG_DFL);
    raise(sig == SIGALRM ? SIGABRT : sig);
}

static void install_handlers(const char *argv0, int keep)
{
    const char *base = strrchr(argv0, '/');
    snprintf(g_crash_path, sizeof g_crash_path, "%s.crash", base ? base + 1 : argv0);
    if (keep && (g_crash_fd = open(g_crash_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC,
                                   0644)) < 0) {
        fprintf(stderr, "fuzz driver: cannot create %s: %s\n", g_crash_path, strerror(errno));
        exit(1);
    }
    signal(SIGABRT, on_signal);
    signal(SIGALRM, on_signal);
#ifdef SL_DRIVER_ASAN
    __sanitizer_set_death_callback(say_where); /* ASan's reports (UBSan's do not call it) */
#else
    signal(SIGSEGV, on_signal); /* under ASan its own handler reports these */
    signal(SIGBUS, on_signal);
    signal(SIGFPE, on_signal);
    signal(SIGILL, on_signal);
#endif
}

static double since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* An input that took longer than SLOW_SECONDS is worth a look (libFuzzer would call it
 * slow): it is saved as <program>.slow and named on stderr, and the run goes on. */
static void note_slow(const unsigned char *p, size_t n, double s)
{
    char path[520];
    snprintf(path, sizeof path, "%.*s.slow", (int)(strlen(g_crash_path) - 6), g_crash_path);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(p, 1, n, f);
        fclose(f);
    }
    fprintf(stderr, "fuzz driver: an input of %zu bytes took %.2f s; saved as %s\n", n, s, path);
}

/* Run the target on p[0..n), copied into a buffer of exactly n bytes. */
static void run_one(const unsigned char *p, size_t n)
{
    unsigned char *copy = malloc(n ? n : 1);
    if (!copy) {
        fprintf(stderr, "fuzz driver: out of memory\n");
        exit(1);
    }
    if (n)
        memcpy(copy, p, n);
    keep_input(copy, n);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    alarm(INPUT_TIMEOUT);
    LLVMFuzzerTestOneInput(copy, n);
    alarm(0);
    double s = since(&t0);
    if (s > SLOW_SECONDS)
        note_slow(copy, n, s);
    free(copy);
}

/* ---- inputs ---- */

static int read_file(const char *path, blob *b)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    b->p = malloc(INPUT_MAX);
    b->n = b->p ? fread(b->p, 1, INPUT_MAX, f) : 0;
    int bad = !b->p || ferror(f);
    fclose(f);
    if (bad) {
        free(b->p);
        return -1;
    }
    unsigned char *fit = realloc(b->p, b->n ? b->n : 1);
    if (fit)
        b->p = fit;
    return 0;
}

static void add_seed(const char *path)
{
    blob b = {0};
    if (read_file(path, &b) != 0 || !(b.name = strdup(path))) {
        fprintf(stderr, "fuzz driver: cannot read %s: %s\n", path, strerror(errno));
        exit(1);
    }
    blob *s = realloc(g_seeds, (g_nseeds + 1) * sizeof *s);
    if (!s)
        exit(1);
    g_seeds = s;
    g_seeds[g_nseeds++] = b;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every regular file in `dir`, in name order. */
static void add_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "fuzz driver: cannot open %s: %s\n", dir, strerror(errno));
        exit(1);
    }
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (e->d_name[0] == '.' || stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        char **more = realloc(names, (n + 1) * sizeof *names);
        if (!more || !(more[n] = strdup(path)))
            exit(1);
        names = more;
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; i++) {
        add_seed(names[i]);
        free(names[i]);
    }
    free(names);
}

/* A libFuzzer dictionary: one "token" per line (optionally name="token"), with \\, \" and
 * \xNN escapes; '#' starts a comment line. */
static void load_dict(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fuzz driver: cannot read %s: %s\n", path, strerror(errno));
        exit(1);
    }
    char line[1024];
    while (g_ndict < MAX_DICT && fgets(line, sizeof line, f)) {
        char *q = strchr(line, '"'), *end = strrchr(line, '"');
        if (line[0] == '#' || !q || end == q)
            continue;
        unsigned char *tok = malloc((size_t)(end - q));
        size_t n = 0;
        if (!tok)
            exit(1);
        for (char *c = q + 1; c < end; c++) {
            if (*c == '\\' && c + 1 < end && c[1] == 'x' && c + 3 < end) {
                tok[n++] = (unsigned char)strtol((char[]){c[2], c[3], 0}, NULL, 16);
                c += 3;
            } else if (*c == '\\' && c + 1 < end) {
                tok[n++] = (unsigned char)*++c;
            } else {
                tok[n++] = (unsigned char)*c;
            }
        }
        g_dict[g_ndict++] = (blob){tok, n, NULL};
    }
    fclose(f);
}

/* ---- mutations ---- */

static const char *const k_decimal[] = {
    "-1", "0", "1", "2", "-0", "7", "255", "256", "65535", "65536", "65538", "2147483647",
    "2147483648", "-2147483648", "4294967295", "4294967296", "9007199254740993",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "18446744073709551615", "18446744073709551616", "99999999999999999999999", "1e308",
    "1e309", "-1e308", "4.9e-324", "0.5", "1.5", "nan", "inf", "-inf", "0x10", "1000000000",
    "1000000001", "4611686018427387904"};
static const uint64_t k_binary[] = {
    0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff,
    0x80000000, 0xffffffff, UINT64_C(0x100000000), UINT64_C(0x7fffffffffffffff),
    UINT64_C(0x8000000000000000), UINT64_MAX, UINT64_C(1) << 62, (UINT64_C(1) << 62) - 1,
    UINT64_C(1) << 53, 1000000000, UINT64_C(1000000000000000000),
    UINT64_C(0x7ff8000000000000) /* NaN */, UINT64_C(0x7ff0000000000000) /* inf */,
    UINT64_C(0xfff0000000000000) /* -inf */, UINT64_C(0x8000000000000000) /* -0.0 */,
    UINT64_C(0x7fefffffffffffff) /* DBL_MAX */, UINT64_C(0x4340000000000000) /* 2^53 */,
    UINT64_C(0x3ff0000000000000) /* 1.0 */, UINT64_C(0x41cdcd6500000000) /* 1e9 */,
    UINT64_C(0x0000000000000001) /* denormal */};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

typedef struct buf {
    unsigned char *p;
    size_t n;
} buf;

/* Make room for k bytes at `at` (the caller fills them); false if the input would get too
 * big. */
static int open_gap(buf *b, size_t at, size_t k)
{
    if (b->n + k > INPUT_MAX)
        return 0;
    memmove(b->p + at + k, b->p + at, b->n - at);
    b->n += k;
    return 1;
}

static void cut(buf *b, size_t at, size_t k)
{
    memmove(b->p + at, b->p + at + k, b->n - at - k);
    b->n -= k;
}

static void insert(buf *b, size_t at, const void *s, size_t k)
{
    if (open_gap(b, at, k))
        memcpy(b->p + at, s, k);
}

/* Replace the run of digits (with its sign) around a random position by an interesting
 * number; insert one if there are no digits there. */
static void put_decimal(buf *b)
{
    const char *num = k_decimal[below(COUNT(k_decimal))];
    size_t at = (size_t)below(b->n + 1), end = at;
    while (at > 0 && b->p[at - 1] >= '0' && b->p[at - 1] <= '9')
        at--;
    if (at > 0 && b->p[at - 1] == '-')
        at--;
    while (end < b->n && ((b->p[end] >= '0' && b->p[end] <= '9') || b->p[end] == '-'))
        end++;
    cut(b, at, end - at);
    insert(b, at, num, strlen(num));
}

/* The header of a RESP array or bulk string ("*<n>\r\n", "$<n>\r\n") gets an interesting
 * length; binary formats are changed at random places, which is just as good for them. */
static void put_header_length(buf *b)
{
    size_t start = (size_t)below(b->n + 1);
    for (size_t i = start; i < b->n; i++)
        if (b->p[i] == '*' || b->p[i] == '$') {
            size_t end = i + 1;
            while (end < b->n && b->p[end] != '\r')
                end++;
            const char *num = k_decimal[below(COUNT(k_decimal))];
            cut(b, i + 1, end - i - 1);
            insert(b, i + 1, num, strlen(num));
            return;
        }
    put_decimal(b);
}

static void mutate_once(buf *b)
{
    size_t n = b->n;
    switch (below(12)) {
    case 0: /* flip a bit */
        if (n)
            b->p[below(n)] ^= (unsigned char)(1u << below(8));
        break;
    case 1: /* set a byte */
        if (n)
            b->p[below(n)] = (unsigned char)rnd();
        break;
    case 2: { /* insert 1..8 random bytes */
        unsigned char r[8];
        size_t k = (size_t)range(1, 8);
        for (size_t i = 0; i < k; i++)
            r[i] = (unsigned char)rnd();
        insert(b, (size_t)below(n + 1), r, k);
        break;
    }
    case 3: /* delete a range */
        if (n) {
            size_t at = (size_t)below(n), k = (size_t)range(1, n - at < 16 ? n - at : 16);
            cut(b, at, k);
        }
        break;
    case 4: /* duplicate a range somewhere */
        if (n) {
            unsigned char r[64];
            size_t from = (size_t)below(n), k = (size_t)range(1, n - from < 64 ? n - from : 64);
            memcpy(r, b->p + from, k);
            insert(b, (size_t)below(n + 1), r, k);
        }
        break;
    case 5: /* truncate */
        b->n = (size_t)below(n + 1);
        break;
    case 6: { /* splice: our prefix, another input's suffix */
        const blob *o = &g_seeds[below(g_nseeds)];
        size_t at = (size_t)below(n + 1), from = (size_t)below(o->n + 1);
        b->n = at;
        insert(b, at, o->p + from, o->n - from);
        break;
    }
    case 7: { /* insert a piece of another input */
        const blob *o = &g_seeds[below(g_nseeds)];
        if (o->n) {
            size_t from = (size_t)below(o->n);
            size_t k = (size_t)range(1, o->n - from < 64 ? o->n - from : 64);
            insert(b, (size_t)below(n + 1), o->p + from, k);
        }
        break;
    }
    case 8:
        put_decimal(b);
        break;
    case 9:
        put_header_length(b);
        break;
    case 10: { /* an interesting integer in binary, little-endian, 1/2/4/8 bytes */
        static const size_t widths[] = {1, 2, 4, 8};
        size_t w = widths[below(4)];
        uint64_t v = k_binary[below(COUNT(k_binary))];
        if (n >= w)
            memcpy(b->p + below(n - w + 1), &v, w);
        break;
    }
    case 11: /* a dictionary token, inserted or overwriting */
        if (g_ndict) {
            const blob *t = &g_dict[below(g_ndict)];
            size_t at = (size_t)below(n + 1);
            if (chance(50) && at + t->n <= n)
                memcpy(b->p + at, t->p, t->n);
            else
                insert(b, at, t->p, t->n);
        }
        break;
    }
}

/* ---- main ---- */

static void usage(void)
{
    fprintf(stderr, "usage: fuzz_<target> [--count N] [--seconds S] [--seed X] [--dict FILE] "
                    "PATH...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    long count = 20000;
    double seconds = 10;
    uint64_t seed = 0x5eed;
    int dirs = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 < argc && strcmp(a, "--count") == 0)
            count = atol(argv[++i]);
        else if (i + 1 < argc && strcmp(a, "--seconds") == 0)
            seconds = atof(argv[++i]);
        else if (i + 1 < argc && strcmp(a, "--seed") == 0)
            seed = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && strcmp(a, "--dict") == 0)
            load_dict(argv[++i]);
        else if (a[0] == '-')
            usage();
        else {
            struct stat st;
            if (stat(a, &st) == 0 && S_ISDIR(st.st_mode))
                add_dir(a), dirs++;
            else
                add_seed(a);
        }
    }
    if (g_nseeds == 0)
        usage();
    install_handlers(argv[0], dirs > 0);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < g_nseeds; i++) {
        if (!dirs)
            fprintf(stderr, "%s\n", g_seeds[i].name);
        run_one(g_seeds[i].p, g_seeds[i].n);
    }

    long done = 0;
    if (dirs && count > 0) {
        rng_state = seed | 1;
        buf b = {malloc(INPUT_MAX), 0};
        blob pool[POOL] = {{0}};
        if (!b.p)
            return 1;
        for (; done < count && since(&t0) < seconds; done++) {
            const blob *from = &g_seeds[below(g_nseeds)];
            size_t again = (size_t)below(POOL);
            if (chance(25) && pool[again].p)
                from = &pool[again];
            memcpy(b.p, from->p, from->n);
            b.n = from->n;
            for (int k = (int)range(1, 4); k > 0; k--)
                mutate_once(&b);
            run_one(b.p, b.n);
            blob *slot = &pool[done % POOL];
            unsigned char *keep = realloc(slot->p, b.n ? b.n : 1);
            if (keep) {
                memcpy(keep, b.p, b.n);
                *slot = (blob){keep, b.n, NULL};
            }
        }
        for (int i = 0; i < POOL; i++)
            free(pool[i].p);
        free(b.p);
    }
    printf("%s: %zu files, %ld mutations, %.1f s\n", argv[0], g_nseeds, done,
           since(&t0));
    for (size_t i = 0; i < g_nseeds; i++) {
        free(g_seeds[i].p);
        free((char *)g_seeds[i].name);
    }
    free(g_seeds);
    for (size_t i = 0; i < g_ndict; i++)
        free(g_dict[i].p);
    if (g_crash_fd >= 0) {
        close(g_crash_fd);
        unlink(g_crash_path);
    }
    return 0;
}
