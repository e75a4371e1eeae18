/*
 * The handshake core: the I/O of engine/handshake.py's HandshakeEngine in C
 * (the Handshaker type), driven by engine/chandshake.py.
 *
 * The split: this core does every system call of a handshake and keeps its
 * state in a C struct (sp_hs): accept, reading the request head under
 * max_header_bytes, the upstream connect's completion (the forwarded head
 * sent at once, since a near backend's connect is often up already; else
 * EPOLLOUT and SO_ERROR), writing the forwarded head, reading the backend's
 * answer, writing it to
 * the client, the lingering close after an answer of our own, and the
 * deadlines (header, connect, response, linger). What needs policy stays in
 * Python and is asked in batches: the core records events during a call
 * (Handshaker.take_events) and the Python side answers each with a command
 * (connect, reject, respond, read_more, close_hs). A handshake waiting for
 * its answer is in state SP_HS_DECIDING, reading nothing, so that no byte
 * is read that the Python side did not ask for.
 *
 * Events, as tuples whose first item is the kind (the SP_EV_* constants,
 * exported as EV_*):
 *   ACCEPTED(hid, ip, port, refused, listener, request)  a connection on
 *                                     listener; refused: accept_one's
 *                                     ``refuse`` (the core read nothing);
 *                                     request: its first read's bytes when
 *                                     they are REQUEST's already, else None
 *   REQUEST(hid, bytes)               the client's bytes once they hold a
 *                                     head end, exceed max_header_bytes, or
 *                                     b"" at EOF (RequestReader.feed's input);
 *                                     from a raw (PROXY) listener, each read
 *   FAILED(hid, errno)                the client's socket failed; all closed
 *   CONNECTED(hid, ip, port)          the upstream connect completed: its
 *                                     source address, if connect asked
 *                                     for it (the first of a tuple space)
 *   CONNECT_FAILED(hid, errno, timed_out)  the backend socket is closed
 *   RESPONSE(hid, bytes)              one read of the backend's answer (b"": EOF);
 *                                     not sent when the first read holds a
 *                                     whole 101 head: the core passes that
 *                                     on itself (hs_pass_101)
 *   BACKEND_FAILED(hid, errno)        writing the head or reading failed
 *   BODY(hid, bytes)                  one read of a non-101 answer's body
 *                                     (b"": EOF or reset)
 *   ESTABLISHED(hid, cfd, bfd, seconds, source_port, behind)  the 101 is
 *                                     out; the fds are the owner's; behind:
 *                                     the backend's bytes after a 101 the
 *                                     core passed on, None after a respond
 *   ANSWERED(hid)                     our answer is out: lingering now
 *   TIMEOUT(hid, what)                a deadline passed (SP_TO_*), after a
 *                                     last look where one can help
 *   CLOSED(hid)                       the core closed the handshake (the
 *                                     lingering close ended)
 *   ACCEPT_ERROR(errno)               accept failed: backing off
 *
 * Ids: a handshake's id is its sequence number << 32 | its client
 * descriptor, so a command finds it in the descriptor table and a stale id
 * (a later connection on the same descriptor) matches nothing.
 *
 * Deadlines: each kind has one duration, so the handshakes armed with it are
 * in due order in the order armed: one FIFO list per kind, O(1) to arm and
 * to disarm, no heap.
 *
 * One epoll set per worker: made with the relay's epoll descriptor
 * (Handshaker(..., epoll_fd=)), the core registers its descriptors in the
 * relay's set with SP_HS_SHARED in the event data, the relay's poll hands
 * those events to sp_handshaker_dispatch, and the relay's loop serves both
 * (crelay.CompiledRelayEngine.attach). A handshake's descriptors leave the
 * set before ESTABLISHED and the relay adds them as its own.
 *
 * Descriptors: accept4 gives non-blocking ones (no fcntl/ioctl); accepted
 * sockets inherit TCP_NODELAY from the listening socket (Linux copies the
 * TCP options on accept). The interest of each descriptor is kept, so
 * epoll_ctl runs only when it changes; a descriptor that waits for nothing
 * leaves the set (EPOLLERR and EPOLLHUP are reported whatever the mask).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_chandshake.h"
#include "_chttp.h"

#define SP_HS_RECV 65536
#define SP_HS_EVENTS 256
#define SP_HS_ACCEPTS 64          /* per listener event: accepting must not starve the rest */
#define SP_HS_BACKOFF 0.1         /* accept failed for lack of descriptors: wait */
#define SP_HS_SLACK 4096          /* read beyond max_header_bytes: the tunnel's first bytes */

enum {
    SP_EV_ACCEPTED = 0, SP_EV_REQUEST, SP_EV_FAILED, SP_EV_CONNECTED, SP_EV_CONNECT_FAILED,
    SP_EV_RESPONSE, SP_EV_BACKEND_FAILED, SP_EV_BODY, SP_EV_ESTABLISHED, SP_EV_ANSWERED,
    SP_EV_TIMEOUT, SP_EV_CLOSED, SP_EV_ACCEPT_ERROR,
};

/* TIMEOUT's what: the state whose deadline passed. */
enum { SP_TO_REQUEST = 0, SP_TO_WRITE_BACKEND, SP_TO_RESPONSE, SP_TO_CLIENT };

/* sp_hs.state (handshake.py's states, plus the two waits for Python). */
enum {
    SP_HS_READ_REQUEST = 0,
    SP_HS_DECIDING,      /* an event is out; waiting for a command */
    SP_HS_CONNECTING,
    SP_HS_WRITE,         /* writing out[], then sp_hs.then */
    SP_HS_READ_RESPONSE,
    SP_HS_PASS_BODY,
    SP_HS_LINGER,
};

/* sp_hs.then: what follows a complete write (Handshaker.respond's ``then``). */
enum { SP_THEN_HAND_OVER = 0, SP_THEN_READ_BODY, SP_THEN_ANSWERED, SP_THEN_READ_RESPONSE };

/* Deadline kinds, one FIFO list each. */
enum { SP_T_HEADER = 0, SP_T_CONNECT, SP_T_RESPONSE, SP_T_LINGER, SP_T_KINDS, SP_T_NONE = 255 };

typedef struct sp_hs {
    uint64_t hid;
    struct sp_hs *tprev, *tnext;  /* its deadline list */
    double started, deadline;
    uint8_t *buf;                 /* request bytes so far, or the bytes to write */
    uint32_t len, off;            /* buf[0:len] read; or buf[off:len] still to write */
    int cfd, bfd;                 /* bfd -1: no upstream connection */
    uint8_t cmask, bmask;         /* what each waits for (SP_IN | SP_OUT) */
    uint8_t state, then, to_backend, timer;
    uint8_t raw;                  /* a PROXY listener's: every read goes to Python */
    uint8_t want_address;         /* CONNECTED wanted: the source address is news */
    uint16_t sport;               /* the upstream connection's source port */
    uint8_t expired;              /* its header deadline passed during a last look */
    uint8_t answer_read;          /* a RESPONSE went out: the answer is Python's to read */
    uint8_t *trail;               /* a 101 passed on here: the bytes behind its head */
    uint32_t trail_len;
} sp_hs;

