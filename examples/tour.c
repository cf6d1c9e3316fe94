/* tour.c — the README's 30-second tour of the C API, compiled and run by `make run` and by
 * the test suite so that it stays true. */
#include <stdio.h>

#include "sluice.h"

int main(void)
{
    sl_limiter *l;
    int rc = sl_open(&l, NULL); /* in-memory store, internal clock, default: token bucket of 5, refilling 1/s */
    if (rc != SL_OK) {
        fprintf(stderr, "sl_open: %s\n", sl_strerror(rc));
        return 1;
    }

    /* acme's clients may log in 3 times, refilling one attempt every 10 s */
    sl_policy login = SL_POLICY_TOKEN_BUCKET(3, 0.1);
    sl_key scope = SL_KEY("acme", "login", NULL);
    sl_rule_set(l, SL_SCOPE_ACTION, &scope, &login);

    /* and at most 2 searches per 1-second window, stacked with 1000 per day */
    sl_policy search = {2,
                        {{SL_SLIDING_WINDOW, 2, 0, 1.0, 0},
                         {SL_FIXED_WINDOW, 1000, 0, 86400, 0}}};
    sl_key scope2 = SL_KEY("acme", "search", NULL);
    sl_rule_set(l, SL_SCOPE_ACTION, &scope2, &search);

    for (int i = 1; i <= 4; i++) {
        sl_key k = SL_KEY("acme", "login", "10.0.0.7");
        sl_decision d;
        rc = sl_take(l, &k, 1, SL_NOW, &d);
        if (rc != SL_OK) {
            fprintf(stderr, "sl_take: %s\n", sl_strerror(rc));
            return 1;
        }
        printf("login %d: %s, %llu left, retry after %.1f s\n", i,
               d.allowed ? "allowed" : "denied", (unsigned long long)d.remaining,
               (double)d.retry_after / 1e9);
    }
    for (int i = 1; i <= 3; i++) {
        sl_key k = SL_KEY("acme", "search", "10.0.0.7");
        sl_decision d;
        sl_take(l, &k, 1, SL_NOW, &d);
        printf("search %d: %s (limit %llu of limit #%u)\n", i, d.allowed ? "allowed" : "denied",
               (unsigned long long)d.limit, d.limit_index);
    }

    sl_key bad = SL_KEY("acme", "login", "");
    sl_decision d;
    rc = sl_take(l, &bad, 1, SL_NOW, &d);
    printf("empty client: %s (%s)\n", sl_err_name(rc), sl_strerror(rc));

    sl_close(l);
    return 0;
}
