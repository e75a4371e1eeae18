/*
 * The HTTP/1.x head parser in C: protocol/http1.py's twin (head_end,
 * parse_request, parse_response, _fields), for the C handshake engine
 * (issue 14), which calls the core below (declared in _chttp.h) with no
 * Python object at all, and for the Python functions at the end of the file,
 * which exist so that the tests can hold the two parsers to one answer.
 *
 * http1.py is the reference, byte for byte: for ANY bytes, valid heads or
 * not, both give the same result or the same HeadError message
 * (tests/unit/test_chttp.py: differential property tests). So the core
 * follows http1.py's bytes operations where they say more than RFC 9112's
 * grammar does, and every one of them is named where it is mirrored:
 *
 * - parse_request drops every leading CR and LF, in any mix
 *   (head.lstrip(b"\r\n"); §2.2 asks for at least one empty line);
 * - the start line ends at the first CRLF; with none, find's -1 makes it the
 *   head but its last byte (head[:-1]);
 * - the header lines are head[line_end + 2 : -4] (whatever the last four
 *   bytes are; an empty slice when the start line reaches into them), split
 *   on CRLF: a CRLF at the end of that slice makes a last, empty line, which
 *   is invalid like any line without a colon;
 * - a request line is split on every space (exactly three parts), a status
 *   line partitioned at its first two;
 * - the patterns' exact classes: tokens are RFC 9110 §5.6.2 tchars (the
 *   request-target also takes \x80-\xff, not space or DEL), the version is
 *   HTTP/<digit>.<digit>, the status three ASCII digits (int() of them, so
 *   "007" is 7), and _CTL is every control but HTAB, DEL included;
 * - a value is stripped of spaces and tabs at both ends, then searched for
 *   controls.
 *
 * The bound: Python takes any number of header lines, and the core keeps
 * the spans of the first SP_HTTP_FIELDS (100) inline in its result, so that
 * a parse allocates nothing. Beyond them it still walks and checks every
 * line to the end of the head, so an invalid line is reported as such
 * wherever it is, as Python reports it, and only a head Python accepts is
 * answered SP_HTTP_TOO_MANY, with nfields the real count. The caller then
 * decides; sp_parse_fields into room for nfields gives it every line. The
 * Python functions here do exactly that, so they never show the bound (the
 * tests cross it). The C handshake should too, to stay the Python engine's
 * twin: its heads are bounded by proxy.max_header_bytes (16 KiB by default),
 * a few thousand lines at most; answering 431 instead would be a difference
 * between the engines to document and test.
 *
 * The Python functions take any bytes-like object (bytes, bytearray,
 * memoryview) and return bytes; http1.py given a bytearray returns
 * bytearrays, which compare equal. HeadError is http1.py's own class,
 * imported at the first error (protocol imports nothing of ours, so there is
 * no cycle to fear, but the module's import need not pay for it either).
 */

#define PY_SSIZE_T_CLEAN
#include "_chttp.h"

#include <string.h>

#define SP_NONE SIZE_MAX  /* bytes.find's -1 */
#define SP_QUOTED 40      /* f"invalid header line {line[:40]!r}" */

static const char *const sp_http_texts[] = {
    [SP_HTTP_OK] = "no error",
    [SP_HTTP_REQUEST_LINE] = "request line is not 'method target version'",
    [SP_HTTP_METHOD] = "invalid method",
    [SP_HTTP_TARGET] = "invalid request target",
    [SP_HTTP_VERSION] = "invalid HTTP version",
    [SP_HTTP_STATUS_VERSION] = "invalid HTTP version in the status line",
    [SP_HTTP_STATUS] = "invalid status code",
    [SP_HTTP_REASON] = "invalid reason phrase",
    [SP_HTTP_FOLDING] = "obsolete line folding is not allowed",
    [SP_HTTP_LINE] = "invalid header line",
    [SP_HTTP_FIELD_CHAR] = "invalid character in header",
    [SP_HTTP_TOO_MANY] = "too many header lines",
};

static int
sp_fail(int code, const char **error)
{
    *error = sp_http_texts[code];
    return code;
}

static struct sp_span
sp_span(size_t off, size_t end)
{
    return (struct sp_span){off, end - off};
}

/* -- http1.py's patterns ---------------------------------------------------- */

