"""Decisions without I/O: routing by host and path (``routing``), the
balancing algorithms (``balancer``), each pool's runtime server registry
with its servers' state and weights (``registry``), the admission lease
every connection holds (``admission``), the handshake engine's questions
(``decisions``) and access-log sampling (``sampling``).

Rule (tests/unit/test_layout.py): imports only ``protocol`` and ``config``
of shardproxy, and no trio, socket, select or ssl.
"""
