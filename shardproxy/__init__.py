"""shardproxy: a WebSocket load balancer for very many concurrent websockets.

The package is laid out by role; each subpackage's docstring says what it
holds::

    cli, __main__   the command line
    config/     TOML -> frozen dataclasses (model: the types and the effective
                config written back out; parse: checking, errors naming file,
                key and reason)
    protocol/   sans-IO: HTTP/1.1 heads, the upgrade, frames, PROXY protocol,
                the errors they answer with
    policy/     decisions without I/O: routing, the runtime server registry,
                balancing, the admission lease, the handshake engine's
                questions (decisions), sampling
    engine/     the data plane: its interface (api), the loop and timers, the
                relay (Python, and compiled: crelay over _cengine.c), the
                handshake engine, upstream connects, transports, which
                engine runs (choice, factory)
    worker/     one worker process (process) and what it gives the relay per
                tunnel (tunnels: placements and notes)
    control/    the supervisor: sockets, workers, typed messages and the
                channel, admin HTTP, health checks, the address plan
    telemetry/  stats snapshots as types, their aggregation, Prometheus
                metrics, ECS logs, ``status``
    host/       socket options, rlimits, what this host can do
    demo/       the built-in echo backend

The import arrows point one way (tests/unit/test_layout.py walks every
import, those under TYPE_CHECKING too, and refuses any cycle): ``protocol``
imports nothing of ours; ``policy`` only ``protocol`` and ``config``;
``engine`` never ``worker`` or ``control``; ``control`` never ``engine`` or
``worker``; and ``protocol``, ``policy`` and ``config`` load neither trio nor
a socket.

Where this departs from the layout first proposed (issue 13):

- Keepalive is the relay engine's, not the worker's: a compiled engine then
  pings every client with no Python per tunnel per interval.
- The worker's accounting and lifecycle (drain, retirement) stay in
  ``worker/process.py``, the one module that composes the engines; what it
  gives the relay per tunnel (a shared placement and a packed note) is
  ``worker/tunnels.py``.
- ``config/`` has no ``dump`` module: the effective configuration written
  back out is one method of the model (``Config.to_dict``).
- ``policy/decisions.py`` is new: the questions the handshake engine asks of
  policy (route, next server, PROXY header or not), so that the engine
  depends on an object of policy and never on the worker.
"""

__version__ = "0.1.0"