/* _TOKEN's class: RFC 9110 §5.6.2 tchar. */
static int
sp_tchar(uint8_t c)
{
    if ((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'))
        return 1;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
        return 1;
    default:
        return 0;
    }
}

/* _TOKEN.fullmatch */
static int
sp_is_token(const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!sp_tchar(p[i]))
            return 0;
    return 1;
}

/* _TARGET.fullmatch: visible ASCII and obs-text, at least one. */
static int
sp_is_target(const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= 0x21 && p[i] <= 0x7e) || p[i] >= 0x80))
            return 0;
    return 1;
}

/* _CTL.search: a control other than HTAB (RFC 9110 §5.5), DEL included. */
static int
sp_has_ctl(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] <= 0x08 || (p[i] >= 0x0a && p[i] <= 0x1f) || p[i] == 0x7f)
            return 1;
    return 0;
}

static int
sp_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

/* _VERSION.fullmatch: HTTP/<digit>.<digit> */
static int
sp_is_version(const uint8_t *p, size_t n)
{
    return n == 8 && memcmp(p, "HTTP/", 5) == 0 && sp_digit(p[5]) && p[6] == '.'
           && sp_digit(p[7]);
}

/* -- bytes methods ------------------------------------------------------------ */

/* Where byte c first is in p[from, to), or SP_NONE. */
static size_t
sp_find(const uint8_t *p, size_t from, size_t to, uint8_t c)
{
    if (from >= to)
        return SP_NONE;
    const uint8_t *at = memchr(p + from, c, to - from);
    return at == NULL ? SP_NONE : (size_t)(at - p);
}

/* p[from:to].find(b"\r\n"), as an offset into p, or SP_NONE: the LF must be
 * inside the slice too. */
static size_t
sp_find_crlf(const uint8_t *p, size_t from, size_t to)
{
    while (from + 1 < to) {
        size_t cr = sp_find(p, from, to - 1, '\r');
        if (cr == SP_NONE)
            return SP_NONE;
        if (p[cr + 1] == '\n')
            return cr;
        from = cr + 1;
    }
    return SP_NONE;
}

int64_t
sp_head_end(const uint8_t *buffer, size_t n, size_t start)
{
    if (n < 4 || start > n - 4)
        return -1;
    for (size_t i = start, last = n - 4; i <= last; i++) {
        i = sp_find(buffer, i, last + 1, '\r');
        if (i == SP_NONE)
            return -1;
        if (memcmp(buffer + i, "\r\n\r\n", 4) == 0)
            return (int64_t)(i + 4);
    }
    return -1;
}

/* head[line_end + 2 : -4], with head starting at `from` of the buffer (the
 * request's lstrip) and line_end SP_NONE for find's -1. */
static struct sp_span
sp_body(size_t n, size_t from, size_t line_end)
{
    size_t len = n - from;
    size_t start = line_end == SP_NONE ? 1 : line_end - from + 2;
    size_t stop = len >= 4 ? len - 4 : 0;
    if (start >= stop)
        return sp_span(n, n);
    return sp_span(from + start, from + stop);
}

/* -- _fields ------------------------------------------------------------------ */

/* One header line, head[a, b). */
static int
sp_field(const uint8_t *head, size_t a, size_t b, struct sp_field *field,
         struct sp_span *error_at)
{
    /* name, colon, value = line.partition(b":") */
    size_t colon = sp_find(head, a, b, ':');
    if (colon == SP_NONE || !sp_is_token(head + a, colon - a)) {
        if (b > a && (head[a] == ' ' || head[a] == '\t'))
            return SP_HTTP_FOLDING; /* RFC 9112 §5.2 */
        *error_at = sp_span(a, b - a > SP_QUOTED ? a + SP_QUOTED : b);
        return SP_HTTP_LINE;
    }
    size_t v = colon + 1, w = b; /* value.strip(b" \t") */
    while (v < w && (head[v] == ' ' || head[v] == '\t'))
        v++;
    while (w > v && (head[w - 1] == ' ' || head[w - 1] == '\t'))
        w--;
    if (sp_has_ctl(head + v, w - v)) {
        *error_at = sp_span(a, colon);
        return SP_HTTP_FIELD_CHAR;
    }
    field->name = sp_span(a, colon);
    field->value = sp_span(v, w);
    return SP_HTTP_OK;
}

