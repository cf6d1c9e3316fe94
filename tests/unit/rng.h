/*
 * rng.h — deterministic random numbers for the randomized tests (xorshift64*): seed
 * rng_state (non-zero), then draw. Header-only; each test program has its own state.
 */
#ifndef SL_TEST_RNG_H
#define SL_TEST_RNG_H

#include <stdint.h>

static uint64_t rng_state;
static inline uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * UINT64_C(2685821657736338717);
}
static inline uint64_t below(uint64_t n) { return n ? rnd() % n : 0; } /* [0, n) */
static inline uint64_t range(uint64_t lo, uint64_t hi) { return lo + below(hi - lo + 1); }
static inline int chance(unsigned pct) { return below(100) < pct; }

#endif
