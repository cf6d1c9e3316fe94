/*
 * redis_fixture.h — a private redis-server for tests: 127.0.0.1 on a free port, no
 * persistence (--save "" --appendonly no), its own temporary directory. redis_fixture_stop
 * kills the server and removes the directory; one that a failed test never stopped is
 * stopped at exit, and the server dies with the test process even when it crashes
 * (PR_SET_PDEATHSIG).
 */
#ifndef SL_REDIS_FIXTURE_H
#define SL_REDIS_FIXTURE_H

#include <sys/types.h>

#include <hiredis/hiredis.h>

typedef struct redis_fixture {
    pid_t pid;     /* the redis-server process; 0 when not running */
    int port;
    char addr[32]; /* "127.0.0.1:port" */
    char dir[64];  /* its working directory */
} redis_fixture;

/* Start redis-server (found on PATH; extra arguments, if any, are appended to its command
 * line, NULL-terminated list) and wait until it answers PING (at most 10 s). 0 on success;
 * -1 with a message on stderr. */
int redis_fixture_start(redis_fixture *f, const char *const *extra_args);

/* The same for a Redis Cluster node: a port p <= 55535 with p + 10000 (its cluster bus)
 * free too. */
int redis_fixture_start_cluster_node(redis_fixture *f, const char *const *extra_args);

/* Stop the server if it runs, then start a new, empty one on the same port (no extra
 * arguments): "Redis came back". 0 or -1. */
int redis_fixture_restart(redis_fixture *f);

/* Kill the server (SIGKILL), reap it and remove its directory. Safe to call twice. */
void redis_fixture_stop(redis_fixture *f);

/* A new synchronous connection (caller frees with redisFree), or NULL with a message. */
redisContext *redis_fixture_connect(const redis_fixture *f);

/* The contents of a whole file, NUL-terminated (caller frees), or NULL. For SCRIPT LOAD. */
char *redis_fixture_read_file(const char *path, size_t *len);

#endif
