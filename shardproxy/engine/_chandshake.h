/* shardproxy.engine._cengine's handshake core (_chandshake.c): the I/O of
 * engine/handshake.py's HandshakeEngine in C, driven by engine/chandshake.py. */
#ifndef SHARDPROXY_CHANDSHAKE_H
#define SHARDPROXY_CHANDSHAKE_H
#include <Python.h>
#include <stdint.h>

/* Adds the Handshaker type and its constants to the module; 0, or -1 with
 * an exception set. */
int sp_handshaker_add(PyObject *module);

/* A Handshaker made with another engine's epoll descriptor (the relay's)
 * registers its descriptors with this bit set in the event's data; that
 * engine's poll hands those events to sp_handshaker_dispatch. */
#define SP_HS_SHARED ((uint64_t)1 << 32)

/* Whether o is a Handshaker. */
int sp_handshaker_check(PyObject *o);

/* One event of the Handshaker o (sp_handshaker_check) for descriptor fd. */
void sp_handshaker_dispatch(PyObject *o, int fd);

/* Whether the Handshaker o has events for take_events. */
int sp_handshaker_pending(PyObject *o);

/* A shared Handshaker leaves a descriptor it hands over (ESTABLISHED) in the
 * set, with its own data; the engine that takes the descriptor claims it
 * (1: it was left, so modify rather than add it), and before each round
 * sp_handshaker_settle removes from the set those nobody claimed. */
int sp_handshaker_claim(PyObject *o, int fd);
void sp_handshaker_settle(PyObject *o);

#endif
