"""``python -m shardproxy.worker SLOT CONTROL_FD LISTEN_FD...``: the
supervisor starts every worker this way (bench/ matches on it too)."""

from shardproxy.worker.process import main

main()
