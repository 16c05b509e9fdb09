/* Direct socket writes for the data plane's plain-TCP connections.
 *
 * uvloop's transport.write spends about 900 CPU instructions per call around the system call
 * itself: a Python method call, then a list append and a list clear through method lookups,
 * a fileno lookup and flow-control bookkeeping. A proxied request makes two writes, so that is
 * about a tenth of the CPU a small request costs. When the transport holds nothing unsent,
 * sending straight to the socket makes the same kind of system call for a fraction of that.
 *
 * A DirectWriter stands in for one connection's transport.write and writelines:
 * - It writes to the socket itself only until it is detached, and while the transport holds
 *   nothing unsent.
 * - Whatever the socket does not take at once (EAGAIN, a partial write, an error) goes to the
 *   transport, which queues it, applies flow control (pause_writing) and reports errors as it
 *   always does. From then on every write goes through the transport until it reports its
 *   buffer empty again, so bytes keep their order.
 * - It knows only what it handed to the transport itself: every write of the connection must
 *   go through it (see writepath.py).
 * - It sends with MSG_NOSIGNAL: a peer that reset the connection gives this call an error,
 *   never a SIGPIPE (Python ignores that signal anyway, and uvloop relies on it).
 * - The descriptor stays valid until it is detached: the protocol detaches it in connection_lost,
 *   and uvloop and asyncio close a socket only after connection_lost has returned, so a write
 *   can never reach a later connection that reused the descriptor's number. (It used to ask
 *   the transport's is_closing() before every write instead: a Python call, about 130 CPU
 *   instructions each.) Between a transport's close and connection_lost the descriptor is
 *   still the connection's; a write there goes out, or fails and goes to the transport, as a
 *   transport.write would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* More parts than this go through the transport's writelines; the data plane writes at most 4. */
#define MAX_PARTS 16

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int fd;
    int queued;            /* it handed bytes to the transport that may still be unsent there */
    int detached;          /* every write goes through the transport (the connection is lost) */
    PyObject *write;       /* transport.write */
    PyObject *writelines;  /* transport.writelines */
    PyObject *buffer_size; /* transport.get_write_buffer_size */
    unsigned long long direct_writes;
    unsigned long long handed_over;
} DirectWriter;

static int
writer_traverse(DirectWriter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->write);
    Py_VISIT(self->writelines);
    Py_VISIT(self->buffer_size);
    return 0;
}

static int
writer_clear(DirectWriter *self)
{
    Py_CLEAR(self->write);
    Py_CLEAR(self->writelines);
    Py_CLEAR(self->buffer_size);
    return 0;
}

static void
writer_dealloc(DirectWriter *self)
{
    PyObject_GC_UnTrack(self);
    writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 when a direct write may be tried now, 0 when it must go through the transport, -1 with an
 * exception set. */
static int
may_write_directly(DirectWriter *self)
{
    if (self->detached)
        return 0;
    if (self->queued) {
        PyObject *size = PyObject_CallNoArgs(self->buffer_size);
        if (size == NULL)
            return -1;
        Py_ssize_t unsent = PyLong_Check(size) ? PyLong_AsSsize_t(size) : -1;
        Py_DECREF(size);
        if (unsent == -1 && PyErr_Occurred())
            return -1;
        if (unsent != 0)
            return 0;
        self->queued = 0;
    }
    return 1;
}

/* Give `argument` to the transport's `method` (write or writelines); it may keep some of it. */
static PyObject *
through_transport(DirectWriter *self, PyObject *method, PyObject *argument)
{
    self->queued = 1;
    self->handed_over++;
    return PyObject_CallOneArg(method, argument);
}

static PyObject *
writer_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    DirectWriter *self = (DirectWriter *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a DirectWriter takes one argument: the bytes to write");
        return NULL;
    }
    PyObject *data = args[0];
    if (!PyBytes_CheckExact(data))
        return through_transport(self, self->write, data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size == 0)
        Py_RETURN_NONE;
    int direct = may_write_directly(self);
    if (direct < 0)
        return NULL;
    if (direct == 0)
        return through_transport(self, self->write, data);
    Py_ssize_t sent;
    do {
        sent = send(self->fd, PyBytes_AS_STRING(data), (size_t)size, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent == size) {
        self->direct_writes++;
        Py_RETURN_NONE;
    }
    if (sent <= 0)  /* EAGAIN, or an error the transport's own write meets and reports */
        return through_transport(self, self->write, data);
    PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + sent, size - sent);
    if (rest == NULL)
        return NULL;
    PyObject *result = through_transport(self, self->write, rest);
    Py_DECREF(rest);
    return result;
}

