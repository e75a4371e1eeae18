/* The HTTP/1.x head parser in C: protocol/http1.py's twin (stub). */
#include "_chttp.h"

int
sp_http_add(PyObject *module)
{
    (void)module;
    return 0;
}
