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
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

#include "_chandshake.h"
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

/* -- the relay (engine/relay.py's RelayEngine) ------------------------------
 *
 * Every established tunnel of a worker in one epoll set, with the Python
 * engine's semantics line for line (its module notes say why each step is
 * as it is); the functions below name the Python methods they mirror. What
 * differs, and why:
 *
 * - A tunnel is one C struct (sp_tunnel, 216 bytes with both directions'
 *   frame trackers and the owner's note) and two slots of a table indexed
 *   by descriptor; parked bytes, a held Pong header and the Close frames of
 *   a closing tunnel live in separate allocations that exist only while
 *   they are needed.
 * - An ended tunnel is marked dead and freed when the call into the engine
 *   returns (sp_sweep), never in the middle of handling it: every step
 *   checks t->dead where the Python one checks self._alive(t).
 * - The end of a tunnel is recorded in a list (token, outcome, both
 *   directions' figures, duration) that the Python side takes after each
 *   call (Relay.take_closed) and hands to TunnelEvents.tunnel_closed: the
 *   events come in batches and no Python runs inside the per-event path.
 * - The ping round sweeps the descriptor table evenly over the interval
 *   (descriptor i of the n there were when the round began is due at
 *   start + interval * i / n) instead of a list of the round's tunnels: no
 *   memory per tunnel, and the same bound (a tunnel is pinged within two
 *   intervals of its start, then once per interval).
 * - Written Pings are checked from a FIFO, not a heap: every check is due
 *   ``timeout`` after it was queued, so queue order is due order.
 * - FIN and RST go out with shutdown(2) and setsockopt(2) on the descriptor:
 *   no socket object, so no getsockname. The last direction's FIN goes out
 *   with the close itself (sp_shut).
 * - A backend the attached handshaker hands over stays in the set with the
 *   handshaker's data, and add() modifies its registration (one epoll_ctl,
 *   not a DEL then an ADD); one nobody takes is removed before the next
 *   round (sp_handshaker_claim, _settle).
 * - The ordinary ends of tunnels added with a summary form are counted per
 *   token and their access lines written here (sp_ends).
 * - An allocation that fails ends that tunnel (both sides reset, outcome
 *   INTERNAL_ERROR) and is counted (Relay.internal_errors), which the Python
 *   side reports as relay_error().
 * - The set also holds an eventfd (Relay.poke) and a timerfd (Relay.wake_at:
 *   the owner's next timer, so that its sleep needs no trio cancel scope),
 *   and can hold the host loop's own epoll descriptor (Relay.host: trio's).
 *   Relay.serve then waits in epoll_wait itself, the GIL released, and
 *   serves rounds until the owner has something to take or to do (an ended
 *   tunnel, a handshake event, the timer, the host's I/O): the worker's loop
 *   in C (engine/trio_host.py).
 */

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SP_BUFFER 65536
#define SP_MAX_EVENTS 1024
#define SP_HOST ((uint64_t)2 << 32)  /* Relay.host's descriptor, in the event's data */
#define SP_PING_BATCH 0.01   /* seconds: a round's pings go out in batches */
#define SP_PING_DUE (-1.0)   /* ping_sent: our Ping waits for frame boundaries */
#define SP_FD_BITS 32

enum { SP_OPEN = 0, SP_SHUT = 1, SP_CLOSING = 2 };     /* sp_flow.state */
#define SP_FOREIGN 0x80       /* sp_flow.mask: in the set with the handshaker's data */
enum { SP_INJ_NONE = 0, SP_INJ_PING, SP_INJ_CLOSE };   /* sp_flow.inject */
/* Outcomes: indexes into the tuple of names the Python side passes in. */
enum { SP_CLOSED = 0, SP_CLIENT_RESET, SP_BACKEND_RESET, SP_STOPPED, SP_DRAINED,
       SP_PING_TIMEOUT, SP_INTERNAL_ERROR, SP_OUTCOMES };

typedef struct {
    uint32_t len, off;        /* data[off:off + len] waits for dst */
    uint8_t data[];
} sp_parked;

typedef struct {
    sp_tracker tr;
    uint64_t nbytes;
    sp_parked *parked;        /* NULL: nothing waits (Flow.parked is None) */
    uint32_t close_order;     /* 0 until a Close went by (Flow.close_order) */
    int32_t src;
    uint8_t state, mask, inject;
} sp_flow;

#define SP_MAX_CLOSE 135      /* 2 + 4 (mask) + 2 (code) + 123 (reason), with room */
#define SP_MAX_HELD 64        /* a Pong of ours cut short: header + 27 bytes */

typedef struct {              /* what few tunnels need at a time */
    uint8_t held_len, close_len[2];
    uint8_t held[SP_MAX_HELD];
    uint8_t close[2][SP_MAX_CLOSE];  /* [0] to the client, [1] to the backend */
} sp_extra;

#define SP_NOTE_BYTES 37      /* engine/api.py's NOTE_BYTES */

/* Ends told in summaries (Relay.summarize, engine/api.py's EndSummary): the
 * tunnels of one token that ended the ordinary way since the owner last
 * took them, counted together, and their access lines written here from
 * the token's form (worker/access.py's summary_form), so that such an end
 * costs the owner no Python call of its own. */
#define SP_MAX_BOUNDS 32      /* of the durations' histogram */
#define SP_MAX_BAD 8          /* Close codes that make an end not ordinary */
#define SP_MAX_SUMMARIES 64   /* tokens per take; the next one's ends go one by one */
#define SP_FORM_SEGMENTS 14   /* a form: the texts around a line's 13 slots */
#define SP_SLOTS_ROOM 256     /* the 13 slots' texts take at most this */
#define SP_ATOMIC_WRITE 4096  /* logs.ATOMIC_WRITE (PIPE_BUF): a chunk of whole lines */

typedef struct {
    PyObject *token;          /* owned */
    uint64_t n;
    uint64_t outcomes[7];     /* per outcome (SP_OUTCOMES) */
    uint64_t bytes[2], messages[2];
    double seconds_sum;
    uint64_t buckets[SP_MAX_BOUNDS + 1];
} sp_summary;

typedef struct {
    uint8_t on;               /* Relay.summarize was called */
    int nbounds, nbad;
    double bounds[SP_MAX_BOUNDS];
    int32_t bad[SP_MAX_BAD];
    sp_summary *sums;
    size_t nsums, capsums;
    char *lines;              /* whole access lines, not taken yet */
    size_t lines_len, lines_cap;
    size_t *cuts;             /* where each chunk but the last ends */
    size_t ncuts, capcuts, chunk_at;
} sp_ends;

typedef struct sp_tunnel {
    sp_flow up, down;         /* client → backend, backend → client */
    PyObject *token;          /* owned; moves into the closed record */
    double started, ping_sent;
    sp_extra *x;
    PyObject *form;           /* owned: its end may be summarized (Relay.summarize); or NULL */
    uint8_t closing, dead;
    uint8_t note_len;         /* the owner's note (TunnelEngine.add) */
    uint8_t note[SP_NOTE_BYTES];
} sp_tunnel;

typedef struct {
    uint64_t id;
    uint64_t seen;            /* client bytes when the Ping was written, or last looked at */
    double sent, due;
} sp_check;

typedef struct {
    PyObject_HEAD
    int epfd;
    int wake_fd;              /* eventfd in the set: Relay.poke wakes a timerless sleep */
    int timer_fd;             /* timerfd in the set: Relay.wake_at's time makes it readable */
    double armed;             /* the time timer_fd is set for; 0: none, or it went off */
    int host_fd;              /* Relay.host's descriptor (trio's epoll set), or -1 */
    uint8_t woken;            /* serve: the timer or a poke went off in this round */
    uint8_t host_ready;       /* serve: host_fd is readable */
    PyObject *handshaker;     /* sharing the set (Relay.attach): its events are its own */
    sp_tunnel **by_fd;        /* both descriptors of every tunnel */
    uint32_t *uses;           /* per client descriptor: tunnels it carried */
    size_t cap;
    size_t count;
    uint8_t *buf;             /* one read buffer for every tunnel; + room for a held header */
    PyObject *closed;         /* list of the ends not taken yet */
    PyObject *outcomes;       /* tuple of SP_OUTCOMES names */
    sp_tunnel **dead;         /* ended in this call, freed by sp_sweep */
    size_t ndead, capdead;
    double interval, timeout;
    double round_start;
    size_t round_next, round_n;
    sp_check *checks;         /* FIFO ring */
    size_t check_head, check_len, check_cap;
    uint8_t ping[2 + 125];
    size_t ping_len;
    uint8_t payload[125];
    size_t payload_len;
    uint32_t close_seq;
    uint64_t internal_errors;
    uint64_t errors_seen;     /* internal_errors when the owner last took the ends */
    sp_ends ends;             /* the summarized ends not taken yet (Relay.summarize) */
} Relay;

static double
sp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int sp_finish(Relay *e, sp_tunnel *t, int outcome);

static inline sp_flow *
sp_other(sp_tunnel *t, sp_flow *f)
{
    return f == &t->up ? &t->down : &t->up;
}

static inline int
sp_dst(sp_tunnel *t, sp_flow *f)
{
    return sp_other(t, f)->src;
}

static inline int
sp_reading(const sp_flow *f)
{
    return f->state != SP_SHUT && f->parked == NULL;
}

static inline uint64_t
sp_id(Relay *e, sp_tunnel *t)
{
    uint32_t fd = (uint32_t)t->up.src;
    return (uint64_t)e->uses[fd] << SP_FD_BITS | fd;
}

static sp_tunnel *
sp_lookup(Relay *e, uint64_t id)
{
    uint64_t fd = id & 0xFFFFFFFFu;
    if (fd >= e->cap)
        return NULL;
    sp_tunnel *t = e->by_fd[fd];
    if (t == NULL || t->dead || (uint64_t)t->up.src != fd || e->uses[fd] != id >> SP_FD_BITS)
        return NULL;
    return t;
}