#define SP_IN 1
#define SP_OUT 2

typedef struct {
    sp_hs *head, *tail;
} sp_tlist;

typedef struct {
    PyObject_HEAD
    int epfd;
    uint8_t shared;               /* epfd is another engine's (SP_HS_SHARED) */
    uint64_t tag;                 /* SP_HS_SHARED when shared: in every event's data */
    sp_hs **by_fd;                /* client and backend descriptors */
    size_t cap;
    int *listeners;
    uint8_t *raw;                 /* per listener: its connections read raw */
    size_t nlisteners, caplisteners;
    uint8_t accepting;            /* the listeners are in the set */
    uint8_t full;                 /* max_handshakes in flight */
    double backoff_until;         /* 0: none */
    size_t count;                 /* handshakes in flight */
    size_t max_handshakes;
    uint32_t max_header;
    uint32_t request_cap;         /* bytes read for a request head at most */
    uint64_t seq;
    double durations[SP_T_KINDS];
    sp_tlist timers[SP_T_KINDS];
    uint8_t *scratch;
    PyObject *events;             /* list, taken by take_events */
    uint64_t internal_errors;     /* events that could not be recorded */
    int *left;                    /* handed over but still in the set (sp_handshaker_claim) */
    size_t nleft, capleft;
} Handshaker;

static double
hs_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- recording events ------------------------------------------------------ */

/* Appends an event built by Py_BuildValue(format, ...). A failure (memory)
 * is counted and cleared: the core goes on, and the Python side reports it
 * as an internal error (Handshaker.internal_errors). */
static void
hs_event(Handshaker *self, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    PyObject *event = Py_VaBuildValue(format, args);
    va_end(args);
    if (event == NULL || PyList_Append(self->events, event) < 0) {
        PyErr_Clear();
        self->internal_errors++;
    }
    Py_XDECREF(event);
}

static PyObject *
hs_address(const struct sockaddr_storage *ss, int *port)
{
    char text[INET6_ADDRSTRLEN];
    const void *where;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        where = &a->sin6_addr;
        *port = ntohs(a->sin6_port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        where = &a->sin_addr;
        *port = ntohs(a->sin_port);
    }
    if (inet_ntop(ss->ss_family, where, text, sizeof(text)) == NULL)
        text[0] = 0;
    return PyUnicode_FromString(text);
}

/* -- descriptors and deadlines --------------------------------------------- */

static int
hs_slot(Handshaker *self, int fd)
{
    if ((size_t)fd < self->cap)
        return 0;
    size_t cap = self->cap ? self->cap : 1024;
    while (cap <= (size_t)fd)
        cap *= 2;
    sp_hs **table = PyMem_Realloc(self->by_fd, cap * sizeof(*table));
    if (table == NULL)
        return -1;
    memset(table + self->cap, 0, (cap - self->cap) * sizeof(*table));
    self->by_fd = table;
    self->cap = cap;
    return 0;
}

static int hs_forget_left(Handshaker *self, int fd);

