/* test_redis_limiter.c — test_limiter.c's semantics on the Redis store (see there). */
#define SL_TEST_REDIS 1
#include "test_limiter.c"