/* Flow.feed with the _close_seen hook: number the first Close. */
static void
sp_flow_feed(Relay *e, sp_flow *f, const uint8_t *data, size_t n)
{
    int had = f->tr.close_code >= 0;
    sp_feed(&f->tr, data, n);
    if (!had && f->tr.close_code >= 0)
        f->close_order = ++e->close_seq;
}

static int64_t
sp_flow_to_boundary(Relay *e, sp_flow *f, const uint8_t *data, size_t n)
{
    int had = f->tr.close_code >= 0;
    int64_t k = sp_feed_to_boundary(&f->tr, data, n);
    if (!had && f->tr.close_code >= 0)
        f->close_order = ++e->close_seq;
    return k;
}

static void
sp_internal(Relay *e, sp_tunnel *t)
{
    e->internal_errors++;
    sp_finish(e, t, SP_INTERNAL_ERROR);
}

/* RelayEngine._update */
static void
sp_update(Relay *e, sp_tunnel *t)
{
    sp_flow *flows[2] = {&t->up, &t->down};
    for (int i = 0; i < 2; i++) {
        sp_flow *src = flows[i], *other = flows[1 - i];
        uint8_t mask = (uint8_t)((sp_reading(src) ? EPOLLIN : 0) | (other->parked ? EPOLLOUT : 0));
        if (mask == src->mask)
            continue;
        /* EPOLLRDHUP with EPOLLIN: a read that finds the peer's FIN behind
         * its data sees the EOF at once (sp_pump), not a round later. */
        uint32_t events = mask & EPOLLIN ? mask | EPOLLRDHUP : mask;
        struct epoll_event ev = {.events = events, .data = {.u64 = (uint32_t)src->src}};
        int op = src->mask == 0 ? EPOLL_CTL_ADD : mask == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
        if (epoll_ctl(e->epfd, op, src->src, &ev) < 0) {
            sp_internal(e, t);
            return;
        }
        src->mask = mask;
    }
}

/* Park data[0:n] after whatever is parked already (RelayEngine._write's
 * rest, and _send_more). */
static int
sp_park(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    sp_parked *old = f->parked;
    size_t have = old ? old->len : 0;
    sp_parked *p = malloc(sizeof(sp_parked) + have + n);
    if (p == NULL) {
        sp_internal(e, t);
        return -1;
    }
    if (old)
        memcpy(p->data, old->data + old->off, have);
    memcpy(p->data + have, data, n);
    p->off = 0;
    p->len = (uint32_t)(have + n);
    free(old);
    f->parked = p;
    return 0;
}

/* RelayEngine._write (nothing parked on f); flags: send's, besides MSG_NOSIGNAL. */
static void
sp_send(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n, int flags)
{
    ssize_t w = send(sp_dst(t, f), data, n, MSG_NOSIGNAL | flags);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            sp_finish(e, t, f == &t->up ? SP_BACKEND_RESET : SP_CLIENT_RESET);
            return;
        }
        w = 0;
    }
    if ((size_t)w < n && sp_park(e, t, f, data + w, n - (size_t)w) == 0)
        sp_update(e, t);
}

static void
sp_write(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    sp_send(e, t, f, data, n, 0);
}

/* RelayEngine._send_more */
static void
sp_send_more(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    if (n == 0)
        return;
    if (f->parked)
        sp_park(e, t, f, data, n);
    else
        sp_write(e, t, f, data, n);
}

static inline int
sp_client_between_frames(sp_tunnel *t)
{
    return sp_at_boundary(&t->up.tr) && !(t->x && t->x->held_len);
}

/* RelayEngine._may_inject */
static inline int
sp_may_inject(sp_tunnel *t, sp_flow *f)
{
    if (!f->inject || !sp_at_boundary(&f->tr))
        return 0;
    return f->inject != SP_INJ_PING || sp_client_between_frames(t);
}

static void
sp_check_push(Relay *e, uint64_t id, uint64_t seen, double sent, double due)
{
    if (e->check_len == e->check_cap) {
        size_t cap = e->check_cap ? e->check_cap * 2 : 256;
        sp_check *ring = malloc(cap * sizeof(sp_check));
        if (ring == NULL) {
            e->internal_errors++;  /* the Ping goes unchecked: the tunnel lives on */
            return;
        }
        for (size_t i = 0; i < e->check_len; i++)
            ring[i] = e->checks[(e->check_head + i) % e->check_cap];
        free(e->checks);
        e->checks = ring;
        e->check_head = 0;
        e->check_cap = cap;
    }
    e->checks[(e->check_head + e->check_len) % e->check_cap] =
        (sp_check){.id = id, .seen = seen, .sent = sent, .due = due};
    e->check_len++;
}

/* RelayEngine._inject */
static void
sp_inject(Relay *e, sp_tunnel *t, sp_flow *f)
{
    int kind = f->inject;
    f->inject = SP_INJ_NONE;
    if (kind == SP_INJ_PING) {
        double now = sp_now();
        t->ping_sent = now;
        sp_check_push(e, sp_id(e, t), t->up.nbytes, now, now + e->timeout);
        sp_write(e, t, f, e->ping, e->ping_len);
        return;
    }
    f->state = SP_CLOSING;
    int i = f == &t->up;
    sp_write(e, t, f, t->x->close[i], t->x->close_len[i]);
}

/* RelayEngine._check_closed */
static void
sp_check_closed(Relay *e, sp_tunnel *t)
{
    sp_flow *flows[2] = {&t->up, &t->down};
    for (int i = 0; i < 2; i++) {
        sp_flow *f = flows[i];
        if (f->inject || f->parked)
            return;
        if (f->state != SP_SHUT && f->tr.close_code < 0)
            return;
    }
    sp_finish(e, t, SP_DRAINED);
}

/* RelayEngine._write_to_boundary */
static int64_t
sp_write_to_boundary(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    int64_t k = sp_flow_to_boundary(e, f, data, n);
    if (k < 0) {
        sp_write(e, t, f, data, n);
        return -1;
    }
    if (k) {
        sp_write(e, t, f, data, (size_t)k);
        if (t->dead)
            return -1;
    }
    return k;
}

/* RelayEngine._pump_closing */
static void
sp_pump_closing(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    if (f->state == SP_CLOSING) {
        sp_flow_feed(e, f, data, n);
    } else if (!f->inject) {
        sp_flow_feed(e, f, data, n);
        sp_write(e, t, f, data, n);
        return;
    } else {
        int64_t k = sp_write_to_boundary(e, t, f, data, n);
        if (k < 0)
            return;
        sp_flow_feed(e, f, data + k, n - (size_t)k);  /* the dropped rest */
        if (!f->parked) {
            sp_inject(e, t, f);
            if (t->dead)
                return;
        } else {
            f->state = SP_CLOSING;  /* sp_flush writes our Close after the parked bytes */
        }
    }
    sp_check_closed(e, t);
}

/* RelayEngine._pump_ping */
static void
sp_pump_ping(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    if (!sp_client_between_frames(t)) {
        sp_flow_feed(e, f, data, n);
        sp_write(e, t, f, data, n);
        return;
    }
    int64_t k = sp_write_to_boundary(e, t, f, data, n);
    if (k < 0)
        return;
    if (!f->parked) {
        sp_inject(e, t, f);
        if (t->dead)
            return;
    }
    if ((size_t)k < n) {
        sp_flow_feed(e, f, data + k, n - (size_t)k);
        sp_send_more(e, t, f, data + k, n - (size_t)k);
    }
}

/* RelayEngine._pump_before_ping */
static void
sp_pump_before_ping(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *data, size_t n)
{
    sp_flow_feed(e, f, data, n);
    sp_write(e, t, f, data, n);
    if (!t->dead && !t->down.parked && sp_may_inject(t, &t->down))
        sp_inject(e, t, &t->down);
}

/* protocol.frames.peek_frame: 1 with the frame's opcode, header and
 * payload length, 0 while its header is not all there. */
static int
sp_peek(const uint8_t *data, size_t pos, size_t n, int *opcode, size_t *header, uint64_t *length)
{
    size_t avail = n - pos;
    if (avail < 2)
        return 0;
    uint8_t b1 = data[pos + 1];
    uint64_t len = b1 & SP_LENGTH;
    size_t head = (b1 & SP_MASK) ? 6 : 2;
    if (len >= 126) {
        size_t ext = len == 126 ? 2 : 8;
        if (avail < head + ext)
            return 0;
        len = 0;
        for (size_t i = 0; i < ext; i++)
            len = len << 8 | data[pos + 2 + i];
        head += ext;
    } else if (avail < head) {
        return 0;
    }
    *opcode = data[pos] & SP_OPCODE;
    *header = head;
    *length = len;
    return 1;
}

static int
sp_hold(Relay *e, sp_tunnel *t, const uint8_t *data, size_t n)
{
    if (n > SP_MAX_HELD) {  /* cannot happen (Relay_init bounds the payload): never overrun */
        sp_internal(e, t);
        return -1;
    }
    if (t->x == NULL) {
        t->x = calloc(1, sizeof(sp_extra));
        if (t->x == NULL) {
            sp_internal(e, t);
            return -1;
        }
    }
    memmove(t->x->held, data, n);  /* data may be the held bytes themselves */
    t->x->held_len = (uint8_t)n;
    return 0;
}

