/*
 * fuzz.h — what every fuzz target (tests/fuzz/fuzz_*.c) shares.
 *
 * A target is one function, LLVMFuzzerTestOneInput, run on one input at a time either by
 * libFuzzer (`make fuzz`: clang, coverage-guided) or by driver.c (every build: the checked-in
 * corpus and a bounded number of deterministic mutations of it). It must not keep state from
 * one input to the next, so that any input replays alone.
 *
 * A target checks properties with FUZZ_CHECK; a failed check aborts, and both runners then
 * save the input that did it.
 */
#ifndef SL_FUZZ_H
#define SL_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "sluice.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static inline _Noreturn void fuzz_fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
    abort();
}

#define FUZZ_CHECK(cond)                                 \
    do {                                                 \
        if (!(cond))                                     \
            fuzz_fail(__FILE__, __LINE__, #cond);        \
    } while (0)

/* Two policies say the same thing (a policy written out and parsed back must). */
static inline int fuzz_same_policy(const sl_policy *a, const sl_policy *b)
{
    if (a->nlimits != b->nlimits)
        return 0;
    for (unsigned i = 0; i < a->nlimits; i++) {
        const sl_limit *x = &a->limits[i], *y = &b->limits[i];
        if (x->algorithm != y->algorithm || x->limit != y->limit || x->rate != y->rate ||
            x->window != y->window || x->reserve_cap != y->reserve_cap)
            return 0;
    }
    return 1;
}

#endif
