"""moto's real S3 server for tests.

``mock_aws`` patches botocore in-process and does not work with aiobotocore, so every S3 test talks
HTTP to ``moto.server.ThreadedMotoServer``.
"""

from __future__ import annotations

from tests.servers import free_port


class MotoServer:
    """moto's S3 on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop()
