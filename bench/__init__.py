"""Benchmark harness for shardproxy (run ``python -m bench --help``).

Pieces, each usable on its own so that later scenarios reuse them:

- :mod:`bench.wire`     RFC 6455 bits shared by client and server (accept key, frames)
- :mod:`bench.backend`  cheap multi-process epoll echo backend (``python -m bench.backend``)
- :mod:`bench.loadgen`  epoll websocket client generator driven over stdin/stdout
                        (``python -m bench.loadgen``)
- :mod:`bench.targets`  the targets by name: shardproxy, direct (no proxy), and the peers
- :mod:`bench.peers`    HAProxy and nginx with generated configs
- :mod:`bench.measure`  process memory snapshots, settling, machine description
- :mod:`bench.procs`    child processes spoken to by lines, ports, descriptor limits
- :mod:`bench.idle`, :mod:`bench.pingpong`, :mod:`bench.handshake`, :mod:`bench.spike`,
  :mod:`bench.beyond64k` the scenarios; :mod:`bench.scenario` what they share;
  :mod:`bench.histogram` latency percentiles; :mod:`bench.compare` and :mod:`bench.charts`
  the side-by-side report (``python -m bench all --compare shardproxy,haproxy,nginx``)

Rules (``../shared/BENCH.md``): loopback only, many 127.x source addresses,
``IP_BIND_ADDRESS_NO_PORT`` before every client ``bind``, a fresh backend port
per run, every loop bounded in count and time.
"""