/* RelayEngine._pump_pong: from the client while our Ping is unanswered. */
static void
sp_pump_pong(Relay *e, sp_tunnel *t, sp_flow *f, const uint8_t *chunk, size_t n)
{
    const uint8_t *data = chunk;
    if (t->x && t->x->held_len) {
        /* e->buf has SP_MAX_HELD bytes of room before the chunk (sp_pump
         * reads at e->buf + SP_MAX_HELD) */
        size_t h = t->x->held_len;
        memcpy((uint8_t *)chunk - h, t->x->held, h);
        data = chunk - h;
        n += h;
        t->x->held_len = 0;
    }
    size_t pos = 0, start = 0;
    while (pos < n) {
        if (!sp_at_boundary(&f->tr)) {
            int64_t k = sp_flow_to_boundary(e, f, data + pos, n - pos);
            pos = k < 0 ? n : pos + (size_t)k;
            continue;
        }
        int opcode;
        size_t header;
        uint64_t length;
        if (!sp_peek(data, pos, n, &opcode, &header, &length)) {
            if (sp_hold(e, t, data + pos, n - pos) < 0)
                return;
            n = pos;
            break;
        }
        uint64_t end = (uint64_t)pos + header + length;
        if (opcode == SP_PONG && length == e->payload_len) {
            if (end > n) {
                if (sp_hold(e, t, data + pos, n - pos) < 0)
                    return;
                n = pos;
                break;
            }
            int ours = 1;
            const uint8_t *p = data + pos + header;
            const uint8_t *key = (data[pos + 1] & SP_MASK) ? p - 4 : NULL;
            for (size_t i = 0; i < length && ours; i++)
                ours = (uint8_t)(p[i] ^ (key ? key[i % 4] : 0)) == e->payload[i];
            if (ours) {
                sp_send_more(e, t, f, data + start, pos - start);
                if (t->dead)
                    return;
                sp_flow_feed(e, f, data + pos, (size_t)(end - pos));  /* counted, not passed on */
                t->ping_sent = 0.0;
                sp_flow_feed(e, f, data + end, n - (size_t)end);
                start = (size_t)end;
                break;
            }
        }
        size_t stop = end < n ? (size_t)end : n;
        sp_flow_feed(e, f, data + pos, stop - pos);
        pos = stop;
    }
    if (!t->dead && n > start)
        sp_send_more(e, t, f, data + start, n - start);
}

/* RelayEngine._shut: pass the source's FIN on. */
static void
sp_shut(Relay *e, sp_tunnel *t, sp_flow *f)
{
    f->state = SP_SHUT;
    f->inject = SP_INJ_NONE;
    if (f == &t->down && t->ping_sent == SP_PING_DUE)
        t->ping_sent = 0.0;
    if (f == &t->up && t->x && t->x->held_len) {  /* an unfinished frame: the client's last bytes */
        uint8_t held[SP_MAX_HELD];
        size_t h = t->x->held_len;
        memcpy(held, t->x->held, h);
        t->x->held_len = 0;
        sp_send_more(e, t, f, held, h);
        if (t->dead)
            return;
    }
    if (t->up.state == SP_SHUT && t->down.state == SP_SHUT) {
        /* The last direction: sp_finish's close sends this FIN (every byte
         * of both sources was read, so close cannot reset), one call fewer. */
        sp_finish(e, t, t->closing ? SP_DRAINED : SP_CLOSED);
        return;
    }
    shutdown(sp_dst(t, f), SHUT_WR);  /* an error: the destination is gone, its events end it */
    if (t->closing) {
        sp_check_closed(e, t);
        if (!t->dead)
            sp_update(e, t);
    } else {
        sp_update(e, t);
    }
}

/* RelayEngine._pump: one read from the flow's source. */
static void
sp_pump(Relay *e, sp_tunnel *t, sp_flow *f, uint32_t ev)
{
    uint8_t *chunk = e->buf + SP_MAX_HELD;
    ssize_t got = read(f->src, chunk, SP_BUFFER);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        sp_finish(e, t, f == &t->up ? SP_CLIENT_RESET : SP_BACKEND_RESET);
        return;
    }
    if (got == 0) {
        sp_shut(e, t, f);
        return;
    }
    size_t n = (size_t)got;
    f->nbytes += n;
    if (t->closing) {
        sp_pump_closing(e, t, f, chunk, n);
    } else if (f->inject) {
        sp_pump_ping(e, t, f, chunk, n);
    } else if (t->ping_sent != 0.0 && f == &t->up) {
        if (t->ping_sent == SP_PING_DUE)
            sp_pump_before_ping(e, t, f, chunk, n);
        else
            sp_pump_pong(e, t, f, chunk, n);
    } else {
        /* The peer's FIN came behind these bytes (a Close frame, then the
         * FIN: how clients and backends end; a short read took every byte
         * before it): the next read is its EOF, so read it now, not a
         * round later, and let the bytes wait for our FIN (MSG_MORE) so
         * that both go out in one segment, a wake-up less for the peer. */
        int fin_behind = (ev & EPOLLRDHUP) && n < SP_BUFFER;
        sp_flow_feed(e, f, chunk, n);
        sp_send(e, t, f, chunk, n, fin_behind ? MSG_MORE : 0);
        /* Not reading: a part was parked, and its flush (no MSG_MORE)
         * pushes it all before the FIN is read. */
        if (fin_behind && !t->dead && sp_reading(f))
            sp_pump(e, t, f, 0);
    }
}

/* RelayEngine._flush */
static void
sp_flush(Relay *e, sp_tunnel *t, sp_flow *f)
{
    sp_parked *p = f->parked;
    ssize_t w = send(sp_dst(t, f), p->data + p->off, p->len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            sp_finish(e, t, f == &t->up ? SP_BACKEND_RESET : SP_CLIENT_RESET);
            return;
        }
        w = 0;
    }
    if ((size_t)w < p->len) {
        p->off += (uint32_t)w;
        p->len -= (uint32_t)w;
        return;
    }
    free(p);
    f->parked = NULL;
    if (f->inject && (f->state == SP_CLOSING || sp_may_inject(t, f))) {
        sp_inject(e, t, f);
        if (t->dead)
            return;
    }
    if (t->closing) {
        sp_check_closed(e, t);
        if (t->dead)
            return;
    }
    sp_update(e, t);
}

/* RelayEngine._dispatch */
static void
sp_dispatch(Relay *e, int fd, uint32_t ev)
{
    sp_tunnel *t = (size_t)fd < e->cap ? e->by_fd[fd] : NULL;
    if (t == NULL || t->dead) {  /* ended earlier in this round, or the poke */
        if (fd == e->wake_fd) {
            eventfd_t count;
            (void)eventfd_read(fd, &count);
            e->woken = 1;
        } else if (fd == e->timer_fd) {
            uint64_t expirations;
            if (read(fd, &expirations, sizeof expirations) > 0)
                e->armed = 0;
            e->woken = 1;
        }
        return;
    }
    sp_flow *src = fd == t->up.src ? &t->up : &t->down;
    sp_flow *into = sp_other(t, src);  /* the flow whose destination is fd */
    if (into->parked && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        sp_flush(e, t, into);
        if (t->dead)
            return;
    }
    if (sp_reading(src)) {
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
            sp_pump(e, t, src, ev);
    } else if (ev & EPOLLERR) {
        /* paused or finished, and the socket failed */
        sp_finish(e, t, src == &t->up ? SP_CLIENT_RESET : SP_BACKEND_RESET);
    }
}

static PyObject *
sp_flow_stats(const sp_flow *f)
{
    PyObject *code = f->tr.close_code >= 0 ? PyLong_FromLong(f->tr.close_code) : Py_NewRef(Py_None);
    PyObject *error = sp_error_text(&f->tr);
    PyObject *r = NULL;
    if (code && error)
        r = Py_BuildValue("(KKOIO)", (unsigned long long)f->nbytes,
                          (unsigned long long)f->tr.messages, code, f->close_order, error);
    Py_XDECREF(code);
    Py_XDECREF(error);
    return r;
}

static void
sp_reset(int fd)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

/* -- ends told in summaries (see sp_ends) --------------------------------- */

/* Whether an end is ordinary, so that its summary and line say all the
 * owner's tunnel_closed would (worker/process.py): not a ping timeout (its
 * own event), both framings intact, neither Close code a bad-stream one
 * (error_by), and a note holding the client's address and no forwarded
 * one (the line's addresses come from the note alone). */
static int
sp_ordinary(const sp_ends *ends, const sp_tunnel *t, int outcome)
{
    if (outcome == SP_PING_TIMEOUT || t->note_len < 5)
        return 0;
    unsigned client = t->note[0] >> 2;
    if ((client != 1 && client != 2) || (t->note[0] & 3) != 0
        || t->note_len != 5 + (client == 1 ? 4 : 16))
        return 0;
    if (t->up.tr.error != SP_OK || t->down.tr.error != SP_OK)
        return 0;
    for (int i = 0; i < ends->nbad; i++)
        if (t->up.tr.close_code == ends->bad[i] || t->down.tr.close_code == ends->bad[i])
            return 0;
    return 1;
}

static char *
sp_put(char *at, PyObject *segment)
{
    Py_ssize_t n = PyBytes_GET_SIZE(segment);
    memcpy(at, PyBytes_AS_STRING(segment), (size_t)n);
    return at + n;
}

static char *
sp_put_code(char *at, int32_t code)
{
    if (code < 0) {
        memcpy(at, "null", 4);
        return at + 4;
    }
    return at + sprintf(at, "%d", (int)code);
}

/* The line of worker/access.py's write for an ordinary end, into out (room:
 * the form's segments and SP_SLOTS_ROOM): the form's segments around the
 * slots in write()'s order (@timestamp, client address and port, source
 * port, outcome, bytes and messages up and down, both Close codes, the
 * event's outcome, the duration), @timestamp that of ``now`` (time.time()'s
 * seconds) as logs._timestamp writes it. Returns the line's length. */
