"""A small HTTP endpoint: ``GET /healthz`` (JSON, 200 or 503) and ``GET /metrics`` (Prometheus
text). When ``node.http_token`` is set, /metrics needs ``Authorization: Bearer <token>``; /healthz
stays open for load balancers and carries no patient data."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, bind: str, port: int, health: Callable[[], dict], metrics: Callable[[], str],
                 token: str | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:  # quiet: no access log lines
                log.debug("http %s", fmt % args)

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    report = outer.health()
                    code = 200 if report.get("status") == "ok" else 503
                    self._send(code, json.dumps(report).encode(), "application/json")
                elif path == "/metrics":
                    if outer.token and not hmac.compare_digest(
                            self.headers.get("Authorization", ""), f"Bearer {outer.token}"):
                        self._send(401, b"missing or wrong bearer token\n", "text/plain")
                        return
                    self._send(200, outer.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    self._send(404, b"not found: use /healthz or /metrics\n", "text/plain")

        self.health, self.metrics, self.token = health, metrics, token
        self._server = ThreadingHTTPServer((bind, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="radvlm-http", daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
