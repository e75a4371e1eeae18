"""Benchmark harness for shardproxy (run ``python -m bench --help``).

Pieces, each usable on its own so that later scenarios reuse them:

- :mod:`bench.wire`     RFC 6455 bits shared by client and server (accept key, frames)
- :mod:`bench.backend`  cheap multi-process epoll echo backend (``python -m bench.backend``)
- :mod:`bench.loadgen`  epoll websocket client generator driven over stdin/stdout
                        (``python -m bench.loadgen``)
- :mod:`bench.targets`  the proxies under test (shardproxy now; HAProxy/nginx later)
- :mod:`bench.measure`  process memory snapshots, settling, machine description
- :mod:`bench.procs`    child processes spoken to by lines, ports, descriptor limits
- :mod:`bench.idle`     the ``idle`` scenario: user memory per idle tunnel

Rules (``../shared/BENCH.md``): loopback only, many 127.x source addresses,
``IP_BIND_ADDRESS_NO_PORT`` before every client ``bind``, a fresh backend port
per run, every loop bounded in count and time.
"""
