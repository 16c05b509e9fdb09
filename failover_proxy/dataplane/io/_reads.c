/* Batched socket reads for the data plane's plain-TCP connections.
 *
 * uvloop delivers each read through two libuv callbacks (a buffer to read into, then the bytes
 * read), and each takes the GIL back and drops it again. On this machine that and the Python
 * call around it cost about 1,700 CPU instructions per read, nearly a fifth of a small proxied
 * request (which reads twice: the request and the response).
 *
 * A ReadLoop is one epoll set per event loop, registered in that loop with add_reader. When
 * any of its sockets can be read, uvloop runs ReadLoop.ready once, with the GIL held once: it
 * takes every ready socket from the set and, for each, makes one recv and gives the bytes to
 * the connection's data_received.
 *
 * A Reader is one connection's reading. It starts out reading through the transport (uvloop
 * starts a transport's reading itself, after connection_made) and takes over when the protocol
 * calls take_over() (once the connection is kept alive: see readpath.py): it pauses the
 * transport's reading and puts the socket in the set. From then on pause() and
 * resume() take the socket out of the set and put it back. Everything else stays with the
 * transport: writes, closing, and the connection_lost call.
 * - It reads only until it is detached: the protocol detaches it when it closes or aborts the
 *   transport (uvloop stops a closing transport's reading too) and in connection_lost, and
 *   uvloop closes a socket only after connection_lost has returned, so a read never takes bytes
 *   from a later connection that reused the descriptor's number. (It used to ask the
 *   transport's is_closing() before every recv instead: a Python call, about 130 CPU
 *   instructions each.) When uvloop closes a transport by itself (its own write failed), reads
 *   go on until connection_lost, as they would on the socket's error.
 * - The set can outlive a socket: closing a descriptor takes it out of every epoll set. The
 *   ReadLoop keeps, per descriptor number, the Reader that registered it, so a Reader whose
 *   socket closed under it never removes the registration of a later socket with the number.
 * - End of stream: the Reader leaves the set, calls the protocol's eof_received and closes
 *   the transport unless that returned true (a half-open connection), as uvloop does. A read
 *   error or an exception from a callback: it leaves the set and calls `failed` with the
 *   exception (the protocol aborts the transport).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* Like uvloop's read buffer: one read takes up to this much. */
#define READ_BUFFER_SIZE (256 * 1024)
/* The most ready sockets one turn of the event loop reads; the rest stay ready for the next. */
#define MAX_EVENTS 256

typedef struct Reader Reader;

typedef struct {
    PyObject_HEAD
    int epfd;
    char *buffer;
    Reader **owners;   /* per descriptor number: the Reader registered with it (a reference) */
    int owners_size;
    unsigned long long batches;
    unsigned long long reads;
} ReadLoop;

struct Reader {
    PyObject_HEAD
    ReadLoop *loop;
    int fd;
    char registered;   /* in the ReadLoop's set (and in its owners) */
    char taken_over;   /* reading is this Reader's, no longer the transport's */
    int wanted;        /* reading is not paused by the protocol */
    int fallbacks;     /* times reading went back to the transport (see read_through_transport) */
    PyObject *transport;        /* its other methods are called by name: rarely, per connection */
    PyObject *is_closing;       /* transport.is_closing: asked before a change of who reads */
    PyObject *on_data;          /* protocol.data_received */
    PyObject *on_eof;           /* protocol.eof_received */
    PyObject *on_failure;       /* called with the exception of a failed read or callback */
};

static PyTypeObject ReadLoopType;
static PyTypeObject ReaderType;

/* -- ReadLoop ------------------------------------------------------------------------------- */

