/*
 * snapshot_int.h — snapshot.c's test hook.
 */
#ifndef SL_SNAPSHOT_INT_H
#define SL_SNAPSHOT_INT_H

/* Process-wide write failure injection for snapshot.c: after `n` more successful write(2)
 * calls every write fails with ENOSPC; n < 0 turns it off (the default). Writes go out in
 * 1 MiB pieces, so n = 0 fails the first, n = 1 the second. */
void sl_snapshot_fail_writes_after(long n);

#endif
