/*
 * dir.h — a directory of interned byte strings: lock-free lookups, inserts under a mutex,
 * no deletion (entries live until the directory is freed). Used for tenants (counters) and
 * for compiled policies (so a policy has one stable id for its whole life).
 *
 * Readers must be inside an EBR section of the domain given to sl_dir_new: a growing
 * directory retires its old slot array through it.
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
 * runs out, or the directory already holds max_entries. */
void *sl_dir_intern(sl_dir *d, uint64_t hash, const void *key, size_t len, sl_dir_make_fn make,
                    void *ctx);
/* Visit every (key, value) without locking (entries added meanwhile may be missed); fn
 * returns non-zero to stop, and may call back into the directory. */
int sl_dir_foreach(sl_dir *d, int (*fn)(void *ctx, const void *key, size_t len, void *val),
                   void *ctx);
size_t sl_dir_count(sl_dir *d);

#endif
