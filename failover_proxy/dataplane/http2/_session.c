/* HTTP/2 frames for the data plane, over the system's libnghttp2 (curl's and Apache's HTTP/2
 * engine), sans-IO: the connection feeds it the bytes it read and gets back one list of
 * events; whatever the session has to send (answers to SETTINGS and PING, headers, data,
 * window updates, resets) is gathered in one buffer the connection writes once per read.
 * The pure-Python `h2` library does the same job behind the same interface (engine.py) where
 * this is not built.
 *
 * Events are tuples (kind, stream_id, payload, number), the kinds numbered as in engine.py:
 *   HEADERS  a complete header block: payload the fields as (name, value) byte pairs (None when
 *            they outgrew the header list size), number 1 when it ended the stream
 *   DATA     payload the bytes, number their flow-controlled length
 *   END      the peer ended its side of the stream
 *   RESET    the peer reset the stream (RST_STREAM), number its error code
 *   CLOSED   the stream is gone, for whatever reason (number: the error code)
 *   WINDOW   the peer opened a window (stream 0: the connection's, or new settings)
 *   GOAWAY   stream_id: the last stream the peer processed, payload its debug data, number
 *            the error code
 *   PONG     the peer answered our PING
 *   INVALID  the peer broke a rule on this stream; the session reset it (number: nghttp2's
 *            error)
 *
 * Flow control is the connection's: window updates are sent only as it calls consume() for
 * data it has passed on (nghttp2's automatic window updates are off), so a slow reader on the
 * other side never makes the proxy hold more than the windows it granted.
 *
 * Data to send is accepted only as far as the peer's windows allow at that moment, and
 * serialized at once: send_data() says how much it took, and the connection holds the rest
 * until a WINDOW event. So the proxy's own buffering stays where the connection can see and
 * bound it, and a response is never copied into a queue the client may never drain.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <nghttp2/nghttp2.h>
#include <string.h>

enum {
    EV_HEADERS = 1, EV_DATA, EV_END, EV_RESET, EV_CLOSED, EV_WINDOW, EV_GOAWAY, EV_PONG,
    EV_INVALID,
};

static PyObject *ProtocolError;

#define RESET_RING 64

typedef struct Outgoing Outgoing;

typedef struct {
    PyObject_HEAD
    nghttp2_session *session;
    int server;
    PyObject *events;          /* list, or NULL while empty */
    PyObject *headers;         /* the header block being received */
    Py_ssize_t header_bytes;   /* its size so far, each field counted as name + value + 4 */
    Py_ssize_t max_header_list;
    int headers_too_large;
    char *out;                 /* bytes to send */
    Py_ssize_t out_len, out_cap;
    int failed;                /* a callback ran out of memory: the session is unusable */
    uint32_t max_streams;      /* streams the peer may open at once (server; see session_init) */
    uint32_t peer_streams;     /* streams the peer opened that are not closed yet */
    int32_t last_peer_stream;  /* the highest stream id the peer opened (server) */
    int32_t reset_ring[RESET_RING];  /* streams reset lately while the peer may still send */
    int reset_at;
    int bad_stream_id;         /* the peer reused a lower stream id: the session fails */
    Outgoing *outgoing;        /* every stream's sending state, to free with the session */
    /* Counts the connection reads to bound floods (it resets control_frames itself). */
    unsigned long long control_frames;
    unsigned long long window_updates;
    unsigned long long data_frames_sent;
} Session;

/* One stream's sending side: the bytes accepted and not yet framed, whether the stream ends
 * after them, and the trailers to end it with. */
struct Outgoing {
    Outgoing *prev, *next;
    Py_buffer view;            /* view.obj NULL: nothing held */
    Py_ssize_t pos, limit;     /* framed so far, and taken (the windows' room when taken) */
    int end;
    int deferred;
    PyObject *trailers;
};

/* -- helpers ----------------------------------------------------------------------------- */

static PyObject *small_ints[EV_INVALID + 1];  /* the event kinds, made once */

static int emit(Session *self, int kind, int32_t stream_id, PyObject *payload, long number) {
    if (self->events == NULL && (self->events = PyList_New(0)) == NULL)
        return -1;
    PyObject *event = PyTuple_New(4);
    if (event == NULL)
        return -1;
    PyObject *id = PyLong_FromLong(stream_id), *count = PyLong_FromLong(number);
    if (id == NULL || count == NULL) {
        Py_XDECREF(id);
        Py_XDECREF(count);
        Py_DECREF(event);
        return -1;
    }
    if (payload == NULL)
        payload = Py_None;
    Py_INCREF(small_ints[kind]);
    Py_INCREF(payload);
    PyTuple_SET_ITEM(event, 0, small_ints[kind]);
    PyTuple_SET_ITEM(event, 1, id);
    PyTuple_SET_ITEM(event, 2, payload);
    PyTuple_SET_ITEM(event, 3, count);
    int rv = PyList_Append(self->events, event);
    Py_DECREF(event);
    return rv;
}

