"""Run an ASGI app with uvicorn in a background thread (the node's HTTP endpoint, tests, benchmarks).

The listening socket is bound here, before the thread starts, so a port conflict raises in
``start()`` and port 0 gives the chosen port at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

log = logging.getLogger(__name__)


class ThreadedServer:
    def __init__(self, app, host: str, port: int, *, log_level: str = "warning") -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(128)
        self._sock.set_inheritable(True)
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        # uvicorn installs no signal handlers outside the main thread: the node keeps SIGTERM/SIGINT
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="radvlm-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self.port

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