/* HandshakeEngine._want over the mask kept in *mask. */
static void
hs_want(Handshaker *self, int fd, uint8_t *mask, uint8_t want)
{
    if (*mask == want || fd < 0)
        return;
    struct epoll_event ev = {0};
    ev.data.u64 = (uint32_t)fd | self->tag;
    ev.events = (want & SP_IN ? EPOLLIN : 0u) | (want & SP_OUT ? EPOLLOUT : 0u);
    if (!want)
        (void)epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
    else if (*mask)
        (void)epoll_ctl(self->epfd, EPOLL_CTL_MOD, fd, &ev);
    else {
        hs_forget_left(self, fd);  /* a number a left descriptor had: it was closed */
        (void)epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    *mask = want;
}

/* Whether fd is on the left list; taken off it. */
static int
hs_forget_left(Handshaker *self, int fd)
{
    for (size_t i = 0; i < self->nleft; i++) {
        if (self->left[i] == fd) {
            self->left[i] = self->left[--self->nleft];
            return 1;
        }
    }
    return 0;
}

/* Hand-over in a shared set: fd stays registered (the relay claims it),
 * or is removed when the list cannot grow. */
static void
hs_leave(Handshaker *self, int fd, uint8_t *mask)
{
    if (*mask == 0 || fd < 0)
        return;
    if (!self->shared || hs_forget_left(self, fd)) {
        hs_want(self, fd, mask, 0);  /* (an fd left twice: closed meanwhile, never claimed) */
        return;
    }
    if (self->nleft == self->capleft) {
        size_t cap = self->capleft ? self->capleft * 2 : 16;
        int *left = PyMem_Realloc(self->left, cap * sizeof(int));
        if (left == NULL) {
            hs_want(self, fd, mask, 0);
            return;
        }
        self->left = left;
        self->capleft = cap;
    }
    self->left[self->nleft++] = fd;
    *mask = 0;
}

static void
hs_disarm(Handshaker *self, sp_hs *h)
{
    if (h->timer == SP_T_NONE)
        return;
    sp_tlist *list = &self->timers[h->timer];
    if (h->tprev)
        h->tprev->tnext = h->tnext;
    else
        list->head = h->tnext;
    if (h->tnext)
        h->tnext->tprev = h->tprev;
    else
        list->tail = h->tprev;
    h->tprev = h->tnext = NULL;
    h->timer = SP_T_NONE;
}

/* HandshakeEngine._arm: due durations[kind] from now. */
static void
hs_arm(Handshaker *self, sp_hs *h, uint8_t kind)
{
    hs_disarm(self, h);
    sp_tlist *list = &self->timers[kind];
    h->deadline = hs_now() + self->durations[kind];
    h->timer = kind;
    h->tprev = list->tail;
    h->tnext = NULL;
    if (list->tail)
        list->tail->tnext = h;
    else
        list->head = h;
    list->tail = h;
}

static void
hs_sync_listeners(Handshaker *self)
{
    uint8_t accepting = !self->backoff_until && !self->full;
    if (accepting == self->accepting)
        return;
    for (size_t i = 0; i < self->nlisteners; i++) {
        struct epoll_event ev = {0};
        ev.events = EPOLLIN;
        ev.data.u64 = (uint32_t)self->listeners[i] | self->tag;
        (void)epoll_ctl(self->epfd, accepting ? EPOLL_CTL_ADD : EPOLL_CTL_DEL,
                        self->listeners[i], &ev);
    }
    self->accepting = accepting;
}

static void
hs_drop_backend(Handshaker *self, sp_hs *h)
{
    if (h->bfd < 0)
        return;
    hs_want(self, h->bfd, &h->bmask, 0);
    self->by_fd[h->bfd] = NULL;
    close(h->bfd);
    h->bfd = -1;
}

/* HandshakeEngine._done_with: the handshake is gone (closed or handed over). */
static void
hs_free(Handshaker *self, sp_hs *h)
{
    hs_disarm(self, h);
    if (h->cfd >= 0 && self->by_fd[h->cfd] == h)
        self->by_fd[h->cfd] = NULL;
    PyMem_Free(h->buf);
    PyMem_Free(h->trail);
    PyMem_Free(h);
    self->count--;
    size_t resume = self->max_handshakes * 3 / 4;
    if (self->full && self->count < (resume ? resume : 1)) {
        self->full = 0;
        hs_sync_listeners(self);
    }
}

/* HandshakeEngine._close; ``closed_event``: tell the Python side (a close of
 * the core's own, not one a command or a FAILED event already explains). */
static void
hs_close(Handshaker *self, sp_hs *h, int closed_event)
{
    uint64_t hid = h->hid;
    hs_drop_backend(self, h);
    hs_want(self, h->cfd, &h->cmask, 0);
    close(h->cfd);
    hs_free(self, h);
    if (closed_event)
        hs_event(self, "(iK)", SP_EV_CLOSED, (unsigned long long)hid);
}

static void
hs_failed(Handshaker *self, sp_hs *h, int err)
{
    uint64_t hid = h->hid;
    hs_close(self, h, 0);
    hs_event(self, "(iKi)", SP_EV_FAILED, (unsigned long long)hid, err);
}

/* Waiting for the Python side: nothing is read or written meanwhile. */
static void
hs_decide(Handshaker *self, sp_hs *h)
{
    h->state = SP_HS_DECIDING;
    hs_want(self, h->cfd, &h->cmask, 0);
    hs_want(self, h->bfd, &h->bmask, 0);
}

/* Takes data[0:n] as the bytes to write (the buffer is the handshake's). */
static int
hs_set_out(sp_hs *h, const char *data, Py_ssize_t n)
{
    PyMem_Free(h->buf);
    h->buf = NULL;
    h->len = h->off = 0;
    if (n <= 0)
        return 0;
    if ((size_t)n > UINT32_MAX || (h->buf = PyMem_Malloc((size_t)n)) == NULL)
        return -1;
    memcpy(h->buf, data, (size_t)n);
    h->len = (uint32_t)n;
    return 0;
}

/* -- the steps ----------------------------------------------------------- */

static void hs_after_write(Handshaker *self, sp_hs *h);

/* What ACCEPTED says of a new connection (hs_new). */
typedef struct {
    PyObject *ip;
    int port, listener;
} sp_accept;

/* HandshakeEngine._read_request: one read; REQUEST once the bytes hold a
 * head end or are more than max_header_bytes (RequestReader decides).
 * ``acc``: the connection's first read, after which its ACCEPTED goes out,
 * carrying the bytes when they hold the whole head (one event, not two). */
static void
hs_read_request(Handshaker *self, sp_hs *h, const sp_accept *acc)
{
    size_t room = self->request_cap - h->len;
    ssize_t n = read(h->cfd, self->scratch, room);
    if (acc != NULL) {
        int err = errno;
        if (n > 0 && !h->raw
            && (sp_head_end(self->scratch, (size_t)n, 0) >= 0 || (size_t)n > self->max_header)) {
            hs_decide(self, h);
            hs_event(self, "(iKOiiiy#)", SP_EV_ACCEPTED, (unsigned long long)h->hid, acc->ip,
                     acc->port, 0, acc->listener, (const char *)self->scratch, (Py_ssize_t)n);
            return;
        }
        hs_event(self, "(iKOiiiO)", SP_EV_ACCEPTED, (unsigned long long)h->hid, acc->ip,
                 acc->port, 0, acc->listener, Py_None);
        errno = err;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) {
            hs_want(self, h->cfd, &h->cmask, SP_IN);
            return;
        }
        hs_failed(self, h, errno);
        return;
    }
    if (n == 0) {
        hs_decide(self, h);
        hs_event(self, "(iKy#)", SP_EV_REQUEST, (unsigned long long)h->hid, "", (Py_ssize_t)0);
        return;
    }
    if (h->raw) {  /* a PROXY header first: the Python side reads it, and the head */
        hs_decide(self, h);
        hs_event(self, "(iKy#)", SP_EV_REQUEST, (unsigned long long)h->hid,
                 (const char *)self->scratch, (Py_ssize_t)n);
        return;
    }
    size_t old = h->len, total = old + (size_t)n;
    const uint8_t *bytes = self->scratch;
    if (old) {
        uint8_t *grown = PyMem_Realloc(h->buf, total);
        if (grown == NULL) {
            hs_failed(self, h, ENOMEM);
            return;
        }
        memcpy(grown + old, self->scratch, (size_t)n);
        h->buf = grown;
        bytes = grown;
    }
    size_t start = old > 3 ? old - 3 : 0;
    if (sp_head_end(bytes, total, start) >= 0 || total > self->max_header) {
        hs_decide(self, h);
        hs_event(self, "(iKy#)", SP_EV_REQUEST, (unsigned long long)h->hid, (const char *)bytes,
                 (Py_ssize_t)total);
        PyMem_Free(h->buf);
        h->buf = NULL;
        h->len = 0;
        return;
    }
    if (!old) {
        if ((h->buf = PyMem_Malloc((size_t)n)) == NULL) {
            hs_failed(self, h, ENOMEM);
            return;
        }
        memcpy(h->buf, self->scratch, (size_t)n);
    }
    h->len = (uint32_t)total;
    hs_want(self, h->cfd, &h->cmask, SP_IN);
}

/* HandshakeEngine._send/_write_more: write buf[off:len] to its side. */
static void
hs_write(Handshaker *self, sp_hs *h)
{
    int fd = h->to_backend ? h->bfd : h->cfd;
    while (h->off < h->len) {
        ssize_t n = send(fd, h->buf + h->off, h->len - h->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                if (h->to_backend)
                    hs_want(self, fd, &h->bmask, SP_OUT);
                else
                    hs_want(self, fd, &h->cmask, SP_OUT);
                return;
            }
            int err = errno;
            if (h->to_backend) {
                hs_decide(self, h);
                hs_event(self, "(iKi)", SP_EV_BACKEND_FAILED, (unsigned long long)h->hid, err);
            } else {
                hs_failed(self, h, err);
            }
            return;
        }
        h->off += (uint32_t)n;
    }
    PyMem_Free(h->buf);
    h->buf = NULL;
    h->len = h->off = 0;
    hs_after_write(self, h);  /* which sets the masks: one epoll_ctl MOD, not a DEL and an ADD */
}

/* HandshakeEngine._hand_over: both descriptors go to the owner. */
static void
hs_hand_over(Handshaker *self, sp_hs *h)
{
    hs_leave(self, h->cfd, &h->cmask);
    hs_leave(self, h->bfd, &h->bmask);
    self->by_fd[h->bfd] = NULL;
    uint64_t hid = h->hid;
    int cfd = h->cfd, bfd = h->bfd;
    uint16_t sport = h->sport;
    double seconds = hs_now() - h->started;
    h->bfd = -1;
    if (!h->answer_read) /* the 101 was passed on here (hs_pass_101) */
        hs_event(self, "(iKiidiy#)", SP_EV_ESTABLISHED, (unsigned long long)hid, cfd, bfd,
                 seconds, (int)sport, h->trail ? (const char *)h->trail : "",
                 (Py_ssize_t)h->trail_len);
    else
        hs_event(self, "(iKiidiO)", SP_EV_ESTABLISHED, (unsigned long long)hid, cfd, bfd,
                 seconds, (int)sport, Py_None);
    hs_free(self, h);
}

