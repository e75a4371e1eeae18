/* shardproxy.engine._cengine's HTTP/1.x head parser (_chttp.c). */
#ifndef SHARDPROXY_CHTTP_H
#define SHARDPROXY_CHTTP_H
#include <Python.h>

/* Adds the parser's Python-visible functions to the module; 0, or -1 with
 * an exception set. */
int sp_http_add(PyObject *module);

#endif