int
sp_parse_fields(const uint8_t *head, struct sp_span body, struct sp_field *fields,
                size_t cap, size_t *count, struct sp_span *error_at, const char **error)
{
    *count = 0;
    if (body.len == 0) /* if not body: return fields */
        return SP_HTTP_OK;
    size_t end = body.off + body.len;
    for (size_t pos = body.off;;) { /* body.split(b"\r\n") */
        size_t crlf = sp_find_crlf(head, pos, end);
        struct sp_field field;
        int code = sp_field(head, pos, crlf == SP_NONE ? end : crlf, &field, error_at);
        if (code != SP_HTTP_OK)
            return sp_fail(code, error);
        if (*count < cap)
            fields[*count] = field;
        ++*count;
        if (crlf == SP_NONE)
            break;
        pos = crlf + 2;
    }
    return *count > cap ? sp_fail(SP_HTTP_TOO_MANY, error) : SP_HTTP_OK;
}

/* -- parse_request, parse_response ---------------------------------------------- */

/* head[:line_end] of the head that starts at `from`: all but its last byte
 * when find gave -1. */
static size_t
sp_line_end(size_t n, size_t from, size_t crlf)
{
    if (crlf != SP_NONE)
        return crlf;
    return n > from ? n - 1 : from;
}

int
sp_parse_request(const uint8_t *head, size_t n, struct sp_request *out, const char **error)
{
    out->nfields = 0;
    out->error_at = sp_span(0, 0);
    size_t s = 0; /* head.lstrip(b"\r\n") */
    while (s < n && (head[s] == '\r' || head[s] == '\n'))
        s++;
    size_t crlf = sp_find_crlf(head, s, n);
    size_t end = sp_line_end(n, s, crlf);
    /* parts = head[:line_end].split(b" "), len(parts) == 3 */
    size_t sp1 = sp_find(head, s, end, ' ');
    size_t sp2 = sp1 == SP_NONE ? SP_NONE : sp_find(head, sp1 + 1, end, ' ');
    if (sp2 == SP_NONE || sp_find(head, sp2 + 1, end, ' ') != SP_NONE)
        return sp_fail(SP_HTTP_REQUEST_LINE, error);
    if (!sp_is_token(head + s, sp1 - s))
        return sp_fail(SP_HTTP_METHOD, error);
    if (!sp_is_target(head + sp1 + 1, sp2 - sp1 - 1))
        return sp_fail(SP_HTTP_TARGET, error);
    if (!sp_is_version(head + sp2 + 1, end - sp2 - 1))
        return sp_fail(SP_HTTP_VERSION, error);
    out->method = sp_span(s, sp1);
    out->target = sp_span(sp1 + 1, sp2);
    out->version = sp_span(sp2 + 6, end); /* version[5:] */
    out->body = sp_body(n, s, crlf);
    return sp_parse_fields(head, out->body, out->fields, SP_HTTP_FIELDS, &out->nfields,
                           &out->error_at, error);
}

int
sp_parse_response(const uint8_t *head, size_t n, struct sp_response *out, const char **error)
{
    out->nfields = 0;
    out->error_at = sp_span(0, 0);
    size_t crlf = sp_find_crlf(head, 0, n);
    size_t end = sp_line_end(n, 0, crlf);
    /* version, _, rest = line.partition(b" "); status, _, reason = rest.partition(b" ") */
    size_t sp1 = sp_find(head, 0, end, ' ');
    size_t version_end = sp1 == SP_NONE ? end : sp1;
    size_t rest = sp1 == SP_NONE ? end : sp1 + 1;
    size_t sp2 = sp_find(head, rest, end, ' ');
    size_t status_end = sp2 == SP_NONE ? end : sp2;
    size_t reason = sp2 == SP_NONE ? end : sp2 + 1;
    if (!sp_is_version(head, version_end))
        return sp_fail(SP_HTTP_STATUS_VERSION, error);
    const uint8_t *status = head + rest;
    if (status_end - rest != 3 || !sp_digit(status[0]) || !sp_digit(status[1])
        || !sp_digit(status[2]))
        return sp_fail(SP_HTTP_STATUS, error);
    if (sp_has_ctl(head + reason, end - reason))
        return sp_fail(SP_HTTP_REASON, error);
    out->version = sp_span(5, version_end);
    out->status = (unsigned)(status[0] - '0') * 100 + (unsigned)(status[1] - '0') * 10
                  + (unsigned)(status[2] - '0');
    out->reason = sp_span(reason, end);
    out->body = sp_body(n, 0, crlf);
    return sp_parse_fields(head, out->body, out->fields, SP_HTTP_FIELDS, &out->nfields,
                           &out->error_at, error);
}