/* The parts not written when a sendmsg of `parts` sent `sent` bytes, as a new tuple. */
static PyObject *
unsent_parts(PyObject *parts, Py_ssize_t sent)
{
    Py_ssize_t count = PyTuple_GET_SIZE(parts);
    PyObject *rest = PyTuple_New(count);
    if (rest == NULL)
        return NULL;
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *part = PyTuple_GET_ITEM(parts, i);
        Py_ssize_t length = PyBytes_GET_SIZE(part);
        if (sent >= length) {
            sent -= length;
            continue;
        }
        PyObject *piece;
        if (sent > 0) {
            piece = PyBytes_FromStringAndSize(PyBytes_AS_STRING(part) + sent, length - sent);
            if (piece == NULL) {
                Py_DECREF(rest);
                return NULL;
            }
            sent = 0;
        } else {
            piece = Py_NewRef(part);
        }
        PyTuple_SET_ITEM(rest, kept++, piece);
    }
    if (_PyTuple_Resize(&rest, kept) < 0)
        return NULL;
    return rest;
}

static PyObject *
writer_writelines(DirectWriter *self, PyObject *parts)
{
    if (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) > MAX_PARTS)
        return through_transport(self, self->writelines, parts);
    Py_ssize_t count = PyTuple_GET_SIZE(parts);
    struct iovec vectors[MAX_PARTS];
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *part = PyTuple_GET_ITEM(parts, i);
        if (!PyBytes_CheckExact(part))
            return through_transport(self, self->writelines, parts);
        vectors[i].iov_base = PyBytes_AS_STRING(part);
        vectors[i].iov_len = (size_t)PyBytes_GET_SIZE(part);
        total += PyBytes_GET_SIZE(part);
    }
    if (total == 0)
        Py_RETURN_NONE;
    int direct = may_write_directly(self);
    if (direct < 0)
        return NULL;
    if (direct == 0)
        return through_transport(self, self->writelines, parts);
    struct msghdr message = {.msg_iov = vectors, .msg_iovlen = (size_t)count};
    Py_ssize_t sent;
    do {
        sent = sendmsg(self->fd, &message, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent == total) {
        self->direct_writes++;
        Py_RETURN_NONE;
    }
    if (sent <= 0)
        return through_transport(self, self->writelines, parts);
    PyObject *rest = unsent_parts(parts, sent);
    if (rest == NULL)
        return NULL;
    PyObject *result = through_transport(self, self->writelines, rest);
    Py_DECREF(rest);
    return result;
}

static PyObject *
writer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"fd", "transport", NULL};
    int fd;
    PyObject *transport;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO:DirectWriter", keywords, &fd, &transport))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a DirectWriter needs an open socket's descriptor");
        return NULL;
    }
    DirectWriter *self = (DirectWriter *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = writer_call;
    self->fd = fd;
    self->queued = 1; /* until the transport is seen to hold nothing */
    self->write = PyObject_GetAttrString(transport, "write");
    self->writelines = PyObject_GetAttrString(transport, "writelines");
    self->buffer_size = PyObject_GetAttrString(transport, "get_write_buffer_size");
    if (!self->write || !self->writelines || !self->buffer_size) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *
writer_get_direct_writes(DirectWriter *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->direct_writes);
}

static PyObject *
writer_get_handed_over(DirectWriter *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->handed_over);
}

static PyObject *
writer_detach(DirectWriter *self, PyObject *Py_UNUSED(ignored))
{
    self->detached = 1;
    Py_RETURN_NONE;
}

static PyMethodDef writer_methods[] = {
    {"writelines", (PyCFunction)writer_writelines, METH_O,
     "Write a tuple of bytes with one sendmsg while the transport holds nothing unsent."},
    {"detach", (PyCFunction)writer_detach, METH_NOARGS,
     "Write only through the transport from now on (call it in connection_lost: the socket "
     "may be closed after that)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
writer_get_detached(DirectWriter *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->detached);
}

static PyGetSetDef writer_getset[] = {
    {"detached", (getter)writer_get_detached, NULL,
     "Every write goes through the transport (detach was called).", NULL},
    {"direct_writes", (getter)writer_get_direct_writes, NULL,
     "Writes the socket took whole, without the transport.", NULL},
    {"handed_over", (getter)writer_get_handed_over, NULL,
     "Writes (or their unwritten ends) given to the transport.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DirectWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "failover_proxy.dataplane.io._direct.DirectWriter",
    .tp_basicsize = sizeof(DirectWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(DirectWriter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
    .tp_doc = "DirectWriter(fd, transport): the transport's write, straight to the socket "
              "while the transport holds nothing unsent.",
};

static struct PyModuleDef direct_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "failover_proxy.dataplane.io._direct",
    .m_doc = "Direct socket writes for plain-TCP transports (see writepath.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__direct(void)
{
    if (PyType_Ready(&DirectWriterType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&direct_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "DirectWriter", (PyObject *)&DirectWriterType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
