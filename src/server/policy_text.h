/*
 * policy_text.h — policies as words, for the RESP front end and logs:
 *
 *   policy := limit ( "AND" limit )*                (at most SL_MAX_LIMITS limits)
 *   limit  := <algorithm> LIMIT <n> [RATE <per second>] [WINDOW <seconds>] [RESERVE <cap>]
 *
 *   token_bucket LIMIT 10 RATE 1
 *   sliding_window LIMIT 100 WINDOW 60 AND token_bucket LIMIT 10 RATE 5
 *
 * Keywords are case-insensitive. Formatting produces the same syntax, so what SL.RULE GET
 * answers can be given back to SL.RULE SET.
 */
#ifndef SD_POLICY_TEXT_H
#define SD_POLICY_TEXT_H

#include <stddef.h>

#include "resp.h"
#include "sluice.h"

/* Parse argv[0..argc) as a policy. 0 and *out filled (and validated with
 * sl_policy_validate); else -1 with a message in err[0..errlen). */
int sd_policy_parse(const resp_arg *argv, int argc, sl_policy *out, char *err, size_t errlen);

/* The fields (SD_F_*) each algorithm takes, and those it needs: every front end and the
 * configuration files refuse the others, and ask for the missing ones. */
enum { SD_F_LIMIT = 1, SD_F_RATE = 2, SD_F_WINDOW = 4, SD_F_RESERVE = 8 };
void sd_policy_fields(sl_algorithm a, unsigned *takes, unsigned *needs);

/* Format `p` into buf (always NUL-terminated). Returns the length it needed. */
size_t sd_policy_format(const sl_policy *p, char *buf, size_t len);

#endif
