/*
 * redis_fixture.c — a private redis-server for tests (see redis_fixture.h).
 */
#include "redis_fixture.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define START_TRIES 5     /* ports tried (another process may take the one we found) */
#define START_WAIT_MS 10000
#define MAX_LIVE 64       /* servers running at once */

/* Every running server, so that the ones a failed test never stopped are killed and their
 * directories removed when the process exits. (PR_SET_PDEATHSIG covers a crash.) */
static struct {
    pid_t pid;
    char dir[64];
} live[MAX_LIVE];

static void kill_and_remove(pid_t pid, char *dir)
{
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    if (dir[0]) {
        /* the server writes nothing with persistence off (a cluster node: nodes.conf) */
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char p[512];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
        if (d)
            closedir(d);
        rmdir(dir);
        dir[0] = '\0';
    }
}

static void cleanup_at_exit(void)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].pid > 0 || live[i].dir[0]) {
            kill_and_remove(live[i].pid, live[i].dir);
            live[i].pid = 0;
        }
}

/* Track f's server and directory (pid 0 and an empty dir: forget them). */
static void track(const redis_fixture *f, pid_t old_pid, const char *old_dir)
{
    static int registered;
    if (!registered) {
        atexit(cleanup_at_exit);
        registered = 1;
    }
    for (int i = 0; i < MAX_LIVE; i++)
        if ((old_pid > 0 && live[i].pid == old_pid) ||
            (old_dir[0] && strcmp(live[i].dir, old_dir) == 0)) {
            live[i].pid = 0;
            live[i].dir[0] = '\0';
        }
    if (f->pid <= 0 && !f->dir[0])
        return;
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].pid <= 0 && !live[i].dir[0]) {
            live[i].pid = f->pid;
            snprintf(live[i].dir, sizeof live[i].dir, "%s", f->dir);
            return;
        }
}

/* Can a listener bind 127.0.0.1:port now (0: any port)? The port bound, or -1. */
static int try_bind(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one); /* as redis-server does */
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    socklen_t len = sizeof a;
    int got = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        got = ntohs(a.sin_port);
    close(fd);
    return got;
}

/* A port that is free now: the kernel's choice. */
static int free_port(void)
{
    return try_bind(0);
}

/* A free port p <= 55535 whose cluster bus port (p + 10000) is free too. */
static int free_cluster_port(void)
{
    for (int tries = 0; tries < 1000; tries++) {
        int p = try_bind(0);
        if (p > 0 && p <= 55535 && try_bind(p + 10000) > 0)
            return p;
    }
    return -1;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static pid_t spawn(const redis_fixture *f, const char *const *extra)
{
    char port[16];
    snprintf(port, sizeof port, "%d", f->port);
    const char *argv[64] = {"redis-server", "--port", port, "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", f->dir,
                            "--protected-mode", "no", "--loglevel", "warning"};
    size_t n = 15;
    for (size_t i = 0; extra && extra[i] && n < 63; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0)
        return pid; /* -1 on error */
    /* child: die with the test, keep its output off the test's unless it fails to start */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    int null = open("/dev/null", O_WRONLY);
    if (null >= 0)
        dup2(null, STDOUT_FILENO);
    execvp("redis-server", (char *const *)argv);
    fprintf(stderr, "redis_fixture: cannot run redis-server: %s\n", strerror(errno));
    _exit(127);
}

/* Wait for PING -> PONG; 0 when it answered, -1 if the server exited or time ran out. */
static int wait_ready(redis_fixture *f)
{
    for (long waited = 0; waited < START_WAIT_MS; waited += 20) {
        int st;
        if (waitpid(f->pid, &st, WNOHANG) == f->pid) {
            f->pid = 0;
            return -1;
        }
        struct timeval tv = {1, 0};
        redisContext *c = redisConnectWithTimeout("127.0.0.1", f->port, tv);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            int ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
            if (r)
                freeReplyObject(r);
            redisFree(c);
            if (ok)
                return 0;
        } else if (c) {
            redisFree(c);
        }
        sleep_ms(20);
    }
    return -1;
}

/* Start on a port from pick(), or (pick NULL) on f->port again, a few times over. */
static int start(redis_fixture *f, const char *const *extra_args, int (*pick)(void))
{
    int port = f->port;
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/sl_redis_XXXXXX");
    if (!mkdtemp(f->dir)) {
        fprintf(stderr, "redis_fixture: mkdtemp: %s\n", strerror(errno));
        f->dir[0] = '\0';
        return -1;
    }
    for (int tries = 0; tries < START_TRIES; tries++) {
        if (!pick && tries > 0)
            sleep_ms(100); /* the same port: it may still be held for a moment */
        f->port = pick ? pick() : port;
        if (f->port <= 0)
            continue;
        snprintf(f->addr, sizeof f->addr, "127.0.0.1:%d", f->port);
        f->pid = spawn(f, extra_args);
        if (f->pid < 0) {
            f->pid = 0;
            break;
        }
        if (wait_ready(f) == 0) {
            track(f, 0, "");
            return 0;
        }
        if (f->pid > 0) { /* alive but silent: give up on this one */
            kill(f->pid, SIGKILL);
            waitpid(f->pid, NULL, 0);
            f->pid = 0;
        }
    }
    fprintf(stderr, "redis_fixture: could not start redis-server (is it installed?)\n");
    redis_fixture_stop(f);
    return -1;
}

int redis_fixture_start(redis_fixture *f, const char *const *extra_args)
{
    return start(f, extra_args, free_port);
}

int redis_fixture_start_cluster_node(redis_fixture *f, const char *const *extra_args)
{
    return start(f, extra_args, free_cluster_port);
}

int redis_fixture_restart(redis_fixture *f)
{
    redis_fixture_stop(f);
    if (f->port <= 0)
        return -1;
    return start(f, NULL, NULL);
}

void redis_fixture_stop(redis_fixture *f)
{
    char dir[sizeof f->dir];
    snprintf(dir, sizeof dir, "%s", f->dir);
    pid_t pid = f->pid;
    kill_and_remove(f->pid, f->dir);
    f->pid = 0;
    track(f, pid, dir);
}

redisContext *redis_fixture_connect(const redis_fixture *f)
{
    struct timeval tv = {10, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", f->port, tv);
    if (!c || c->err) {
        fprintf(stderr, "redis_fixture: connect to %s: %s\n", f->addr,
                c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    return c;
}

char *redis_fixture_read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += got;
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(fp);
    if (!buf)
        return NULL;
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}