static size_t
sp_render(char *out, PyObject *form, const uint8_t *note, PyObject *outcome, int success,
          const sp_flow *up, const sp_flow *down, double duration, double now)
{
    static time_t second = -1;
    static char second_text[32];
    char *at = out;
    at = sp_put(at, PyTuple_GET_ITEM(form, 0));
    time_t whole = (time_t)now;  /* int(now): now is after 1970 */
    if (whole != second) {
        struct tm tm;
        gmtime_r(&whole, &tm);
        snprintf(second_text, sizeof(second_text), "%04d-%02d-%02dT%02d:%02d:%02d",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        second = whole;
    }
    at += sprintf(at, "%s.%03dZ", second_text, (int)((now - (double)whole) * 1000));
    at = sp_put(at, PyTuple_GET_ITEM(form, 1));
    inet_ntop((note[0] >> 2) == 2 ? AF_INET6 : AF_INET, note + 5, at, INET6_ADDRSTRLEN);
    at += strlen(at);
    at = sp_put(at, PyTuple_GET_ITEM(form, 2));
    at += sprintf(at, "%d", note[1] << 8 | note[2]);
    at = sp_put(at, PyTuple_GET_ITEM(form, 3));
    at += sprintf(at, "%d", note[3] << 8 | note[4]);
    at = sp_put(at, PyTuple_GET_ITEM(form, 4));
    Py_ssize_t n;
    const char *name = PyUnicode_AsUTF8AndSize(outcome, &n);  /* ASCII, cached by the str */
    if (name == NULL) {  /* cannot fail for the outcomes' names: ASCII */
        PyErr_Clear();
        n = 0;
    }
    memcpy(at, name, (size_t)n);
    at += n;
    at = sp_put(at, PyTuple_GET_ITEM(form, 5));
    at += sprintf(at, "%llu", (unsigned long long)up->nbytes);
    at = sp_put(at, PyTuple_GET_ITEM(form, 6));
    at += sprintf(at, "%llu", (unsigned long long)down->nbytes);
    at = sp_put(at, PyTuple_GET_ITEM(form, 7));
    at += sprintf(at, "%llu", (unsigned long long)up->tr.messages);
    at = sp_put(at, PyTuple_GET_ITEM(form, 8));
    at += sprintf(at, "%llu", (unsigned long long)down->tr.messages);
    at = sp_put(at, PyTuple_GET_ITEM(form, 9));
    at = sp_put_code(at, up->tr.close_code);
    at = sp_put(at, PyTuple_GET_ITEM(form, 10));
    at = sp_put_code(at, down->tr.close_code);
    at = sp_put(at, PyTuple_GET_ITEM(form, 11));
    memcpy(at, success ? "success" : "failure", 7);
    at += 7;
    at = sp_put(at, PyTuple_GET_ITEM(form, 12));
    at += sprintf(at, "%lld", (long long)(duration * 1e9));  /* int(): toward zero, as C's cast */
    at = sp_put(at, PyTuple_GET_ITEM(form, 13));
    return (size_t)(at - out);
}

/* time.time(): the realtime clock's nanoseconds over 1e9, in a double. */
static double
sp_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9;
}

static size_t
sp_form_bytes(PyObject *form)
{
    size_t n = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(form); i++)
        n += (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(form, i));
    return n;
}

/* A form is () (no line: the owner writes none for these tunnels) or
 * SP_FORM_SEGMENTS bytes objects. */
static int
sp_form_valid(PyObject *form)
{
    if (!PyTuple_Check(form))
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(form);
    if (n != 0 && n != SP_FORM_SEGMENTS)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(form, i)))
            return 0;
    return 1;
}

static sp_summary *
sp_summary_of(sp_ends *ends, PyObject *token)
{
    for (size_t i = ends->nsums; i-- > 0;)
        if (ends->sums[i].token == token)
            return &ends->sums[i];
    if (ends->nsums == SP_MAX_SUMMARIES)
        return NULL;
    if (ends->nsums == ends->capsums) {
        size_t cap = ends->capsums ? ends->capsums * 2 : 8;
        sp_summary *sums = realloc(ends->sums, cap * sizeof(sp_summary));
        if (sums == NULL)
            return NULL;
        ends->sums = sums;
        ends->capsums = cap;
    }
    sp_summary *s = &ends->sums[ends->nsums++];
    memset(s, 0, sizeof(*s));
    s->token = Py_NewRef(token);
    return s;
}

/* Room for one more line of ``form`` in ends->lines (and a chunk's cut). */
static int
sp_line_room(sp_ends *ends, PyObject *form)
{
    size_t need = ends->lines_len + sp_form_bytes(form) + SP_SLOTS_ROOM;
    if (need > ends->lines_cap) {
        size_t cap = ends->lines_cap ? ends->lines_cap : SP_ATOMIC_WRITE * 4;
        while (cap < need)
            cap *= 2;
        char *lines = realloc(ends->lines, cap);
        if (lines == NULL)
            return -1;
        ends->lines = lines;
        ends->lines_cap = cap;
    }
    if (ends->ncuts == ends->capcuts) {
        size_t cap = ends->capcuts ? ends->capcuts * 2 : 16;
        size_t *cuts = realloc(ends->cuts, cap * sizeof(size_t));
        if (cuts == NULL)
            return -1;
        ends->cuts = cuts;
        ends->capcuts = cap;
    }
    return 0;
}

/* Count an ordinary end in its token's summary and write its line; -1 (and
 * nothing done) when there is no room: the end then goes alone. */
static int
sp_summarize(Relay *e, sp_tunnel *t, int outcome, double duration)
{
    sp_ends *ends = &e->ends;
    PyObject *form = t->form;
    int lined = PyTuple_GET_SIZE(form) != 0;
    if (lined && sp_line_room(ends, form) < 0)
        return -1;
    sp_summary *s = sp_summary_of(ends, t->token);
    if (s == NULL)
        return -1;
    if (lined) {
        int success = outcome == SP_CLOSED || outcome == SP_DRAINED;
        size_t n = sp_render(ends->lines + ends->lines_len, form, t->note,
                             PyTuple_GET_ITEM(e->outcomes, outcome), success, &t->up, &t->down,
                             duration, sp_wall());
        if (ends->lines_len > ends->chunk_at
            && ends->lines_len + n - ends->chunk_at > SP_ATOMIC_WRITE) {
            ends->cuts[ends->ncuts++] = ends->lines_len;
            ends->chunk_at = ends->lines_len;
        }
        ends->lines_len += n;
    }
    s->n++;
    s->outcomes[outcome]++;
    s->bytes[0] += t->up.nbytes;
    s->bytes[1] += t->down.nbytes;
    s->messages[0] += t->up.tr.messages;
    s->messages[1] += t->down.tr.messages;
    s->seconds_sum += duration;
    int b = 0;  /* bisect_left(bounds, duration), as BucketCounts.observe */
    while (b < ends->nbounds && ends->bounds[b] < duration)
        b++;
    s->buckets[b]++;
    return 0;
}

static int
sp_summaries_waiting(const sp_ends *ends)
{
    return ends->nsums > 0 || ends->lines_len > 0;
}

static void
sp_ends_free(sp_ends *ends)
{
    for (size_t i = 0; i < ends->nsums; i++)
        Py_DECREF(ends->sums[i].token);
    free(ends->sums);
    free(ends->lines);
    free(ends->cuts);
    memset(ends, 0, sizeof(*ends));
}

/* RelayEngine._finish: close both sockets (an abort passed on as an
 * abort) and record the end. Always returns -1. */
static int
sp_finish(Relay *e, sp_tunnel *t, int outcome)
{
    if (t->dead)
        return -1;
    t->dead = 1;
    e->by_fd[t->up.src] = NULL;
    e->by_fd[t->down.src] = NULL;
    e->count--;
    if (outcome == SP_CLIENT_RESET || outcome == SP_INTERNAL_ERROR)
        sp_reset(t->down.src);
    if (outcome == SP_BACKEND_RESET || outcome == SP_INTERNAL_ERROR)
        sp_reset(t->up.src);
    close(t->up.src);  /* no EPOLL_CTL_DEL first: closing removes it (epoll(7) Q6) */
    close(t->down.src);
    if (e->ndead == e->capdead) {
        size_t cap = e->capdead ? e->capdead * 2 : 64;
        sp_tunnel **d = realloc(e->dead, cap * sizeof(sp_tunnel *));
        if (d == NULL) {  /* cannot defer: nothing refers to it past this point but our callers */
            e->internal_errors++;
        } else {
            e->dead = d;
            e->capdead = cap;
        }
    }
    if (e->ndead < e->capdead)
        e->dead[e->ndead++] = t;
    double duration = sp_now() - t->started;
    if (t->form != NULL && sp_ordinary(&e->ends, t, outcome)
        && sp_summarize(e, t, outcome, duration) == 0) {
        Py_CLEAR(t->token);
        return -1;
    }
    PyObject *up = sp_flow_stats(&t->up), *down = sp_flow_stats(&t->down);
    PyObject *rec = NULL;
    if (up && down)
        rec = Py_BuildValue("(OONNdy#)", t->token, PyTuple_GET_ITEM(e->outcomes, outcome), up,
                            down, duration, (const char *)t->note, (Py_ssize_t)t->note_len);
    else {
        Py_XDECREF(up);
        Py_XDECREF(down);
    }
    if (rec == NULL || PyList_Append(e->closed, rec) < 0) {
        PyErr_Clear();
        e->internal_errors++;
    }
    Py_XDECREF(rec);
    Py_CLEAR(t->token);
    return -1;
}

static void
sp_free_tunnel(sp_tunnel *t)
{
    Py_XDECREF(t->token);
    Py_XDECREF(t->form);
    free(t->up.parked);
    free(t->down.parked);
    free(t->x);
    free(t);
}

/* Free the tunnels that ended during a call into the engine. */
static void
sp_sweep(Relay *e)
{
    for (size_t i = 0; i < e->ndead; i++)
        sp_free_tunnel(e->dead[i]);
    e->ndead = 0;
}

/* RelayEngine._schedule_ping */
static int
sp_schedule_ping(Relay *e, sp_tunnel *t)
{
    if (t->ping_sent != 0.0 || t->closing || t->down.state != SP_OPEN)
        return 0;
    t->ping_sent = SP_PING_DUE;
    t->down.inject = SP_INJ_PING;
    if (!t->down.parked && sp_may_inject(t, &t->down))
        sp_inject(e, t, &t->down);
    return 1;
}

/* RelayEngine._begin_close; the frames are built by the caller. */
static void
sp_begin_close(Relay *e, sp_tunnel *t, const uint8_t *to_client, size_t nc,
               const uint8_t *to_backend, size_t nb)
{
    if (t->closing)
        return;
    if (t->x == NULL && (t->x = calloc(1, sizeof(sp_extra))) == NULL) {
        sp_internal(e, t);
        return;
    }
    t->closing = 1;
    if (t->ping_sent == SP_PING_DUE) {  /* replaced by our Close below */
        t->ping_sent = 0.0;
        t->down.inject = SP_INJ_NONE;
    }
    memcpy(t->x->close[0], to_client, nc);
    t->x->close_len[0] = (uint8_t)nc;
    memcpy(t->x->close[1], to_backend, nb);
    t->x->close_len[1] = (uint8_t)nb;
    sp_flow *flows[2] = {&t->down, &t->up};
    for (int i = 0; i < 2; i++) {
        sp_flow *f = flows[i];
        if (f->state == SP_SHUT || f->tr.close_code >= 0)
            continue;
        f->inject = SP_INJ_CLOSE;
        if (!f->parked && sp_at_boundary(&f->tr)) {
            sp_inject(e, t, f);
            if (t->dead)
                return;
        }
    }
    sp_check_closed(e, t);
}

/* RelayEngine._ping_round: the descriptors of the round that fell due. */
static void
sp_ping_round(Relay *e, double now)
{
    if (now >= e->round_start + e->interval) {
        e->round_start = now;
        e->round_next = 0;
        e->round_n = e->cap;
    }
    while (e->round_next < e->round_n
           && e->round_start + e->interval * (double)e->round_next / (double)e->round_n <= now) {
        size_t fd = e->round_next++;
        sp_tunnel *t = fd < e->cap ? e->by_fd[fd] : NULL;
        if (t && !t->dead && (size_t)t->up.src == fd)
            sp_schedule_ping(e, t);
    }
}

/* The checks of written Pings that fell due (RelayEngine.process). */
static void
sp_ping_checks(Relay *e, double now)
{
    size_t todo = e->check_len;  /* those queued again below are due later */
    while (todo-- && e->check_len && e->checks[e->check_head].due <= now) {
        sp_check c = e->checks[e->check_head];
        e->check_head = (e->check_head + 1) % e->check_cap;
        e->check_len--;
        sp_tunnel *t = sp_lookup(e, c.id);
        if (t == NULL || t->ping_sent != c.sent)  /* ended, or answered */
            continue;
        if (t->up.nbytes != c.seen) {
            /* the client sent bytes since: alive; look again a timeout later */
            sp_check_push(e, c.id, t->up.nbytes, c.sent, now + e->timeout);
            continue;
        }
        sp_finish(e, t, SP_PING_TIMEOUT);
    }
}

/* -- the Python type over it ------------------------------------------------ */

static int
Relay_init(Relay *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"outcomes", "interval", "timeout", "ping_payload", NULL};
    PyObject *outcomes;
    Py_buffer payload;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!ddy*", kwlist, &PyTuple_Type, &outcomes,
                                     &self->interval, &self->timeout, &payload))
        return -1;
    /* A Pong of ours cut short is held whole (sp_hold): its header and
     * payload must fit SP_MAX_HELD. */
    if (PyTuple_GET_SIZE(outcomes) != SP_OUTCOMES || payload.len > SP_MAX_HELD - SP_MAX_HEADER
        || self->epfd >= 0) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError, "Relay(outcomes: 7 names, ..., ping_payload ≤ 50 bytes), once");
        return -1;
    }
    memcpy(self->payload, payload.buf, (size_t)payload.len);
    self->payload_len = (size_t)payload.len;
    PyBuffer_Release(&payload);
    self->ping[0] = SP_FIN | 0x9;
    self->ping[1] = (uint8_t)self->payload_len;
    memcpy(self->ping + 2, self->payload, self->payload_len);
    self->ping_len = 2 + self->payload_len;
    Py_INCREF(outcomes);
    self->outcomes = outcomes;
    self->closed = PyList_New(0);
    self->buf = malloc(SP_MAX_HELD + SP_BUFFER);
    if (self->closed == NULL || self->buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->round_start = -1e300;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data = {.u64 = (uint32_t)self->wake_fd}};
    if (self->wake_fd < 0 || epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    ev.data.u64 = (uint32_t)self->timer_fd;
    if (self->timer_fd < 0 || epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->timer_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *
Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self) {
        self->epfd = -1;
        self->wake_fd = -1;
        self->timer_fd = -1;
        self->host_fd = -1;
    }
    return (PyObject *)self;
}

/* RelayEngine.close: every tunnel ends (STOPPED), then the epoll set. */
static void
sp_close_all(Relay *e)
{
    for (size_t fd = 0; fd < e->cap; fd++) {
        sp_tunnel *t = e->by_fd[fd];
        if (t && (size_t)t->up.src == fd)
            sp_finish(e, t, SP_STOPPED);
    }
    sp_sweep(e);
    if (e->epfd >= 0)
        close(e->epfd);
    e->epfd = -1;
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    e->wake_fd = -1;
    if (e->timer_fd >= 0)
        close(e->timer_fd);
    e->timer_fd = -1;
}

static void
Relay_dealloc(Relay *self)
{
    if (self->closed)  /* not closed by its owner: end the tunnels quietly */
        sp_close_all(self);
    Py_XDECREF(self->closed);
    Py_XDECREF(self->outcomes);
    Py_XDECREF(self->handshaker);
    sp_ends_free(&self->ends);
    free(self->by_fd);
    free(self->uses);
    free(self->buf);
    free(self->dead);
    free(self->checks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
sp_grow(Relay *e, size_t fd)
{
    if (fd < e->cap)
        return 0;
    size_t cap = fd + 1024;
    sp_tunnel **by_fd = realloc(e->by_fd, cap * sizeof(sp_tunnel *));
    if (by_fd == NULL)
        return -1;
    e->by_fd = by_fd;
    uint32_t *uses = realloc(e->uses, cap * sizeof(uint32_t));
    if (uses == NULL)
        return -1;  /* by_fd is bigger than cap says: harmless */
    e->uses = uses;
    memset(e->by_fd + e->cap, 0, (cap - e->cap) * sizeof(sp_tunnel *));
    memset(e->uses + e->cap, 0, (cap - e->cap) * sizeof(uint32_t));
    e->cap = cap;
    return 0;
}

static int
sp_ready(Relay *e)
{
    if (e->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the relay is closed");
        return -1;
    }
    return 0;
}

/* Relay.add(client_fd, backend_fd, token, to_backend, to_client, note,
 * form=None) -> id; form: its end may be summarized (sp_ends). */
static PyObject *
Relay_add(Relay *self, PyObject *args)
{
    int cfd, bfd;
    PyObject *token, *form = Py_None;
    Py_buffer first[2], note;
    if (sp_ready(self) < 0
        || !PyArg_ParseTuple(args, "iiOy*y*y*|O", &cfd, &bfd, &token, &first[0], &first[1], &note,
                             &form))
        return NULL;
    PyObject *result = NULL;
    if (note.len > SP_NOTE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "a tunnel's note holds at most 37 bytes");
        goto done;
    }
    if (form != Py_None && (!self->ends.on || !sp_form_valid(form))) {
        PyErr_SetString(PyExc_ValueError,
                        "a summary form is () or 14 bytes segments, after Relay.summarize");
        goto done;
    }
    if (cfd < 0 || bfd < 0 || cfd == bfd) {
        PyErr_SetString(PyExc_ValueError, "two distinct descriptors");
        goto done;
    }
    if (((size_t)cfd < self->cap && self->by_fd[cfd]) || ((size_t)bfd < self->cap && self->by_fd[bfd])) {
        PyErr_SetString(PyExc_ValueError, "a descriptor of a tunnel already open");
        goto done;
    }
    sp_tunnel *t = calloc(1, sizeof(sp_tunnel));
    if (t == NULL || sp_grow(self, (size_t)(cfd > bfd ? cfd : bfd)) < 0) {
        free(t);
        PyErr_NoMemory();
        goto done;
    }
    sp_tracker_init(&t->up.tr);
    sp_tracker_init(&t->down.tr);
    t->up.src = cfd;
    t->down.src = bfd;
    t->token = Py_NewRef(token);
    t->form = form == Py_None ? NULL : Py_NewRef(form);
    t->started = sp_now();
    memcpy(t->note, note.buf, (size_t)note.len);
    t->note_len = (uint8_t)note.len;
    /* A descriptor the attached handshaker left in the set at its hand-over:
     * sp_update's first epoll_ctl is then a MOD, not an ADD after a DEL. */
    if (self->handshaker != NULL) {
        if (sp_handshaker_claim(self->handshaker, cfd))
            t->up.mask = SP_FOREIGN;
        if (sp_handshaker_claim(self->handshaker, bfd))
            t->down.mask = SP_FOREIGN;
    }
    self->uses[cfd]++;
    self->by_fd[cfd] = self->by_fd[bfd] = t;
    self->count++;
    uint64_t id = sp_id(self, t);
    sp_flow *flows[2] = {&t->up, &t->down};
    for (int i = 0; i < 2; i++) {
        size_t n = (size_t)first[i].len;
        if (n && !t->dead) {  /* a failed write ends the tunnel */
            sp_flow_feed(self, flows[i], first[i].buf, n);
            flows[i]->nbytes += n;
            sp_write(self, t, flows[i], first[i].buf, n);
        }
    }
    if (!t->dead)
        sp_update(self, t);
    sp_sweep(self);
    result = PyLong_FromUnsignedLongLong(id);
done:
    PyBuffer_Release(&first[0]);
    PyBuffer_Release(&first[1]);
    PyBuffer_Release(&note);
    return result;
}

/* One round's events, handed to their tunnels or the attached handshaker;
 * SP_HOST's (Relay.host) only noted. */
static void
sp_round(Relay *self, struct epoll_event *evs, int n)
{
    if (self->handshaker != NULL)
        sp_handshaker_settle(self->handshaker);
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        if (data & SP_HOST) {
            self->host_ready = 1;
            continue;
        }
        if (data >> 32) {  /* the attached handshaker's descriptor (SP_HS_SHARED) */
            if (self->handshaker != NULL)
                sp_handshaker_dispatch(self->handshaker, (int)(uint32_t)data);
            continue;
        }
        sp_dispatch(self, (int)data, evs[i].events);
    }
    sp_sweep(self);
}

