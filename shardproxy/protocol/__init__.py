"""Sans-IO protocol logic: HTTP/1.1 heads (``http1``), the WebSocket upgrade
(``upgrade``), frame boundaries (``frames``), the PROXY protocol
(``proxyproto``) and the errors that say who is at fault and what to answer
(``errors``).

Rule (tests/unit/test_layout.py): nothing here imports anything else of
shardproxy, nor trio, socket, select or ssl. Bytes in, events or bytes out.
"""
