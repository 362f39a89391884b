"""Real servers for the tests, each on a free port of 127.0.0.1, and proxies that break them on purpose.

- ``tests.servers.s3``: moto's S3 server (``MotoServer``).
- ``tests.servers.redis``: a ``redis-server`` in a directory of its own (``RedisServer``).
- ``tests.servers.proxy``: an HTTP proxy in front of S3 that counts traffic and injects faults
  (``Proxy``, ``Fault``), and a TCP proxy in front of Redis that drops a reply (``DroppingProxy``).

tests/conftest.py makes fixtures of them (``moto``, ``proxy``, ``redis_url``); the benchmarks start
them directly. Importing this package needs no optional dependency: moto is imported when a server
starts.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
