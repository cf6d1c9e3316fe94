/*
 * mono.h — CLOCK_MONOTONIC in nanoseconds: the one copy, for timing the library's own work
 * (lock back-off, snapshot durations, Redis timeouts) and sluiced's (decision latency,
 * state saves). Decisions use the limiter's clock.
 */
#ifndef SL_MONO_H
#define SL_MONO_H

#include <stdint.h>
#include <time.h>

static inline int64_t sl_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif
