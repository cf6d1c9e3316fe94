/*
 * sluice.c — the CPython extension module `sluice`: libsluice behind the RateLimiter
 * interface Python services use. Uses include/sluice.h only (linked statically).
 *
 * Units: durations in a Decision are float seconds (`retry_after`) with exact integer
 * nanoseconds beside them (`retry_after_ns`); timestamps (`now=`, the `clock` callable) are
 * integer nanoseconds, as in the C API.
 *
 * The GIL: held during decisions by default (measured: releasing it around a decision of
 * ~100 ns costs more than it frees; docs/design.md "Python binding"). `release_gil=True`
 * releases it around each call into the library, for callers whose other threads do real
 * work outside Python.
 *
 * Ownership: a RateLimiter owns its sl_limiter and closes it when the object is freed (no
 * call can be running then: every call holds a reference to the object). Ids passed to the
 * library are borrowed from the caller's str/bytes objects, which outlive the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <sluice.h>

#define BINDING_VERSION "0.2.0"

/* ---- errors --------------------------------------------------------------------------- */

/* Raise the Python exception for a library error; returns NULL. Bad input or configuration
 * is ValueError (message from sl_strerror, plus the code's name). */
static PyObject *sl_raise(int rc)
{
    PyObject *type = PyExc_ValueError;
    if (rc == SL_ENOMEM)
        return PyErr_NoMemory();
    if (rc == SL_EIO)
        type = PyExc_OSError;
    else if (rc == SL_ESTORE)
        type = PyExc_RuntimeError;
    PyErr_Format(type, "%s (%s)", sl_strerror(rc), sl_err_name(rc));
    return NULL;
}

/* ---- argument parsing ------------------------------------------------------------------
 * For METH_FASTCALL | METH_KEYWORDS: names[0..n-1]; the first `npos` may be given by
 * position, the first `nreq` are required. out[i] is NULL when not given. */
static int parse_args(const char *fn, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames, const char *const *names, int n, int npos, int nreq,
                      PyObject **out)
{
    for (int i = 0; i < n; i++)
        out[i] = NULL;
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional argument%s (%zd given)",
                     fn, npos, npos == 1 ? "" : "s", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t j = 0; j < nkw; j++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, j);
        int i;
        for (i = 0; i < n; i++)
            if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0)
                break;
        if (i == n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fn,
                         name);
            return -1;
        }
        if (out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + j];
    }
    for (int i = 0; i < nreq; i++)
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
            return -1;
        }
    return 0;
}

/* An id: str (UTF-8) or bytes, borrowed. None is "default" for a tenant or action, and a
 * ValueError for a client. */
static int id_from(PyObject *o, const char *what, int is_client, const char **p, size_t *n)
{
    Py_ssize_t len;
    if (PyUnicode_Check(o)) {
        const char *s = PyUnicode_AsUTF8AndSize(o, &len);
        if (!s)
            return -1;
        *p = s;
        *n = (size_t)len;
        return 0;
    }
    if (PyBytes_Check(o)) {
        *p = PyBytes_AS_STRING(o);
        *n = (size_t)PyBytes_GET_SIZE(o);
        return 0;
    }
    if (o == Py_None) {
        if (is_client) {
            PyErr_SetString(PyExc_ValueError, "client id is None");
            return -1;
        }
        *p = NULL;
        *n = 0;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", what,
                 Py_TYPE(o)->tp_name);
    return -1;
}

/* A decision key: a client id (str or bytes; default tenant and action) or a tuple
 * (tenant, action, client). An empty client id is the library's SL_EKEYEMPTY. */
static int key_from(PyObject *o, sl_key *k)
{
    memset(k, 0, sizeof *k);
    if (PyTuple_Check(o)) {
        if (PyTuple_GET_SIZE(o) != 3) {
            PyErr_Format(PyExc_ValueError,
                         "a key tuple is (tenant, action, client), not %zd items",
                         PyTuple_GET_SIZE(o));
            return -1;
        }
        if (id_from(PyTuple_GET_ITEM(o, 0), "tenant", 0, &k->tenant, &k->tenant_len) < 0 ||
            id_from(PyTuple_GET_ITEM(o, 1), "action", 0, &k->action, &k->action_len) < 0 ||
            id_from(PyTuple_GET_ITEM(o, 2), "client id", 1, &k->client, &k->client_len) < 0)
            return -1;
        return 0;
    }
    return id_from(o, "client id (or a (tenant, action, client) tuple)", 1, &k->client,
                   &k->client_len);
}

/* A rule's key: scope "tenant" takes a tenant (str/bytes, or a 1-tuple), "action" a
 * (tenant, action) tuple, "client" a (tenant, action, client) tuple. */
static int scope_from(PyObject *o, sl_scope *s)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "scope must be str, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(o, "tenant") == 0)
        *s = SL_SCOPE_TENANT;
    else if (PyUnicode_CompareWithASCIIString(o, "action") == 0)
        *s = SL_SCOPE_ACTION;
    else if (PyUnicode_CompareWithASCIIString(o, "client") == 0)
        *s = SL_SCOPE_CLIENT;
    else {
        PyErr_Format(PyExc_ValueError, "scope must be 'tenant', 'action' or 'client', not %R",
                     o);
        return -1;
    }
    return 0;
}

static int scope_key_from(sl_scope s, PyObject *o, sl_key *k)
{
    static const char *const forms[] = {"", "a tenant id", "a (tenant, action) tuple",
                                        "a (tenant, action, client) tuple"};
    memset(k, 0, sizeof *k);
    Py_ssize_t need = (Py_ssize_t)s;
    if (s == SL_SCOPE_TENANT && !PyTuple_Check(o))
        return id_from(o, "tenant", 0, &k->tenant, &k->tenant_len);
    if (!PyTuple_Check(o)) {
        PyErr_Format(PyExc_TypeError, "the key of this scope is %s, not %.100s", forms[s],
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (PyTuple_GET_SIZE(o) != need) {
        PyErr_Format(PyExc_ValueError, "the key of this scope is %s, not %zd items", forms[s],
                     PyTuple_GET_SIZE(o));
        return -1;
    }
    if (id_from(PyTuple_GET_ITEM(o, 0), "tenant", 0, &k->tenant, &k->tenant_len) < 0)
        return -1;
    if (need >= 2 &&
        id_from(PyTuple_GET_ITEM(o, 1), "action", 0, &k->action, &k->action_len) < 0)
        return -1;
    if (need >= 3 &&
        id_from(PyTuple_GET_ITEM(o, 2), "client id", 1, &k->client, &k->client_len) < 0)
        return -1;
    return 0;
}

/* A whole number >= 0 for argument `what` (NULL o: 1, the default cost). */
static int count_from(PyObject *o, const char *what, uint64_t *out)
{
    if (!o) {
        *out = 1;
        return 0;
    }
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0) {
        PyErr_Format(PyExc_ValueError, overflow > 0 ? "%s is too large" : "%s must be >= 0",
                     what);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static int number_from(PyObject *o, const char *what, double *out)
{
    if (!PyLong_Check(o) && !PyFloat_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be int or float, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* ---- policies --------------------------------------------------------------------------
 * A limit in Python is a dict: {"algorithm": name, and the algorithm's parameters}. The
 * canonical names are the C fields (limit, rate, window, reserve_cap); each algorithm also
 * takes the names of the RateLimiter constructor (capacity, refill_rate, base_rate, ...).
 * A parameter the algorithm does not use is an error, so a typo cannot pass unnoticed. */
enum { F_LIMIT, F_RATE, F_WINDOW, F_CAP, NFIELDS };
static const char *const field_name[NFIELDS] = {"limit", "rate", "window", "reserve_cap"};

typedef struct alg_spec {
    sl_algorithm a;
    const char *names[NFIELDS][4]; /* accepted names per field; none: field unused */
    double dflt[NFIELDS];          /* NAN: required */
    const char *hint[NFIELDS];     /* for "needs ..." messages */
} alg_spec;

static const alg_spec specs[] = {
    {SL_TOKEN_BUCKET,
     {{"limit", "capacity"}, {"rate", "refill_rate"}, {NULL}, {NULL}},
     {5, 1.0, 0, 0},
     {"capacity", "refill_rate (per second)", NULL, NULL}},
    {SL_LEAKY_BUCKET,
     {{"limit", "capacity"}, {"rate", "leak_rate", "refill_rate"}, {NULL}, {NULL}},
     {5, 1.0, 0, 0},
     {"capacity (queue depth)", "leak_rate (per second)", NULL, NULL}},
    {SL_FIXED_WINDOW,
     {{"limit", "capacity"}, {NULL}, {"window"}, {NULL}},
     {5, 0, NAN, 0},
     {"limit", NULL, "window (seconds)", NULL}},
    {SL_SLIDING_WINDOW,
     {{"limit", "capacity"}, {NULL}, {"window"}, {NULL}},
     {5, 0, NAN, 0},
     {"limit", NULL, "window (seconds)", NULL}},
    {SL_SLIDING_LOG,
     {{"limit", "capacity"}, {NULL}, {"window"}, {NULL}},
     {5, 0, NAN, 0},
     {"limit", NULL, "window (seconds)", NULL}},
    {SL_BURST_RESERVE,
     {{"limit", "base_rate", "capacity"}, {"rate", "reserve_rate"}, {NULL}, {"reserve_cap"}},
     {50, 1.0, 0, 100},
     {"base_rate", "reserve_rate", NULL, "reserve_cap"}},
    {SL_CONCURRENCY,
     {{"limit", "capacity", "max_in_flight"}, {NULL}, {"window", "lease_ttl"}, {NULL}},
     {5, 0, NAN, 0},
     {"max_in_flight", NULL, "lease_ttl (seconds)", NULL}},
};

static const alg_spec *spec_of(sl_algorithm a)
{
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
        if (specs[i].a == a)
            return &specs[i];
    return NULL;
}

static int algorithm_from(PyObject *o, sl_algorithm *a)
{
    if (!o) {
        *a = SL_TOKEN_BUCKET;
        return 0;
    }
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "algorithm must be str, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s)
        return -1;
    if (sl_algorithm_parse(s, (size_t)n, a) != SL_OK) {
        PyErr_Format(PyExc_ValueError,
                     "unknown algorithm %R (token_bucket, leaky_bucket, fixed_window, "
                     "sliding_window, sliding_log, burst_reserve, concurrency)",
                     o);
        return -1;
    }
    return 0;
}

/* One limit from the items of `d` (a dict; every key is consumed or an error). `ctor`: the
 * dict holds constructor keywords, so an unknown name is a TypeError as for any call. */
static int limit_from_dict(PyObject *d, sl_limit *lim, int ctor)
{
    memset(lim, 0, sizeof *lim);
    PyObject *alg = PyDict_GetItemString(d, "algorithm");
    Py_ssize_t nnone = 0; /* constructor keywords given as None mean "not given" */
    if (ctor && alg == Py_None) {
        alg = NULL;
        nnone++;
    }
    if (algorithm_from(alg, &lim->algorithm) < 0)
        return -1;
    const alg_spec *sp = spec_of(lim->algorithm);
    double v[NFIELDS];
    Py_ssize_t used = (alg ? 1 : 0) + nnone;
    for (int f = 0; f < NFIELDS; f++) {
        const char *given = NULL;
        v[f] = sp->dflt[f];
        for (int j = 0; j < 4 && sp->names[f][j]; j++) {
            PyObject *o = PyDict_GetItemString(d, sp->names[f][j]);
            if (!o || (ctor && o == Py_None))
                continue;
            used++;
            if (given) {
                PyErr_Format(PyExc_ValueError, "%s: give %s or %s, not both",
                             sl_algorithm_name(lim->algorithm), given, sp->names[f][j]);
                return -1;
            }
            given = sp->names[f][j];
            if (number_from(o, given, &v[f]) < 0)
                return -1;
        }
        if (sp->names[f][0] && isnan(v[f]) && !given) {
            PyErr_Format(PyExc_ValueError, "%s needs %s", sl_algorithm_name(lim->algorithm),
                         sp->hint[f]);
            return -1;
        }
    }
    if (used != PyDict_GET_SIZE(d)) { /* a key no field of this algorithm takes */
        PyObject *k, *val;
        Py_ssize_t pos = 0;
        while (PyDict_Next(d, &pos, &k, &val)) {
            int known = PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, "algorithm") == 0;
            for (int f = 0; f < NFIELDS && !known; f++)
                for (int j = 0; j < 4 && sp->names[f][j] && !known; j++)
                    known = PyUnicode_Check(k) &&
                            PyUnicode_CompareWithASCIIString(k, sp->names[f][j]) == 0;
            if (known || (ctor && val == Py_None))
                continue;
            /* a parameter of another algorithm: a configuration error; a name no
               algorithm takes, in the constructor: an unexpected keyword */
            int other = 0;
            for (size_t i = 0; i < sizeof specs / sizeof specs[0] && !other; i++)
                for (int f = 0; f < NFIELDS && !other; f++)
                    for (int j = 0; j < 4 && specs[i].names[f][j] && !other; j++)
                        other = PyUnicode_Check(k) &&
                                PyUnicode_CompareWithASCIIString(k, specs[i].names[f][j]) == 0;
            if (ctor && !other)
                PyErr_Format(PyExc_TypeError, "RateLimiter() got an unexpected keyword argument %R", k);
            else
                PyErr_Format(PyExc_ValueError, "%R does not apply to %s", k,
                             sl_algorithm_name(lim->algorithm));
            return -1;
        }
    }
    lim->limit = v[F_LIMIT];
    lim->rate = sp->names[F_RATE][0] ? v[F_RATE] : 0;
    lim->window = sp->names[F_WINDOW][0] ? v[F_WINDOW] : 0;
    lim->reserve_cap = sp->names[F_CAP][0] ? v[F_CAP] : 0;
    return 0;
}

/* A policy: one limit (a dict) or a list/tuple of 1..4 of them (stacked limits). */
static int policy_from(PyObject *o, sl_policy *p)
{
    memset(p, 0, sizeof *p);
    if (PyDict_Check(o)) {
        p->nlimits = 1;
        if (limit_from_dict(o, &p->limits[0], 0) < 0)
            return -1;
    } else if (PyList_Check(o) || PyTuple_Check(o)) {
        PyObject *seq = PySequence_Fast(o, "policy");
        if (!seq)
            return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n < 1 || n > SL_MAX_LIMITS) {
            Py_DECREF(seq);
            return (void)sl_raise(SL_ELIMITS), -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyDict_Check(it)) {
                PyErr_Format(PyExc_TypeError, "a limit must be a dict, not %.100s",
                             Py_TYPE(it)->tp_name);
                Py_DECREF(seq);
                return -1;
            }
            if (limit_from_dict(it, &p->limits[i], 0) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
        p->nlimits = (unsigned)n;
        Py_DECREF(seq);
    } else {
        PyErr_Format(PyExc_TypeError, "a policy is a dict or a list of dicts, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int rc = sl_policy_validate(p);
    return rc == SL_OK ? 0 : ((void)sl_raise(rc), -1);
}

static int dict_set_steal(PyObject *d, const char *k, PyObject *v)
{
    if (!v)
        return -1;
    int rc = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return rc;
}

/* A whole number as int, anything else as float. */
static PyObject *num_to_py(double v)
{
    if (v == floor(v) && fabs(v) < 9e15)
        return PyLong_FromLongLong((long long)v);
    return PyFloat_FromDouble(v);
}

static PyObject *limit_to_py(const sl_limit *lim)
{
    const alg_spec *sp = spec_of(lim->algorithm);
    PyObject *d = PyDict_New();
    if (!d || !sp)
        return d;
    if (dict_set_steal(d, "algorithm", PyUnicode_FromString(sl_algorithm_name(lim->algorithm))) < 0)
        goto fail;
    const double v[NFIELDS] = {lim->limit, lim->rate, lim->window, lim->reserve_cap};
    for (int f = 0; f < NFIELDS; f++) /* counts as int, rate and window as float */
        if (sp->names[f][0] &&
            dict_set_steal(d, field_name[f],
                           f == F_LIMIT || f == F_CAP ? num_to_py(v[f]) : PyFloat_FromDouble(v[f])) < 0)
            goto fail;
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* A dict for one limit, a list of dicts for stacked limits (as the HTTP API's forms). */
static PyObject *policy_to_py(const sl_policy *p)
{
    if (p->nlimits == 1)
        return limit_to_py(&p->limits[0]);
    PyObject *l = PyList_New((Py_ssize_t)p->nlimits);
    for (unsigned i = 0; l && i < p->nlimits; i++) {
        PyObject *d = limit_to_py(&p->limits[i]);
        if (!d) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, d);
    }
    return l;
}

/* str when the bytes are UTF-8, else bytes */
static PyObject *id_to_py(const char *p, size_t n)
{
    PyObject *s = PyUnicode_DecodeUTF8(p ? p : "", (Py_ssize_t)n, NULL);
    if (!s && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        s = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    }
    return s;
}

/* ---- Decision ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sl_decision d;
} Decision;

static PyTypeObject DecisionType;

static PyObject *decision_new(const sl_decision *d)
{
    Decision *o = PyObject_New(Decision, &DecisionType);
    if (o)
        o->d = *d;
    return (PyObject *)o;
}

static void decision_dealloc(PyObject *o) { PyObject_Free(o); }

static int64_t ceil_s(int64_t ns) { return ns <= 0 ? 0 : (ns + SL_SECOND - 1) / SL_SECOND; }

/* The headers sluiced's HTTP front end sends with a decision (draft-ietf-httpapi-ratelimit-
 * headers-11, as in src/server/http_api.c), plus Retry-After when `retry` >= 0. */
static PyObject *headers_of(const sl_decision *d, int64_t retry)
{
    char buf[96];
    PyObject *h = PyDict_New();
    if (!h)
        return NULL;
    int64_t w = ceil_s(d->window);
    if (w > 0)
        snprintf(buf, sizeof buf, "\"default\";q=%llu;w=%lld", (unsigned long long)d->limit,
                 (long long)w);
    else
        snprintf(buf, sizeof buf, "\"default\";q=%llu", (unsigned long long)d->limit);
    if (dict_set_steal(h, "RateLimit-Policy", PyUnicode_FromString(buf)) < 0)
        goto fail;
    snprintf(buf, sizeof buf, "\"default\";r=%llu;t=%lld", (unsigned long long)d->remaining,
             (long long)ceil_s(d->reset_after));
    if (dict_set_steal(h, "RateLimit", PyUnicode_FromString(buf)) < 0)
        goto fail;
    if (retry >= 0) {
        snprintf(buf, sizeof buf, "%lld", (long long)ceil_s(retry));
        if (dict_set_steal(h, "Retry-After", PyUnicode_FromString(buf)) < 0)
            goto fail;
    }
    return h;
fail:
    Py_DECREF(h);
    return NULL;
}

static PyObject *decision_headers(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    const sl_decision *d = &((Decision *)self)->d;
    return headers_of(d, d->allowed ? -1 : d->retry_after);
}

#define D(o) (((Decision *)(o))->d)
static PyObject *dg_allowed(PyObject *o, void *c) { (void)c; return PyBool_FromLong(D(o).allowed); }
static PyObject *dg_limit(PyObject *o, void *c) { (void)c; return PyLong_FromUnsignedLongLong(D(o).limit); }
static PyObject *dg_remaining(PyObject *o, void *c) { (void)c; return PyLong_FromUnsignedLongLong(D(o).remaining); }
static PyObject *dg_reset_after(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble((double)D(o).reset_after / 1e9); }
static PyObject *dg_retry_after(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble((double)D(o).retry_after / 1e9); }
static PyObject *dg_delay(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble((double)D(o).delay / 1e9); }
static PyObject *dg_window(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble((double)D(o).window / 1e9); }
static PyObject *dg_reset_after_ns(PyObject *o, void *c) { (void)c; return PyLong_FromLongLong(D(o).reset_after); }
static PyObject *dg_retry_after_ns(PyObject *o, void *c) { (void)c; return PyLong_FromLongLong(D(o).retry_after); }
static PyObject *dg_delay_ns(PyObject *o, void *c) { (void)c; return PyLong_FromLongLong(D(o).delay); }
static PyObject *dg_tokens(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble(D(o).tokens); }
static PyObject *dg_reserve(PyObject *o, void *c) { (void)c; return PyFloat_FromDouble(D(o).reserve); }
static PyObject *dg_lease(PyObject *o, void *c) { (void)c; return PyLong_FromUnsignedLongLong(D(o).lease); }
static PyObject *dg_limit_index(PyObject *o, void *c) { (void)c; return PyLong_FromUnsignedLong(D(o).limit_index); }
static PyObject *dg_algorithm(PyObject *o, void *c) { (void)c; return PyUnicode_FromString(sl_algorithm_name(D(o).algorithm)); }

static PyGetSetDef decision_getset[] = {
    {"allowed", dg_allowed, NULL, "True: admitted (and consumed); False: denied (nothing consumed)", NULL},
    {"limit", dg_limit, NULL, "the reported limit's capacity (int)", NULL},
    {"remaining", dg_remaining, NULL, "whole units of the reported limit left after this request (int)", NULL},
    {"reset_after", dg_reset_after, NULL, "seconds until the reported limit is back to full (float)", NULL},
    {"retry_after", dg_retry_after, NULL, "seconds until a request of this cost could pass; 0 when allowed (float)", NULL},
    {"delay", dg_delay, NULL, "leaky_bucket: seconds until the admitted request may proceed; else 0", NULL},
    {"window", dg_window, NULL, "seconds: the reported limit's window or full-refill time", NULL},
    {"reset_after_ns", dg_reset_after_ns, NULL, "reset_after in integer nanoseconds (exact)", NULL},
    {"retry_after_ns", dg_retry_after_ns, NULL, "retry_after in integer nanoseconds (exact)", NULL},
    {"delay_ns", dg_delay_ns, NULL, "delay in integer nanoseconds (exact)", NULL},
    {"tokens", dg_tokens, NULL, "exact (fractional) units left of the reported limit", NULL},
    {"reserve", dg_reserve, NULL, "burst_reserve: reserve units left; else 0", NULL},
    {"lease", dg_lease, NULL, "concurrency: the lease acquired (0 when none)", NULL},
    {"limit_index", dg_limit_index, NULL, "which limit of a stacked policy is reported", NULL},
    {"algorithm", dg_algorithm, NULL, "the reported limit's algorithm", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *decision_repr(PyObject *o)
{
    const sl_decision *d = &D(o);
    char buf[256];
    snprintf(buf, sizeof buf,
             "Decision(allowed=%s, limit=%llu, remaining=%llu, reset_after=%.9g, "
             "retry_after=%.9g, algorithm='%s')",
             d->allowed ? "True" : "False", (unsigned long long)d->limit,
             (unsigned long long)d->remaining, (double)d->reset_after / 1e9,
             (double)d->retry_after / 1e9, sl_algorithm_name(d->algorithm));
    return PyUnicode_FromString(buf);
}

static int decision_bool(PyObject *o) { return D(o).allowed != 0; }
#undef D

static PyNumberMethods decision_as_number = {.nb_bool = decision_bool};

static PyMethodDef decision_methods[] = {
    {"headers", decision_headers, METH_NOARGS,
     "headers() -> dict: RateLimit-Policy, RateLimit and (when denied) Retry-After, as "
     "sluiced's HTTP API sends them with this decision."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecisionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sluice.Decision",
    .tp_basicsize = sizeof(Decision),
    .tp_dealloc = decision_dealloc,
    .tp_repr = decision_repr,
    .tp_as_number = &decision_as_number,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The answer to one request (read-only). True in a boolean context when allowed.",
    .tp_methods = decision_methods,
    .tp_getset = decision_getset,
};

/* ---- RateLimiter ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sl_limiter *l;
    PyObject *clock; /* callable returning int ns, or NULL: the library's clock */
    int release_gil;
} Limiter;

static PyTypeObject LimiterType;

static int ns_from(PyObject *o, const char *what, int64_t *ns)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be int nanoseconds, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0 || v >= (INT64_C(1) << 62)) {
        PyErr_Format(PyExc_ValueError, "%s must be between 0 and 2**62 ns", what);
        return -1;
    }
    *ns = v;
    return 0;
}

/* The `now` of a call: the argument, else the limiter's clock callable, else SL_NOW. */
static int now_of(Limiter *self, PyObject *arg, int64_t *now)
{
    if (arg && arg != Py_None)
        return ns_from(arg, "now", now);
    if (!self->clock) {
        *now = SL_NOW;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(self->clock);
    if (!r)
        return -1;
    int rc = ns_from(r, "the clock's value", now);
    Py_DECREF(r);
    return rc;
}

/* The decision calls, with or without the GIL. */
static int do_take(Limiter *self, const sl_key *k, uint64_t cost, int64_t now, sl_decision *d)
{
    int rc;
    if (self->release_gil) {
        Py_BEGIN_ALLOW_THREADS
        rc = sl_take(self->l, k, cost, now, d);
        Py_END_ALLOW_THREADS
    } else {
        rc = sl_take(self->l, k, cost, now, d);
    }
    return rc;
}

static int do_peek(Limiter *self, const sl_key *k, int64_t now, sl_decision *d)
{
    int rc;
    if (self->release_gil) {
        Py_BEGIN_ALLOW_THREADS
        rc = sl_peek(self->l, k, now, d);
        Py_END_ALLOW_THREADS
    } else {
        rc = sl_peek(self->l, k, now, d);
    }
    return rc;
}

static PyObject *limiter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static const char *const pos[] = {"capacity", "refill_rate", "algorithm", "max_keys"};
    Py_ssize_t npos = PyTuple_GET_SIZE(args);
    if (npos > 4) {
        PyErr_Format(PyExc_TypeError, "RateLimiter() takes at most 4 positional arguments (%zd given)", npos);
        return NULL;
    }
    /* Everything in one dict; then the limiter's own options are taken out and what is left
     * describes the default limit. */
    PyObject *kw = kwds ? PyDict_Copy(kwds) : PyDict_New();
    if (!kw)
        return NULL;
    Limiter *self = NULL;
    PyObject *policy_arg = NULL, *max_keys = NULL, *shards = NULL, *clock = NULL,
             *release_gil = NULL;
    for (Py_ssize_t i = 0; i < npos; i++) {
        if (PyDict_GetItemString(kw, pos[i])) {
            PyErr_Format(PyExc_TypeError, "RateLimiter() got multiple values for argument '%s'",
                         pos[i]);
            goto fail;
        }
        if (PyDict_SetItemString(kw, pos[i], PyTuple_GET_ITEM(args, i)) < 0)
            goto fail;
    }
#define TAKE(var, name)                                                                     \
    do {                                                                                    \
        var = PyDict_GetItemString(kw, name);                                               \
        Py_XINCREF(var);                                                                    \
        if (var && PyDict_DelItemString(kw, name) < 0)                                      \
            goto fail;                                                                      \
    } while (0)
    TAKE(policy_arg, "policy");
    TAKE(max_keys, "max_keys");
    TAKE(shards, "shards");
    TAKE(clock, "clock");
    TAKE(release_gil, "release_gil");
#undef TAKE

    sl_options o;
    sl_options_init(&o);
    sl_policy pol;
    if (policy_arg && policy_arg != Py_None) {
        Py_ssize_t pos2 = 0;
        PyObject *k, *v;
        while (PyDict_Next(kw, &pos2, &k, &v))
            if (v != Py_None) {
                PyErr_Format(PyExc_TypeError, "RateLimiter(): give policy= or %U, not both", k);
                goto fail;
            }
        if (policy_from(policy_arg, &pol) < 0)
            goto fail;
    } else {
        pol.nlimits = 1;
        if (limit_from_dict(kw, &pol.limits[0], 1) < 0)
            goto fail;
        int rc = sl_policy_validate(&pol);
        if (rc != SL_OK) {
            sl_raise(rc);
            goto fail;
        }
    }
    o.default_policy = &pol;
    if (max_keys && max_keys != Py_None) {
        if (!PyLong_Check(max_keys)) {
            PyErr_Format(PyExc_TypeError, "max_keys must be int or None, not %.100s",
                         Py_TYPE(max_keys)->tp_name);
            goto fail;
        }
        long long v = PyLong_AsLongLong(max_keys);
        if (v == -1 && PyErr_Occurred())
            goto fail;
        if (v < 1) {
            PyErr_SetString(PyExc_ValueError, "max_keys must be >= 1 (None: unbounded)");
            goto fail;
        }
        o.max_keys = (size_t)v;
    }
    if (shards && shards != Py_None) {
        long v = PyLong_Check(shards) ? PyLong_AsLong(shards) : -2;
        if (v == -2 && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "shards must be int");
            goto fail;
        }
        if (v == -1 && PyErr_Occurred())
            goto fail;
        if (v < 1 || v > 65536 || (v & (v - 1))) {
            PyErr_SetString(PyExc_ValueError, "shards must be a power of two, 1 to 65536");
            goto fail;
        }
        o.shards = (unsigned)v;
    }
    if (clock == Py_None)
        Py_CLEAR(clock);
    if (clock && !PyCallable_Check(clock)) {
        PyErr_Format(PyExc_TypeError, "clock must be callable (returning int ns), not %.100s",
                     Py_TYPE(clock)->tp_name);
        goto fail;
    }
    int rg = 0;
    if (release_gil && (rg = PyObject_IsTrue(release_gil)) < 0)
        goto fail;

    self = (Limiter *)type->tp_alloc(type, 0);
    if (!self)
        goto fail;
    self->release_gil = rg;
    int rc = sl_open(&self->l, &o);
    if (rc != SL_OK) {
        self->l = NULL;
        sl_raise(rc);
        goto fail;
    }
    self->clock = clock;
    clock = NULL;
    Py_XDECREF(policy_arg);
    Py_XDECREF(max_keys);
    Py_XDECREF(shards);
    Py_XDECREF(release_gil);
    Py_DECREF(kw);
    return (PyObject *)self;
fail:
    Py_XDECREF(self);
    Py_XDECREF(policy_arg);
    Py_XDECREF(max_keys);
    Py_XDECREF(shards);
    Py_XDECREF(clock);
    Py_XDECREF(release_gil);
    Py_DECREF(kw);
    return NULL;
}

static void limiter_dealloc(PyObject *o)
{
    Limiter *self = (Limiter *)o;
    PyObject_GC_UnTrack(o);
    sl_close(self->l); /* no call can be running: each holds a reference */
    self->l = NULL;
    Py_CLEAR(self->clock);
    Py_TYPE(o)->tp_free(o);
}

static int limiter_traverse(PyObject *o, visitproc visit, void *arg)
{
    Py_VISIT(((Limiter *)o)->clock);
    return 0;
}

static int limiter_clear(PyObject *o)
{
    Py_CLEAR(((Limiter *)o)->clock);
    return 0;
}

/* Shared by the methods taking (key, [cost], *, now): parse, decide. */
static int decide_call(Limiter *self, const char *fn, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, int has_cost, int take,
                       uint64_t cost_override, sl_decision *d)
{
    PyObject *a[3];
    int n = has_cost ? 3 : 2;
    if (parse_args(fn, args, nargs, kwnames, names, n, n - 1, 1, a) < 0)
        return -1;
    sl_key k;
    uint64_t cost = cost_override;
    int64_t now;
    if (key_from(a[0], &k) < 0 || (has_cost && count_from(a[1], "cost", &cost) < 0) ||
        now_of(self, a[n - 1], &now) < 0)
        return -1;
    int rc = take ? do_take(self, &k, cost, now, d) : do_peek(self, &k, now, d);
    if (rc != SL_OK)
        return (void)sl_raise(rc), -1;
    return 0;
}

static const char *const kn_take[] = {"key", "cost", "now"};
static const char *const kn_allow[] = {"client_id", "tokens", "now"};
static const char *const kn_user[] = {"user_id", "now"};
static const char *const kn_client[] = {"client_id", "now"};
static const char *const kn_key[] = {"key", "now"};

static PyObject *lim_take(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "take", args, nargs, kwn, kn_take, 1, 1, 1, &d) < 0)
        return NULL;
    return decision_new(&d);
}

static PyObject *lim_peek(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "peek", args, nargs, kwn, kn_key, 0, 0, 1, &d) < 0)
        return NULL;
    return decision_new(&d);
}

static PyObject *lim_allow_request(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "allow_request", args, nargs, kwn, kn_allow, 1, 1, 1, &d) < 0)
        return NULL;
    return PyBool_FromLong(d.allowed);
}

static PyObject *lim_is_allowed(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "is_allowed", args, nargs, kwn, kn_user, 0, 1, 1, &d) < 0)
        return NULL;
    return PyBool_FromLong(d.allowed);
}

/* cost 0: what is left now, consuming nothing and creating no key */
static PyObject *lim_get_remaining_tokens(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                          PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "get_remaining_tokens", args, nargs, kwn, kn_client, 0, 1, 0,
                    &d) < 0)
        return NULL;
    return PyFloat_FromDouble(d.tokens);
}

static PyObject *lim_get_burst_allowance(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwn)
{
    sl_decision d;
    if (decide_call((Limiter *)s, "get_burst_allowance", args, nargs, kwn, kn_user, 0, 1, 0,
                    &d) < 0)
        return NULL;
    return PyFloat_FromDouble(d.reserve);
}

/* The headers of the key's state now (a cost-0 decision), with Retry-After when a request
 * of cost 1 would be denied now (the value a 429 from sluiced would carry). */
static PyObject *lim_get_rate_limit_headers(PyObject *s, PyObject *const *args,
                                            Py_ssize_t nargs, PyObject *kwn)
{
    Limiter *self = (Limiter *)s;
    PyObject *a[2];
    if (parse_args("get_rate_limit_headers", args, nargs, kwn, kn_client, 2, 1, 1, a) < 0)
        return NULL;
    sl_key k;
    int64_t now;
    if (key_from(a[0], &k) < 0 || now_of(self, a[1], &now) < 0)
        return NULL;
    if (now == SL_NOW) /* one `now` for both questions */
        now = sl_now(self->l);
    sl_decision d, next;
    int rc = do_take(self, &k, 0, now, &d);
    if (rc == SL_OK)
        rc = do_peek(self, &k, now, &next);
    if (rc != SL_OK)
        return sl_raise(rc);
    return headers_of(&d, next.allowed ? -1 : next.retry_after);
}

static PyObject *lim_release(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"key", "lease", "now"};
    Limiter *self = (Limiter *)s;
    PyObject *a[3];
    if (parse_args("release", args, nargs, kwn, names, 3, 2, 2, a) < 0)
        return NULL;
    sl_key k;
    int64_t now;
    uint64_t lease;
    if (key_from(a[0], &k) < 0 || count_from(a[1], "lease", &lease) < 0 || now_of(self, a[2], &now) < 0)
        return NULL;
    int rc = sl_release(self->l, &k, lease, now);
    if (rc == SL_ELEASE)
        Py_RETURN_FALSE;
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_TRUE;
}

static PyObject *lim_now(PyObject *s, PyObject *Py_UNUSED(ignored))
{
    Limiter *self = (Limiter *)s;
    int64_t now;
    if (now_of(self, NULL, &now) < 0)
        return NULL;
    return PyLong_FromLongLong(now == SL_NOW ? sl_now(self->l) : now);
}

/* ---- rules, tiers, default ------------------------------------------------------------ */

static const char *scope_name(sl_scope s)
{
    return s == SL_SCOPE_TENANT ? "tenant" : s == SL_SCOPE_ACTION ? "action" : "client";
}

static PyObject *lim_set_rule(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"scope", "key", "policy"};
    PyObject *a[3];
    sl_scope sc;
    sl_key k;
    sl_policy p;
    if (parse_args("set_rule", args, nargs, kwn, names, 3, 3, 3, a) < 0 ||
        scope_from(a[0], &sc) < 0 || scope_key_from(sc, a[1], &k) < 0 || policy_from(a[2], &p) < 0)
        return NULL;
    int rc = sl_rule_set(((Limiter *)s)->l, sc, &k, &p);
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *lim_get_rule(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"scope", "key"};
    PyObject *a[2];
    sl_scope sc;
    sl_key k;
    sl_policy p;
    if (parse_args("get_rule", args, nargs, kwn, names, 2, 2, 2, a) < 0 ||
        scope_from(a[0], &sc) < 0 || scope_key_from(sc, a[1], &k) < 0)
        return NULL;
    int rc = sl_rule_get(((Limiter *)s)->l, sc, &k, &p);
    if (rc == SL_ENOTFOUND)
        Py_RETURN_NONE;
    if (rc != SL_OK)
        return sl_raise(rc);
    return policy_to_py(&p);
}

static PyObject *lim_delete_rule(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwn)
{
    static const char *const names[] = {"scope", "key"};
    PyObject *a[2];
    sl_scope sc;
    sl_key k;
    if (parse_args("delete_rule", args, nargs, kwn, names, 2, 2, 2, a) < 0 ||
        scope_from(a[0], &sc) < 0 || scope_key_from(sc, a[1], &k) < 0)
        return NULL;
    int rc = sl_rule_del(((Limiter *)s)->l, sc, &k);
    if (rc == SL_ENOTFOUND)
        Py_RETURN_FALSE;
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_TRUE;
}

static int rule_cb(void *ctx, sl_scope scope, const sl_key *k, const sl_policy *p)
{
    PyObject *list = ctx, *key = NULL, *pol = NULL, *item = NULL;
    if (scope == SL_SCOPE_TENANT)
        key = Py_BuildValue("(N)", id_to_py(k->tenant, k->tenant_len));
    else if (scope == SL_SCOPE_ACTION)
        key = Py_BuildValue("(NN)", id_to_py(k->tenant, k->tenant_len),
                            id_to_py(k->action, k->action_len));
    else
        key = Py_BuildValue("(NNN)", id_to_py(k->tenant, k->tenant_len),
                            id_to_py(k->action, k->action_len), id_to_py(k->client, k->client_len));
    if (key && (pol = policy_to_py(p)))
        item = Py_BuildValue("(sNN)", scope_name(scope), key, pol);
    else {
        Py_XDECREF(key);
        return 1;
    }
    if (!item || PyList_Append(list, item) < 0) {
        Py_XDECREF(item);
        return 1;
    }
    Py_DECREF(item);
    return 0;
}

static PyObject *lim_list_rules(PyObject *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    int rc = sl_rule_list(((Limiter *)s)->l, rule_cb, list);
    if (rc != SL_OK) {
        Py_DECREF(list);
        return rc > 0 ? NULL : sl_raise(rc);
    }
    return list;
}

static PyObject *lim_set_default(PyObject *s, PyObject *p_obj)
{
    sl_policy p;
    if (policy_from(p_obj, &p) < 0)
        return NULL;
    int rc = sl_default_set(((Limiter *)s)->l, &p);
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *lim_get_default(PyObject *s, PyObject *Py_UNUSED(ignored))
{
    sl_policy p;
    int rc = sl_default_get(((Limiter *)s)->l, &p);
    if (rc != SL_OK)
        return sl_raise(rc);
    return policy_to_py(&p);
}

/* A tier name: a non-empty str (NUL-terminated for the C API; no NUL inside). */
static int tier_name_from(PyObject *o, const char **name)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a tier name must be str, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s)
        return -1;
    if (n == 0 || n > SL_MAX_ID_LEN || (size_t)n != strlen(s)) {
        PyErr_SetString(PyExc_ValueError, "a tier name is 1 to 255 bytes (UTF-8), without NUL");
        return -1;
    }
    *name = s;
    return 0;
}

static PyObject *lim_set_tier(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"name", "policy"};
    PyObject *a[2];
    const char *name;
    sl_policy p;
    if (parse_args("set_tier", args, nargs, kwn, names, 2, 2, 2, a) < 0 ||
        tier_name_from(a[0], &name) < 0 || policy_from(a[1], &p) < 0)
        return NULL;
    int rc = sl_tier_set(((Limiter *)s)->l, name, &p);
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *lim_get_tier(PyObject *s, PyObject *name_obj)
{
    const char *name;
    sl_policy p;
    if (tier_name_from(name_obj, &name) < 0)
        return NULL;
    int rc = sl_tier_get(((Limiter *)s)->l, name, &p);
    if (rc == SL_ETIER)
        Py_RETURN_NONE;
    if (rc != SL_OK)
        return sl_raise(rc);
    return policy_to_py(&p);
}

