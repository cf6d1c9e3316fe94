/*
 * state.h — bucket state kept across restarts: snapshots of the limiter in --data-dir.
 *
 * <data-dir>/state.snap is written (sl_snapshot_save: atomic, checksummed) every
 * --snapshot-interval seconds by a thread of its own, on demand (SL.SAVE,
 * POST /api/admin/snapshot) and once more after the workers have stopped on a graceful
 * shutdown. At start it is loaded before anything is served; one that is truncated, corrupt
 * or from a newer version is renamed to state.snap.bad-<unix time> (never loaded, never
 * deleted) with a log line, and the server starts with empty state.
 *
 * A crash (kill -9, power loss) loses at most what was consumed since the last snapshot:
 * those clients get up to one interval's worth of tokens back.
 */
#ifndef SD_STATE_H
#define SD_STATE_H

#include <stddef.h>
#include <stdint.h>

typedef struct sd_server sd_server;

/* Load the snapshot (moving a bad one aside: truncated, corrupt, a newer version). 0, or -1
 * with err set (an I/O error other than a missing file, memory running out: the server must
 * not start and forget state it cannot read; the file is left in place). */
int sd_state_open(sd_server *srv, char *err, size_t errlen);
/* Start the periodic snapshot thread (no-op without --data-dir or with interval 0). */
int sd_state_start(sd_server *srv);
/* Stop the thread and write a final snapshot (after the workers have stopped). 0, or -1
 * when the final snapshot could not be written (logged). */
int sd_state_stop(sd_server *srv);

typedef struct sd_save_result {
    int rc;          /* SL_OK or the library's error */
    int err;         /* errno for SL_EIO */
    int64_t ms;      /* how long it took */
    uint64_t keys;   /* keys written */
} sd_save_result;

/* Write a snapshot now (serialised with the periodic one). rc SL_ENOTFOUND without a data
 * dir. Blocks the calling thread for the duration of the save. */
sd_save_result sd_state_save(sd_server *srv);

#endif
