/* shardproxy.engine._cengine's handshake core (_chandshake.c): the I/O of
 * engine/handshake.py's HandshakeEngine in C, driven by engine/chandshake.py. */
#ifndef SHARDPROXY_CHANDSHAKE_H
#define SHARDPROXY_CHANDSHAKE_H
#include <Python.h>

/* Adds the Handshaker type and its constants to the module; 0, or -1 with
 * an exception set. */
int sp_handshaker_add(PyObject *module);

#endif
