/* Where a head ends, and which of its field lines the proxy must read or rewrite.
 *
 * The proxy reads each request and response head whole once llhttp has accepted it, instead of
 * a Python callback per field (headers.py). Splitting a head into a bytes object per line and
 * sorting each line in Python cost about 2,300 CPU instructions for a browser's request head of
 * ten fields: a quarter of what the proxy spends reading a request. Here one pass over the
 * bytes does it, with no object made for a line forwarded as it came.
 *
 * - head_end(buf, start): the offset just past the first blank line (CRLF CRLF) at or after
 *   `start`, -1 when `buf` ends before one.
 * - walk_fields(buf, start, taken, noted, runs): walks the head that begins at `start` (its
 *   first line, then field lines up to the blank line). Runs of consecutive field lines the
 *   proxy forwards as they came are appended to `runs` as bytes (each line with its CRLF). It
 *   returns [end, count, line_end, kind, value, kind, value, ...]: `end` as head_end gives it
 *   (-1 when `buf` ends before the blank line: `runs` then holds the complete lines), `count`
 *   the field lines, `line_end` the offset of the CRLF ending the first line, and for each field
 *   whose kind is in a mask, in order, its kind and its value without the whitespace around it.
 *   A field of a kind in `taken` (a bit mask, 1 << kind) is left out of the runs; one in `noted`
 *   stays in them.
 *
 * The kinds are headers.py's (PASS, HOST...), by the field's name in any case; tests check the
 * two tables agree. Bytes are only ever read within `buf`, whatever it holds; what the results
 * mean is defined for heads llhttp has accepted (no CR or LF but in the CRLF ending each line,
 * a colon after every field name), and headers.py keeps the same walk in Python for builds
 * without a C compiler.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <string.h>

enum {
    PASS = 0,
    HOST = 1,
    CONTENT_LENGTH = 2,
    TRANSFER_ENCODING = 3,
    CONNECTION = 4,
    UPGRADE = 5,
    EXPECT = 6,
    VIA = 7,
    X_FORWARDED_FOR = 8,
    X_REQUEST_ID = 9,
    PROXY_CONNECTION = 10,
    DROPPED = 11,
    UNDERSCORED = 12, /* any other name with an underscore */
    BAD_HOST = 13,    /* a Host field whose value is no host[:port] */
    TE = 14,
};

/* The bytes a Host value may hold (RFC 3986 3.2.2 and RFC 9110 7.2): a reg-name, an IPv4
 * address or a bracketed IP literal, and a port. Filled when the module is loaded. */
static char host_bytes[256];

static void
index_host_bytes(void)
{
    const char *allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                          "-._~!$&'()*+,;=%:[]";
    for (const char *c = allowed; *c; c++)
        host_bytes[(unsigned char)*c] = 1;
}

static int
valid_host(const char *value, Py_ssize_t length)
{
    if (length == 0)
        return 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        if (!host_bytes[(unsigned char)value[i]])
            return 0;
    }
    return 1;
}

typedef struct {
    const char *name; /* lower case */
    Py_ssize_t length;
    int kind;
} SpecialName;

#define NAME(text, kind) {text, sizeof(text) - 1, kind}
static const SpecialName SPECIAL_NAMES[] = {
    NAME("host", HOST),
    NAME("content-length", CONTENT_LENGTH),
    NAME("transfer-encoding", TRANSFER_ENCODING),
    NAME("connection", CONNECTION),
    NAME("upgrade", UPGRADE),
    NAME("expect", EXPECT),
    NAME("via", VIA),
    NAME("x-forwarded-for", X_FORWARDED_FOR),
    NAME("x-request-id", X_REQUEST_ID),
    NAME("proxy-connection", PROXY_CONNECTION),
    NAME("keep-alive", DROPPED),
    NAME("te", TE),
    NAME("trailer", DROPPED),
    NAME("x-forwarded-proto", DROPPED),
    NAME("x-forwarded-host", DROPPED),
};
#define SPECIAL_COUNT ((int)(sizeof(SPECIAL_NAMES) / sizeof(SPECIAL_NAMES[0])))
#define LONGEST_SPECIAL 17

/* Whether `name` is `lower` in any case (ASCII letters only, as bytes.lower()). */
static int
same_name(const char *name, const char *lower, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = name[i], l = lower[i];
        if (c != l && !(l >= 'a' && l <= 'z' && c == l - ('a' - 'A')))
            return 0;
    }
    return 1;
}

/* By length, the special names that long (no three are), each list ended by NULL; filled
 * when the module is loaded. */
static const SpecialName *names_by_length[LONGEST_SPECIAL + 1][3];
static int names_indexed;

static int
name_kind(const char *name, Py_ssize_t length)
{
    if (length <= LONGEST_SPECIAL) {
        for (const SpecialName *const *special = names_by_length[length]; *special; special++) {
            if (same_name(name, (*special)->name, length))
                return (*special)->kind;
        }
    }
    return memchr(name, '_', (size_t)length) != NULL ? UNDERSCORED : PASS;
}

static int
index_names(void)
{
    for (int i = 0; i < SPECIAL_COUNT; i++) {
        const SpecialName *special = &SPECIAL_NAMES[i];
        const SpecialName **slot = names_by_length[special->length];
        int used = 0;
        while (slot[used] != NULL)
            used++;
        if (used >= 2) {
            PyErr_SetString(PyExc_SystemError, "three special names of one length");
            return -1;
        }
        slot[used] = special;
    }
    names_indexed = 1;
    return 0;
}