/* HandshakeEngine._linger: read and drop until the client closes. */
static void
hs_linger(Handshaker *self, sp_hs *h)
{
    for (;;) {
        ssize_t n = read(h->cfd, self->scratch, SP_HS_RECV);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            hs_close(self, h, 1);
            return;
        }
    }
}

/* HandshakeEngine._finish_reject after ANSWERED: FIN, then linger. */
static void
hs_start_linger(Handshaker *self, sp_hs *h)
{
    h->state = SP_HS_LINGER;
    hs_arm(self, h, SP_T_LINGER);
    if (shutdown(h->cfd, SHUT_WR) < 0) {
        hs_close(self, h, 1);
        return;
    }
    hs_want(self, h->cfd, &h->cmask, SP_IN);
    hs_linger(self, h);
}

static void
hs_after_write(Handshaker *self, sp_hs *h)
{
    switch (h->then) {
    case SP_THEN_READ_RESPONSE:
        /* The backend answers after reading the head: wait, no read yet. */
        h->state = SP_HS_READ_RESPONSE;
        hs_want(self, h->bfd, &h->bmask, SP_IN);
        break;
    case SP_THEN_HAND_OVER:
        hs_hand_over(self, h);
        break;
    case SP_THEN_READ_BODY:
        h->state = SP_HS_PASS_BODY;
        hs_want(self, h->cfd, &h->cmask, 0);
        hs_want(self, h->bfd, &h->bmask, SP_IN);
        break;
    default: /* SP_THEN_ANSWERED */
        hs_event(self, "(iK)", SP_EV_ANSWERED, (unsigned long long)h->hid);
        hs_start_linger(self, h);
        break;
    }
}

static void hs_backend_up(Handshaker *self, sp_hs *h);

/* The connect failed (err): Python tries the next server. */
static void
hs_connect_failed(Handshaker *self, sp_hs *h, int err, int timed_out)
{
    hs_drop_backend(self, h);
    hs_decide(self, h);
    hs_event(self, "(iKii)", SP_EV_CONNECT_FAILED, (unsigned long long)h->hid, err,
             err == ETIMEDOUT && timed_out);
}

/* HandshakeEngine._connected: the connect's outcome is in SO_ERROR. */
static void
hs_connected(Handshaker *self, sp_hs *h, int timed_out)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(h->bfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (!err && timed_out) {
        /* The connect may have completed with its event still queued
         * behind others (HandshakeEngine._timed_out): getpeername says. */
        struct sockaddr_storage peer;
        socklen_t plen = sizeof(peer);
        if (getpeername(h->bfd, (struct sockaddr *)&peer, &plen) < 0)
            err = ETIMEDOUT;
    }
    if (err) {
        hs_connect_failed(self, h, err, timed_out);
        return;
    }
    hs_backend_up(self, h);
}

/* The connect completed: its source port (and address, when asked), then
 * the head to the backend. */
static void
hs_backend_up(Handshaker *self, sp_hs *h)
{
    struct sockaddr_storage local;
    socklen_t llen = sizeof(local);
    int port = 0;
    if (getsockname(h->bfd, (struct sockaddr *)&local, &llen) == 0) {
        port = ntohs(local.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&local)->sin6_port
                                                 : ((struct sockaddr_in *)&local)->sin_port);
        if (h->want_address) {
            PyObject *address = hs_address(&local, &port);
            if (address == NULL) {
                PyErr_Clear();
                address = Py_None;
                Py_INCREF(address);
            }
            hs_event(self, "(iKNi)", SP_EV_CONNECTED, (unsigned long long)h->hid, address, port);
        }
    }
    h->sport = (uint16_t)port;
    hs_arm(self, h, SP_T_RESPONSE);
    h->state = SP_HS_WRITE;
    h->to_backend = 1;
    h->then = SP_THEN_READ_RESPONSE;
    hs_write(self, h);
}

/* The backend's first read holds a whole 101 head that ResponseReader.feed
 * would pass on as it came (ResponseHead(101, head)): pass it on here and
 * hand over, as respond(hid, head, THEN_HAND_OVER) would, without a RESPONSE
 * event; the bytes behind the head go with ESTABLISHED. 1: done; 0: the
 * read is Python's (any other answer, a head not whole, no memory). */
static int
hs_pass_101(Handshaker *self, sp_hs *h, const uint8_t *data, size_t n)
{
    int64_t end = sp_head_end(data, n, 0);
    if (end < 0 || (uint64_t)end > self->max_header)
        return 0;
    struct sp_response r;
    const char *error;
    int code = sp_parse_response(data, (size_t)end, &r, &error);
    if ((code != SP_HTTP_OK && code != SP_HTTP_TOO_MANY) || r.status != 101)
        return 0;
    size_t rest = n - (size_t)end;
    if (rest) {
        if ((h->trail = PyMem_Malloc(rest)) == NULL)
            return 0;
        memcpy(h->trail, data + end, rest);
        h->trail_len = (uint32_t)rest;
    }
    if (hs_set_out(h, (const char *)data, (Py_ssize_t)end) < 0) {
        PyMem_Free(h->trail);
        h->trail = NULL;
        h->trail_len = 0;
        return 0;
    }
    int cfd = h->cfd;
    h->state = SP_HS_WRITE;
    h->to_backend = 0;
    h->then = SP_THEN_HAND_OVER;
    /* The 101 most often goes out at once: the hand-over then leaves the
     * backend in the set for the relay (hs_leave). Else it waits for the
     * client, out of the set until the relay takes it. */
    hs_write(self, h);
    if (cfd < (int)self->cap && self->by_fd[cfd] == h && h->state == SP_HS_WRITE)
        hs_want(self, h->bfd, &h->bmask, 0);
    return 1;
}

/* HandshakeEngine._read_response and _pass_body: one read, to Python (a
 * whole 101 in the first read: passed on here, hs_pass_101). */
static void
hs_read_backend(Handshaker *self, sp_hs *h)
{
    int body = h->state == SP_HS_PASS_BODY;
    ssize_t n = read(h->bfd, self->scratch, SP_HS_RECV);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        int err = errno;
        hs_decide(self, h);
        if (body)  /* a reset ends the answer */
            hs_event(self, "(iKy#)", SP_EV_BODY, (unsigned long long)h->hid, "", (Py_ssize_t)0);
        else
            hs_event(self, "(iKi)", SP_EV_BACKEND_FAILED, (unsigned long long)h->hid, err);
        return;
    }
    if (!body && !h->answer_read && n > 0 && hs_pass_101(self, h, self->scratch, (size_t)n))
        return;
    h->answer_read = 1;
    hs_decide(self, h);
    hs_event(self, "(iKy#)", body ? SP_EV_BODY : SP_EV_RESPONSE, (unsigned long long)h->hid,
             (const char *)self->scratch, (Py_ssize_t)n);
}

