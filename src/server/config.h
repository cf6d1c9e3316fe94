/*
 * config.h — the server's configuration (rules, tiers, assignments, the default policy,
 * admission settings, tenant weights), kept durable in --data-dir.
 *
 * Every change made through RESP or HTTP goes through these functions, which, under one lock:
 * check it against the configuration in effect (the library's own error for anything it
 * would refuse), write the whole changed configuration to <data-dir>/config.json (temp file,
 * fsync, rename, directory fsync), and only then apply it to the limiter. If the write fails,
 * nothing changed — not the file, not the running configuration — and SD_EPERSIST is
 * returned (sd_config_errno() says why). Without --data-dir, changes are applied in memory
 * only.
 *
 * Items: each piece of configuration is one item with a key and a JSON value:
 *
 *   rule/tenant/<t>  rule/action/<t>/<a>  rule/client/<t>/<a>/<c>   policy
 *   tier/<name>                                                   policy
 *   assign/<t>/<c>                                                tier name
 *   default                                                       policy
 *   admission/max_global_concurrent_requests | max_tenant_queue_size | max_queue_wait_ms
 *   weight/<t>                                                    1..1000
 *
 * ids percent-encoded (any byte outside A-Z a-z 0-9 - . _ ~), tenant and action "default"
 * written as empty; a policy is {"limits": [{"algorithm", "limit", "rate"?, "window"?,
 * "reserve_cap"?}, ...]}. The configuration in effect is the items of --config's "items"
 * object, overridden item by item by <data-dir>/config.json, which holds every change made
 * through the API since (a deleted item is recorded as null, so that a change made later
 * wins over the --config file even when it is a deletion).
 */
#ifndef SD_CONFIG_H
#define SD_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "sluice.h"

#define SD_EPERSIST (-1000) /* the change could not be written to disk; nothing changed */

typedef struct sd_server sd_server;
typedef struct json_t json_t;

/* Load --config's items (`base`, an object or NULL; the reference is taken) and the data
 * dir's, check every item, and apply them to the limiter. 0, or -1 with one line in err
 * naming the file, line, column and item. */
int sd_config_open(sd_server *srv, json_t *base, const char *base_path, char *err,
                   size_t errlen);
void sd_config_close(sd_server *srv);

/* Where a JSON file holds the object member `key` at nesting `depth` (1: the top-level
 * object's members), for error messages, as jansson keeps no positions: "<prefix><path>:
 * line L, column C", or "<prefix><path>" if it is not there. Escapes in the file count as
 * jansson decodes them. */
void sd_file_where(char *out, size_t n, const char *prefix, const char *path, int depth,
                   const char *key);

/* The errno of this thread's last SD_EPERSIST. */
int sd_config_errno(void);

int sd_cfg_rule_set(sd_server *s, sl_scope scope, const sl_key *k, const sl_policy *p);
int sd_cfg_rule_del(sd_server *s, sl_scope scope, const sl_key *k);
int sd_cfg_tier_set(sd_server *s, const char *name, const sl_policy *p);
int sd_cfg_tier_del(sd_server *s, const char *name);
int sd_cfg_tier_assign(sd_server *s, const sl_key *tenant_client, const char *tier);
int sd_cfg_weight_set(sd_server *s, const char *tenant, size_t len, unsigned weight);
/* The admission settings, in this order everywhere (items, HTTP, RESP): name and range. */
typedef struct sd_adm_field {
    const char *name;
    int64_t min, max;
} sd_adm_field;
extern const sd_adm_field sd_adm_fields[3];

/* Default policy (NULL: unchanged) and admission settings (set[i]: vals[i] given, in
 * sd_adm_fields's order), all or nothing; a value out of its range is SL_EINVAL. */
int sd_cfg_global_set(sd_server *s, const sl_policy *deflt, const int64_t vals[3],
                      const int set[3]);

#endif