/* -- the Python functions (http1.py's, for the differential tests) ----------- */

static PyObject *head_error; /* http1.HeadError, once imported */

static PyObject *
sp_bytes(const uint8_t *head, struct sp_span span)
{
    return PyBytes_FromStringAndSize((const char *)head + span.off, (Py_ssize_t)span.len);
}

/* Raises http1.HeadError with http1.py's message. Returns NULL. */
static PyObject *
sp_raise(const uint8_t *head, int code, const char *error, struct sp_span at)
{
    if (head_error == NULL) {
        PyObject *http1 = PyImport_ImportModule("shardproxy.protocol.http1");
        if (http1 == NULL)
            return NULL;
        head_error = PyObject_GetAttrString(http1, "HeadError");
        Py_DECREF(http1);
        if (head_error == NULL)
            return NULL;
    }
    PyObject *quoted = NULL, *message;
    if (code == SP_HTTP_LINE) { /* f"invalid header line {line[:40]!r}" */
        if ((quoted = sp_bytes(head, at)) == NULL)
            return NULL;
        message = PyUnicode_FromFormat("%s %R", error, quoted);
    } else if (code == SP_HTTP_FIELD_CHAR) { /* f"... {name.decode('latin-1')}" */
        quoted = PyUnicode_DecodeLatin1((const char *)head + at.off, (Py_ssize_t)at.len, NULL);
        if (quoted == NULL)
            return NULL;
        message = PyUnicode_FromFormat("%s %U", error, quoted);
    } else {
        message = PyUnicode_FromString(error);
    }
    Py_XDECREF(quoted);
    if (message != NULL) {
        PyErr_SetObject(head_error, message);
        Py_DECREF(message);
    }
    return NULL;
}

static PyObject *
sp_fields_list(const uint8_t *head, const struct sp_field *fields, size_t count)
{
    PyObject *list = PyList_New((Py_ssize_t)count);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        PyObject *name = sp_bytes(head, fields[i].name);
        PyObject *value = sp_bytes(head, fields[i].value);
        PyObject *pair = name && value ? PyTuple_Pack(2, name, value) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    return list;
}

/* The header lines as _fields's list: from the parse's own room or, past
 * SP_HTTP_FIELDS, from a second walk into room for all of them (see the
 * bound in the head comment). */
static PyObject *
sp_fields(const uint8_t *head, const struct sp_field *fields, size_t count, struct sp_span body)
{
    if (count <= SP_HTTP_FIELDS)
        return sp_fields_list(head, fields, count);
    struct sp_field *all = PyMem_New(struct sp_field, count);
    if (all == NULL)
        return PyErr_NoMemory();
    size_t again;
    struct sp_span at;
    const char *error;
    PyObject *list = NULL;
    if (sp_parse_fields(head, body, all, count, &again, &at, &error) == SP_HTTP_OK
        && again == count)
        list = sp_fields_list(head, all, count);
    else
        PyErr_SetString(PyExc_SystemError, "_chttp: the header lines' second walk disagrees");
    PyMem_Free(all);
    return list;
}

/* (a, b, c, d), taking the references; NULL if any is (its error set). */
static PyObject *
sp_tuple4(PyObject *a, PyObject *b, PyObject *c, PyObject *d)
{
    PyObject *t = a && b && c && d ? PyTuple_Pack(4, a, b, c, d) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(d);
    return t;
}

static PyObject *
http_parse_request(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"head", NULL};
    Py_buffer view;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:parse_request", kwlist, &view))
        return NULL;
    const uint8_t *head = view.buf;
    struct sp_request r;
    const char *error;
    PyObject *result;
    int code = sp_parse_request(head, (size_t)view.len, &r, &error);
    if (code == SP_HTTP_OK || code == SP_HTTP_TOO_MANY)
        result = sp_tuple4(sp_bytes(head, r.method), sp_bytes(head, r.target),
                           sp_bytes(head, r.version), sp_fields(head, r.fields, r.nfields, r.body));
    else
        result = sp_raise(head, code, error, r.error_at);
    PyBuffer_Release(&view);
    return result;
}