/* A new handshake for accepted fd; its id (0: none, the fd closed). The
 * handshake may be over when this returns (its first read failed). */
static uint64_t
hs_new(Handshaker *self, int listener, int fd, const struct sockaddr_storage *addr, int refused)
{
    int raw = 0;
    for (size_t i = 0; i < self->nlisteners; i++)
        if (self->listeners[i] == listener)
            raw = self->raw[i];
    sp_hs *h = NULL;
    if (hs_slot(self, fd) < 0 || (h = PyMem_Calloc(1, sizeof(*h))) == NULL) {
        close(fd);
        self->internal_errors++;
        return 0;
    }
    self->seq++;
    h->hid = self->seq << 32 | (uint32_t)fd;
    h->cfd = fd;
    h->bfd = -1;
    h->timer = SP_T_NONE;
    h->raw = (uint8_t)raw;
    h->started = hs_now();
    self->by_fd[fd] = h;
    self->count++;
    int port = 0;
    PyObject *ip = hs_address(addr, &port);
    if (ip == NULL) {
        PyErr_Clear();
        ip = PyUnicode_FromString("");
    }
    if (refused) {
        hs_event(self, "(iKNiiiO)", SP_EV_ACCEPTED, (unsigned long long)h->hid, ip, port, 1,
                 listener, Py_None);
        h->state = SP_HS_DECIDING;
        return h->hid;
    }
    h->state = SP_HS_READ_REQUEST;
    hs_arm(self, h, SP_T_HEADER);
    sp_accept acc = {ip, port, listener};
    uint64_t hid = h->hid;
    hs_read_request(self, h, &acc);  /* the head usually came with the connection */
    Py_XDECREF(ip);
    return hid;
}

/* One accept4: 1 with a connection, 0 when the queue is empty, -1 with errno. */
static int
hs_take(int listener, int *fd, struct sockaddr_storage *addr)
{
    for (;;) {
        socklen_t len = sizeof(*addr);
        *fd = accept4(listener, (struct sockaddr *)addr, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (*fd >= 0)
            return 1;
        if (errno == EAGAIN)
            return 0;
        if (errno == ECONNABORTED || errno == EPROTO || errno == EPERM || errno == EINTR)
            continue;  /* a client that gave up while queued */
        return -1;
    }
}

/* HandshakeEngine._accept. */
static void
hs_accept(Handshaker *self, int listener)
{
    for (int i = 0; i < SP_HS_ACCEPTS; i++) {
        if (self->count >= self->max_handshakes) {
            self->full = 1;
            hs_sync_listeners(self);
            return;
        }
        int fd;
        struct sockaddr_storage addr;
        int got = hs_take(listener, &fd, &addr);
        if (got == 0)
            return;
        if (got < 0) {  /* EMFILE, ENFILE, ENOBUFS, ENOMEM: _pause_accepting */
            hs_event(self, "(ii)", SP_EV_ACCEPT_ERROR, errno);
            self->backoff_until = hs_now() + SP_HS_BACKOFF;
            hs_sync_listeners(self);
            return;
        }
        hs_new(self, listener, fd, &addr, 0);
    }
}

static int
hs_is_listener(Handshaker *self, int fd)
{
    for (size_t i = 0; i < self->nlisteners; i++)
        if (self->listeners[i] == fd)
            return 1;
    return 0;
}

/* HandshakeEngine._dispatch. */
static void
hs_dispatch(Handshaker *self, int fd)
{
    sp_hs *h = (size_t)fd < self->cap ? self->by_fd[fd] : NULL;
    if (h == NULL) {
        if (hs_is_listener(self, fd))
            hs_accept(self, fd);
        return;
    }
    switch (h->state) {
    case SP_HS_READ_REQUEST:
        hs_read_request(self, h, NULL);
        break;
    case SP_HS_CONNECTING:
        hs_connected(self, h, 0);
        break;
    case SP_HS_WRITE:
        hs_write(self, h);
        break;
    case SP_HS_READ_RESPONSE:
    case SP_HS_PASS_BODY:
        hs_read_backend(self, h);
        break;
    case SP_HS_LINGER:
        hs_linger(self, h);
        break;
    default:
        break;
    }
}

/* HandshakeEngine._timed_out: h's deadline passed. */
static void
hs_timed_out(Handshaker *self, sp_hs *h)
{
    int what;
    switch (h->state) {
    case SP_HS_READ_REQUEST: {
        int cfd = h->cfd;
        uint64_t hid = h->hid;
        hs_read_request(self, h, NULL);  /* its event may be queued behind others */
        h = self->by_fd[cfd];      /* NULL if it failed (and was freed) */
        if (h == NULL || h->hid != hid)
            return;
        if (h->state != SP_HS_READ_REQUEST) {
            /* A raw read handed to Python: if it asks for more, the time is up. */
            h->expired = h->raw;
            return;
        }
        what = SP_TO_REQUEST;
        break;
    }
    case SP_HS_CONNECTING:
        hs_connected(self, h, 1);
        return;
    case SP_HS_READ_RESPONSE:
        hs_read_backend(self, h);
        if (h->state != SP_HS_READ_RESPONSE)
            return;
        what = SP_TO_RESPONSE;
        break;
    case SP_HS_WRITE:
        what = h->to_backend ? SP_TO_WRITE_BACKEND : SP_TO_CLIENT;
        break;
    case SP_HS_PASS_BODY:
        what = SP_TO_CLIENT;
        break;
    case SP_HS_LINGER:
        hs_close(self, h, 1);
        return;
    default:  /* DECIDING: the Python side acts on it in this round */
        return;
    }
    hs_decide(self, h);
    hs_event(self, "(iKi)", SP_EV_TIMEOUT, (unsigned long long)h->hid, what);
}

/* -- the Python type --------------------------------------------------------- */

static sp_hs *
hs_find(Handshaker *self, PyObject *arg)
{
    unsigned long long hid = PyLong_AsUnsignedLongLong(arg);
    if (hid == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int fd = (int)(uint32_t)hid;
    sp_hs *h = fd >= 0 && (size_t)fd < self->cap ? self->by_fd[fd] : NULL;
    return h != NULL && h->hid == hid && h->cfd == fd ? h : NULL;
}

/* The handshake a command names: 1 with *h; 0 when it has ended (the
 * command then does nothing); -1 with an exception set. */
static int
hs_command(Handshaker *self, PyObject *id, sp_hs **h)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the handshaker is closed");
        return -1;
    }
    *h = hs_find(self, id);
    if (*h == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return 1;
}

static int
Handshaker_init(Handshaker *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"header_timeout", "connect_timeout", "response_timeout",
                             "linger_timeout", "max_header_bytes", "max_handshakes",
                             "epoll_fd", NULL};
    double header, connect, response, linger;
    unsigned int max_header;
    Py_ssize_t max_handshakes;
    int epoll_fd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ddddIn|i", kwlist, &header, &connect,
                                     &response, &linger, &max_header, &max_handshakes, &epoll_fd))
        return -1;
    if (max_header > (1u << 30) || max_handshakes < 1) {
        PyErr_SetString(PyExc_ValueError, "max_header_bytes or max_handshakes out of range");
        return -1;
    }
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Handshaker initialised twice");
        return -1;
    }
    self->durations[SP_T_HEADER] = header;
    self->durations[SP_T_CONNECT] = connect;
    self->durations[SP_T_RESPONSE] = response;
    self->durations[SP_T_LINGER] = linger;
    self->max_header = max_header;
    self->request_cap = max_header + SP_HS_SLACK;
    self->max_handshakes = (size_t)max_handshakes;
    size_t scratch = self->request_cap > SP_HS_RECV ? self->request_cap : SP_HS_RECV;
    self->scratch = PyMem_Malloc(scratch);
    self->events = PyList_New(0);
    if (self->scratch == NULL || self->events == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->shared = epoll_fd >= 0;
    self->tag = self->shared ? SP_HS_SHARED : 0;
    self->epfd = self->shared ? epoll_fd : epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->accepting = 0;
    hs_sync_listeners(self);
    return 0;
}

