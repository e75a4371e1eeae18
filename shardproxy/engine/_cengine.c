/*
 * shardproxy.engine._cengine: the compiled data path (issue 14), C twin of
 * the Python engines.
 *
 * Why C and not Cython: the per-tunnel state must be a C struct whose
 * layout we choose byte by byte (the bar is 300 bytes per idle tunnel,
 * kernel excluded), the per-event path must make no Python call at all, and
 * a hand-written module has no generated code to review and no build
 * dependency beyond gcc and the Python headers (websockets ships its C
 * speedups the same way). The Python engines stay the readable reference:
 * every function here names the Python one it mirrors, and the tests hold
 * both to the same results (tests/unit/test_cengine.py).
 *
 * What is here so far: the frame tracker (protocol/frames.py's
 * FrameTracker), as a C core (sp_tracker, sp_feed, sp_feed_to_boundary)
 * that the C relay embeds in its tunnel struct, and a small Python type
 * over it for the differential tests.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_chttp.h"

/* -- the frame tracker core (RFC 6455 §5.2) ------------------------------ */

#define SP_CONTINUATION 0x0
#define SP_BINARY 0x2
#define SP_CLOSE 0x8
#define SP_PONG 0xA
#define SP_FIN 0x80
#define SP_OPCODE 0x0F
#define SP_MASK 0x80
#define SP_LENGTH 0x7F
#define SP_MAX_HEADER 14    /* 2 + 8 (64-bit length) + 4 (masking key) */
#define SP_NO_STATUS 1005   /* §7.1.5: a Close without a status code */

/* Why a direction's framing was lost; the reasons' texts are the Python
 * tracker's (sp_error_text), so that both engines log the same words. */
enum sp_error {
    SP_OK = 0,
    SP_RESERVED_OPCODE,
    SP_CONTINUATION_OUTSIDE,
    SP_DATA_INSIDE,
    SP_LENGTH_MSB,
    SP_FRAGMENTED_CONTROL,
    SP_CONTROL_TOO_LONG,
    SP_CLOSE_ONE_BYTE,
};

typedef struct {
    uint64_t remaining;      /* payload bytes of the current frame not seen yet */
    uint64_t messages;       /* completed data messages */
    int32_t close_code;      /* of the first Close; -1: none yet */
    uint8_t error;           /* enum sp_error */
    uint8_t error_opcode;    /* for SP_RESERVED_OPCODE's text */
    uint8_t fragmented;      /* inside a fragmented message (§5.4) */
    uint8_t partial_len;     /* a header cut by the end of a chunk: its bytes */
    uint8_t partial[SP_MAX_HEADER];
} sp_tracker;

static void
sp_tracker_init(sp_tracker *t)
{
    memset(t, 0, sizeof(*t));
    t->close_code = -1;
}

static int
sp_at_boundary(const sp_tracker *t)
{
    return t->remaining == 0 && t->partial_len == 0 && t->error == SP_OK;
}

static int
sp_fail(sp_tracker *t, enum sp_error error)
{
    t->error = (uint8_t)error;
    return -1;
}

/* FrameTracker._control: the rest of a control frame's header. Returns as
 * sp_frame does. */
static int
sp_control(sp_tracker *t, const uint8_t *data, size_t pos, size_t avail, uint8_t b0,
           unsigned header, unsigned length, uint64_t *size)
{
    if (!(b0 & SP_FIN))
        return sp_fail(t, SP_FRAGMENTED_CONTROL);
    if (length > 125)
        return sp_fail(t, SP_CONTROL_TOO_LONG);
    if ((b0 & SP_OPCODE) != SP_CLOSE || t->close_code >= 0) {
        if (avail < header)
            return 0;
        *size = header + length;
        return 1;
    }
    if (length == 0) {
        if (avail < header)
            return 0;
        t->close_code = SP_NO_STATUS;
        *size = header;
        return 1;
    }
    if (length == 1)
        return sp_fail(t, SP_CLOSE_ONE_BYTE);
    if (avail < header + 2)
        return 0;
    unsigned hi = data[pos + header], lo = data[pos + header + 1];
    if (header == 6) { /* §5.3: payload octet i XOR masking key octet i % 4 */
        hi ^= data[pos + 2];
        lo ^= data[pos + 3];
    }
    t->close_code = (int32_t)(hi << 8 | lo);
    *size = header + length;
    return 1;
}