/* -- the upgrade request's fast path (protocol/upgrade.py) ------------------
 *
 * parse_upgrade(buffer, end) answers for the common head only: one that
 * RequestReader.feed's parse_request + validate_upgrade accept, with the
 * same fields, or None, and then the reference decides (and words any
 * refusal). So the C side may be stricter than Python (None for a head
 * Python accepts costs one parse more) but never looser: it answers only
 * for GET, HTTP/1.1, an origin-form target, at most SP_HTTP_FIELDS lines,
 * no Content-Length or Transfer-Encoding, one Host of visible ASCII not in
 * brackets, "websocket" among the Upgrade tokens and "upgrade" among the
 * Connection ones, one Sec-WebSocket-Version "13" and one Sec-WebSocket-Key
 * of 22 base64 characters and "==" (16 bytes). tests/unit/test_upgrade_fast.py
 * holds it to that against validate_upgrade, on any bytes. */

static uint8_t
sp_lower(uint8_t c)
{
    return c >= 'A' && c <= 'Z' ? (uint8_t)(c + 32) : c;
}

/* span == lower-case name, ASCII case-insensitively (bytes.lower()). */
static int
sp_is_name(const uint8_t *head, struct sp_span span, const char *name)
{
    size_t n = strlen(name);
    if (span.len != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (sp_lower(head[span.off + i]) != (uint8_t)name[i])
            return 0;
    return 1;
}

/* Whether token (lower case) is among the comma-separated tokens of the
 * value, each stripped and lowered (upgrade.py's _tokens). */
static int
sp_has_token(const uint8_t *head, struct sp_span value, const char *token)
{
    size_t at = value.off, end = value.off + value.len;
    while (at <= end) {
        size_t comma = sp_find(head, at, end, ',');
        size_t stop = comma == SP_NONE ? end : comma, a = at, b = stop;
        while (a < b && (head[a] == ' ' || head[a] == '\t'))
            a++;
        while (b > a && (head[b - 1] == ' ' || head[b - 1] == '\t'))
            b--;
        if (sp_is_name(head, sp_span(a, b), token))
            return 1;
        if (comma == SP_NONE)
            break;
        at = comma + 1;
    }
    return 0;
}

static int
sp_b64char(uint8_t c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+'
           || c == '/';
}

/* base64 of 16 bytes: 22 characters of the alphabet, then "==". */
static int
sp_is_key(const uint8_t *head, struct sp_span v)
{
    if (v.len != 24 || head[v.off + 22] != '=' || head[v.off + 23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if (!sp_b64char(head[v.off + i]))
            return 0;
    return 1;
}

/* _host_name for a Host of visible ASCII (and inner spaces) not in
 * brackets: lower case, the port cut off when there is one colon. NULL
 * with no error set when the value is not such a Host. */
static PyObject *
sp_host_name(const uint8_t *head, struct sp_span v)
{
    char name[256];
    size_t colons = 0, colon = 0;
    if (v.len == 0 || v.len > sizeof name || head[v.off] == '[')
        return NULL;
    for (size_t i = 0; i < v.len; i++) {
        uint8_t c = head[v.off + i];
        if (c < 0x20 || c > 0x7e)
            return NULL;
        if (c == ':') {
            colons++;
            colon = i;
        }
        name[i] = (char)sp_lower(c);
    }
    return PyUnicode_DecodeASCII(name, (Py_ssize_t)(colons == 1 ? colon : v.len), NULL);
}

/* The names of an upgrade request's usual fields, as clients write them and
 * lowered: their bytes objects are made once (sp_http_add), so that a head's
 * usual names cost no allocation (a handshake's head objects are a good
 * part of its Python-side cost). */
static const char *const sp_usual_names[][2] = {
    {"Host", "host"},
    {"Upgrade", "upgrade"},
    {"Connection", "connection"},
    {"Sec-WebSocket-Key", "sec-websocket-key"},
    {"Sec-WebSocket-Version", "sec-websocket-version"},
    {"Sec-WebSocket-Extensions", "sec-websocket-extensions"},
    {"Sec-WebSocket-Protocol", "sec-websocket-protocol"},
    {"User-Agent", "user-agent"},
    {"Origin", "origin"},
    {"Cookie", "cookie"},
    {"Pragma", "pragma"},
    {"Cache-Control", "cache-control"},
    {"Accept-Encoding", "accept-encoding"},
    {"Accept-Language", "accept-language"},
    {"X-Forwarded-For", "x-forwarded-for"},
};
#define SP_USUAL (sizeof(sp_usual_names) / sizeof(sp_usual_names[0]))
static PyObject *sp_usual[SP_USUAL][2];

/* The field name's objects as sent and lowered, new references: the usual
 * ones shared (one object for both when it came lowered), else made. */
static int
sp_name_objects(const uint8_t *head, struct sp_span name, PyObject **raw, PyObject **low)
{
    for (size_t i = 0; i < SP_USUAL; i++) {
        if (sp_usual[i][0] == NULL || (size_t)PyBytes_GET_SIZE(sp_usual[i][0]) != name.len)
            continue;
        for (int form = 0; form < 2; form++) {
            if (memcmp(PyBytes_AS_STRING(sp_usual[i][form]), head + name.off, name.len) == 0) {
                *raw = Py_NewRef(sp_usual[i][form]);
                *low = Py_NewRef(sp_usual[i][1]);
                return 0;
            }
        }
    }
    *raw = sp_bytes(head, name);
    *low = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)name.len);
    if (*raw == NULL || *low == NULL) {
        Py_CLEAR(*raw);
        Py_CLEAR(*low);
        return -1;
    }
    char *out = PyBytes_AS_STRING(*low);
    for (size_t j = 0; j < name.len; j++)
        out[j] = (char)sp_lower(head[name.off + j]);
    return 0;
}

/* The fields a pair of tuples: (raw_headers, headers), names lowered in
 * the second (one tuple for both where the name came lowered). */
static int
sp_header_tuples(const uint8_t *head, const struct sp_request *r, PyObject **raw,
                 PyObject **lowered)
{
    Py_ssize_t n = (Py_ssize_t)r->nfields;
    *raw = PyTuple_New(n);
    *lowered = PyTuple_New(n);
    if (*raw == NULL || *lowered == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        const struct sp_field *f = &r->fields[i];
        PyObject *name, *low;
        if (sp_name_objects(head, f->name, &name, &low) < 0)
            return -1;
        PyObject *value = sp_bytes(head, f->value);
        if (value == NULL) {
            Py_DECREF(name);
            Py_DECREF(low);
            return -1;
        }
        PyObject *pair = PyTuple_Pack(2, name, value);
        PyObject *lpair = name == low ? Py_XNewRef(pair) : PyTuple_Pack(2, low, value);
        Py_DECREF(name);
        Py_DECREF(value);
        Py_DECREF(low);
        if (pair == NULL || lpair == NULL) {
            Py_XDECREF(pair);
            Py_XDECREF(lpair);
            return -1;
        }
        PyTuple_SET_ITEM(*raw, i, pair);
        PyTuple_SET_ITEM(*lowered, i, lpair);
    }
    return 0;
}

/* (method, target, raw_headers, headers, host, path), or None. */
static PyObject *
sp_upgrade(const uint8_t *head, size_t n)
{
    struct sp_request r;
    const char *error;
    if (sp_parse_request(head, n, &r, &error) != SP_HTTP_OK)
        Py_RETURN_NONE;
    if (r.method.len != 3 || memcmp(head + r.method.off, "GET", 3) != 0 || r.version.len != 3
        || memcmp(head + r.version.off, "1.1", 3) != 0 || head[r.target.off] != '/')
        Py_RETURN_NONE;
    int hosts = 0, versions = 0, keys = 0, upgrade = 0, connection = 0;
    struct sp_span host = {0, 0};
    for (size_t i = 0; i < r.nfields; i++) {
        struct sp_span name = r.fields[i].name, value = r.fields[i].value;
        if (sp_is_name(head, name, "host")) {
            hosts++;
            host = value;
        } else if (sp_is_name(head, name, "upgrade")) {
            upgrade |= sp_has_token(head, value, "websocket");
        } else if (sp_is_name(head, name, "connection")) {
            connection |= sp_has_token(head, value, "upgrade");
        } else if (sp_is_name(head, name, "sec-websocket-version")) {
            versions += value.len == 2 && memcmp(head + value.off, "13", 2) == 0 ? 1 : 2;
        } else if (sp_is_name(head, name, "sec-websocket-key")) {
            keys += sp_is_key(head, value) ? 1 : 2;
        } else if (sp_is_name(head, name, "content-length")
                   || sp_is_name(head, name, "transfer-encoding")) {
            Py_RETURN_NONE;
        }
    }
    if (hosts != 1 || versions != 1 || keys != 1 || !upgrade || !connection)
        Py_RETURN_NONE;
    PyObject *host_name = sp_host_name(head, host);
    if (host_name == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    size_t q = sp_find(head, r.target.off, r.target.off + r.target.len, '?');
    size_t path_len = (q == SP_NONE ? r.target.off + r.target.len : q) - r.target.off;
    PyObject *raw = NULL, *lowered = NULL, *result = NULL;
    PyObject *path = PyUnicode_DecodeLatin1((const char *)head + r.target.off,
                                            (Py_ssize_t)path_len, NULL);
    if (path != NULL && sp_header_tuples(head, &r, &raw, &lowered) == 0) {
        PyObject *method = sp_bytes(head, r.method);
        PyObject *target = sp_bytes(head, r.target);
        if (method != NULL && target != NULL)
            result = PyTuple_Pack(6, method, target, raw, lowered, host_name, path);
        Py_XDECREF(method);
        Py_XDECREF(target);
    }
    Py_XDECREF(raw);
    Py_XDECREF(lowered);
    Py_XDECREF(path);
    Py_DECREF(host_name);
    return result;
}

static PyObject *
http_parse_upgrade(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t end;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*n:parse_upgrade", &view, &end))
        return NULL;
    if (end < 0 || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "end is not within the buffer");
        return NULL;
    }
    PyObject *result = sp_upgrade(view.buf, (size_t)end);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
http_parse_response(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"head", NULL};
    Py_buffer view;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:parse_response", kwlist, &view))
        return NULL;
    const uint8_t *head = view.buf;
    struct sp_response r;
    const char *error;
    PyObject *result;
    int code = sp_parse_response(head, (size_t)view.len, &r, &error);
    if (code == SP_HTTP_OK || code == SP_HTTP_TOO_MANY)
        result = sp_tuple4(sp_bytes(head, r.version), PyLong_FromUnsignedLong(r.status),
                           sp_bytes(head, r.reason), sp_fields(head, r.fields, r.nfields, r.body));
    else
        result = sp_raise(head, code, error, r.error_at);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
http_head_end(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "start", NULL};
    Py_buffer view;
    PyObject *start_arg = Py_None;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|O:head_end", kwlist, &view, &start_arg))
        return NULL;
    /* buffer.find(END, start): start is a slice index, clipped, from the end
     * when negative, and None is 0 */
    Py_ssize_t start = 0;
    if (start_arg != Py_None) {
        if (!PyIndex_Check(start_arg)) {
            PyErr_SetString(PyExc_TypeError,
                            "slice indices must be integers or None or have an __index__ method");
            PyBuffer_Release(&view);
            return NULL;
        }
        start = PyNumber_AsSsize_t(start_arg, NULL);
        if (start == -1 && PyErr_Occurred()) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    if (start < 0)
        start = start < -view.len ? 0 : start + view.len;
    int64_t end = sp_head_end(view.buf, (size_t)view.len, (size_t)start);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong((long long)end);
}

/* -- the forwarded head (http1.forwarded_head) ------------------------------ */

/* Which X-Forwarded-* field name n[0, len) is, ASCII case-insensitively:
 * 1 For, 2 Proto, 3 Port, 0 none. */
static int
sp_forwarded_name(const char *n, Py_ssize_t len)
{
    static const char *names[] = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-port"};
    struct sp_span all = {0, (size_t)len};
    for (int i = 0; i < 3; i++)
        if (sp_is_name((const uint8_t *)n, all, names[i]))
            return i + 1;
    return 0;
}

static void
sp_put(char **at, const char *data, size_t n)
{
    memcpy(*at, data, n);
    *at += n;
}

/* http1.forwarded_head in C: the same bytes, in one pass to size the head
 * and one to write it. raw_headers: a sequence of (name, value) bytes. */
static PyObject *
http_forwarded_head(PyObject *module, PyObject *args)
{
    const char *method, *target, *ip, *proto;
    Py_ssize_t method_len, target_len, ip_len, proto_len;
    PyObject *raw, *port;
    (void)module;
    if (!PyArg_ParseTuple(args, "y#y#Os#s#O:forwarded_head", &method, &method_len, &target,
                          &target_len, &raw, &ip, &ip_len, &proto, &proto_len, &port))
        return NULL;
    PyObject *port_text = PyObject_Str(port);  /* str(port), as the reference */
    if (port_text == NULL)
        return NULL;
    Py_ssize_t port_len;
    const char *port_chars = PyUnicode_AsUTF8AndSize(port_text, &port_len);
    PyObject *fields = PySequence_Fast(raw, "raw_headers must be a sequence");
    PyObject *result = NULL;
    if (port_chars == NULL || fields == NULL)
        goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fields);
    PyObject **items = PySequence_Fast_ITEMS(fields);
    static const char xff[] = "X-Forwarded-For: ", xfproto[] = "\r\nX-Forwarded-Proto: ",
                      xfport[] = "\r\nX-Forwarded-Port: ", version[] = " HTTP/1.1\r\n";
    size_t total = (size_t)method_len + 1 + (size_t)target_len + sizeof(version) - 1;
    size_t prior = 0;  /* bytes of earlier X-Forwarded-For values and their ", " */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "raw_headers: (name, value) pairs of bytes");
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        int which = sp_forwarded_name(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
        if (which == 1)
            prior += (size_t)PyBytes_GET_SIZE(value) + 2;
        else if (which == 0)
            total += (size_t)PyBytes_GET_SIZE(name) + 2 + (size_t)PyBytes_GET_SIZE(value) + 2;
    }
    total += sizeof(xff) - 1 + prior + (size_t)ip_len + sizeof(xfproto) - 1 + (size_t)proto_len +
             sizeof(xfport) - 1 + (size_t)port_len + 4;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result == NULL)
        goto done;
    char *at = PyBytes_AS_STRING(result);
    sp_put(&at, method, (size_t)method_len);
    sp_put(&at, " ", 1);
    sp_put(&at, target, (size_t)target_len);
    sp_put(&at, version, sizeof(version) - 1);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(items[i], 0), *value = PyTuple_GET_ITEM(items[i], 1);
        if (sp_forwarded_name(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) != 0)
            continue;
        sp_put(&at, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
        sp_put(&at, ": ", 2);
        sp_put(&at, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        sp_put(&at, "\r\n", 2);
    }
    sp_put(&at, xff, sizeof(xff) - 1);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(items[i], 0), *value = PyTuple_GET_ITEM(items[i], 1);
        if (sp_forwarded_name(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) != 1)
            continue;
        sp_put(&at, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        sp_put(&at, ", ", 2);
    }
    sp_put(&at, ip, (size_t)ip_len);
    sp_put(&at, xfproto, sizeof(xfproto) - 1);
    sp_put(&at, proto, (size_t)proto_len);
    sp_put(&at, xfport, sizeof(xfport) - 1);
    sp_put(&at, port_chars, (size_t)port_len);
    sp_put(&at, "\r\n\r\n", 4);
done:
    Py_XDECREF(fields);
    Py_DECREF(port_text);
    return result;
}