static void release_view(Outgoing *outgoing) {
    if (outgoing->view.obj != NULL)
        PyBuffer_Release(&outgoing->view);
    outgoing->view.obj = NULL;
    outgoing->pos = 0;
}

static void free_outgoing(Session *self, Outgoing *outgoing) {
    release_view(outgoing);
    Py_CLEAR(outgoing->trailers);
    if (outgoing->prev) outgoing->prev->next = outgoing->next;
    else self->outgoing = outgoing->next;
    if (outgoing->next) outgoing->next->prev = outgoing->prev;
    PyMem_Free(outgoing);
}

static Outgoing *new_outgoing(Session *self) {
    Outgoing *outgoing = PyMem_Calloc(1, sizeof(Outgoing));
    if (outgoing == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    outgoing->next = self->outgoing;
    if (self->outgoing) self->outgoing->prev = outgoing;
    self->outgoing = outgoing;
    return outgoing;
}

/* Fields from Python, (name, value) byte pairs, as nghttp2's name-value array (pointing into
 * the Python objects: nghttp2 copies them when the frame is submitted). */
static nghttp2_nv *to_nva(PyObject *fields, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence of (name, value)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    nghttp2_nv *nva = PyMem_Calloc(n ? n : 1, sizeof(nghttp2_nv));
    if (nva == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *name, *value;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyBytes_Check(name = PyTuple_GET_ITEM(pair, 0))
            || !PyBytes_Check(value = PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "a field must be a (bytes, bytes) pair");
            PyMem_Free(nva);
            Py_DECREF(seq);
            return NULL;
        }
        nva[i].name = (uint8_t *)PyBytes_AS_STRING(name);
        nva[i].namelen = (size_t)PyBytes_GET_SIZE(name);
        nva[i].value = (uint8_t *)PyBytes_AS_STRING(value);
        nva[i].valuelen = (size_t)PyBytes_GET_SIZE(value);
        nva[i].flags = NGHTTP2_NV_FLAG_NONE;
    }
    /* The pointers stay valid while `fields` lives: the caller holds it. */
    Py_DECREF(seq);
    *count = n;
    return nva;
}

/* Frame whatever the session has to send into the output buffer. */
static int gather(Session *self) {
    for (;;) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(self->session, &data);
        if (n < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(ProtocolError, "%s", nghttp2_strerror((int)n));
            return -1;
        }
        if (self->failed) {
            if (!PyErr_Occurred())
                PyErr_NoMemory();
            return -1;
        }
        if (n == 0)
            return 0;
        if (self->out_len + n > self->out_cap) {
            Py_ssize_t cap = self->out_cap ? self->out_cap : 4096;
            while (cap < self->out_len + n) cap *= 2;
            char *grown = PyMem_Realloc(self->out, cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->out = grown;
            self->out_cap = cap;
        }
        memcpy(self->out + self->out_len, data, n);
        self->out_len += n;
    }
}

/* -- nghttp2 callbacks ------------------------------------------------------------------- */

/* A stream reset before the peer's side ended: its last frames may still come (trailers). */
static void remember_reset(Session *self, int32_t stream_id) {
    self->reset_ring[self->reset_at] = stream_id;
    self->reset_at = (self->reset_at + 1) % RESET_RING;
}

