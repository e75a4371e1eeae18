"""One worker process (``python -m shardproxy.worker``, started by the
supervisor): composes the engines, keeps the counts, writes the access log,
and runs drains, retirement and health closes (``process``); its tunnels'
records, indexed by backend endpoint and client address (``tunnels``)."""