/* Whether anything waits for take_closed (or internal_errors changed since
 * the owner last took the ends). */
static int
sp_ended(Relay *self)
{
    return PyList_GET_SIZE(self->closed) > 0 || sp_summaries_waiting(&self->ends)
           || self->internal_errors != self->errors_seen;
}

/* Whether the owner has something to take: an ended tunnel, a handshake event. */
static int
sp_owner_work(Relay *self)
{
    return sp_ended(self) || (self->handshaker != NULL && sp_handshaker_pending(self->handshaker));
}

/* Relay.poll() -> events handled: one epoll_wait(0) round. */
static PyObject *
Relay_poll(Relay *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event evs[SP_MAX_EVENTS];
    if (sp_ready(self) < 0)
        return NULL;
    int n = epoll_wait(self->epfd, evs, SP_MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    sp_round(self, evs, n);
    return PyLong_FromLong(n);
}

/* Relay.host(fd): the host loop's own epoll descriptor (trio's) in the set,
 * level-triggered, so that serve returns when the host has events. */
static PyObject *
Relay_host(Relay *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (sp_ready(self) < 0)
        return NULL;
    if (fd < 0 || fd > INT32_MAX || self->host_fd >= 0) {
        PyErr_SetString(PyExc_ValueError, "one host descriptor, not negative");
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data = {.u64 = SP_HOST | (uint32_t)fd}};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, (int)fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->host_fd = (int)fd;
    Py_RETURN_NONE;
}

/* Relay.unhost(): Relay.host undone. */
static PyObject *
Relay_unhost(Relay *self, PyObject *Py_UNUSED(ignored))
{
    if (self->host_fd >= 0 && self->epfd >= 0)
        (void)epoll_ctl(self->epfd, EPOLL_CTL_DEL, self->host_fd, NULL);
    self->host_fd = -1;
    self->host_ready = 0;
    Py_RETURN_NONE;
}

/* Relay.serve() -> whether the host has events: block in epoll_wait (the
 * GIL released) and serve rounds in C until the owner has something to
 * take, the timer (wake_at) or a poke went off, the host's descriptor
 * (Relay.host) is readable, or a signal came. The worker's loop in C: a
 * busy relay's rounds cost no Python and no pass through trio's scheduler. */
static PyObject *
Relay_serve(Relay *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event evs[SP_MAX_EVENTS];
    if (sp_ready(self) < 0)
        return NULL;
    self->woken = 0;
    self->host_ready = 0;
    for (;;) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(self->epfd, evs, SP_MAX_EVENTS, -1);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR)
                break;  /* Python's handlers run on the way out */
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sp_round(self, evs, n);
        if (self->woken || self->host_ready || sp_owner_work(self))
            break;
    }
    return PyBool_FromLong(self->host_ready);
}

/* Relay.process(now): the keepalive's timers. */
static PyObject *
Relay_process(Relay *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (sp_ready(self) < 0)
        return NULL;
    if (self->interval > 0)
        sp_ping_round(self, now);
    sp_ping_checks(self, now);
    sp_sweep(self);
    Py_RETURN_NONE;
}

/* Relay.next_wake(now) -> float | None: the keepalive's next timer. */
static PyObject *
Relay_next_wake(Relay *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    int have = 0;
    double wake = 0.0;
    if (self->check_len) {
        wake = self->checks[self->check_head].due;
        have = 1;
    }
    if (self->interval > 0) {
        double ping = self->round_next < self->round_n
            ? self->round_start + self->interval * (double)self->round_next / (double)self->round_n
            : self->round_start + self->interval;
        if (ping < now + SP_PING_BATCH)
            ping = now + SP_PING_BATCH;
        wake = have && wake < ping ? wake : ping;
        have = 1;
    }
    if (!have)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(wake);
}

static int
sp_parse_id(PyObject *arg, uint64_t *id)
{
    *id = PyLong_AsUnsignedLongLongMask(arg);
    return (*id == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *
Relay_begin_close(Relay *self, PyObject *args)
{
    PyObject *arg;
    Py_buffer to_client, to_backend;
    uint64_t id;
    if (!PyArg_ParseTuple(args, "Oy*y*", &arg, &to_client, &to_backend))
        return NULL;
    PyObject *result = NULL;
    if (to_client.len > SP_MAX_CLOSE || to_backend.len > SP_MAX_CLOSE) {
        PyErr_SetString(PyExc_ValueError, "a Close frame is at most 131 bytes");
    } else if (sp_parse_id(arg, &id) == 0) {
        sp_tunnel *t = sp_lookup(self, id);
        if (t)
            sp_begin_close(self, t, to_client.buf, (size_t)to_client.len, to_backend.buf,
                           (size_t)to_backend.len);
        sp_sweep(self);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&to_client);
    PyBuffer_Release(&to_backend);
    return result;
}

static PyObject *
Relay_ping(Relay *self, PyObject *arg)
{
    uint64_t id;
    if (sp_parse_id(arg, &id) < 0)
        return NULL;
    sp_tunnel *t = sp_lookup(self, id);
    int done = t != NULL && sp_schedule_ping(self, t);
    sp_sweep(self);
    return PyBool_FromLong(done);
}

static PyObject *
Relay_end(Relay *self, PyObject *args)
{
    PyObject *arg;
    int outcome;
    uint64_t id;
    if (!PyArg_ParseTuple(args, "Oi", &arg, &outcome) || sp_parse_id(arg, &id) < 0)
        return NULL;
    if (outcome < 0 || outcome >= SP_OUTCOMES) {
        PyErr_SetString(PyExc_ValueError, "an outcome's index");
        return NULL;
    }
    sp_tunnel *t = sp_lookup(self, id);
    if (t)
        sp_finish(self, t, outcome);
    sp_sweep(self);
    Py_RETURN_NONE;
}

/* (alive, closing) of a tunnel: closing is 1 once begin_close ran. */
static PyObject *
Relay_state(Relay *self, PyObject *arg)
{
    uint64_t id;
    if (sp_parse_id(arg, &id) < 0)
        return NULL;
    sp_tunnel *t = sp_lookup(self, id);
    return Py_BuildValue("(ii)", t != NULL, t != NULL && t->closing);
}

/* Relay.inspect(id) -> None | (seconds, up, down, parked up, parked down,
 * closing, ping (0 none, 1 due, 2 sent), at boundary up, at boundary down,
 * held, note): engine/api.py's TunnelView, in a tuple. */
static PyObject *
Relay_inspect(Relay *self, PyObject *arg)
{
    uint64_t id;
    if (sp_parse_id(arg, &id) < 0)
        return NULL;
    sp_tunnel *t = sp_lookup(self, id);
    if (t == NULL)
        Py_RETURN_NONE;
    PyObject *up = sp_flow_stats(&t->up), *down = sp_flow_stats(&t->down);
    if (up == NULL || down == NULL) {
        Py_XDECREF(up);
        Py_XDECREF(down);
        return NULL;
    }
    int ping = t->ping_sent == 0.0 ? 0 : t->ping_sent == SP_PING_DUE ? 1 : 2;
    return Py_BuildValue("(dNNIIiiiiiy#)", sp_now() - t->started, up, down,
                         t->up.parked ? t->up.parked->len : 0u,
                         t->down.parked ? t->down.parked->len : 0u, (int)t->closing, ping,
                         sp_at_boundary(&t->up.tr), sp_at_boundary(&t->down.tr),
                         t->x ? (int)t->x->held_len : 0, (const char *)t->note,
                         (Py_ssize_t)t->note_len);
}

static PyObject *
Relay_token(Relay *self, PyObject *arg)
{
    uint64_t id;
    if (sp_parse_id(arg, &id) < 0)
        return NULL;
    sp_tunnel *t = sp_lookup(self, id);
    return Py_NewRef(t ? t->token : Py_None);
}

/* Relay.tunnels(tokens=None) -> [(id, token)]: every open tunnel's, or
 * those whose token is in the set ``tokens`` (by identity: the tokens'
 * own hash and equality are not called). */
static PyObject *
Relay_tunnels(Relay *self, PyObject *args)
{
    PyObject *tokens = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &tokens))
        return NULL;
    PyObject **wanted = NULL;
    Py_ssize_t nwanted = 0;
    PyObject *seq = NULL;
    if (tokens != Py_None) {
        seq = PySequence_Fast(tokens, "tokens: a collection");
        if (seq == NULL)
            return NULL;
        wanted = PySequence_Fast_ITEMS(seq);
        nwanted = PySequence_Fast_GET_SIZE(seq);
    }
    PyObject *out = PyList_New(0);
    for (size_t fd = 0; out && fd < self->cap; fd++) {
        sp_tunnel *t = self->by_fd[fd];
        if (t == NULL || t->dead || (size_t)t->up.src != fd)
            continue;
        if (seq != NULL) {
            Py_ssize_t i = 0;
            while (i < nwanted && wanted[i] != t->token)
                i++;
            if (i == nwanted)
                continue;
        }
        PyObject *pair = Py_BuildValue("(KO)", (unsigned long long)sp_id(self, t), t->token);
        if (pair == NULL || PyList_Append(out, pair) < 0)
            Py_CLEAR(out);
        Py_XDECREF(pair);
    }
    Py_XDECREF(seq);
    return out;
}