static int was_reset(Session *self, int32_t stream_id) {
    for (int i = 0; i < RESET_RING; i++)
        if (self->reset_ring[i] == stream_id)
            return 1;
    return 0;
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *user) {
    Session *self = user;
    if (hd->type > NGHTTP2_CONTINUATION)
        self->control_frames++;  /* an extension frame: ignored, and work all the same */
    if (self->server && hd->type == NGHTTP2_HEADERS && (hd->stream_id & 1)) {
        if (hd->stream_id > self->last_peer_stream) {
            self->last_peer_stream = hd->stream_id;
        } else if (nghttp2_session_get_stream_remote_close(s, hd->stream_id) < 0
                   && !was_reset(self, hd->stream_id)) {
            /* A stream id lower than one the client used, on no stream it could still be
             * sending on (RFC 9113 §5.1.1): a connection error. (libnghttp2 ignores it, for
             * the trailers of a stream it reset and forgot: those are let through above.) */
            self->bad_stream_id = 1;
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
    }
    return 0;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user) {
    Session *self = user;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST
        && self->server && ++self->peer_streams > self->max_streams) {
        /* Past our SETTINGS_MAX_CONCURRENT_STREAMS: a stream error (RFC 9113 §5.1.2), the
         * client may retry it; the header block is still decoded (HPACK) and dropped. */
        self->control_frames++;
        Py_CLEAR(self->headers);
        remember_reset(self, frame->hd.stream_id);
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                  NGHTTP2_REFUSED_STREAM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    Py_XDECREF(self->headers);
    self->headers = PyList_New(0);
    self->header_bytes = 0;
    self->headers_too_large = 0;
    if (self->headers == NULL) {
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user) {
    Session *self = user;
    self->header_bytes += (Py_ssize_t)(namelen + valuelen + 4);
    if (self->header_bytes > self->max_header_list) {
        /* Past the size announced in SETTINGS_MAX_HEADER_LIST_SIZE: an HPACK bomb or a
         * client that ignores it. The header block cannot be dropped without desynchronising
         * HPACK, so the connection ends. */
        self->headers_too_large = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    if (self->headers == NULL)
        return 0;
    PyObject *pair = PyTuple_New(2);
    PyObject *name_bytes = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)namelen);
    PyObject *value_bytes = PyBytes_FromStringAndSize((const char *)value,
                                                      (Py_ssize_t)valuelen);
    if (pair == NULL || name_bytes == NULL || value_bytes == NULL) {
        Py_XDECREF(pair);
        Py_XDECREF(name_bytes);
        Py_XDECREF(value_bytes);
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    PyTuple_SET_ITEM(pair, 0, name_bytes);
    PyTuple_SET_ITEM(pair, 1, value_bytes);
    int rv = PyList_Append(self->headers, pair);
    Py_DECREF(pair);
    if (rv < 0) {
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user) {
    Session *self = user;
    int32_t sid = frame->hd.stream_id;
    int end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    int rv = 0;
    switch (frame->hd.type) {
    case NGHTTP2_DATA:
        if (end)
            rv = emit(self, EV_END, sid, NULL, 0);
        else if (frame->hd.length == 0)
            self->control_frames++;  /* an empty DATA frame asks for work and carries none */
        break;
    case NGHTTP2_HEADERS:
        if (self->headers == NULL)
            break;
        rv = emit(self, EV_HEADERS, sid, self->headers, end);
        Py_CLEAR(self->headers);
        if (rv == 0 && end)
            rv = emit(self, EV_END, sid, NULL, 0);
        break;
    case NGHTTP2_RST_STREAM:
        rv = emit(self, EV_RESET, sid, NULL, (long)frame->rst_stream.error_code);
        break;
    case NGHTTP2_SETTINGS:
        self->control_frames++;
        if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
            rv = emit(self, EV_WINDOW, 0, NULL, 0);  /* the initial window may have grown */
        break;
    case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK)
            rv = emit(self, EV_PONG, 0, NULL, 0);
        else
            self->control_frames++;
        break;
    case NGHTTP2_PRIORITY:
        self->control_frames++;
        break;
    case NGHTTP2_WINDOW_UPDATE:
        self->window_updates++;
        rv = emit(self, EV_WINDOW, sid, NULL, 0);
        break;
    case NGHTTP2_GOAWAY: {
        PyObject *debug = PyBytes_FromStringAndSize(
            (const char *)frame->goaway.opaque_data, (Py_ssize_t)frame->goaway.opaque_data_len);
        if (debug == NULL) {
            rv = -1;
            break;
        }
        rv = emit(self, EV_GOAWAY, frame->goaway.last_stream_id, debug,
                  (long)frame->goaway.error_code);
        Py_DECREF(debug);
        break;
    }
    default:
        break;
    }
    if (rv < 0) {
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int on_invalid_frame_recv(nghttp2_session *s, const nghttp2_frame *frame,
                                 int lib_error_code, void *user) {
    Session *self = user;
    Py_CLEAR(self->headers);
    if (frame->hd.stream_id == 0)
        return 0;  /* a connection error: the session ends itself (GOAWAY) */
    remember_reset(self, frame->hd.stream_id);
    if (emit(self, EV_INVALID, frame->hd.stream_id, NULL, lib_error_code) < 0) {
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int on_data_chunk_recv(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                              const uint8_t *data, size_t len, void *user) {
    Session *self = user;
    PyObject *chunk = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (chunk == NULL || emit(self, EV_DATA, stream_id, chunk, (long)len) < 0) {
        Py_XDECREF(chunk);
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    Py_DECREF(chunk);
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code,
                           void *user) {
    Session *self = user;
    if (self->server && (stream_id & 1) && self->peer_streams > 0)
        self->peer_streams--;
    Outgoing *outgoing = nghttp2_session_get_stream_user_data(s, stream_id);
    if (outgoing != NULL) {
        nghttp2_session_set_stream_user_data(s, stream_id, NULL);
        free_outgoing(self, outgoing);
    }
    if (emit(self, EV_CLOSED, stream_id, NULL, (long)error_code) < 0) {
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int submit_trailers(Session *self, int32_t stream_id, PyObject *trailers) {
    Py_ssize_t count;
    nghttp2_nv *nva = to_nva(trailers, &count);
    if (nva == NULL)
        return -1;
    int rv = nghttp2_submit_trailer(self->session, stream_id, nva, (size_t)count);
    PyMem_Free(nva);
    return rv;
}

/* The data provider of every stream we send a body on: serves the bytes send_data accepted,
 * defers when they are all framed and the stream has not ended. */
static ssize_t read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                         uint32_t *data_flags, nghttp2_data_source *source, void *user) {
    Session *self = user;
    Outgoing *outgoing = source->ptr;
    Py_ssize_t left = outgoing->view.obj ? outgoing->limit - outgoing->pos : 0;
    if (left == 0 && !outgoing->end) {
        outgoing->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    size_t n = (size_t)left < length ? (size_t)left : length;
    if (n) {
        memcpy(buf, (const char *)outgoing->view.buf + outgoing->pos, n);
        outgoing->pos += (Py_ssize_t)n;
        self->data_frames_sent++;
        if (outgoing->pos == outgoing->limit)
            release_view(outgoing);
    }
    if (outgoing->view.obj == NULL && outgoing->end) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        if (outgoing->trailers != NULL) {
            *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            PyObject *trailers = outgoing->trailers;
            outgoing->trailers = NULL;
            int rv = submit_trailers(self, stream_id, trailers);
            Py_DECREF(trailers);
            if (rv != 0) {
                if (PyErr_Occurred()) self->failed = 1;
                return NGHTTP2_ERR_CALLBACK_FAILURE;
            }
        }
    }
    return (ssize_t)n;
}

/* -- the Session type -------------------------------------------------------------------- */

#define NO_LIMIT 0x7fffffffu

/* Our first SETTINGS frame, the first bytes gathered: its MAX_CONCURRENT_STREAMS entry (NO_LIMIT,
 * as nghttp2 knows it) set to the limit the client is to keep. */
static int advertise_max_streams(Session *self) {
    unsigned char *frame = (unsigned char *)self->out;
    if (self->out_len < 9 || frame[3] != NGHTTP2_SETTINGS) {
        PyErr_SetString(PyExc_RuntimeError, "nghttp2 did not start with SETTINGS");
        return -1;
    }
    Py_ssize_t length = (frame[0] << 16) | (frame[1] << 8) | frame[2];
    for (Py_ssize_t at = 9; at + 6 <= 9 + length && at + 6 <= self->out_len; at += 6) {
        if (((frame[at] << 8) | frame[at + 1]) == NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) {
            uint32_t value = self->max_streams;
            frame[at + 2] = value >> 24;
            frame[at + 3] = (value >> 16) & 0xff;
            frame[at + 4] = (value >> 8) & 0xff;
            frame[at + 5] = value & 0xff;
            return 0;
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "no MAX_CONCURRENT_STREAMS in our SETTINGS");
    return -1;
}

static int session_init(Session *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"server", "settings", "connection_window", "max_header_list",
                               NULL};
    int server;
    PyObject *settings;
    long connection_window = 65535;
    Py_ssize_t max_header_list = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "pO|ln", keywords, &server, &settings,
                                     &connection_window, &max_header_list))
        return -1;
    if (self->session != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Session is initialised once");
        return -1;
    }
    self->server = server;
    self->max_header_list = max_header_list;
    PyObject *seq = PySequence_Fast(settings, "settings must be (id, value) pairs");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    nghttp2_settings_entry entries[16];
    if (n > 16) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many settings");
        return -1;
    }
    self->max_streams = 0xffffffffu;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned int id;
        unsigned int value;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "II", &id, &value)) {
            Py_DECREF(seq);
            return -1;
        }
        entries[i].settings_id = (int32_t)id;
        entries[i].value = value;
        if (server && id == NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) {
            /* nghttp2 takes a stream past an acknowledged limit for a connection error (all
             * the client's streams lost); RFC 9113 §5.1.2 says a stream error. So nghttp2 is
             * told of no limit, the client is told ours (patched into the SETTINGS frame
             * below), and on_begin_headers refuses the streams past it. */
            self->max_streams = value;
            entries[i].value = NO_LIMIT;
        }
    }
    Py_DECREF(seq);

    nghttp2_session_callbacks *callbacks;
    nghttp2_option *option;
    if (nghttp2_session_callbacks_new(&callbacks) != 0 || nghttp2_option_new(&option) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_session_callbacks_set_on_begin_frame_callback(callbacks, on_begin_frame);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(callbacks,
                                                                 on_invalid_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);
    nghttp2_option_set_no_auto_window_update(option, 1);
    /* Headers are encoded from the static table and as literals, none put in the dynamic
     * table: what varies per message (the request id, the date) would churn it, and keeping
     * it cost more CPU than all else the codec does (as nginx, whose encoder keeps none). */
    nghttp2_option_set_max_deflate_dynamic_table_size(option, 0);
    int rv = server ? nghttp2_session_server_new2(&self->session, callbacks, self, option)
                    : nghttp2_session_client_new2(&self->session, callbacks, self, option);
    nghttp2_session_callbacks_del(callbacks);
    nghttp2_option_del(option);
    if (rv != 0) {
        PyErr_Format(PyExc_RuntimeError, "nghttp2: %s", nghttp2_strerror(rv));
        return -1;
    }
    rv = nghttp2_submit_settings(self->session, NGHTTP2_FLAG_NONE, entries, (size_t)n);
    if (rv == 0 && connection_window > 65535)
        rv = nghttp2_session_set_local_window_size(self->session, NGHTTP2_FLAG_NONE, 0,
                                                   (int32_t)connection_window);
    if (rv != 0) {
        PyErr_Format(PyExc_ValueError, "nghttp2: %s", nghttp2_strerror(rv));
        return -1;
    }
    if (gather(self) < 0)
        return -1;
    if (self->max_streams != 0xffffffffu)
        return advertise_max_streams(self);
    return 0;
}

static void session_dealloc(Session *self) {
    if (self->session != NULL)
        nghttp2_session_del(self->session);
    while (self->outgoing != NULL)
        free_outgoing(self, self->outgoing);
    Py_CLEAR(self->events);
    Py_CLEAR(self->headers);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *take_events(Session *self) {
    PyObject *events = self->events;
    self->events = NULL;
    if (events == NULL)
        return PyList_New(0);
    return events;
}

/* After a fatal error of the peer's making: tell it (GOAWAY) and raise ProtocolError with
 * nghttp2's reason and whether it was a flood. The session sends nothing more after it. */
static PyObject *fail(Session *self, int code) {
    int flood = code == NGHTTP2_ERR_FLOODED || self->headers_too_large
#ifdef NGHTTP2_ERR_TOO_MANY_CONTINUATIONS
                || code == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS
#endif
        ;
    if (self->failed) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    nghttp2_session_terminate_session(
        self->session, flood ? NGHTTP2_ENHANCE_YOUR_CALM : NGHTTP2_PROTOCOL_ERROR);
    PyErr_Clear();
    gather(self);
    PyErr_Clear();
    const char *why = self->headers_too_large ? "header list larger than announced"
                      : self->bad_stream_id ? "a stream id lower than one already used"
                      : nghttp2_strerror(code);
    PyObject *value = Py_BuildValue("(sO)", why, flood ? Py_True : Py_False);
    if (value != NULL) {
        PyErr_SetObject(ProtocolError, value);
        Py_DECREF(value);
    }
    return NULL;
}

static PyObject *session_receive(Session *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ssize_t n = nghttp2_session_mem_recv(self->session, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (n < 0)
        return fail(self, (int)n);
    if (self->failed || gather(self) < 0)
        return self->failed ? fail(self, NGHTTP2_ERR_CALLBACK_FAILURE) : NULL;
    return take_events(self);
}

static PyObject *session_events(Session *self, PyObject *unused) {
    return take_events(self);
}

static PyObject *finish(Session *self) {
    if (gather(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static Outgoing *outgoing_of(Session *self, int32_t stream_id) {
    return nghttp2_session_get_stream_user_data(self->session, stream_id);
}

/* The arguments of the methods called per request, read without PyArg_ParseTuple's format
 * parsing (about 700 instructions a request). */
static int stream_arg(PyObject *arg, int32_t *stream_id) {
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < 0 || value > 0x7fffffffL) {
        PyErr_SetString(PyExc_ValueError, "not a stream id");
        return -1;
    }
    *stream_id = (int32_t)value;
    return 0;
}

static int check_count(Py_ssize_t nargs, Py_ssize_t low, Py_ssize_t high, const char *name) {
    if (nargs < low || nargs > high) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd arguments", name, low, high);
        return -1;
    }
    return 0;
}

static PyObject *session_send_headers(Session *self, PyObject *const *args, Py_ssize_t nargs) {
    int32_t stream_id;
    if (check_count(nargs, 3, 3, "send_headers") < 0 || stream_arg(args[0], &stream_id) < 0)
        return NULL;
    PyObject *fields = args[1];
    int end = PyObject_IsTrue(args[2]);
    if (end < 0)
        return NULL;
    Py_ssize_t count;
    nghttp2_nv *nva = to_nva(fields, &count);
    if (nva == NULL)
        return NULL;
    int rv;
    int final = !self->server || count == 0 || nva[0].namelen != 7
                || memcmp(nva[0].name, ":status", 7) != 0 || nva[0].valuelen != 3
                || nva[0].value[0] != '1';
    if (!final || !self->server) {
        /* an interim (1xx) response, or a client's trailers: a HEADERS frame on its own */
        rv = nghttp2_submit_headers(self->session, end ? NGHTTP2_FLAG_END_STREAM : 0,
                                    stream_id, NULL, nva, (size_t)count, NULL);
    } else if (end) {
        rv = nghttp2_submit_response(self->session, stream_id, nva, (size_t)count, NULL);
    } else if (nghttp2_session_get_stream_remote_close(self->session, stream_id) < 0) {
        rv = 0;  /* the client closed it meanwhile: there is nobody to answer */
    } else {
        Outgoing *outgoing = new_outgoing(self);
        if (outgoing == NULL) {
            PyMem_Free(nva);
            return NULL;
        }
        nghttp2_session_set_stream_user_data(self->session, stream_id, outgoing);
        nghttp2_data_provider provider = {.source = {.ptr = outgoing}, .read_callback = read_body};
        rv = nghttp2_submit_response(self->session, stream_id, nva, (size_t)count, &provider);
        if (rv != 0) {
            nghttp2_session_set_stream_user_data(self->session, stream_id, NULL);
            free_outgoing(self, outgoing);
        }
    }
    PyMem_Free(nva);
    if (rv != 0 && rv != NGHTTP2_ERR_INVALID_ARGUMENT && rv != NGHTTP2_ERR_STREAM_CLOSED) {
        PyErr_Format(PyExc_RuntimeError, "nghttp2: %s", nghttp2_strerror(rv));
        return NULL;
    }
    return finish(self);
}

static PyObject *session_submit_request(Session *self, PyObject *args) {
    PyObject *fields;
    int end;
    if (!PyArg_ParseTuple(args, "Op", &fields, &end))
        return NULL;
    Py_ssize_t count;
    nghttp2_nv *nva = to_nva(fields, &count);
    if (nva == NULL)
        return NULL;
    Outgoing *outgoing = NULL;
    nghttp2_data_provider provider;
    if (!end) {
        if ((outgoing = new_outgoing(self)) == NULL) {
            PyMem_Free(nva);
            return NULL;
        }
        provider.source.ptr = outgoing;
        provider.read_callback = read_body;
    }
    int32_t stream_id = nghttp2_submit_request(self->session, NULL, nva, (size_t)count,
                                               end ? NULL : &provider, outgoing);
    PyMem_Free(nva);
    if (stream_id < 0) {
        if (outgoing) free_outgoing(self, outgoing);
        PyErr_Format(ProtocolError, "%s", nghttp2_strerror(stream_id));
        return NULL;
    }
    if (gather(self) < 0)
        return NULL;
    return PyLong_FromLong(stream_id);
}

static PyObject *session_send_data(Session *self, PyObject *const *args, Py_ssize_t nargs) {
    int32_t stream_id;
    if (check_count(nargs, 2, 2, "send_data") < 0 || stream_arg(args[0], &stream_id) < 0)
        return NULL;
    PyObject *data = args[1];
    Outgoing *outgoing = outgoing_of(self, stream_id);
    if (outgoing == NULL || outgoing->end)
        return PyObject_Length(data) < 0 ? NULL : PyLong_FromSsize_t(PyObject_Length(data));
    if (outgoing->view.obj != NULL)
        return PyLong_FromLong(0);  /* the last bytes accepted still wait for their window */
    int32_t window = nghttp2_session_get_stream_remote_window_size(self->session, stream_id);
    int32_t connection = nghttp2_session_get_remote_window_size(self->session);
    if (connection < window) window = connection;
    if (window <= 0)
        return PyLong_FromLong(0);
    if (PyObject_GetBuffer(data, &outgoing->view, PyBUF_SIMPLE) < 0)
        return NULL;
    /* What the windows have no room for is the caller's to offer again. */
    Py_ssize_t taken = outgoing->view.len < window ? outgoing->view.len : window;
    outgoing->limit = taken;
    outgoing->pos = 0;
    if (taken == 0)
        release_view(outgoing);
    if (outgoing->deferred) {
        outgoing->deferred = 0;
        nghttp2_session_resume_data(self->session, stream_id);
    }
    if (gather(self) < 0)
        return NULL;
    return PyLong_FromSsize_t(taken);
}

/* A whole response in one call, the usual one: its head, as much of its body as the windows
 * take now, and its end when all of it was taken; one gathering of frames. */
static PyObject *session_send_response(Session *self, PyObject *const *args, Py_ssize_t nargs) {
    int32_t stream_id;
    if (check_count(nargs, 4, 4, "send_response") < 0 || stream_arg(args[0], &stream_id) < 0)
        return NULL;
    PyObject *data = args[2];
    int end = PyObject_IsTrue(args[3]);
    if (end < 0)
        return NULL;
    Py_ssize_t count;
    nghttp2_nv *nva = to_nva(args[1], &count);
    if (nva == NULL)
        return NULL;
    int32_t window = nghttp2_session_get_stream_remote_window_size(self->session, stream_id);
    if (window < 0 || outgoing_of(self, stream_id) != NULL) {  /* closed, or answered already */
        PyMem_Free(nva);
        return PyObject_Length(data) < 0 ? NULL : PyLong_FromSsize_t(PyObject_Length(data));
    }
    int32_t connection = nghttp2_session_get_remote_window_size(self->session);
    if (connection < window) window = connection;
    Outgoing *outgoing = new_outgoing(self);
    if (outgoing == NULL) {
        PyMem_Free(nva);
        return NULL;
    }
    if (PyObject_GetBuffer(data, &outgoing->view, PyBUF_SIMPLE) < 0) {
        free_outgoing(self, outgoing);
        PyMem_Free(nva);
        return NULL;
    }
    Py_ssize_t whole = outgoing->view.len;
    Py_ssize_t taken = whole < window ? whole : (window > 0 ? window : 0);
    outgoing->limit = taken;
    if (taken == 0)
        release_view(outgoing);
    outgoing->end = end && taken == whole;
    nghttp2_session_set_stream_user_data(self->session, stream_id, outgoing);
    nghttp2_data_provider provider = {.source = {.ptr = outgoing}, .read_callback = read_body};
    int rv = nghttp2_submit_response(self->session, stream_id, nva, (size_t)count, &provider);
    PyMem_Free(nva);
    if (rv != 0) {
        nghttp2_session_set_stream_user_data(self->session, stream_id, NULL);
        free_outgoing(self, outgoing);
        PyErr_Format(PyExc_RuntimeError, "nghttp2: %s", nghttp2_strerror(rv));
        return NULL;
    }
    if (gather(self) < 0)
        return NULL;
    return PyLong_FromSsize_t(taken);
}

static PyObject *session_end_stream(Session *self, PyObject *const *args, Py_ssize_t nargs) {
    int32_t stream_id;
    if (check_count(nargs, 1, 2, "end_stream") < 0 || stream_arg(args[0], &stream_id) < 0)
        return NULL;
    PyObject *trailers = nargs > 1 ? args[1] : Py_None;
    Outgoing *outgoing = outgoing_of(self, stream_id);
    if (outgoing == NULL || outgoing->end)
        Py_RETURN_NONE;
    outgoing->end = 1;
    if (trailers != Py_None && PyObject_Length(trailers) > 0) {
        Py_INCREF(trailers);
        outgoing->trailers = trailers;
    }
    if (outgoing->deferred) {
        outgoing->deferred = 0;
        nghttp2_session_resume_data(self->session, stream_id);
    }
    return finish(self);
}

static PyObject *session_reset(Session *self, PyObject *args) {
    int stream_id;
    unsigned int code;
    if (!PyArg_ParseTuple(args, "iI", &stream_id, &code))
        return NULL;
    Outgoing *outgoing = outgoing_of(self, stream_id);
    if (outgoing != NULL) {
        release_view(outgoing);
        Py_CLEAR(outgoing->trailers);
    }
    remember_reset(self, stream_id);
    nghttp2_submit_rst_stream(self->session, NGHTTP2_FLAG_NONE, stream_id, code);
    return finish(self);
}

static PyObject *session_consume(Session *self, PyObject *const *args, Py_ssize_t nargs) {
    int32_t stream_id;
    if (check_count(nargs, 2, 2, "consume") < 0 || stream_arg(args[0], &stream_id) < 0)
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size > 0) {
        int rv = nghttp2_session_consume(self->session, stream_id, (size_t)size);
        if (rv == NGHTTP2_ERR_INVALID_ARGUMENT)  /* the stream is gone: the connection's own */
            rv = nghttp2_session_consume_connection(self->session, (size_t)size);
        (void)rv;
    }
    return finish(self);
}

static PyObject *session_goaway(Session *self, PyObject *args) {
    unsigned int code;
    const char *debug = NULL;
    Py_ssize_t debug_len = 0;
    int last = -1;
    if (!PyArg_ParseTuple(args, "I|y#i", &code, &debug, &debug_len, &last))
        return NULL;
    if (last < 0)
        last = nghttp2_session_get_last_proc_stream_id(self->session);
    nghttp2_submit_goaway(self->session, NGHTTP2_FLAG_NONE, last, code,
                          (const uint8_t *)debug, (size_t)debug_len);
    return finish(self);
}

static PyObject *session_ping(Session *self, PyObject *unused) {
    nghttp2_submit_ping(self->session, NGHTTP2_FLAG_NONE, NULL);
    return finish(self);
}

static PyObject *session_data_to_send(Session *self, PyObject *unused) {
    if (self->out_len == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    PyObject *data = PyBytes_FromStringAndSize(self->out, self->out_len);
    self->out_len = 0;
    /* Between reads a connection keeps no buffer (10,000 idle ones kept 40 MB). */
    PyMem_Free(self->out);
    self->out = NULL;
    self->out_cap = 0;
    return data;
}

static PyObject *session_window(Session *self, PyObject *arg) {
    long stream_id = PyLong_AsLong(arg);
    if (stream_id == -1 && PyErr_Occurred())
        return NULL;
    int32_t window = nghttp2_session_get_remote_window_size(self->session);
    if (stream_id > 0) {
        int32_t stream = nghttp2_session_get_stream_remote_window_size(self->session,
                                                                      (int32_t)stream_id);
        if (stream < window) window = stream;
    }
    return PyLong_FromLong(window < 0 ? 0 : window);
}

static PyObject *session_get_want_read(Session *self, void *closure) {
    return PyBool_FromLong(nghttp2_session_want_read(self->session));
}

static PyObject *session_get_last_stream_id(Session *self, void *closure) {
    return PyLong_FromLong(nghttp2_session_get_last_proc_stream_id(self->session));
}

static PyObject *session_get_remote_max_streams(Session *self, void *closure) {
    return PyLong_FromUnsignedLong(nghttp2_session_get_remote_settings(
        self->session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS));
}

static PyObject *session_get_next_stream_id(Session *self, void *closure) {
    return PyLong_FromUnsignedLong(nghttp2_session_get_next_stream_id(self->session));
}

static PyMethodDef session_methods[] = {
    {"receive", (PyCFunction)session_receive, METH_O,
     "Feed bytes read from the peer; the events they make (and any waiting)."},
    {"events", (PyCFunction)session_events, METH_NOARGS, "Events made since last asked."},
    {"send_headers", (PyCFunction)(void (*)(void))session_send_headers, METH_FASTCALL,
     "A response's header block (or a 1xx one, or trailers from a client)."},
    {"submit_request", (PyCFunction)session_submit_request, METH_VARARGS,
     "A request's header block on a new stream; its id."},
    {"send_data", (PyCFunction)(void (*)(void))session_send_data, METH_FASTCALL,
     "Frame as much of the bytes as the windows allow now; how many were taken."},
    {"send_response", (PyCFunction)(void (*)(void))session_send_response, METH_FASTCALL,
     "A response's head, as much of its body as the windows take (how much), its end."},
    {"end_stream", (PyCFunction)(void (*)(void))session_end_stream, METH_FASTCALL,
     "End our side of a stream after its data, with trailers if given."},
    {"reset", (PyCFunction)session_reset, METH_VARARGS, "RST_STREAM with an error code."},
    {"consume", (PyCFunction)(void (*)(void))session_consume, METH_FASTCALL,
     "Bytes of a stream's data passed on: give them back to the peer's windows."},
    {"goaway", (PyCFunction)session_goaway, METH_VARARGS,
     "GOAWAY(code, debug=b'', last_stream_id=the last processed)."},
    {"ping", (PyCFunction)session_ping, METH_NOARGS, "PING the peer (a PONG event answers)."},
    {"data_to_send", (PyCFunction)session_data_to_send, METH_NOARGS,
     "The bytes gathered to send, once."},
    {"window", (PyCFunction)session_window, METH_O,
     "Bytes that may be sent on a stream now (0: the connection)."},
    {NULL},
};

static PyGetSetDef session_getset[] = {
    {"want_read", (getter)session_get_want_read, NULL, "The session still reads.", NULL},
    {"last_stream_id", (getter)session_get_last_stream_id, NULL,
     "The highest stream id the peer opened and we processed.", NULL},
    {"remote_max_streams", (getter)session_get_remote_max_streams, NULL,
     "The peer's SETTINGS_MAX_CONCURRENT_STREAMS.", NULL},
    {"next_stream_id", (getter)session_get_next_stream_id, NULL,
     "The id the next request would take (1 << 31 when exhausted).", NULL},
    {NULL},
};

static PyMemberDef session_members[] = {
    {"control_frames", T_ULONGLONG, offsetof(Session, control_frames), 0,
     "PING, SETTINGS, PRIORITY, empty DATA and unknown frames received."},
    {"window_updates", T_ULONGLONG, offsetof(Session, window_updates), 0,
     "WINDOW_UPDATE frames received."},
    {"data_frames_sent", T_ULONGLONG, offsetof(Session, data_frames_sent), READONLY,
     "DATA frames framed."},
    {NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "failover_proxy.dataplane.http2._session.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One HTTP/2 connection's frames, over libnghttp2 (sans-IO).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)session_init,
    .tp_dealloc = (destructor)session_dealloc,
    .tp_methods = session_methods,
    .tp_getset = session_getset,
    .tp_members = session_members,
};

static struct PyModuleDef session_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "failover_proxy.dataplane.http2._session",
    .m_doc = "HTTP/2 frames over libnghttp2, sans-IO.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__session(void) {
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    for (int kind = 0; kind <= EV_INVALID; kind++)
        if ((small_ints[kind] = PyLong_FromLong(kind)) == NULL)
            return NULL;
    PyObject *module = PyModule_Create(&session_module);
    if (module == NULL)
        return NULL;
    ProtocolError = PyErr_NewExceptionWithDoc(
        "failover_proxy.dataplane.http2._session.ProtocolError",
        "The peer broke HTTP/2 (args: why, and whether it was a flood); the GOAWAY saying so "
        "is gathered to send.", NULL, NULL);
    Py_INCREF(&SessionType);
    if (ProtocolError == NULL || PyModule_AddObject(module, "Session", (PyObject *)&SessionType)
        || PyModule_AddObject(module, "ProtocolError", ProtocolError)
        || PyModule_AddStringConstant(module, "NGHTTP2_VERSION", NGHTTP2_VERSION)) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(ProtocolError);
    return module;
}
