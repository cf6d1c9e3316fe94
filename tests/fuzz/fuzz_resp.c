/*
 * fuzz_resp.c — the RESP command parser (src/server/resp.c) and what sluiced does with the
 * words it returns: numbers (resp_arg_int, resp_arg_double) and policies in words
 * (policy_text.c). The input is what any client may send to the RESP port.
 *
 * Checked for every input:
 *  - each command lies inside the bytes the parser says it took (> 0, within the input);
 *    argc is within [0, RESP_MAX_ARGS]; RESP_ERROR comes with a message;
 *  - fed in two pieces, as a connection may read it (split at a position taken from the first
 *    byte), the input gives the same commands and the same end (an error, or waiting for more)
 *    as when parsed whole: the parser resumes correctly;
 *  - a command re-encoded as a multibulk array parses back into the same arguments;
 *  - a policy that parses formats into words that parse back into the same policy (what
 *    SL.RULE GET answers, SL.RULE SET accepts); a refused one has a message.
 */
#include <math.h>
#include <string.h>

#include "fuzz.h"
#include "policy_text.h"
#include "resp.h"

/* The commands of one parse of the whole input: arguments as offsets into the input. */
typedef struct run {
    size_t cap;        /* of each array */
    size_t ncmds, nargs;
    size_t *cmd_end;   /* offset just past each command */
    size_t *cmd_first; /* index of each command's first argument in off/len */
    size_t *off, *len;
    long end;          /* RESP_NEED_MORE or RESP_ERROR: how parsing stopped */
    const char *err;
} run;

static void run_alloc(run *r, size_t size)
{
    /* every command takes at least one byte and every argument at least one byte (a quoted
     * empty inline argument takes two), so `size + 1` of each is enough */
    memset(r, 0, sizeof *r);
    r->cap = size + 1;
    r->cmd_end = malloc((size + 1) * sizeof(size_t));
    r->cmd_first = malloc((size + 1) * sizeof(size_t));
    r->off = malloc((size + 1) * sizeof(size_t));
    r->len = malloc((size + 1) * sizeof(size_t));
    FUZZ_CHECK(r->cmd_end && r->cmd_first && r->off && r->len);
}

static void run_free(run *r)
{
    free(r->cmd_end);
    free(r->cmd_first);
    free(r->off);
    free(r->len);
}

/* The parser's contract for one command parsed from buf[0..len). */
static void check_command(const char *buf, size_t len, long used, const resp_cmd *cmd)
{
    FUZZ_CHECK(used > 0 && (size_t)used <= len);
    FUZZ_CHECK(cmd->argc >= 0 && cmd->argc <= RESP_MAX_ARGS);
    for (int i = 0; i < cmd->argc; i++) {
        const resp_arg *a = &cmd->argv[i];
        FUZZ_CHECK(a->p >= buf && a->p <= buf + used);
        FUZZ_CHECK(a->len <= (size_t)(buf + used - a->p));
        FUZZ_CHECK(a->len <= RESP_MAX_BULK);
    }
}

/* Encode the command as a client library would and parse it again. */
static void check_reencode(const resp_cmd *cmd)
{
    resp_buf b = {0};
    resp_array(&b, cmd->argc);
    for (int i = 0; i < cmd->argc; i++)
        resp_bulk(&b, cmd->argv[i].p, cmd->argv[i].len);
    FUZZ_CHECK(!b.oom);
    resp_cmd *again = malloc(sizeof *again);
    const char *err = NULL;
    FUZZ_CHECK(again);
    long used = resp_parse(b.p, b.len, again, &err);
    FUZZ_CHECK(used == (long)b.len);
    FUZZ_CHECK(again->argc == cmd->argc);
    for (int i = 0; i < cmd->argc; i++)
        FUZZ_CHECK(again->argv[i].len == cmd->argv[i].len &&
                   memcmp(again->argv[i].p, cmd->argv[i].p, cmd->argv[i].len) == 0);
    free(again);
    resp_buf_free(&b);
}

/* The words of a formatted policy, as arguments. */
static int split_words(char *text, resp_arg *argv, int max)
{
    int n = 0;
    for (char *w = strtok(text, " "); w; w = strtok(NULL, " ")) {
        FUZZ_CHECK(n < max);
        argv[n++] = (resp_arg){w, strlen(w)};
    }
    return n;
}

/* The message quotes the argument: as a RESP error it must still be one line. */
static void check_error_reply(const char *err)
{
    resp_buf b = {0};
    resp_error(&b, "ERR %s", err);
    FUZZ_CHECK(!b.oom && b.len >= 3 && b.p[0] == '-');
    FUZZ_CHECK(b.p[b.len - 2] == '\r' && b.p[b.len - 1] == '\n');
    FUZZ_CHECK(!memchr(b.p, '\r', b.len - 2) && !memchr(b.p, '\n', b.len - 2));
    resp_buf_free(&b);
}