/* The ends recorded since the last call: [(token, outcome, up, down, duration, note)]. */
static PyObject *
Relay_take_closed(Relay *self, PyObject *Py_UNUSED(ignored))
{
    if (PyList_GET_SIZE(self->closed) == 0) {
        self->errors_seen = self->internal_errors;
        return PyList_New(0);
    }
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL)
        return NULL;
    PyObject *taken = self->closed;
    self->closed = fresh;
    self->errors_seen = self->internal_errors;
    return taken;
}

/* Relay.summarize(bounds, bad_codes): ends of tunnels added with a form
 * may be summarized from now on (sp_ends), their durations counted over
 * ``bounds`` (ascending), an end with a Close code of ``bad_codes`` told
 * alone. */
static PyObject *
Relay_summarize(Relay *self, PyObject *args)
{
    PyObject *bounds, *bad;
    if (!PyArg_ParseTuple(args, "O!O!:summarize", &PyTuple_Type, &bounds, &PyTuple_Type, &bad))
        return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds), nc = PyTuple_GET_SIZE(bad);
    if (nb > SP_MAX_BOUNDS || nc > SP_MAX_BAD) {
        PyErr_SetString(PyExc_ValueError, "summarize: at most 32 bounds and 8 codes");
        return NULL;
    }
    sp_ends *ends = &self->ends;
    if (ends->nsums || ends->lines_len) {
        PyErr_SetString(PyExc_ValueError, "summarize: take the summaries first");
        return NULL;
    }
    double b[SP_MAX_BOUNDS];
    int32_t c[SP_MAX_BAD];
    for (Py_ssize_t i = 0; i < nb; i++) {
        b[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (b[i] == -1.0 && PyErr_Occurred())
            return NULL;
        if (i && !(b[i] > b[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "summarize: bounds ascend");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < nc; i++) {
        long code = PyLong_AsLong(PyTuple_GET_ITEM(bad, i));
        if (code == -1 && PyErr_Occurred())
            return NULL;
        c[i] = (int32_t)code;
    }
    memcpy(ends->bounds, b, sizeof(b));
    memcpy(ends->bad, c, sizeof(c));
    ends->nbounds = (int)nb;
    ends->nbad = (int)nc;
    ends->on = 1;
    Py_RETURN_NONE;
}

/* The summaries since the last call: [(token, count, outcomes, up_bytes,
 * down_bytes, up_messages, down_messages, buckets, seconds_sum)]. */
static PyObject *
Relay_take_summaries(Relay *self, PyObject *Py_UNUSED(ignored))
{
    sp_ends *ends = &self->ends;
    PyObject *out = PyList_New((Py_ssize_t)ends->nsums);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < ends->nsums; i++) {
        sp_summary *s = &ends->sums[i];
        PyObject *outcomes = PyTuple_New(SP_OUTCOMES);
        PyObject *buckets = PyTuple_New(ends->nbounds + 1);
        if (outcomes == NULL || buckets == NULL)
            goto fail_item;
        for (int k = 0; k < SP_OUTCOMES; k++) {
            PyObject *v = PyLong_FromUnsignedLongLong(s->outcomes[k]);
            if (v == NULL)
                goto fail_item;
            PyTuple_SET_ITEM(outcomes, k, v);
        }
        for (int k = 0; k <= ends->nbounds; k++) {
            PyObject *v = PyLong_FromUnsignedLongLong(s->buckets[k]);
            if (v == NULL)
                goto fail_item;
            PyTuple_SET_ITEM(buckets, k, v);
        }
        PyObject *item = Py_BuildValue("(OKNKKKKNd)", s->token, (unsigned long long)s->n, outcomes,
                                       (unsigned long long)s->bytes[0],
                                       (unsigned long long)s->bytes[1],
                                       (unsigned long long)s->messages[0],
                                       (unsigned long long)s->messages[1], buckets,
                                       s->seconds_sum);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;  /* the summaries stay: taken next time */
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
        continue;
    fail_item:
        Py_XDECREF(outcomes);
        Py_XDECREF(buckets);
        Py_DECREF(out);
        return NULL;
    }
    for (size_t i = 0; i < ends->nsums; i++)
        Py_DECREF(ends->sums[i].token);
    ends->nsums = 0;
    return out;
}

/* The access lines since the last call, in chunks of whole lines of at
 * most SP_ATOMIC_WRITE bytes (a longer line alone): [bytes]. */
static PyObject *
Relay_take_lines(Relay *self, PyObject *Py_UNUSED(ignored))
{
    sp_ends *ends = &self->ends;
    PyObject *out = PyList_New(0);
    if (out == NULL || ends->lines_len == 0)
        return out;
    size_t at = 0;
    for (size_t i = 0; i <= ends->ncuts; i++) {
        size_t end = i < ends->ncuts ? ends->cuts[i] : ends->lines_len;
        PyObject *chunk = PyBytes_FromStringAndSize(ends->lines + at, (Py_ssize_t)(end - at));
        if (chunk == NULL || PyList_Append(out, chunk) < 0) {
            Py_XDECREF(chunk);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(chunk);
        at = end;
    }
    ends->lines_len = ends->ncuts = ends->chunk_at = 0;
    return out;
}

static PyObject *
Relay_close(Relay *self, PyObject *Py_UNUSED(ignored))
{
    sp_close_all(self);
    Py_RETURN_NONE;
}

/* Relay.attach(handshaker): a Handshaker made with this relay's epoll
 * descriptor; poll dispatches its descriptors' events to it. */
static PyObject *
Relay_attach(Relay *self, PyObject *arg)
{
    if (!sp_handshaker_check(arg)) {
        PyErr_SetString(PyExc_TypeError, "attach takes a Handshaker");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(self->handshaker, arg);
    Py_RETURN_NONE;
}

/* Relay.wake_at(when): make the epoll set readable at time.monotonic()
 * ``when`` at the latest (or stay as set, for None), so that the owner's
 * loop sleeps with no timer of its own: a trio cancel scope per sleep
 * costs more than the sleep. The timer is set only when ``when`` is sooner
 * than the time it is set for (or it is not set): an owner whose next time
 * moves later, as a FIFO of deadlines does, gets one early wake-up at the
 * old time instead of a system call per look. */
static PyObject *
Relay_wake_at(Relay *self, PyObject *arg)
{
    if (sp_ready(self) < 0)
        return NULL;
    if (arg == Py_None)
        Py_RETURN_NONE;
    double when = PyFloat_AsDouble(arg);
    if (when == -1.0 && PyErr_Occurred())
        return NULL;
    if (self->armed != 0 && self->armed <= when)
        Py_RETURN_NONE;
    if (when <= 0)
        when = 1e-9;  /* a time gone by, but a set timer (0 would disarm it) */
    struct itimerspec spec = {.it_value = {.tv_sec = (time_t)when,
                                           .tv_nsec = (long)((when - (double)(time_t)when) * 1e9)}};
    if (timerfd_settime(self->timer_fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->armed = when;
    Py_RETURN_NONE;
}

/* Relay.poke(): make the epoll set readable, so that a loop asleep with no
 * timer looks at its timers again (loop.Sleep). */
static PyObject *
Relay_poke(Relay *self, PyObject *Py_UNUSED(ignored))
{
    if (self->wake_fd >= 0)
        (void)eventfd_write(self->wake_fd, 1);
    Py_RETURN_NONE;
}

static PyObject *
Relay_fileno(Relay *self, PyObject *Py_UNUSED(ignored))
{
    if (sp_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(self->epfd);
}

static Py_ssize_t
Relay_len(Relay *self)
{
    return (Py_ssize_t)self->count;
}

static PyObject *
Relay_get_internal_errors(Relay *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->internal_errors);
}

/* Whether anything waits for take_closed (or internal_errors changed since
 * the last look): the owner's check after each call, at no allocation. */
static PyObject *
Relay_get_ended(Relay *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(sp_ended(self));
}

/* Bytes of C memory the relay holds for one idle tunnel: its struct and
 * its two descriptors' table slots (malloc's own overhead excluded). */
static PyObject *
Relay_get_tunnel_bytes(Relay *self, void *Py_UNUSED(closure))
{
    (void)self;
    return PyLong_FromSize_t(sizeof(sp_tunnel) + 2 * (sizeof(sp_tunnel *) + sizeof(uint32_t)));
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS, "add(client_fd, backend_fd, token, to_backend, to_client, note, form=None) -> id"},
    {"poll", (PyCFunction)Relay_poll, METH_NOARGS, "One epoll_wait(0) round; the events handled."},
    {"process", (PyCFunction)Relay_process, METH_O, "process(now): the keepalive's timers."},
    {"next_wake", (PyCFunction)Relay_next_wake, METH_O, "next_wake(now) -> float | None"},
    {"begin_close", (PyCFunction)Relay_begin_close, METH_VARARGS, "begin_close(id, to_client, to_backend)"},
    {"ping", (PyCFunction)Relay_ping, METH_O, "ping(id) -> bool"},
    {"end", (PyCFunction)Relay_end, METH_VARARGS, "end(id, outcome index)"},
    {"state", (PyCFunction)Relay_state, METH_O, "state(id) -> (alive, closing)"},
    {"token", (PyCFunction)Relay_token, METH_O, "token(id) -> token | None"},
    {"inspect", (PyCFunction)Relay_inspect, METH_O, "inspect(id) -> tuple | None (TunnelView)"},
    {"tunnels", (PyCFunction)Relay_tunnels, METH_VARARGS, "tunnels(tokens=None) -> [(id, token)]"},
    {"take_closed", (PyCFunction)Relay_take_closed, METH_NOARGS, "[(token, outcome, up, down, duration, note)]"},
    {"summarize", (PyCFunction)Relay_summarize, METH_VARARGS, "summarize(bounds, bad_codes): ordinary ends of tunnels with a form told in summaries"},
    {"take_summaries", (PyCFunction)Relay_take_summaries, METH_NOARGS, "[(token, count, outcomes, up_bytes, down_bytes, up_messages, down_messages, buckets, seconds_sum)]"},
    {"take_lines", (PyCFunction)Relay_take_lines, METH_NOARGS, "[bytes]: the summarized ends' access lines, in chunks of whole lines"},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "End every tunnel (STOPPED) and close the epoll set."},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The epoll descriptor."},
    {"poke", (PyCFunction)Relay_poke, METH_NOARGS, "Make the epoll set readable (loop.Sleep)."},
    {"wake_at", (PyCFunction)Relay_wake_at, METH_O, "wake_at(when): the set readable at that time.monotonic() at the latest."},
    {"attach", (PyCFunction)Relay_attach, METH_O, "attach(handshaker): share the epoll set"},
    {"host", (PyCFunction)Relay_host, METH_O, "host(fd): the host loop's epoll descriptor in the set"},
    {"unhost", (PyCFunction)Relay_unhost, METH_NOARGS, "host undone"},
    {"serve", (PyCFunction)Relay_serve, METH_NOARGS, "Serve in C until the owner or the host has something to do."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"internal_errors", (getter)Relay_get_internal_errors, NULL, "allocations that failed", NULL},
    {"ended", (getter)Relay_get_ended, NULL, "whether take_closed, take_summaries or take_lines has anything (or an error is new)", NULL},
    {"tunnel_bytes", (getter)Relay_get_tunnel_bytes, NULL, "C bytes per idle tunnel", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Relay_as_sequence = {
    .sq_length = (lenfunc)Relay_len,
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardproxy.engine._cengine.Relay",
    .tp_doc = "The relay's C core (engine/crelay.py wraps it as a TunnelEngine).",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
    .tp_as_sequence = &Relay_as_sequence,
};

/* -- the worker's note (worker/tunnels.py's pack_note and note_fields) ------- */

/* An address's packed bytes into out (4 or 16), its length; 0 when it has
 * no packed form (a zone: "fe80::1%eth0"), as socket.inet_pton refuses it.
 * -1 with an exception: not a str, or a NUL in it (inet_pton's ValueError). */
static int
sp_note_address(PyObject *address, uint8_t out[16])
{
    if (address == Py_None)
        return 0;
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(address, &n);
    if (text == NULL)
        return -1;
    if ((Py_ssize_t)strlen(text) != n) {
        PyErr_SetString(PyExc_ValueError, "embedded null character");
        return -1;
    }
    int v6 = strchr(text, ':') != NULL;
    if (inet_pton(v6 ? AF_INET6 : AF_INET, text, out) != 1)
        return 0;
    return v6 ? 16 : 4;
}

/* pack_note(client_ip, client_port, source_port, forwarded_ip=None) ->
 * (note, client_left, forwarded_left): worker/tunnels.py's pack_note. */
static PyObject *
sp_pack_note(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *client, *forwarded = Py_None;
    int client_port, source_port;
    if (!PyArg_ParseTuple(args, "Oii|O:pack_note", &client, &client_port, &source_port,
                          &forwarded))
        return NULL;
    if (client_port < 0 || client_port > 65535 || source_port < 0 || source_port > 65535) {
        PyErr_SetString(PyExc_ValueError, "pack_note: a port is 0 to 65535");
        return NULL;
    }
    uint8_t note[5 + 16 + 16];
    int clen = sp_note_address(client, note + 5);
    if (clen < 0)
        return NULL;
    int flen = sp_note_address(forwarded, note + 5 + clen);
    if (flen < 0)
        return NULL;
    note[0] = (uint8_t)((clen == 0 ? 0 : clen == 4 ? 1 : 2) << 2 | (flen == 0 ? 0 : flen == 4 ? 1 : 2));
    note[1] = (uint8_t)(client_port >> 8);
    note[2] = (uint8_t)client_port;
    note[3] = (uint8_t)(source_port >> 8);
    note[4] = (uint8_t)source_port;
    return Py_BuildValue("(y#OO)", (const char *)note, (Py_ssize_t)(5 + clen + flen),
                         clen || client == Py_None ? Py_None : client,
                         flen || forwarded == Py_None ? Py_None : forwarded);
}

/* note_fields(note) -> (client_ip | None, client_port, source_port,
 * forwarded bytes | None): worker/tunnels.py's note_fields. */
static PyObject *
sp_note_fields(PyObject *Py_UNUSED(module), PyObject *arg)
{
    static const int lengths[3] = {0, 4, 16};
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "note_fields: a bytes note");
        return NULL;
    }
    const uint8_t *note = (const uint8_t *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n < 5 || (note[0] >> 2) > 2 || (note[0] & 3) > 2) {
        PyErr_SetString(PyExc_ValueError, "note_fields: not a note");
        return NULL;
    }
    Py_ssize_t clen = lengths[note[0] >> 2], flen = lengths[note[0] & 3];
    if (n < 5 + clen + flen) {
        PyErr_SetString(PyExc_ValueError, "note_fields: not a note");
        return NULL;
    }
    PyObject *client;
    if (clen) {
        char text[INET6_ADDRSTRLEN];
        inet_ntop(clen == 16 ? AF_INET6 : AF_INET, note + 5, text, sizeof(text));
        client = PyUnicode_FromString(text);
        if (client == NULL)
            return NULL;
    } else {
        client = Py_NewRef(Py_None);
    }
    PyObject *forwarded = flen ? PyBytes_FromStringAndSize((const char *)note + 5 + clen, flen)
                               : Py_NewRef(Py_None);
    if (forwarded == NULL) {
        Py_DECREF(client);
        return NULL;
    }
    return Py_BuildValue("(NiiN)", client, note[1] << 8 | note[2], note[3] << 8 | note[4],
                         forwarded);
}

/* render_access(form, note, outcome, success, up, down, duration, now) -> bytes:
 * sp_render's line, for the tests (up, down: (bytes, messages, close_code | None)). */
static PyObject *
sp_render_access(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *form, *outcome, *flows[2];
    Py_buffer note;
    int success;
    double duration, now;
    if (!PyArg_ParseTuple(args, "O!y*UpO!O!dd:render_access", &PyTuple_Type, &form, &note,
                          &outcome, &success, &PyTuple_Type, &flows[0], &PyTuple_Type, &flows[1],
                          &duration, &now))
        return NULL;
    PyObject *result = NULL;
    sp_tunnel t;
    memset(&t, 0, sizeof(t));
    sp_flow *f[2] = {&t.up, &t.down};
    if (PyTuple_GET_SIZE(form) != SP_FORM_SEGMENTS || !sp_form_valid(form)
        || (size_t)note.len > SP_NOTE_BYTES || !PyUnicode_IS_ASCII(outcome)
        || PyUnicode_GET_LENGTH(outcome) > 32) {
        PyErr_SetString(PyExc_ValueError, "render_access: a form of 14 segments, a note, an outcome");
        goto done;
    }
    memcpy(t.note, note.buf, (size_t)note.len);
    t.note_len = (uint8_t)note.len;
    sp_ends none = {0};
    if (!sp_ordinary(&none, &t, SP_CLOSED)) {
        PyErr_SetString(PyExc_ValueError, "render_access: a note with the client's address alone");
        goto done;
    }
    for (int i = 0; i < 2; i++) {
        unsigned long long nbytes, messages;
        PyObject *code;
        if (!PyArg_ParseTuple(flows[i], "KKO", &nbytes, &messages, &code))
            goto done;
        sp_tracker_init(&f[i]->tr);
        f[i]->nbytes = nbytes;
        f[i]->tr.messages = messages;
        if (code != Py_None) {
            long c = PyLong_AsLong(code);
            if (c == -1 && PyErr_Occurred())
                goto done;
            if (c < 0 || c > 65535) {
                PyErr_SetString(PyExc_ValueError, "render_access: a close code is 0 to 65535");
                goto done;
            }
            f[i]->tr.close_code = (int32_t)c;
        }
    }
    if (!(now >= 0 && now < 253402300800.0 && duration >= 0 && duration < 9e9)) {
        PyErr_SetString(PyExc_ValueError, "render_access: a time after 1970, before 10000");
        goto done;
    }
    char *out = malloc(sp_form_bytes(form) + SP_SLOTS_ROOM);
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t n = sp_render(out, form, t.note, outcome, success, &t.up, &t.down, duration, now);
    result = PyBytes_FromStringAndSize(out, (Py_ssize_t)n);
    free(out);
done:
    PyBuffer_Release(&note);
    return result;
}

static PyMethodDef sp_note_functions[] = {
    {"render_access", (PyCFunction)sp_render_access, METH_VARARGS,
     "render_access(form, note, outcome, success, up, down, duration, now, /)\n--\n\n"
     "The access line the relay writes for a summarized end (the tests')."},
    {"pack_note", (PyCFunction)sp_pack_note, METH_VARARGS,
     "pack_note(client_ip, client_port, source_port, forwarded_ip=None, /)\n--\n\n"
     "worker/tunnels.py's pack_note in C: (note, client_left, forwarded_left)."},
    {"note_fields", (PyCFunction)sp_note_fields, METH_O,
     "note_fields(note, /)\n--\n\n"
     "worker/tunnels.py's note_fields in C: (client_ip, client_port, source_port,\n"
     "forwarded address bytes), None for an address the note does not hold."},
    {NULL, NULL, 0, NULL},
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
    if (PyType_Ready(&TrackerType) < 0 || PyType_Ready(&RelayType) < 0)
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
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(module, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "TRACKER_BYTES", (long)sizeof(sp_tracker)) < 0
        || sp_http_add(module) < 0 || sp_handshaker_add(module) < 0
        || PyModule_AddFunctions(module, sp_note_functions) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
