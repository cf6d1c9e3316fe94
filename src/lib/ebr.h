/*
 * ebr.h — epoch-based reclamation: readers never block, writers defer frees.
 *
 * A reader brackets every access to shared, replaceable memory (rule sets, index arrays)
 * with sl_ebr_enter/sl_ebr_leave. A writer unlinks an object (swaps a pointer), then hands it
 * to sl_ebr_retire; it is freed once every thread that might still see it has left its
 * read section. Threads register themselves on first use; nothing is asked of the embedder.
 * All synchronisation is C11 atomics, so ThreadSanitizer sees it.
 */
#ifndef SL_EBR_H
#define SL_EBR_H

#include <stddef.h>

typedef struct sl_ebr sl_ebr;

sl_ebr *sl_ebr_new(void);
/* Frees everything still retired. No reader may be inside a section of this domain. */
void sl_ebr_free(sl_ebr *d);

/* Enter/leave a read section. Nestable. enter returns 0, or -1 when the per-thread record
 * cannot be allocated (out of memory). */
int sl_ebr_enter(sl_ebr *d);
void sl_ebr_leave(sl_ebr *d);

/* Free `p` with `fn(p)` once no reader can hold it. `p` must already be unreachable for new
 * readers. May free older retired objects on the way. Never blocks on readers. */
void sl_ebr_retire(sl_ebr *d, void *p, void (*fn)(void *));
/* The same for an object of `bytes` bytes: besides every doubling of the list, a retire also
 * frees what it can once the bytes waiting have doubled (and are at least 1 MiB), so that a
 * few large objects (a table's blocks) do not wait for 64 retires. */
void sl_ebr_retire_sized(sl_ebr *d, void *p, void (*fn)(void *), size_t bytes);

/* Free what can be freed now; returns the number still waiting. */
size_t sl_ebr_collect(sl_ebr *d);

#endif