/* What sluiced does with arguments: numbers and policies. */
static void check_arguments(const resp_cmd *cmd)
{
    for (int i = 0; i < cmd->argc; i++) {
        int64_t v;
        double d;
        resp_arg_int(&cmd->argv[i], &v);
        if (resp_arg_double(&cmd->argv[i], &d) == 0)
            FUZZ_CHECK(isfinite(d));
    }
    if (cmd->argc < 1)
        return;
    sl_policy p;
    char err[256] = "";
    if (sd_policy_parse(cmd->argv + 1, cmd->argc - 1, &p, err, sizeof err) != 0) {
        FUZZ_CHECK(err[0] != 0 && strlen(err) < sizeof err);
        check_error_reply(err);
        return;
    }
    FUZZ_CHECK(sl_policy_validate(&p) == SL_OK);
    char text[1024];
    size_t n = sd_policy_format(&p, text, sizeof text);
    FUZZ_CHECK(n < sizeof text && strlen(text) == n);
    char small[16]; /* a short buffer is cut, never overrun */
    FUZZ_CHECK(sd_policy_format(&p, small, sizeof small) == n && strlen(small) < sizeof small);
    resp_arg words[64];
    int nw = split_words(text, words, 64);
    sl_policy back;
    FUZZ_CHECK(sd_policy_parse(words, nw, &back, err, sizeof err) == 0);
    FUZZ_CHECK(fuzz_same_policy(&p, &back));
}

/* Parse buf[0..len) (which starts at offset `base` of the input) until it needs more or
 * fails, appending the commands to r. Returns the bytes consumed. */
static size_t parse_all(const char *buf, size_t len, size_t base, resp_cmd *cmd, run *r,
                        int deep)
{
    size_t pos = 0;
    for (;;) {
        const char *err = NULL;
        long used = resp_parse(buf + pos, len - pos, cmd, &err);
        if (used <= 0) {
            FUZZ_CHECK(used == RESP_NEED_MORE || used == RESP_ERROR);
            FUZZ_CHECK(used == RESP_NEED_MORE || err != NULL);
            r->end = used;
            r->err = used == RESP_ERROR ? err : NULL;
            return pos;
        }
        check_command(buf + pos, len - pos, used, cmd);
        FUZZ_CHECK(r->ncmds < r->cap && (size_t)cmd->argc <= r->cap - r->nargs);
        r->cmd_first[r->ncmds] = r->nargs;
        for (int i = 0; i < cmd->argc; i++) {
            r->off[r->nargs] = base + (size_t)(cmd->argv[i].p - buf);
            r->len[r->nargs++] = cmd->argv[i].len;
        }
        pos += (size_t)used;
        r->cmd_end[r->ncmds++] = base + pos;
        if (deep) {
            check_reencode(cmd);
            check_arguments(cmd);
        }
    }
}

/* The input in two pieces: the first alone, then what it left unread with the second. */
static void parse_split(const char *data, size_t size, size_t split, resp_cmd *cmd, run *r)
{
    char *first = malloc(split ? split : 1);
    FUZZ_CHECK(first);
    memcpy(first, data, split);
    size_t used = parse_all(first, split, 0, cmd, r, 0);
    free(first);
    if (r->end == RESP_ERROR)
        return;
    size_t rest = size - used;
    char *second = malloc(rest ? rest : 1);
    FUZZ_CHECK(second);
    memcpy(second, data + used, rest);
    parse_all(second, rest, used, cmd, r, 0);
    free(second);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    resp_cmd *cmd = malloc(sizeof *cmd);
    FUZZ_CHECK(cmd);
    run whole, split;
    run_alloc(&whole, size);
    run_alloc(&split, size);

    parse_all(in, size, 0, cmd, &whole, 1);
    parse_split(in, size, size ? (size_t)data[0] * (size + 1) / 256 : 0, cmd, &split);

    FUZZ_CHECK(split.end == whole.end && split.ncmds == whole.ncmds &&
               split.nargs == whole.nargs);
    FUZZ_CHECK(split.err == whole.err || (split.err && whole.err &&
                                          strcmp(split.err, whole.err) == 0));
    for (size_t i = 0; i < whole.ncmds; i++)
        FUZZ_CHECK(split.cmd_end[i] == whole.cmd_end[i] &&
                   split.cmd_first[i] == whole.cmd_first[i]);
    for (size_t i = 0; i < whole.nargs; i++)
        FUZZ_CHECK(split.off[i] == whole.off[i] && split.len[i] == whole.len[i]);

    run_free(&whole);
    run_free(&split);
    free(cmd);
    return 0;
}
