/*
 * dir.h — a directory of interned byte strings: lock-free lookups, inserts and removals
 * under a mutex. Used for tenants (counters; never removed) and for compiled policies
 * (removed by the limiter's policy collection when nothing uses them).
 *
 * Readers must be inside an EBR section of the domain given to sl_dir_new: a growing or
 * shrinking directory retires its old slot array, and a removal its item, through it.
 */
#ifndef SL_DIR_H
#define SL_DIR_H

#include <stddef.h>
#include <stdint.h>

#include "ebr.h"

typedef struct sl_dir sl_dir;

/* Build the value for a new key; called with the directory's mutex held. NULL = failure. */
typedef void *(*sl_dir_make_fn)(void *ctx, const void *key, size_t len);

sl_dir *sl_dir_new(sl_ebr *ebr, size_t max_entries);
/* Frees the directory and, with `free_val`, every value. */
void sl_dir_free(sl_dir *d, void (*free_val)(void *));

/* The value for `key`, or NULL. Lock-free. */
void *sl_dir_get(sl_dir *d, uint64_t hash, const void *key, size_t len);
/* The value for `key`, creating it with `make` if absent. NULL when `make` fails, memory
 * runs out, or the directory already holds max_entries. `found` (may be NULL) is called with
 * the mutex held when the key was there already. */
void *sl_dir_intern(sl_dir *d, uint64_t hash, const void *key, size_t len, sl_dir_make_fn make,
                    void (*found)(void *ctx, void *val), void *ctx);
/* Remove every entry for which doomed(ctx, val) is non-zero, under the mutex, calling
 * gone(ctx, val) for each after it is unreachable for new readers (readers already in may
 * still see it: retire what they could touch). The item itself is retired through EBR.
 * Returns how many were removed, or -1 (out of memory: nothing removed). */
long sl_dir_remove_if(sl_dir *d, int (*doomed)(void *ctx, void *val),
                      void (*gone)(void *ctx, void *val), void *ctx);
/* Visit every (key, value) without locking (entries added meanwhile may be missed); fn
 * returns non-zero to stop, and may call back into the directory. */
int sl_dir_foreach(sl_dir *d, int (*fn)(void *ctx, const void *key, size_t len, void *val),
                   void *ctx);
size_t sl_dir_count(sl_dir *d);

#endif
