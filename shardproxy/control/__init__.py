"""The supervisor's side: listen sockets and worker processes
(``supervisor``), the control channel (``channel``), the admin listener
(``admin``), health checks (``health``) and the address plan (``addrplan``).

Rule (tests/unit/test_layout.py): never imports ``engine`` or ``worker``:
the supervisor runs workers as processes and speaks to them over the
channel only.
"""
