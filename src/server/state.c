/*
 * state.c — snapshots of bucket state in --data-dir (see state.h).
 */
#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mono.h"
#include "server.h"

#define STATE_FILE "state.snap"

static pthread_mutex_t g_save_lock = PTHREAD_MUTEX_INITIALIZER; /* one save at a time */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;      /* g_stop, g_cond */
static pthread_cond_t g_cond;
static pthread_t g_thread;
static int g_running, g_stop;
static char g_path[600];

int sd_state_open(sd_server *srv, char *err, size_t errlen)
{
    if (!srv->cfg.data_dir[0])
        return 0;
    snprintf(g_path, sizeof g_path, "%s/%s", srv->cfg.data_dir, STATE_FILE);
    if (access(g_path, F_OK) != 0)
        return 0; /* first start */
    int64_t t0 = sl_mono_ns() / 1000000;
    int rc = sl_snapshot_load(srv->lim, g_path);
    if (rc == SL_OK) {
        sl_stats s;
        sl_stats_get(srv->lim, NULL, 0, &s);
        sd_info("state: loaded %s (%llu keys) in %lld ms", g_path, (unsigned long long)s.keys,
                (long long)(sl_mono_ns() / 1000000 - t0));
        return 0;
    }
    if (rc == SL_EIO) {
        snprintf(err, errlen, "%s: %s (%s)", g_path, sl_strerror(rc), strerror(errno));
        return -1;
    }
    if (rc != SL_ESNAPSHOT && rc != SL_EVERSION) {
        /* Not the file's fault (memory ran out, too many policies): it stays where it is and
         * sluiced does not start, rather than forget state it could not read (a load that
         * failed part way has restored some keys: the process ends, so none is kept) */
        snprintf(err, errlen, "%s: not loaded: %s (%s); the file is left as it is", g_path,
                 sl_strerror(rc), sl_err_name(rc));
        return -1;
    }
    /* Truncated, corrupt, or from a newer version: keep it for a person to look at, under a
     * name no earlier one has (link fails rather than replace: two in one second both stay) */
    char aside[700];
    int moved = -1;
    long long now = (long long)time(NULL);
    for (int i = 0; i < 1000 && moved != 0; i++) {
        if (i)
            snprintf(aside, sizeof aside, "%s.bad-%lld-%d", g_path, now, i);
        else
            snprintf(aside, sizeof aside, "%s.bad-%lld", g_path, now);
        moved = link(g_path, aside);
        if (moved != 0 && errno != EEXIST && access(aside, F_OK) != 0) {
            /* a filesystem without hard links (vfat, some FUSE and container mounts): the
             * name is free, so rename cannot replace anything */
            moved = rename(g_path, aside) == 0 ? 1 : -1;
            break;
        }
        if (moved != 0 && errno != EEXIST)
            break;
    }
    if (moved == 1)
        moved = 0; /* renamed: nothing left to unlink */
    else if (moved == 0 && unlink(g_path) != 0)
        moved = -1;
    if (moved != 0) {
        snprintf(err, errlen, "%s: %s, and it cannot be moved aside: %s", g_path,
                 sl_strerror(rc), strerror(errno));
        return -1;
    }
    sd_error("state: %s not loaded: %s (%s); moved to %s; starting with empty state", g_path,
             sl_strerror(rc), sl_err_name(rc), aside);
    return 0;
}

sd_save_result sd_state_save(sd_server *srv)
{
    sd_save_result r = {SL_ENOTFOUND, 0, 0, 0};
    if (!srv->cfg.data_dir[0] || srv->rstore) /* Redis keeps the Redis store's state */
        return r;
    pthread_mutex_lock(&g_save_lock);
    int64_t t0 = sl_mono_ns() / 1000000;
    r.rc = sl_snapshot_save(srv->lim, g_path);
    r.err = errno;
    r.ms = sl_mono_ns() / 1000000 - t0;
    pthread_mutex_unlock(&g_save_lock);
    sl_stats s;
    sl_stats_get(srv->lim, NULL, 0, &s);
    r.keys = s.keys;
    if (r.rc != SL_OK)
        sd_error("state: snapshot to %s failed: %s (%s)", g_path, sl_strerror(r.rc),
                 r.rc == SL_EIO ? strerror(r.err) : sl_err_name(r.rc));
    else
        sd_debug("state: snapshot of %llu keys in %lld ms", (unsigned long long)r.keys,
                 (long long)r.ms);
    atomic_fetch_add(r.rc == SL_OK ? &srv->m.snapshots : &srv->m.snapshot_errors, 1);
    atomic_store(&srv->m.snapshot_last_ms, (uint64_t)r.ms);
    return r;
}

static void *state_main(void *arg)
{
    sd_server *srv = arg;
    int64_t every = (int64_t)srv->cfg.snapshot_interval_ms;
    int last_failed = 0;
    pthread_mutex_lock(&g_lock);
    while (!g_stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += every / 1000;
        until.tv_nsec += (every % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
        while (!g_stop && pthread_cond_timedwait(&g_cond, &g_lock, &until) != ETIMEDOUT)
            ;
        if (g_stop)
            break;
        pthread_mutex_unlock(&g_lock);
        sd_save_result r = sd_state_save(srv);
        if (r.rc == SL_OK && last_failed)
            sd_info("state: snapshots succeed again");
        last_failed = r.rc != SL_OK;
        pthread_mutex_lock(&g_lock);
    }
    pthread_mutex_unlock(&g_lock);
    return NULL;
}

int sd_state_start(sd_server *srv)
{
    if (!srv->cfg.data_dir[0] || srv->cfg.snapshot_interval_ms <= 0)
        return 0;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cond, &ca);
    pthread_condattr_destroy(&ca);
    g_stop = 0;
    if (pthread_create(&g_thread, NULL, state_main, srv) != 0)
        return -1;
    g_running = 1;
    return 0;
}

int sd_state_stop(sd_server *srv)
{
    if (g_running) {
        pthread_mutex_lock(&g_lock);
        g_stop = 1;
        pthread_cond_signal(&g_cond);
        pthread_mutex_unlock(&g_lock);
        pthread_join(g_thread, NULL);
        pthread_cond_destroy(&g_cond);
        g_running = 0;
    }
    if (srv->cfg.data_dir[0]) {
        sd_save_result r = sd_state_save(srv);
        if (r.rc != SL_OK)
            return -1; /* sd_state_save logged why */
        sd_info("state: final snapshot of %llu keys in %lld ms", (unsigned long long)r.keys,
                (long long)r.ms);
    }
    return 0;
}
