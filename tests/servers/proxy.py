"""Proxies between a client and a test server, to count what passes and to break it on purpose.

- ``Proxy``: HTTP, in front of moto's S3; counts requests and bytes, injects S3 errors, resets and
  stalls (``Fault``, ``chaos()``).
- ``DroppingProxy``: TCP, in front of Redis; lets a command through and drops its reply, and
  refuses new connections once ``cut``.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    """Answer the next ``times`` requests that ``match`` with ``status`` and an S3 error ``code``.

    ``status`` 0 resets the connection instead of answering. With ``after``, moto gets the request
    and acts on it, and the client gets the fault instead of moto's answer.
    """

    status: int
    code: str
    times: int = 1
    match: Callable[[str, str], bool] = lambda method, path: True
    after: bool = False  # pass the request on first, and lose moto's answer
    stall: float = 0.0  # with status -1: pass the request on, then answer this many seconds late


@dataclass
class Traffic:
    requests: list[tuple[str, str]] = field(default_factory=list)  # method, path
    sent: int = 0  # bytes from the client, headers included
    received: int = 0  # bytes to the client, headers included


class Proxy:
    """An HTTP proxy between an S3 client and moto that counts bytes and injects faults."""

    def __init__(self, upstream_port: int) -> None:
        self.traffic = Traffic()
        self.faults: list[Fault] = []
        self.broken: collections.Counter[str] = collections.Counter()  # faults made by chaos()
        self._chaos: tuple[float, random.Random, float] | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self._read_body()
                head = len(self.requestline) + 2 + len(bytes(self.headers)) + 2
                fault = proxy._take_fault(self.command, self.path)
                with proxy._lock:
                    proxy.traffic.requests.append((self.command, self.path))
                    proxy.traffic.sent += head + len(body)
                if fault is not None and fault.status == -1:  # moto acts; its answer comes late
                    status, forwarded, payload = self._forward(body)
                    time.sleep(fault.stall)
                    with contextlib.suppress(OSError):
                        self._answer(status, forwarded, payload, head_only=self.command == "HEAD")
                    return
                if fault is not None and fault.after:
                    self._forward(body)
                if fault is not None and fault.status == 0:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault is not None:
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self._answer(fault.status, [("Content-Type", "application/xml")], payload)
                    return
                status, forwarded, payload = self._forward(body)
                self._answer(status, forwarded, payload, head_only=self.command == "HEAD")

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                dropped = {"transfer-encoding", "connection"} | (
                    {"content-length"} if self.command != "HEAD" else set()
                )
                forwarded = [(k, v) for k, v in response.getheaders() if k.lower() not in dropped]
                upstream.close()
                return response.status, forwarded, payload

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(
                self, status: int, headers: list[tuple[str, str]], payload: bytes, head_only: bool = False
            ) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if not head_only or not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not head_only:
                    self.wfile.write(payload)
                with proxy._lock:
                    proxy.traffic.received += len(payload) + 200  # the status line and headers, roughly

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset_traffic(self) -> Traffic:
        with self._lock:
            traffic, self.traffic = self.traffic, Traffic()
        return traffic

    def chaos(self, probability: float, rng: random.Random, stall: float = 2.0) -> None:
        """From now on, break each request with ``probability``: a 500, a 503 SlowDown, a reset
        before or after moto acted, or an answer held back for ``stall`` seconds."""
        self._chaos = (probability, rng, stall)

    def calm(self) -> None:
        self._chaos = None

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    return fault
            if self._chaos is not None:
                probability, rng, stall = self._chaos
                if rng.random() < probability:
                    kind = rng.choice(["500", "503", "reset", "reset-after", "stall"])
                    self.broken[kind] += 1
                    if kind == "500":
                        return Fault(500, "InternalError")
                    if kind == "503":
                        return Fault(503, "SlowDown")
                    if kind == "stall":
                        return Fault(-1, "", after=True, stall=stall)
                    return Fault(0, "", after=kind == "reset-after")
        return None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class DroppingProxy:
    """A TCP proxy to Redis that, on demand, lets a request through and drops the connection
    instead of passing the reply back: the client cannot tell whether its command ran. The reply
    dropped is the next one, or, with ``drop_reply_to`` set, the reply to the next request that
    holds those bytes. Once ``cut``, it closes every new connection at once, as an unreachable
    server would (connections already open stay up)."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self.drop_next_reply = False
        self.drop_reply_to: bytes | None = None
        self.cut = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._server.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if not replies and self.drop_reply_to is not None and self.drop_reply_to in data:
                    self.drop_reply_to = None
                    self.drop_next_reply = True  # before the request goes on: its reply comes after
                if replies and self.drop_next_reply:
                    self.drop_next_reply = False
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stop(self) -> None:
        self._server.close()
