/*
 * inject.h — the countdown behind the tests' failure injection (memory.c's allocations,
 * snapshot.c's writes): a process-wide counter the test sets to n >= 0; the next n
 * operations succeed, every later one fails; -1 (the default) never fails.
 */
#ifndef SL_INJECT_H
#define SL_INJECT_H

#include <stdatomic.h>

/* Count one operation against `left`: 1 when it must fail. */
static inline int sl_inject_fails(_Atomic long *left)
{
    long n = atomic_load_explicit(left, memory_order_relaxed);
    while (n > 0)
        if (atomic_compare_exchange_weak(left, &n, n - 1))
            return 0;
    return n == 0;
}

#endif