static PyObject *lim_delete_tier(PyObject *s, PyObject *name_obj)
{
    const char *name;
    if (tier_name_from(name_obj, &name) < 0)
        return NULL;
    int rc = sl_tier_del(((Limiter *)s)->l, name);
    if (rc == SL_ETIER)
        Py_RETURN_FALSE;
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_TRUE;
}

/* assign_tier(client_or_(tenant, client), tier or None) */
static PyObject *lim_assign_tier(PyObject *s, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwn)
{
    static const char *const names[] = {"key", "tier"};
    PyObject *a[2];
    if (parse_args("assign_tier", args, nargs, kwn, names, 2, 2, 2, a) < 0)
        return NULL;
    sl_key k;
    memset(&k, 0, sizeof k);
    if (PyTuple_Check(a[0])) {
        if (PyTuple_GET_SIZE(a[0]) != 2) {
            PyErr_SetString(PyExc_ValueError, "assign_tier's key is a client id or a (tenant, client) tuple");
            return NULL;
        }
        if (id_from(PyTuple_GET_ITEM(a[0], 0), "tenant", 0, &k.tenant, &k.tenant_len) < 0 ||
            id_from(PyTuple_GET_ITEM(a[0], 1), "client id", 1, &k.client, &k.client_len) < 0)
            return NULL;
    } else if (id_from(a[0], "client id (or a (tenant, client) tuple)", 1, &k.client,
                       &k.client_len) < 0) {
        return NULL;
    }
    const char *tier = NULL;
    if (a[1] != Py_None && tier_name_from(a[1], &tier) < 0)
        return NULL;
    int rc = sl_tier_assign(((Limiter *)s)->l, &k, tier);
    if (rc != SL_OK && !(rc == SL_ENOTFOUND && !tier)) /* unassigning nothing: fine */
        return sl_raise(rc);
    Py_RETURN_NONE;
}

static int tier_cb(void *ctx, const char *name, const sl_policy *p)
{
    PyObject *pol = policy_to_py(p);
    if (!pol)
        return 1;
    int rc = PyDict_SetItemString(ctx, name, pol);
    Py_DECREF(pol);
    return rc < 0 ? 1 : 0;
}

static PyObject *lim_list_tiers(PyObject *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    int rc = sl_tier_list(((Limiter *)s)->l, tier_cb, d);
    if (rc != SL_OK) {
        Py_DECREF(d);
        return rc > 0 ? NULL : sl_raise(rc);
    }
    return d;
}

/* ---- counters, housekeeping, snapshots ------------------------------------------------- */

static PyObject *lim_stats(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"tenant"};
    PyObject *a[1];
    if (parse_args("stats", args, nargs, kwn, names, 1, 1, 0, a) < 0)
        return NULL;
    const char *t = NULL;
    size_t tn = 0;
    if (a[0] && a[0] != Py_None) {
        if (id_from(a[0], "tenant", 0, &t, &tn) < 0)
            return NULL;
        if (!t) /* "" is the default tenant, not "all" */
            t = "";
    }
    sl_stats st;
    int rc = sl_stats_get(((Limiter *)s)->l, t, tn, &st);
    if (rc == SL_ENOTFOUND) {
        PyErr_SetObject(PyExc_KeyError, a[0]);
        return NULL;
    }
    if (rc != SL_OK)
        return sl_raise(rc);
    if (t)
        return Py_BuildValue("{sKsKsK}", "allowed", (unsigned long long)st.allowed, "denied",
                             (unsigned long long)st.denied, "evicted",
                             (unsigned long long)st.evicted);
    return Py_BuildValue("{sKsKsKsKsK}", "allowed", (unsigned long long)st.allowed, "denied",
                         (unsigned long long)st.denied, "evicted", (unsigned long long)st.evicted,
                         "keys", (unsigned long long)st.keys, "reclaimed",
                         (unsigned long long)st.reclaimed);
}

static PyObject *lim_sweep(PyObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwn)
{
    static const char *const names[] = {"budget", "now"};
    Limiter *self = (Limiter *)s;
    PyObject *a[2];
    if (parse_args("sweep", args, nargs, kwn, names, 2, 1, 0, a) < 0)
        return NULL;
    uint64_t budget = 1024;
    int64_t now;
    if ((a[0] && count_from(a[0], "budget", &budget) < 0) || now_of(self, a[1], &now) < 0)
        return NULL;
    if (now == SL_NOW)
        now = sl_now(self->l);
    size_t n;
    Py_BEGIN_ALLOW_THREADS
    n = sl_sweep(self->l, now, (size_t)budget);
    Py_END_ALLOW_THREADS
    return PyLong_FromSize_t(n);
}

static PyObject *snapshot_call(PyObject *s, PyObject *path, int save)
{
    PyObject *b;
    if (!PyUnicode_FSConverter(path, &b))
        return NULL;
    sl_limiter *l = ((Limiter *)s)->l;
    const char *p = PyBytes_AS_STRING(b);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = save ? sl_snapshot_save(l, p) : sl_snapshot_load(l, p);
    Py_END_ALLOW_THREADS
    if (rc == SL_EIO) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(b);
        return NULL;
    }
    Py_DECREF(b);
    if (rc != SL_OK)
        return sl_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *lim_save(PyObject *s, PyObject *path) { return snapshot_call(s, path, 1); }
static PyObject *lim_load(PyObject *s, PyObject *path) { return snapshot_call(s, path, 0); }

static PyObject *lim_get_release_gil(PyObject *s, void *c)
{
    (void)c;
    return PyBool_FromLong(((Limiter *)s)->release_gil);
}

