"""The data plane of a worker: the engine interface (``api``), the one loop
and timer structure both engines run on (``loop``), the relay engine
(``relay``, and its compiled twin ``crelay`` over the C module
``_cengine``), the handshake engine (``handshake``), upstream connects
through the worker's slice of the address plan (``upstream``), the
transports every byte of both engines goes through (``transport``: plain
now, TLS next), and which engine runs (``choice``, ``factory``).

Rule (tests/unit/test_layout.py): never imports ``worker`` or ``control``:
an engine is told what to do through its interface and reports through its
event sinks, so a compiled engine can take a Python one's place.
"""