static int
hs_ready(Handshaker *self)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the handshaker is closed");
        return -1;
    }
    return 0;
}

static void
hs_close_all(Handshaker *self)
{
    for (size_t fd = 0; fd < self->cap; fd++) {
        sp_hs *h = self->by_fd[fd];
        if (h != NULL && h->cfd == (int)fd)
            hs_close(self, h, 0);
    }
}

static void
Handshaker_dealloc(Handshaker *self)
{
    if (self->epfd >= 0) {
        hs_close_all(self);
        if (!self->shared)
            close(self->epfd);
    }
    PyMem_Free(self->by_fd);
    PyMem_Free(self->listeners);
    PyMem_Free(self->raw);
    PyMem_Free(self->scratch);
    PyMem_Free(self->left);
    Py_XDECREF(self->events);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* listen(fd, raw): accept on it (while neither a backoff nor the limit says
 * wait); raw: its connections begin with a PROXY header, so every read of
 * theirs goes to Python until it has the head (read_more asks for the next). */
static PyObject *
Handshaker_listen(Handshaker *self, PyObject *args)
{
    int fd, raw;
    if (!PyArg_ParseTuple(args, "ip", &fd, &raw) || hs_ready(self) < 0)
        return NULL;
    if (self->nlisteners == self->caplisteners) {
        size_t cap = self->caplisteners ? self->caplisteners * 2 : 4;
        int *grown = PyMem_Realloc(self->listeners, cap * sizeof(int));
        if (grown == NULL)
            return PyErr_NoMemory();
        self->listeners = grown;
        uint8_t *flags = PyMem_Realloc(self->raw, cap);
        if (flags == NULL)
            return PyErr_NoMemory();
        self->raw = flags;
        self->caplisteners = cap;
    }
    self->raw[self->nlisteners] = (uint8_t)raw;
    self->listeners[self->nlisteners++] = fd;
    if (self->accepting) {
        struct epoll_event ev = {0};
        ev.events = EPOLLIN;
        ev.data.u64 = (uint32_t)fd | self->tag;
        if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            self->nlisteners--;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

/* unlisten(fd): stop accepting on it (the owner closes it). */
static PyObject *
Handshaker_unlisten(Handshaker *self, PyObject *arg)
{
    int fd = (int)PyLong_AsLong(arg);
    if ((fd == -1 && PyErr_Occurred()) || hs_ready(self) < 0)
        return NULL;
    for (size_t i = 0; i < self->nlisteners; i++) {
        if (self->listeners[i] != fd)
            continue;
        if (self->accepting)
            (void)epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
        self->nlisteners--;
        self->listeners[i] = self->listeners[self->nlisteners];
        self->raw[i] = self->raw[self->nlisteners];
        break;
    }
    Py_RETURN_NONE;
}

/* accept_one(fd, refuse) -> hid | None: HandshakeEngine._accept_all's step;
 * raises OSError when accept fails (out of descriptors). */
static PyObject *
Handshaker_accept_one(Handshaker *self, PyObject *args)
{
    int listener, refuse;
    if (!PyArg_ParseTuple(args, "ip", &listener, &refuse) || hs_ready(self) < 0)
        return NULL;
    int fd;
    struct sockaddr_storage addr;
    int got = hs_take(listener, &fd, &addr);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (got == 0)
        Py_RETURN_NONE;
    uint64_t hid = hs_new(self, listener, fd, &addr, refuse);
    if (hid == 0)
        return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong((unsigned long long)hid);
}

/* poll(): one epoll_wait(0) round; the events handled. */
static PyObject *
Handshaker_poll(Handshaker *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event evs[SP_HS_EVENTS];
    if (hs_ready(self) < 0)
        return NULL;
    if (self->shared) {
        PyErr_SetString(PyExc_RuntimeError, "a shared handshaker is polled by its relay");
        return NULL;
    }
    int n = epoll_wait(self->epfd, evs, SP_HS_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int i = 0; i < n; i++)
        hs_dispatch(self, (int)(uint32_t)evs[i].data.u64);
    return PyLong_FromLong(n);
}

/* process(now): the deadlines that passed and the end of a backoff. */
static PyObject *
Handshaker_process(Handshaker *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if ((now == -1.0 && PyErr_Occurred()) || hs_ready(self) < 0)
        return NULL;
    if (self->backoff_until && now >= self->backoff_until) {
        self->backoff_until = 0;
        hs_sync_listeners(self);
    }
    for (int kind = 0; kind < SP_T_KINDS; kind++) {
        sp_tlist *list = &self->timers[kind];
        while (list->head != NULL && list->head->deadline <= now) {
            sp_hs *h = list->head;
            hs_disarm(self, h);
            hs_timed_out(self, h);
        }
    }
    Py_RETURN_NONE;
}

/* next_wake() -> float | None: the earliest deadline or backoff's end. */
static PyObject *
Handshaker_next_wake(Handshaker *self, PyObject *Py_UNUSED(ignored))
{
    double wake = self->backoff_until;
    for (int kind = 0; kind < SP_T_KINDS; kind++) {
        sp_hs *h = self->timers[kind].head;
        if (h != NULL && (wake == 0 || h->deadline < wake))
            wake = h->deadline;
    }
    if (wake == 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(wake);
}

static PyObject *
Handshaker_take_events(Handshaker *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL)
        return NULL;
    PyObject *taken = self->events;
    self->events = fresh;
    return taken;
}

/* connect(hid, bfd, head, want_address): a non-blocking connect under way
 * on bfd (the core's from now on); head goes once it completes, after a
 * CONNECTED event if want_address. */
static PyObject *
Handshaker_connect(Handshaker *self, PyObject *args)
{
    PyObject *id;
    int bfd, want_address;
    const char *head;
    Py_ssize_t n;
    sp_hs *h;
    if (!PyArg_ParseTuple(args, "Oiy#p", &id, &bfd, &head, &n, &want_address))
        return NULL;
    int found = hs_command(self, id, &h);
    if (found <= 0) {
        close(bfd);
        if (found < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (h->bfd >= 0 || bfd < 0 || hs_slot(self, bfd) < 0 || hs_set_out(h, head, n) < 0) {
        close(bfd);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "connect: a backend already, or out of memory");
        return NULL;
    }
    h->bfd = bfd;
    h->bmask = 0;
    h->want_address = (uint8_t)want_address;
    self->by_fd[bfd] = h;
    h->state = SP_HS_CONNECTING;
    hs_arm(self, h, SP_T_CONNECT);
    /* A connect to a near backend (loopback, a backend on the same host)
     * has often completed by now, within connect(2) itself. The head goes
     * at once, as HAProxy sends it: taken, the connect is up (no EPOLLOUT
     * registration, no SO_ERROR, no round); EAGAIN, the SYN is still out;
     * an error, the connect's own, as SO_ERROR would have said. */
    ssize_t sent = send(bfd, h->buf ? (const char *)h->buf : "", h->len, MSG_NOSIGNAL);
    if (sent >= 0) {
        h->off = (uint32_t)sent;
        hs_backend_up(self, h);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        hs_want(self, bfd, &h->bmask, SP_OUT);
    else
        hs_connect_failed(self, h, errno, 0);
    Py_RETURN_NONE;
}

/* reject(hid, answer): HandshakeEngine._reject: the backend (if any)
 * closed, the answer written, then ANSWERED and the lingering close. */
static PyObject *
Handshaker_reject(Handshaker *self, PyObject *args)
{
    PyObject *id;
    const char *answer;
    Py_ssize_t n;
    sp_hs *h;
    if (!PyArg_ParseTuple(args, "Oy#", &id, &answer, &n))
        return NULL;
    int found = hs_command(self, id, &h);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    hs_drop_backend(self, h);
    hs_want(self, h->cfd, &h->cmask, 0);
    if (hs_set_out(h, answer, n) < 0) {
        hs_close(self, h, 1);
        return PyErr_NoMemory();
    }
    if (h->timer == SP_T_NONE)  /* refused at accept: the answer gets linger's time */
        hs_arm(self, h, SP_T_LINGER);
    h->state = SP_HS_WRITE;
    h->to_backend = 0;
    h->then = SP_THEN_ANSWERED;
    hs_write(self, h);
    Py_RETURN_NONE;
}

/* respond(hid, data, then): data to the client, then HAND_OVER, READ_BODY
 * or ANSWERED (which closes the backend first). */
static PyObject *
Handshaker_respond(Handshaker *self, PyObject *args)
{
    PyObject *id;
    const char *data;
    Py_ssize_t n;
    int then;
    if (!PyArg_ParseTuple(args, "Oy#i", &id, &data, &n, &then))
        return NULL;
    if (then < SP_THEN_HAND_OVER || then > SP_THEN_ANSWERED) {
        PyErr_SetString(PyExc_ValueError, "respond: then is HAND_OVER, READ_BODY or ANSWERED");
        return NULL;
    }
    sp_hs *h;
    int found = hs_command(self, id, &h);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    if (then != SP_THEN_ANSWERED && h->bfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "respond: no backend to hand over or read");
        return NULL;
    }
    if (then == SP_THEN_ANSWERED)
        hs_drop_backend(self, h);
    hs_want(self, h->bfd, &h->bmask, 0);
    if (hs_set_out(h, data, n) < 0) {
        hs_close(self, h, 1);
        return PyErr_NoMemory();
    }
    h->state = SP_HS_WRITE;
    h->to_backend = 0;
    h->then = (uint8_t)then;
    hs_write(self, h);
    Py_RETURN_NONE;
}

/* read_more(hid): go on reading: the backend's answer after a RESPONSE
 * that did not complete its head, or a raw connection's PROXY header and
 * head (TIMEOUT instead once their deadline passed). */
static PyObject *
Handshaker_read_more(Handshaker *self, PyObject *arg)
{
    sp_hs *h;
    int found = hs_command(self, arg, &h);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    if (h->bfd < 0) {
        if (!h->raw) {
            PyErr_SetString(PyExc_RuntimeError, "read_more: no backend, not a raw connection");
            return NULL;
        }
        if (h->expired) {
            hs_event(self, "(iKi)", SP_EV_TIMEOUT, (unsigned long long)h->hid, SP_TO_REQUEST);
            Py_RETURN_NONE;
        }
        h->state = SP_HS_READ_REQUEST;
        hs_want(self, h->cfd, &h->cmask, SP_IN);
        Py_RETURN_NONE;
    }
    h->state = SP_HS_READ_RESPONSE;
    hs_want(self, h->bfd, &h->bmask, SP_IN);
    Py_RETURN_NONE;
}

/* close_hs(hid): close both sides now (no event). */
static PyObject *
Handshaker_close_hs(Handshaker *self, PyObject *arg)
{
    sp_hs *h;
    int found = hs_command(self, arg, &h);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    hs_close(self, h, 0);
    Py_RETURN_NONE;
}

/* close(): every handshake closed (no events), and the epoll set. */
static PyObject *
Handshaker_close(Handshaker *self, PyObject *Py_UNUSED(ignored))
{
    if (self->epfd < 0)
        Py_RETURN_NONE;
    hs_close_all(self);
    if (!self->shared)
        close(self->epfd);
    self->epfd = -1;
    Py_RETURN_NONE;
}

static PyObject *
Handshaker_fileno(Handshaker *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->epfd);
}

static PyObject *
Handshaker_get_internal_errors(Handshaker *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->internal_errors);
}

static PyObject *
Handshaker_get_accepting(Handshaker *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->accepting);
}

static Py_ssize_t
Handshaker_len(Handshaker *self)
{
    return (Py_ssize_t)self->count;
}

static PyMethodDef Handshaker_methods[] = {
    {"listen", (PyCFunction)Handshaker_listen, METH_VARARGS, "listen(fd, raw): accept on it"},
    {"unlisten", (PyCFunction)Handshaker_unlisten, METH_O, "unlisten(fd): stop accepting on it"},
    {"accept_one", (PyCFunction)Handshaker_accept_one, METH_VARARGS,
     "accept_one(fd, refuse) -> hid | None"},
    {"poll", (PyCFunction)Handshaker_poll, METH_NOARGS, "One epoll_wait(0) round; the events handled."},
    {"process", (PyCFunction)Handshaker_process, METH_O, "process(now): deadlines and backoff"},
    {"next_wake", (PyCFunction)Handshaker_next_wake, METH_NOARGS, "next_wake() -> float | None"},
    {"take_events", (PyCFunction)Handshaker_take_events, METH_NOARGS, "The events recorded so far."},
    {"connect", (PyCFunction)Handshaker_connect, METH_VARARGS, "connect(hid, bfd, head)"},
    {"reject", (PyCFunction)Handshaker_reject, METH_VARARGS, "reject(hid, answer)"},
    {"respond", (PyCFunction)Handshaker_respond, METH_VARARGS, "respond(hid, data, then)"},
    {"read_more", (PyCFunction)Handshaker_read_more, METH_O, "read_more(hid)"},
    {"close_hs", (PyCFunction)Handshaker_close_hs, METH_O, "close_hs(hid): close it now"},
    {"close", (PyCFunction)Handshaker_close, METH_NOARGS, "Close every handshake and the epoll set."},
    {"fileno", (PyCFunction)Handshaker_fileno, METH_NOARGS, "The epoll descriptor."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Handshaker_getset[] = {
    {"internal_errors", (getter)Handshaker_get_internal_errors, NULL,
     "events or handshakes lost to a failed allocation", NULL},
    {"accepting", (getter)Handshaker_get_accepting, NULL, "the listeners are in the set", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Handshaker_as_sequence = {
    .sq_length = (lenfunc)Handshaker_len,
};

static PyObject *
Handshaker_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    Handshaker *self = (Handshaker *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->epfd = -1;
    return (PyObject *)self;
}

static PyTypeObject HandshakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardproxy.engine._cengine.Handshaker",
    .tp_doc = "The handshake core (see _chandshake.c's head comment).",
    .tp_basicsize = sizeof(Handshaker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Handshaker_new,
    .tp_init = (initproc)Handshaker_init,
    .tp_dealloc = (destructor)Handshaker_dealloc,
    .tp_methods = Handshaker_methods,
    .tp_getset = Handshaker_getset,
    .tp_as_sequence = &Handshaker_as_sequence,
};

/* -- connect_tcp: engine/upstream.py's _kernel without a socket object ----- */

static int
hs_sockaddr(int family, const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        *len = sizeof(*a);
        return inet_pton(AF_INET6, host, &a->sin6_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    *len = sizeof(*a);
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

/* connect_tcp(family, source, host, port, options) -> fd: a non-blocking,
 * close-on-exec TCP socket with options ((level, name, int | bytes), ...)
 * set in order, bound to source (port 0) unless None, its connect to
 * host:port under way. OSError with the errno of the call that failed (the
 * socket closed); ValueError for an address inet_pton does not read. */
static PyObject *
sp_connect_tcp(PyObject *Py_UNUSED(module), PyObject *args)
{
    int family, port;
    const char *source, *host;
    PyObject *options;
    if (!PyArg_ParseTuple(args, "izsiO!", &family, &source, &host, &port, &PyTuple_Type, &options))
        return NULL;
    if ((family != AF_INET && family != AF_INET6) || port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "connect_tcp: AF_INET or AF_INET6, a port");
        return NULL;
    }
    struct sockaddr_storage dst, src;
    socklen_t dst_len, src_len = 0;
    if (hs_sockaddr(family, host, port, &dst, &dst_len) < 0
        || (source != NULL && hs_sockaddr(family, source, 0, &src, &src_len) < 0)) {
        PyErr_SetString(PyExc_ValueError, "connect_tcp: not a numeric address");
        return NULL;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(options); i++) {
        int level, name;
        PyObject *value;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(options, i), "iiO", &level, &name, &value)) {
            close(fd);
            return NULL;
        }
        int rc;
        if (PyBytes_Check(value)) {
            rc = setsockopt(fd, level, name, PyBytes_AS_STRING(value),
                            (socklen_t)PyBytes_GET_SIZE(value));
        } else {
            int number = (int)PyLong_AsLong(value);
            if (number == -1 && PyErr_Occurred()) {
                close(fd);
                return NULL;
            }
            rc = setsockopt(fd, level, name, &number, sizeof(number));
        }
        if (rc < 0)
            goto failed;
    }
    if (source != NULL && bind(fd, (struct sockaddr *)&src, src_len) < 0)
        goto failed;
    if (connect(fd, (struct sockaddr *)&dst, dst_len) < 0 && errno != EINPROGRESS)
        goto failed;
    return PyLong_FromLong(fd);
failed: {
    int err = errno;
    close(fd);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}
}

int
sp_handshaker_check(PyObject *o)
{
    return PyObject_TypeCheck(o, &HandshakerType);
}

void
sp_handshaker_dispatch(PyObject *o, int fd)
{
    Handshaker *self = (Handshaker *)o;
    if (self->epfd >= 0)
        hs_dispatch(self, fd);
}

int
sp_handshaker_pending(PyObject *o)
{
    return PyList_GET_SIZE(((Handshaker *)o)->events) > 0;
}

int
sp_handshaker_claim(PyObject *o, int fd)
{
    return hs_forget_left((Handshaker *)o, fd);
}

void
sp_handshaker_settle(PyObject *o)
{
    Handshaker *self = (Handshaker *)o;
    for (size_t i = 0; i < self->nleft; i++)
        if (self->epfd >= 0)
            (void)epoll_ctl(self->epfd, EPOLL_CTL_DEL, self->left[i], NULL);
    self->nleft = 0;
}

static PyMethodDef hs_functions[] = {
    {"connect_tcp", (PyCFunction)sp_connect_tcp, METH_VARARGS,
     "connect_tcp(family, source, host, port, options) -> fd"},
    {NULL, NULL, 0, NULL},
};

int
sp_handshaker_add(PyObject *module)
{
    if (PyType_Ready(&HandshakerType) < 0 || PyModule_AddFunctions(module, hs_functions) < 0)
        return -1;
    Py_INCREF(&HandshakerType);
    if (PyModule_AddObject(module, "Handshaker", (PyObject *)&HandshakerType) < 0) {
        Py_DECREF(&HandshakerType);
        return -1;
    }
    static const struct {
        const char *name;
        int value;
    } constants[] = {
        {"EV_ACCEPTED", SP_EV_ACCEPTED}, {"EV_REQUEST", SP_EV_REQUEST},
        {"EV_FAILED", SP_EV_FAILED}, {"EV_CONNECTED", SP_EV_CONNECTED},
        {"EV_CONNECT_FAILED", SP_EV_CONNECT_FAILED}, {"EV_RESPONSE", SP_EV_RESPONSE},
        {"EV_BACKEND_FAILED", SP_EV_BACKEND_FAILED}, {"EV_BODY", SP_EV_BODY},
        {"EV_ESTABLISHED", SP_EV_ESTABLISHED}, {"EV_ANSWERED", SP_EV_ANSWERED},
        {"EV_TIMEOUT", SP_EV_TIMEOUT}, {"EV_CLOSED", SP_EV_CLOSED},
        {"EV_ACCEPT_ERROR", SP_EV_ACCEPT_ERROR},
        {"TO_REQUEST", SP_TO_REQUEST}, {"TO_WRITE_BACKEND", SP_TO_WRITE_BACKEND},
        {"TO_RESPONSE", SP_TO_RESPONSE}, {"TO_CLIENT", SP_TO_CLIENT},
        {"THEN_HAND_OVER", SP_THEN_HAND_OVER}, {"THEN_READ_BODY", SP_THEN_READ_BODY},
        {"THEN_ANSWERED", SP_THEN_ANSWERED},
    };
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++)
        if (PyModule_AddIntConstant(module, constants[i].name, constants[i].value) < 0)
            return -1;
    return 0;
}
