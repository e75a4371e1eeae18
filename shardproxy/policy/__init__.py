"""Decisions without I/O: routing by host and path (``routing``), the
balancing algorithms and server state (``balancer``), the admission lease
every connection holds (``admission``), the handshake engine's questions
(``decisions``) and access-log sampling (``sampling``).

Rule (tests/unit/test_layout.py): imports only ``protocol`` and ``config``
of shardproxy, and no trio, socket, select or ssl.
"""