/* FrameTracker._frame: 1 with the whole frame's length (header and payload,
 * below 2^63 + 14) in *size; 0 if its header is not all in data[pos:end]
 * (nothing changed then); -1 after setting the error. */
static int
sp_frame(sp_tracker *t, const uint8_t *data, size_t pos, size_t end, uint64_t *size)
{
    size_t avail = end - pos;
    if (avail < 2)
        return 0;
    uint8_t b0 = data[pos], b1 = data[pos + 1];
    unsigned opcode = b0 & SP_OPCODE;
    uint64_t length = b1 & SP_LENGTH;
    unsigned header = (b1 & SP_MASK) ? 6 : 2;
    if (opcode > SP_BINARY) {
        if (opcode < SP_CLOSE || opcode > SP_PONG) {
            t->error_opcode = (uint8_t)opcode;
            return sp_fail(t, SP_RESERVED_OPCODE);
        }
        return sp_control(t, data, pos, avail, b0, header, (unsigned)length, size);
    }
    if (opcode == SP_CONTINUATION) {
        if (!t->fragmented)
            return sp_fail(t, SP_CONTINUATION_OUTSIDE);
    }
    else if (t->fragmented) {
        return sp_fail(t, SP_DATA_INSIDE);
    }
    if (length >= 126) {
        unsigned extended = length == 126 ? 2 : 8;
        if (avail < header + extended)
            return 0;
        length = 0;
        for (unsigned i = 0; i < extended; i++)
            length = length << 8 | data[pos + 2 + i];
        if (length >> 63)
            return sp_fail(t, SP_LENGTH_MSB);
        header += extended;
    }
    else if (avail < header) {
        return 0;
    }
    if (b0 & SP_FIN) {
        t->messages++;
        t->fragmented = 0;
    }
    else {
        t->fragmented = 1;
    }
    *size = header + length; /* fits: a length's MSB was refused */
    return 1;
}

/* FrameTracker._complete_partial: 1 with the offset in data just past the
 * frame whose header began in an earlier chunk in *next; 0 when there is
 * nothing more to do with this chunk (still short, or an error). */
static int
sp_complete_partial(sp_tracker *t, const uint8_t *data, size_t n, uint64_t *next)
{
    uint8_t head[SP_MAX_HEADER];
    size_t have = t->partial_len;
    size_t take = SP_MAX_HEADER - have;
    if (take > n)
        take = n;
    memcpy(head, t->partial, have);
    memcpy(head + have, data, take);
    uint64_t size = 0;
    int found = sp_frame(t, head, 0, have + take, &size);
    if (found == 0) { /* still short: head holds all of data */
        memcpy(t->partial, head, have + take);
        t->partial_len = (uint8_t)(have + take);
        return 0;
    }
    t->partial_len = 0;
    if (found < 0)
        return 0;
    *next = size - have; /* the header is longer than what was held */
    return 1;
}

/* FrameTracker.feed */
static void
sp_feed(sp_tracker *t, const uint8_t *data, size_t n)
{
    if (t->error != SP_OK)
        return;
    if (t->remaining >= n) { /* the whole chunk is payload */
        t->remaining -= n;
        return;
    }
    uint64_t pos = t->remaining;
    t->remaining = 0;
    if (t->partial_len && !sp_complete_partial(t, data, n, &pos))
        return;
    while (pos < n) {
        uint64_t size = 0;
        int found = sp_frame(t, data, (size_t)pos, n, &size);
        if (found <= 0) {
            if (found == 0) {
                t->partial_len = (uint8_t)(n - pos);
                memcpy(t->partial, data + pos, (size_t)(n - pos));
            }
            return;
        }
        pos += size;
    }
    t->remaining = pos - n;
}

/* FrameTracker.feed_to_boundary: bytes up to the end of the current frame
 * (0 at a boundary), or -1 when the frame goes on past data (all fed) or
 * after an error (nothing fed). */
