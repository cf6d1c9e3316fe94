/*
 * fuzz_server.c — what the fuzz targets that reach sluiced's code need from the parts of the
 * server they do not link (see fuzz_server.h).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "fuzz_server.h"

/* main.c's logging: every message is formatted, so that its arguments are read as the server
 * would read them, and dropped (a fuzzer makes the server's code log on most inputs). */
int sd_log_level = SD_LOG_DEBUG;

void sd_log(int level, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    (void)level;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
}

/* net.c's thread pool: not here, so a reply that would be built on it (/metrics) is built at
 * once, on net.c's own fallback path. */
int sd_offload(sd_conn *c, void (*work)(void *arg), void (*done)(void *arg), void *arg)
{
    (void)c;
    (void)work;
    (void)done;
    (void)arg;
    return -1;
}

#define WEIGHTS 64 /* put back per pass */

typedef struct weights {
    int n;
    char name[WEIGHTS][SL_MAX_ID_LEN];
    size_t len[WEIGHTS];
} weights;

static int note_weight(void *ctx, const char *tenant, size_t len, unsigned w)
{
    weights *ws = ctx;
    FUZZ_CHECK(w >= 1 && w <= 1000 && len <= SL_MAX_ID_LEN);
    if (ws->n == WEIGHTS)
        return 1;
    memcpy(ws->name[ws->n], tenant, len);
    ws->len[ws->n++] = len;
    return 0;
}

void fuzz_reset_weights(sd_admission *a)
{
    weights *ws = malloc(sizeof *ws);
    FUZZ_CHECK(ws);
    do {
        ws->n = 0;
        sd_weight_list(a, note_weight, ws);
        for (int i = 0; i < ws->n; i++)
            FUZZ_CHECK(sd_weight_set(a, ws->name[i], ws->len[i], 1) == 0);
    } while (ws->n == WEIGHTS);
    free(ws);
}
