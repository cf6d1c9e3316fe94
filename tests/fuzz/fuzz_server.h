/*
 * fuzz_server.h — for fuzz targets that run parts of sluiced (fuzz_config, fuzz_http,
 * fuzz_resp_cmd). fuzz_server.c also stands in for main.c's logging (sd_log, sd_log_level).
 */
#ifndef SL_FUZZ_SERVER_H
#define SL_FUZZ_SERVER_H

#include "server.h"

/* Tenant weights are process-wide (admission.c): put every one back to the default, so that
 * no input leaves state for the next. */
void fuzz_reset_weights(sd_admission *a);

#endif
