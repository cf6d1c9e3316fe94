/* version.c — version and error strings, generated from the tables in sluice.h. */
#include "sluice.h"

unsigned sl_version(void) { return SLUICE_VERSION_HEX; }

#define SL_STR_(x) #x
#define SL_STR(x) SL_STR_(x)
const char *sl_version_string(void)
{
    return SL_STR(SLUICE_VERSION_MAJOR) "." SL_STR(SLUICE_VERSION_MINOR) "." SL_STR(
        SLUICE_VERSION_PATCH);
}

const char *sl_strerror(int err)
{
    switch (err) {
    case SL_OK:
        return "success";
#define SL_XX_MSG(name, code, msg) \
    case SL_##name:                \
        return msg;
        SL_ERRNO_MAP(SL_XX_MSG)
#undef SL_XX_MSG
    }
    return "unknown error";
}

const char *sl_err_name(int err)
{
    switch (err) {
    case SL_OK:
        return "SL_OK";
#define SL_XX_NAME(name, code, msg) \
    case SL_##name:                 \
        return "SL_" #name;
        SL_ERRNO_MAP(SL_XX_NAME)
#undef SL_XX_NAME
    }
    return "SL_UNKNOWN";
}