/* The offset of the next CRLF at or after `from`, or -1. */
static Py_ssize_t
next_crlf(const char *data, Py_ssize_t from, Py_ssize_t size)
{
    while (from < size - 1) {
        const char *cr = memchr(data + from, '\r', (size_t)(size - 1 - from));
        if (cr == NULL)
            return -1;
        Py_ssize_t at = cr - data;
        if (data[at + 1] == '\n')
            return at;
        from = at + 1;
    }
    return -1;
}

static int
parse_start(PyObject *buf, PyObject *start_arg, Py_ssize_t *start)
{
    if (!PyBytes_CheckExact(buf)) {
        PyErr_SetString(PyExc_TypeError, "a bytes object is needed");
        return -1;
    }
    *start = PyLong_AsSsize_t(start_arg);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    if (*start < 0 || *start > PyBytes_GET_SIZE(buf)) {
        PyErr_SetString(PyExc_ValueError, "start outside the buffer");
        return -1;
    }
    return 0;
}

static PyObject *
head_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t start;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "head_end(buf, start)");
        return NULL;
    }
    if (parse_start(args[0], args[1], &start) < 0)
        return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    const char *found = memmem(data + start, (size_t)(size - start), "\r\n\r\n", 4);
    return PyLong_FromSsize_t(found == NULL ? -1 : (found - data) + 4);
}

/* Append a new reference to `list` and drop it; NULL (failed to make it) is passed on. */
static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* Append buf[from:to] to `runs`. */
static int
append_run(PyObject *runs, const char *data, Py_ssize_t from, Py_ssize_t to)
{
    return append_new(runs, PyBytes_FromStringAndSize(data + from, to - from));
}

/* Append a field's kind and its value (after the colon at `colon`, up to `line_end`, without
 * the spaces and tabs around it) to `found`. */
static int
append_field(PyObject *found, int kind, const char *data, Py_ssize_t colon, Py_ssize_t line_end)
{
    Py_ssize_t from = colon + 1, to = line_end;
    while (from < to && (data[from] == ' ' || data[from] == '\t'))
        from++;
    while (to > from && (data[to - 1] == ' ' || data[to - 1] == '\t'))
        to--;
    if (kind == HOST && !valid_host(data + from, to - from))
        kind = BAD_HOST;
    if (append_new(found, PyLong_FromLong(kind)) < 0)
        return -1;
    return append_new(found, PyBytes_FromStringAndSize(data + from, to - from));
}

/* Set item `index` of a new list, from a C integer. */
static int
set_number(PyObject *list, Py_ssize_t index, Py_ssize_t number)
{
    PyObject *item = PyLong_FromSsize_t(number);
    if (item == NULL)
        return -1;
    PyList_SET_ITEM(list, index, item);
    return 0;
}

static PyObject *
walk_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t start;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "walk_fields(buf, start, taken, noted, runs)");
        return NULL;
    }
    if (parse_start(args[0], args[1], &start) < 0)
        return NULL;
    long taken = PyLong_AsLong(args[2]);
    if (taken == -1 && PyErr_Occurred())
        return NULL;
    long noted = PyLong_AsLong(args[3]);
    if (noted == -1 && PyErr_Occurred())
        return NULL;
    PyObject *runs = args[4];
    if (!PyList_CheckExact(runs)) {
        PyErr_SetString(PyExc_TypeError, "runs must be a list");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);

    /* Its first three items are set last; nothing in between runs Python code (only bytes,
     * ints and list appends are made), so no one sees them unset. */
    PyObject *found = PyList_New(3);
    if (found == NULL)
        return NULL;
    Py_ssize_t end = -1, count = 0;
    Py_ssize_t line_end = next_crlf(data, start, size);
    if (line_end >= 0) {
        Py_ssize_t pos = line_end + 2; /* where the next field line begins */
        Py_ssize_t run = pos;          /* where the run of forwarded lines being gathered began */
        for (;;) {
            if (pos + 1 < size && data[pos] == '\r' && data[pos + 1] == '\n') {
                end = pos + 2; /* the blank line */
                break;
            }
            Py_ssize_t stop = next_crlf(data, pos, size);
            if (stop < 0)
                break;
            count++;
            const char *colon = memchr(data + pos, ':', (size_t)(stop - pos));
            int kind = colon == NULL ? PASS : name_kind(data + pos, colon - (data + pos));
            if (kind != PASS && (taken >> kind) & 1) {
                if (run < pos && append_run(runs, data, run, pos) < 0)
                    goto error;
                run = stop + 2;
            }
            if (kind != PASS && ((taken | noted) >> kind) & 1
                && append_field(found, kind, data, colon - data, stop) < 0)
                goto error;
            pos = stop + 2;
        }
        if (run < pos && append_run(runs, data, run, pos) < 0)
            goto error;
    }
    if (set_number(found, 0, end) < 0 || set_number(found, 1, count) < 0
        || set_number(found, 2, line_end) < 0)
        goto error;
    return found;
error:
    Py_DECREF(found);
    return NULL;
}

static PyMethodDef fields_methods[] = {
    {"head_end", (PyCFunction)(void (*)(void))head_end, METH_FASTCALL,
     "head_end(buf, start): the offset just past the first blank line at or after start, "
     "or -1."},
    {"walk_fields", (PyCFunction)(void (*)(void))walk_fields, METH_FASTCALL,
     "walk_fields(buf, start, taken, noted, runs): [end, count, line_end, kind, value, ...] "
     "of the head at start; forwarded runs of field lines appended to runs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fields_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "failover_proxy.dataplane.http1._fields",
    .m_doc = "Where a head ends and which of its fields the proxy reads (see headers.py).",
    .m_size = -1,
    .m_methods = fields_methods,
};

PyMODINIT_FUNC
PyInit__fields(void)
{
    if (!names_indexed && index_names() < 0)
        return NULL;
    index_host_bytes();
    return PyModule_Create(&fields_module);
}