static int64_t
sp_feed_to_boundary(sp_tracker *t, const uint8_t *data, size_t n)
{
    if (t->error != SP_OK)
        return -1;
    size_t pos = 0;
    while (t->partial_len && pos < n) { /* a cut header, a byte at a time */
        sp_feed(t, data + pos, 1);
        pos++;
        if (t->error != SP_OK)
            return -1;
    }
    if (t->partial_len)
        return -1;
    uint64_t remaining = t->remaining;
    if (remaining > n - pos) {
        sp_feed(t, data + pos, n - pos);
        return -1;
    }
    if (remaining)
        sp_feed(t, data + pos, (size_t)remaining);
    return (int64_t)(pos + remaining);
}

static PyObject *
sp_error_text(const sp_tracker *t)
{
    switch (t->error) {
    case SP_OK:
        Py_RETURN_NONE;
    case SP_RESERVED_OPCODE:
        return PyUnicode_FromFormat("reserved opcode 0x%x", (unsigned)t->error_opcode);
    case SP_CONTINUATION_OUTSIDE:
        return PyUnicode_FromString("continuation frame outside a fragmented message");
    case SP_DATA_INSIDE:
        return PyUnicode_FromString("new data frame inside a fragmented message");
    case SP_LENGTH_MSB:
        return PyUnicode_FromString("64-bit payload length with the MSB set");
    case SP_FRAGMENTED_CONTROL:
        return PyUnicode_FromString("fragmented control frame");
    case SP_CONTROL_TOO_LONG:
        return PyUnicode_FromString("control frame payload over 125 bytes");
    case SP_CLOSE_ONE_BYTE:
        return PyUnicode_FromString("close payload of 1 byte");
    }
    return PyUnicode_FromString("unknown error");
}

/* -- FrameTracker: the core as a Python type (for the differential tests) - */

typedef struct {
    PyObject_HEAD
    sp_tracker tracker;
} TrackerObject;

static int
Tracker_init(TrackerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":FrameTracker", kwlist))
        return -1;
    sp_tracker_init(&self->tracker);
    return 0;
}

static PyObject *
Tracker_feed(TrackerObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    sp_feed(&self->tracker, (const uint8_t *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
Tracker_feed_to_boundary(TrackerObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int64_t k = sp_feed_to_boundary(&self->tracker, (const uint8_t *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong((long long)k);
}

static PyObject *
Tracker_get_messages(TrackerObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong((unsigned long long)self->tracker.messages);
}

static PyObject *
Tracker_get_close_code(TrackerObject *self, void *closure)
{
    (void)closure;
    if (self->tracker.close_code < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong((long)self->tracker.close_code);
}

static PyObject *
Tracker_get_error(TrackerObject *self, void *closure)
{
    (void)closure;
    return sp_error_text(&self->tracker);
}

static PyObject *
Tracker_get_at_boundary(TrackerObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(sp_at_boundary(&self->tracker));
}

static PyMethodDef Tracker_methods[] = {
    {"feed", (PyCFunction)Tracker_feed, METH_O, "Account for the next chunk of the stream."},
    {"feed_to_boundary", (PyCFunction)Tracker_feed_to_boundary, METH_O,
     "Feed up to the end of the current frame: bytes taken, or -1."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Tracker_getset[] = {
    {"messages", (getter)Tracker_get_messages, NULL, "completed data messages", NULL},
    {"close_code", (getter)Tracker_get_close_code, NULL, "of the first Close, or None", NULL},
    {"error", (getter)Tracker_get_error, NULL, "why framing was lost, or None", NULL},
    {"at_boundary", (getter)Tracker_get_at_boundary, NULL, "the next byte starts a frame", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardproxy.engine._cengine.FrameTracker",
    .tp_doc = "protocol.frames.FrameTracker in C (the C relay embeds its core).",
    .tp_basicsize = sizeof(TrackerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tracker_init,
    .tp_methods = Tracker_methods,
    .tp_getset = Tracker_getset,
};

/* -- the module ----------------------------------------------------------- */

static struct PyModuleDef cengine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardproxy.engine._cengine",
    .m_doc = "The compiled data path (see the C source's head comment).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__cengine(void)
{
    if (PyType_Ready(&TrackerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&cengine_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&TrackerType);
    if (PyModule_AddObject(module, "FrameTracker", (PyObject *)&TrackerType) < 0) {
        Py_DECREF(&TrackerType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "TRACKER_BYTES", (long)sizeof(sp_tracker)) < 0
        || sp_http_add(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