static PyMethodDef sp_http_methods[] = {
    {"head_end", (PyCFunction)(void (*)(void))http_head_end, METH_VARARGS | METH_KEYWORDS,
     "head_end($module, /, buffer, start=0)\n--\n\n"
     "protocol.http1.head_end in C: the offset just past the empty line ending\n"
     "the head, or -1 if not there yet."},
    {"parse_request", (PyCFunction)(void (*)(void))http_parse_request,
     METH_VARARGS | METH_KEYWORDS,
     "parse_request($module, /, head)\n--\n\n"
     "protocol.http1.parse_request in C: (method, target, version, headers).\n"
     "Raises protocol.http1.HeadError."},
    {"parse_upgrade", (PyCFunction)http_parse_upgrade, METH_VARARGS,
     "parse_upgrade($module, buffer, end, /)\n--\n\n"
     "buffer[:end] as (method, target, raw_headers, headers, host, path) when\n"
     "protocol.upgrade's validate_upgrade accepts it as such, or None: ask it."},
    {"forwarded_head", (PyCFunction)http_forwarded_head, METH_VARARGS,
     "forwarded_head($module, method, target, raw_headers, client_ip, proto, port, /)\n--\n\n"
     "protocol.http1.forwarded_head in C: the same head for the backend."},
    {"parse_response", (PyCFunction)(void (*)(void))http_parse_response,
     METH_VARARGS | METH_KEYWORDS,
     "parse_response($module, /, head)\n--\n\n"
     "protocol.http1.parse_response in C: (version, status, reason, headers).\n"
     "Raises protocol.http1.HeadError."},
    {NULL, NULL, 0, NULL},
};

int
sp_http_add(PyObject *module)
{
    for (size_t i = 0; i < SP_USUAL; i++) {
        for (int form = 0; form < 2; form++) {
            if (sp_usual[i][form] == NULL)
                sp_usual[i][form] = PyBytes_FromString(sp_usual_names[i][form]);
            if (sp_usual[i][form] == NULL)
                return -1;
        }
    }
    return PyModule_AddFunctions(module, sp_http_methods);
}
