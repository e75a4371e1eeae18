/* shardproxy.engine._cengine's HTTP/1.x head parser (_chttp.c): a C core
 * over plain bytes for the C relay's handshake, and its Python twin's
 * functions (protocol/http1.py) for the differential tests. */
#ifndef SHARDPROXY_CHTTP_H
#define SHARDPROXY_CHTTP_H
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* The header lines a parse result holds inline. A head with more is still
 * walked to its end (an invalid line anywhere is reported as such), and then
 * answered SP_HTTP_TOO_MANY with nfields set: see _chttp.c's head comment. */
#define SP_HTTP_FIELDS 100

/* What sp_parse_* found wrong; *error is the text (protocol/http1.py's
 * HeadError message, without the part that quotes the head for
 * SP_HTTP_LINE and SP_HTTP_FIELD_CHAR, whose error_at says what to quote). */
enum sp_http_error {
    SP_HTTP_OK = 0,
    SP_HTTP_REQUEST_LINE,   /* request line is not 'method target version' */
    SP_HTTP_METHOD,         /* invalid method */
    SP_HTTP_TARGET,         /* invalid request target */
    SP_HTTP_VERSION,        /* invalid HTTP version */
    SP_HTTP_STATUS_VERSION, /* invalid HTTP version in the status line */
    SP_HTTP_STATUS,         /* invalid status code */
    SP_HTTP_REASON,         /* invalid reason phrase */
    SP_HTTP_FOLDING,        /* obsolete line folding is not allowed */
    SP_HTTP_LINE,           /* invalid header line (error_at: its first 40 bytes) */
    SP_HTTP_FIELD_CHAR,     /* invalid character in header (error_at: the name) */
    SP_HTTP_TOO_MANY,       /* valid, but more than the caller's room for lines */
};

/* Bytes head[off, off + len) of the head given to the parser. */
struct sp_span {
    size_t off;
    size_t len;
};

/* One header line: the name as sent, the value without its OWS. */
struct sp_field {
    struct sp_span name;
    struct sp_span value;
};

struct sp_request {
    struct sp_span method;
    struct sp_span target;
    struct sp_span version;   /* "1.1": the digits after "HTTP/" */
    struct sp_span body;      /* the header lines' bytes, for sp_parse_fields */
    struct sp_span error_at;  /* SP_HTTP_LINE, SP_HTTP_FIELD_CHAR: see above */
    size_t nfields;           /* all header lines, even beyond SP_HTTP_FIELDS */
    struct sp_field fields[SP_HTTP_FIELDS]; /* the first min(nfields, SP_HTTP_FIELDS) */
};

struct sp_response {
    struct sp_span version;   /* "1.1" */
    unsigned status;          /* 000 to 999: three digits */
    struct sp_span reason;
    struct sp_span body;
    struct sp_span error_at;
    size_t nfields;
    struct sp_field fields[SP_HTTP_FIELDS];
};

/* http1.head_end: the offset just past the first "\r\n\r\n" that starts at
 * or after start, or -1. */
int64_t sp_head_end(const uint8_t *buffer, size_t n, size_t start);

/* http1.parse_request and parse_response over head[0, n): SP_HTTP_OK, or an
 * enum sp_http_error with *error its text. Spans are offsets into head. */
int sp_parse_request(const uint8_t *head, size_t n, struct sp_request *out, const char **error);
int sp_parse_response(const uint8_t *head, size_t n, struct sp_response *out, const char **error);

/* http1._fields over head[body): the header lines into fields[0, cap), all
 * of them counted in *count; returns as the parsers do (SP_HTTP_TOO_MANY:
 * every line is valid, *count > cap). How a caller with SP_HTTP_TOO_MANY
 * gets all the lines: cap = *count, a second time. */
int sp_parse_fields(const uint8_t *head, struct sp_span body, struct sp_field *fields,
                    size_t cap, size_t *count, struct sp_span *error_at, const char **error);

/* Adds the parser's Python-visible functions to the module; 0, or -1 with
 * an exception set. */
int sp_http_add(PyObject *module);

#endif