static PyObject *
readloop_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":ReadLoop", keywords))
        return NULL;
    ReadLoop *self = (ReadLoop *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = -1;
    self->buffer = PyMem_RawMalloc(READ_BUFFER_SIZE);
    if (self->buffer == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Forget `reader`'s registration: the caller removed it from the set, or its socket closed. */
static void
forget_registration(ReadLoop *loop, Reader *reader)
{
    reader->registered = 0;
    if (reader->fd < loop->owners_size && loop->owners[reader->fd] == reader)
        loop->owners[reader->fd] = NULL;
    Py_DECREF(reader);  /* the registration's reference; the caller holds another */
}

static void
readloop_release_all(ReadLoop *self)
{
    for (int fd = 0; fd < self->owners_size; fd++) {
        Reader *owner = self->owners[fd];
        if (owner != NULL) {
            owner->registered = 0;
            self->owners[fd] = NULL;
            Py_DECREF(owner);
        }
    }
}

static PyObject *
readloop_close(ReadLoop *self, PyObject *Py_UNUSED(ignored))
{
    readloop_release_all(self);
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static int
readloop_traverse(ReadLoop *self, visitproc visit, void *arg)
{
    for (int fd = 0; fd < self->owners_size; fd++)
        Py_VISIT(self->owners[fd]);
    return 0;
}

static int
readloop_clear(ReadLoop *self)
{
    readloop_release_all(self);
    return 0;
}

static void
readloop_dealloc(ReadLoop *self)
{
    PyObject_GC_UnTrack(self);
    readloop_release_all(self);
    if (self->epfd >= 0)
        close(self->epfd);
    PyMem_RawFree(self->owners);
    PyMem_RawFree(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
readloop_fileno(ReadLoop *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->epfd);
}

/* Take `reader` out of the set. */
static void
unregister(Reader *reader)
{
    if (!reader->registered)
        return;
    ReadLoop *loop = reader->loop;
    if (loop->epfd >= 0)
        (void)epoll_ctl(loop->epfd, EPOLL_CTL_DEL, reader->fd, NULL);  /* closed: gone already */
    forget_registration(loop, reader);
}

/* The exception being raised, normalized, as a new reference; the error indicator is cleared.
 * (PyErr_GetRaisedException from Python 3.12, written for 3.11.) */
static PyObject *
take_exception(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value != NULL ? value : Py_NewRef(Py_None);
}

/* Hand `exception` (a new reference) to the reader's failure handler; it leaves the set. */
static void
report_failure(Reader *reader, PyObject *exception)
{
    unregister(reader);
    if (reader->on_failure == NULL) {
        Py_DECREF(exception);
        return;
    }
    PyObject *result = PyObject_CallOneArg(reader->on_failure, exception);
    if (result == NULL)
        PyErr_WriteUnraisable(reader->on_failure);
    else
        Py_DECREF(result);
    Py_DECREF(exception);
}

/* The end of the stream, met as uvloop's transport meets it: the protocol's eof_received, then
 * the transport closed unless that returned true (the protocol keeps the connection half-open). */
static PyObject *
end_of_stream(Reader *reader)
{
    PyObject *keep = PyObject_CallNoArgs(reader->on_eof);
    if (keep == NULL)
        return NULL;
    int keep_open = PyObject_IsTrue(keep);
    Py_DECREF(keep);
    if (keep_open < 0)
        return NULL;
    if (keep_open || reader->transport == NULL)
        Py_RETURN_NONE;
    return PyObject_CallMethod(reader->transport, "close", NULL);
}

/* One recv for a ready reader, and the call its outcome asks for. Never leaves an error set. */
static void
read_ready(ReadLoop *loop, Reader *reader)
{
    if (reader->on_data == NULL) {  /* its callbacks were cleared: it cannot be called */
        unregister(reader);
        return;
    }
    Py_ssize_t got;
    do {
        got = recv(reader->fd, loop->buffer, READ_BUFFER_SIZE, 0);
    } while (got < 0 && errno == EINTR);
    PyObject *result;
    if (got > 0) {
        loop->reads++;
        PyObject *data = PyBytes_FromStringAndSize(loop->buffer, got);
        if (data == NULL) {
            report_failure(reader, take_exception());
            return;
        }
        result = PyObject_CallOneArg(reader->on_data, data);
        Py_DECREF(data);
    } else if (got == 0) {
        unregister(reader);
        result = end_of_stream(reader);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return;  /* another reader of the socket took it first */
    } else {
        PyErr_SetFromErrno(PyExc_OSError);
        report_failure(reader, take_exception());
        return;
    }
    if (result == NULL)
        report_failure(reader, take_exception());
    else
        Py_DECREF(result);
}

static PyObject *
readloop_ready(ReadLoop *self, PyObject *Py_UNUSED(ignored))
{
    if (self->epfd < 0)
        Py_RETURN_NONE;
    struct epoll_event events[MAX_EVENTS];
    int count;
    do {
        count = epoll_wait(self->epfd, events, MAX_EVENTS, 0);
    } while (count < 0 && errno == EINTR);
    if (count < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->batches++;
    /* A callback may take any reader of the batch out of the set, which may free it: hold each
     * until the batch is done. */
    Reader *batch[MAX_EVENTS];
    for (int i = 0; i < count; i++) {
        batch[i] = (Reader *)events[i].data.ptr;
        Py_INCREF(batch[i]);
    }
    Py_INCREF(self);
    for (int i = 0; i < count; i++) {
        if (batch[i]->registered)
            read_ready(self, batch[i]);
    }
    for (int i = 0; i < count; i++)
        Py_DECREF(batch[i]);
    Py_DECREF(self);
    Py_RETURN_NONE;
}

static PyObject *
readloop_get_registered(ReadLoop *self, void *Py_UNUSED(closure))
{
    long count = 0;
    for (int fd = 0; fd < self->owners_size; fd++)
        count += self->owners[fd] != NULL;
    return PyLong_FromLong(count);
}

static PyMemberDef readloop_members[] = {
    {"batches", T_ULONGLONG, offsetof(ReadLoop, batches), READONLY,
     "Times ready() found the set ready."},
    {"reads", T_ULONGLONG, offsetof(ReadLoop, reads), READONLY, "Reads that returned bytes."},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef readloop_methods[] = {
    {"fileno", (PyCFunction)readloop_fileno, METH_NOARGS,
     "The epoll set's descriptor, to register with the event loop's add_reader."},
    {"ready", (PyCFunction)readloop_ready, METH_NOARGS,
     "Read every socket of the set that is ready (the add_reader callback)."},
    {"close", (PyCFunction)readloop_close, METH_NOARGS,
     "Drop every registration and close the epoll set."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef readloop_getset[] = {
    {"registered", (getter)readloop_get_registered, NULL, "Sockets in the set now.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReadLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "failover_proxy.dataplane.io._reads.ReadLoop",
    .tp_basicsize = sizeof(ReadLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = readloop_new,
    .tp_dealloc = (destructor)readloop_dealloc,
    .tp_traverse = (traverseproc)readloop_traverse,
    .tp_clear = (inquiry)readloop_clear,
    .tp_methods = readloop_methods,
    .tp_members = readloop_members,
    .tp_getset = readloop_getset,
    .tp_doc = "ReadLoop(): one epoll set of plain-TCP sockets, read in batches (see _reads.c).",
};

/* -- Reader --------------------------------------------------------------------------------- */

static PyObject *
reader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "loop", "fd", "transport", "data_received", "eof_received", "failed", NULL};
    PyObject *loop, *transport, *on_data, *on_eof, *on_failure;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!iOOOO:Reader", keywords, &ReadLoopType,
                                     &loop, &fd, &transport, &on_data, &on_eof, &on_failure))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a Reader needs an open socket's descriptor");
        return NULL;
    }
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->loop = (ReadLoop *)Py_NewRef(loop);
    self->fd = fd;
    self->wanted = 1;
    self->on_data = Py_NewRef(on_data);
    self->on_eof = Py_NewRef(on_eof);
    self->on_failure = Py_NewRef(on_failure);
    self->is_closing = PyObject_GetAttrString(transport, "is_closing");
    self->transport = Py_NewRef(transport);
    if (!self->is_closing) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->is_closing);
    Py_VISIT(self->transport);
    Py_VISIT(self->on_data);
    Py_VISIT(self->on_eof);
    Py_VISIT(self->on_failure);
    return 0;
}

static int
reader_clear(Reader *self)
{
    Py_CLEAR(self->is_closing);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->on_data);
    Py_CLEAR(self->on_eof);
    Py_CLEAR(self->on_failure);
    return 0;
}

static void
reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    reader_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 when the transport is closing (or the Reader is detached), 0 when open, -1 on error. */
static int
transport_closing(Reader *self)
{
    if (self->is_closing == NULL)
        return 1;
    PyObject *closing = PyObject_CallNoArgs(self->is_closing);
    if (closing == NULL)
        return -1;
    int closed = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    return closed;
}

/* Put the socket in the set (the transport is open and reading is this Reader's). */
static int
register_reader(Reader *self)
{
    ReadLoop *loop = self->loop;
    if (loop->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the ReadLoop is closed");
        return -1;
    }
    if (self->fd >= loop->owners_size) {
        int size = loop->owners_size ? loop->owners_size : 1024;
        while (size <= self->fd)
            size *= 2;
        Reader **owners = PyMem_RawRealloc(loop->owners, (size_t)size * sizeof(Reader *));
        if (owners == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memset(owners + loop->owners_size, 0,
               (size_t)(size - loop->owners_size) * sizeof(Reader *));
        loop->owners = owners;
        loop->owners_size = size;
    }
    Reader *previous = loop->owners[self->fd];
    if (previous != NULL && previous != self) {
        /* Its socket closed, which took it out of the set: the number is this socket's now. */
        forget_registration(loop, previous);
    }
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = self};
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, self->fd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->registered = 1;
    loop->owners[self->fd] = (Reader *)Py_NewRef(self);
    return 0;
}

/* Reading goes back to the transport: the socket could not be put in the set (out of memory,
 * or the system's limit of epoll registrations). The connection works as it did without us. */
static PyObject *
read_through_transport(Reader *self)
{
    PyErr_Clear();
    self->taken_over = 0;
    self->fallbacks++;
    if (!self->wanted)
        Py_RETURN_NONE;
    return PyObject_CallMethod(self->transport, "resume_reading", NULL);
}

static PyObject *
reader_take_over(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->taken_over || self->transport == NULL)
        Py_RETURN_NONE;
    int closed = transport_closing(self);
    if (closed < 0)
        return NULL;
    if (closed)
        Py_RETURN_NONE;
    PyObject *reading = PyObject_CallMethod(self->transport, "is_reading", NULL);
    if (reading == NULL)
        return NULL;
    int was_reading = PyObject_IsTrue(reading);
    Py_DECREF(reading);
    if (was_reading < 0)
        return NULL;
    self->taken_over = 1;
    if (!was_reading)
        /* Paused by the protocol (its resume() registers), or stopped at the end of the stream
         * (uvloop stops reading there; a resume() would read the end again, as uvloop's
         * resume_reading would). */
        Py_RETURN_NONE;
    PyObject *result = PyObject_CallMethod(self->transport, "pause_reading", NULL);
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    if (!self->wanted)
        /* Paused during connection_made: uvloop started the transport reading after it. */
        Py_RETURN_NONE;
    if (register_reader(self) < 0)
        return read_through_transport(self);
    Py_RETURN_NONE;
}

static PyObject *
reader_pause(Reader *self, PyObject *Py_UNUSED(ignored))
{
    self->wanted = 0;
    if (self->taken_over) {
        unregister(self);
        Py_RETURN_NONE;
    }
    int closed = transport_closing(self);
    if (closed < 0)
        return NULL;
    if (closed)
        Py_RETURN_NONE;
    return PyObject_CallMethod(self->transport, "pause_reading", NULL);
}

static PyObject *
reader_resume(Reader *self, PyObject *Py_UNUSED(ignored))
{
    self->wanted = 1;
    int closed = transport_closing(self);
    if (closed < 0)
        return NULL;
    if (closed)
        Py_RETURN_NONE;
    if (!self->taken_over)
        return PyObject_CallMethod(self->transport, "resume_reading", NULL);
    if (!self->registered && register_reader(self) < 0)
        return read_through_transport(self);
    Py_RETURN_NONE;
}

static PyObject *
reader_is_reading(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->taken_over)
        return PyBool_FromLong(self->registered);
    if (self->transport == NULL)
        Py_RETURN_FALSE;
    return PyObject_CallMethod(self->transport, "is_reading", NULL);
}

static PyObject *
reader_detach(Reader *self, PyObject *Py_UNUSED(ignored))
{
    unregister(self);
    self->taken_over = 1;  /* never hands reading back to the transport */
    reader_clear(self);
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"take_over", (PyCFunction)reader_take_over, METH_NOARGS,
     "Stop the transport's reading and read the socket in the ReadLoop instead (not inside "
     "connection_made: uvloop starts the transport reading after it returns)."},
    {"pause", (PyCFunction)reader_pause, METH_NOARGS, "Stop reading (back-pressure)."},
    {"resume", (PyCFunction)reader_resume, METH_NOARGS, "Read again."},
    {"is_reading", (PyCFunction)reader_is_reading, METH_NOARGS, "Reading is not paused."},
    {"detach", (PyCFunction)reader_detach, METH_NOARGS,
     "Stop for good (the transport is being closed, or the connection is lost) and drop the "
     "callbacks."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef reader_members[] = {
    {"registered", T_BOOL, offsetof(Reader, registered), READONLY, "In the ReadLoop's set now."},
    {"taken_over", T_BOOL, offsetof(Reader, taken_over), READONLY,
     "Reading is the Reader's, no longer the transport's."},
    {"fallbacks", T_INT, offsetof(Reader, fallbacks), READONLY,
     "Times the socket could not be put in the set, so the transport kept reading."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "failover_proxy.dataplane.io._reads.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = reader_new,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
    .tp_doc = "Reader(loop, fd, transport, data_received, eof_received, failed): one "
              "connection's reading, done in a ReadLoop once taken over (see _reads.c).",
};

static struct PyModuleDef reads_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "failover_proxy.dataplane.io._reads",
    .m_doc = "Batched socket reads for plain-TCP transports (see readpath.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__reads(void)
{
    if (PyType_Ready(&ReadLoopType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&reads_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "ReadLoop", (PyObject *)&ReadLoopType) < 0 ||
        PyModule_AddObjectRef(module, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
