/*
 * fuzz_config.c — sluiced's configuration items (src/server/config.c): the "items" object of
 * a --config file (rules, tiers, assignments, the default policy, admission settings, tenant
 * weights), checked and applied by sd_config_open. The input is the text of that object.
 *
 * The server is only what sd_config_open uses: settings without a data dir, a limiter and the
 * admission settings. The file that error messages locate items in (sd_file_where reads it
 * through /proc/self/fd) is {"items": <input>}.
 *
 * Checked: a refusal names --config, the file and the line and column of the item (so the
 * locator decodes keys as jansson does, escapes included); after success or
 * refusal the limiter decides, and every rule and tier it holds is a valid policy; nothing
 * leaks. Not covered: main.c's reading of the other settings (flags and the rest of the
 * file), which exits the process on the first bad value.
 */
#include <jansson.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "fuzz.h"
#include "fuzz_server.h"

static int check_rule(void *ctx, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    (void)ctx, (void)k;
    FUZZ_CHECK(scope >= SL_SCOPE_TENANT && scope <= SL_SCOPE_CLIENT);
    FUZZ_CHECK(sl_policy_validate(p) == SL_OK);
    return 0;
}

static int check_tier(void *ctx, const char *name, const sl_policy *p)
{
    (void)ctx;
    FUZZ_CHECK(strlen(name) >= 1 && sl_policy_validate(p) == SL_OK);
    return 0;
}

static void use_limiter(sl_limiter *l)
{
    const sl_key keys[] = {SL_KEY("acme", "login", "alice"), SL_KEY(NULL, NULL, "c"),
                           SL_KEY("t", "a", "c")};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        sl_decision d;
        int rc = sl_take(l, &keys[i], 1, SL_NOW, &d);
        FUZZ_CHECK(rc == SL_OK || rc == SL_ECOST);
    }
    sl_rule_list(l, check_rule, NULL);
    sl_tier_list(l, check_tier, NULL);
    sl_policy p;
    FUZZ_CHECK(sl_default_get(l, &p) == SL_OK && sl_policy_validate(&p) == SL_OK);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t e;
    json_t *items = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &e);
    if (!items)
        return 0;
    if (!json_is_object(items)) { /* main.c refuses it before sd_config_open */
        json_decref(items);
        return 0;
    }
    int fd = memfd_create("fuzz_config", MFD_CLOEXEC);
    FUZZ_CHECK(fd >= 0 && write(fd, "{\"items\": ", 10) == 10 &&
               write(fd, data, size) == (ssize_t)size && write(fd, "}", 1) == 1);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    sd_server *srv = calloc(1, sizeof *srv);
    FUZZ_CHECK(srv);
    sl_options o;
    sl_options_init(&o);
    o.shards = 1;
    FUZZ_CHECK(sl_open(&srv->lim, &o) == SL_OK);
    sd_admission_init(&srv->adm);

    char err[1024] = "";
    if (sd_config_open(srv, items, path, err, sizeof err) != 0) {
        /* every refusal is of one item, which the file holds: its place is found */
        char want[96];
        snprintf(want, sizeof want, "--config %s: line ", path);
        FUZZ_CHECK(strncmp(err, want, strlen(want)) == 0);
    }
    use_limiter(srv->lim);

    sd_config_close(srv);
    fuzz_reset_weights(&srv->adm);
    sl_close(srv->lim);
    free(srv);
    close(fd);
    return 0;
}