static PyGetSetDef limiter_getset[] = {
    {"release_gil", lim_get_release_gil, NULL,
     "True when decisions release the GIL (the release_gil= option)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* One-argument methods that also take their argument by keyword (save(path=...)). */
#define ONE_ARG(fn, method, argname)                                                          \
    static PyObject *fn##_kw(PyObject *s, PyObject *const *args, Py_ssize_t nargs,            \
                             PyObject *kwn)                                                   \
    {                                                                                         \
        static const char *const names[] = {argname};                                         \
        PyObject *a[1];                                                                       \
        if (parse_args(method, args, nargs, kwn, names, 1, 1, 1, a) < 0)                      \
            return NULL;                                                                      \
        return fn(s, a[0]);                                                                   \
    }
ONE_ARG(lim_set_default, "set_default", "policy")
ONE_ARG(lim_get_tier, "get_tier", "name")
ONE_ARG(lim_delete_tier, "delete_tier", "name")
ONE_ARG(lim_save, "save", "path")
ONE_ARG(lim_load, "load", "path")
#undef ONE_ARG

#define FK (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef limiter_methods[] = {
    {"take", (PyCFunction)(void (*)(void))lim_take, FK,
     "take(key, cost=1, *, now=None) -> Decision\n\nDecide one request, consuming `cost` units "
     "if it is allowed. key: a client id (str or bytes) or a (tenant, action, client) tuple."},
    {"peek", (PyCFunction)(void (*)(void))lim_peek, FK,
     "peek(key, *, now=None) -> Decision\n\nWhat take(key, 1) would answer; consumes nothing."},
    {"allow_request", (PyCFunction)(void (*)(void))lim_allow_request, FK,
     "allow_request(client_id, tokens=1, *, now=None) -> bool\n\nTake `tokens` units."},
    {"is_allowed", (PyCFunction)(void (*)(void))lim_is_allowed, FK,
     "is_allowed(user_id, *, now=None) -> bool\n\nTake one unit."},
    {"get_remaining_tokens", (PyCFunction)(void (*)(void))lim_get_remaining_tokens, FK,
     "get_remaining_tokens(client_id, *, now=None) -> float\n\nExact units left now (of the "
     "most restrictive limit); consumes nothing."},
    {"get_burst_allowance", (PyCFunction)(void (*)(void))lim_get_burst_allowance, FK,
     "get_burst_allowance(user_id, *, now=None) -> float\n\nburst_reserve: reserve units left "
     "now (0.0 for other algorithms); consumes nothing."},
    {"get_rate_limit_headers", (PyCFunction)(void (*)(void))lim_get_rate_limit_headers, FK,
     "get_rate_limit_headers(client_id, *, now=None) -> dict\n\nRateLimit-Policy and RateLimit "
     "for the key's state now, plus Retry-After when one more request would be denied."},
    {"release", (PyCFunction)(void (*)(void))lim_release, FK,
     "release(key, lease, *, now=None) -> bool\n\nFree a concurrency lease early; False if "
     "it is unknown or expired."},
    {"now", lim_now, METH_NOARGS, "now() -> int\n\nThe limiter's clock, in ns."},
    {"set_rule", (PyCFunction)(void (*)(void))lim_set_rule, FK,
     "set_rule(scope, key, policy)\n\nscope 'tenant' (key: tenant), 'action' (key: (tenant, "
     "action)) or 'client' (key: (tenant, action, client)). policy: a dict or a list of "
     "1..4 dicts."},
    {"get_rule", (PyCFunction)(void (*)(void))lim_get_rule, FK,
     "get_rule(scope, key) -> policy or None"},
    {"delete_rule", (PyCFunction)(void (*)(void))lim_delete_rule, FK,
     "delete_rule(scope, key) -> bool (False: there was no such rule)"},
    {"list_rules", lim_list_rules, METH_NOARGS,
     "list_rules() -> [(scope, key tuple, policy), ...] from one consistent snapshot"},
    {"set_default", (PyCFunction)(void (*)(void))lim_set_default_kw, FK, "set_default(policy): the global default policy"},
    {"get_default", lim_get_default, METH_NOARGS, "get_default() -> policy"},
    {"set_tier", (PyCFunction)(void (*)(void))lim_set_tier, FK,
     "set_tier(name, policy): create or replace a named policy"},
    {"get_tier", (PyCFunction)(void (*)(void))lim_get_tier_kw, FK, "get_tier(name) -> policy or None"},
    {"delete_tier", (PyCFunction)(void (*)(void))lim_delete_tier_kw, FK,
     "delete_tier(name) -> bool (False: no such tier; ValueError while it is assigned)"},
    {"assign_tier", (PyCFunction)(void (*)(void))lim_assign_tier, FK,
     "assign_tier(key, tier)\n\nkey: a client id (default tenant) or (tenant, client); tier "
     "None removes the assignment."},
    {"list_tiers", lim_list_tiers, METH_NOARGS, "list_tiers() -> {name: policy}"},
    {"stats", (PyCFunction)(void (*)(void))lim_stats, FK,
     "stats(tenant=None) -> dict: allowed, denied, evicted (and keys, reclaimed for the whole "
     "limiter). KeyError for a tenant never seen."},
    {"sweep", (PyCFunction)(void (*)(void))lim_sweep, FK,
     "sweep(budget=1024, *, now=None) -> int: reclaim idle full keys, looking at <= budget keys"},
    {"save", (PyCFunction)(void (*)(void))lim_save_kw, FK, "save(path): snapshot the bucket state atomically"},
    {"load", (PyCFunction)(void (*)(void))lim_load_kw, FK, "load(path): restore bucket state from a snapshot"},
    {NULL, NULL, 0, NULL},
};
#undef FK

static PyTypeObject LimiterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sluice.RateLimiter",
    .tp_basicsize = sizeof(Limiter),
    .tp_dealloc = limiter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc =
        "RateLimiter(capacity=5, refill_rate=1.0, algorithm='token_bucket', max_keys=None, *,\n"
        "            limit=None, window=None, leak_rate=None, base_rate=None,\n"
        "            reserve_rate=None, reserve_cap=None, max_in_flight=None, lease_ttl=None,\n"
        "            policy=None, shards=None, clock=None, release_gil=False)\n\n"
        "An in-process rate limiter over libsluice. The arguments describe the default policy\n"
        "(every key without a rule): token_bucket/leaky_bucket take capacity and refill_rate\n"
        "(leak_rate); fixed_window/sliding_window/sliding_log take limit (or capacity) and\n"
        "window (seconds); burst_reserve takes base_rate (50), reserve_rate (1.0) and\n"
        "reserve_cap (100); concurrency takes max_in_flight (or capacity) and lease_ttl\n"
        "(seconds). policy= gives a whole policy instead (a dict, or a list of up to 4 for\n"
        "stacked limits). max_keys bounds the keys held (least recently used evicted).\n"
        "clock: a callable returning int nanoseconds, used when a call has no now=\n"
        "(default: the library's monotonic clock). Thread-safe.",
    .tp_traverse = limiter_traverse,
    .tp_clear = limiter_clear,
    .tp_methods = limiter_methods,
    .tp_getset = limiter_getset,
    .tp_new = limiter_new,
};

/* ---- module --------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sluice",
    .m_doc = "libsluice, a multi-tenant rate limiter in C, as a CPython extension.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit_sluice(void)
{
    if (PyType_Ready(&DecisionType) < 0 || PyType_Ready(&LimiterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *algs = Py_BuildValue("(sssssss)", "token_bucket", "leaky_bucket", "fixed_window",
                                   "sliding_window", "sliding_log", "burst_reserve",
                                   "concurrency");
    if (PyModule_AddType(m, &LimiterType) < 0 || PyModule_AddType(m, &DecisionType) < 0 ||
        PyModule_AddStringConstant(m, "__version__", BINDING_VERSION) < 0 ||
        PyModule_AddStringConstant(m, "library_version", sl_version_string()) < 0 ||
        PyModule_AddIntConstant(m, "SECOND", (long)SL_SECOND) < 0 || !algs ||
        PyModule_AddObject(m, "ALGORITHMS", algs) < 0) {
        Py_XDECREF(algs);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
