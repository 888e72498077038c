"""Serve the prebuilt OHIF viewer (`@ohif/app` dist) and Orthanc's DICOMweb API at one origin.

    python deploy/ohif/serve.py --dist .cache/ohif/package/dist --orthanc http://127.0.0.1:8042

* ``/dicom-web/…`` and ``/wado…`` are forwarded to Orthanc (which sends no CORS headers, so the
  browser must see them at the viewer's own origin); the client's Host header is kept so that
  URLs Orthanc writes into its answers point back at this server;
* ``/app-config.js`` is the data-source config next to this file (``--app-config`` to change it);
* other paths are files of the dist folder; an unknown path without a file extension (a viewer
  route such as ``/viewer?StudyInstanceUIDs=…``) gets ``index.html`` (SPA fallback);
* every answer carries ``Cross-Origin-Opener-Policy: same-origin`` and
  ``Cross-Origin-Embedder-Policy: require-corp`` (OHIF's decoders use SharedArrayBuffer).

Python standard library only; binds to 127.0.0.1 unless told otherwise. For production use nginx
(``deploy/ohif/nginx.conf``). See docs/viewer.md.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import mimetypes
import posixpath
import shutil
import sys
import urllib.parse
from collections.abc import Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_APP_CONFIG = HERE / "app-config.js"
PROXIED_PREFIXES = ("/dicom-web", "/wado")
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin",
                     "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade"}
CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                 ".json": "application/json", ".css": "text/css", ".html": "text/html; charset=utf-8",
                 ".svg": "image/svg+xml", ".woff2": "font/woff2", ".map": "application/json"}
CHUNK = 64 * 1024
EXIT_OK, EXIT_USAGE = 0, 2

log = logging.getLogger("radvlm.ohif")


class ViewerHandler(BaseHTTPRequestHandler):
    """Static dist + SPA fallback + reverse proxy to Orthanc; one instance per request."""

    protocol_version = "HTTP/1.1"
    server_version = "radvlm-ohif-proxy"

    def __init__(self, *args, dist: Path, upstream: urllib.parse.SplitResult, app_config: Path,
                 timeout: float, **kwargs) -> None:
        self.dist, self.upstream, self.app_config, self.upstream_timeout = dist, upstream, app_config, timeout
        super().__init__(*args, **kwargs)

    # --- dispatch -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_POST(self) -> None:  # STOW-RS, only if the site enables uploads in app-config.js
        if self._is_proxied():
            self._proxy()
        else:
            self._error(405, "method not allowed")

    def _dispatch(self, body: bool) -> None:
        if self._is_proxied():
            self._proxy()
        else:
            self._static(body)

    def _is_proxied(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return any(path == p or path.startswith(p + "/") or (p == "/wado" and path.startswith("/wado?"))
                   for p in PROXIED_PREFIXES)

    # --- static files ---------------------------------------------------------------------------
    def _static(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        file = self._resolve(path)
        if file is None:
            self._error(404, "not found")
            return
        content_type = CONTENT_TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0] \
            or "application/octet-stream"
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        # hashed bundles may be cached; index.html and app-config.js must not be
        no_store = file.name in ("index.html", "app-config.js") or file == self.app_config
        self.send_header("Cache-Control", "no-cache" if no_store else "public, max-age=3600")
        self._isolation_headers()
        self.end_headers()
        if body:
            with file.open("rb") as handle:
                shutil.copyfileobj(handle, self.wfile, CHUNK)

    def _resolve(self, path: str) -> Path | None:
        if path == "/app-config.js":
            return self.app_config
        clean = posixpath.normpath(path).lstrip("/")
        if clean in ("", "."):
            clean = "index.html"
        candidate = (self.dist / clean).resolve()
        if candidate.is_relative_to(self.dist) and candidate.is_file():
            return candidate
        if candidate.is_relative_to(self.dist) and candidate.is_dir() and (candidate / "index.html").is_file():
            return candidate / "index.html"
        if "." not in posixpath.basename(clean):  # a viewer route: SPA fallback
            return self.dist / "index.html"
        return None

    # --- reverse proxy --------------------------------------------------------------------------
    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        # Orthanc's DICOMweb plugin builds the absolute URLs in its answers from these
        headers["Forwarded"] = f"host={self.headers.get('Host', '')};proto=http"
        headers["X-Forwarded-Proto"] = "http"
        connection_class = http.client.HTTPSConnection if self.upstream.scheme == "https" \
            else http.client.HTTPConnection
        upstream = connection_class(self.upstream.hostname, self.upstream.port, timeout=self.upstream_timeout)
        target = self.upstream.path.rstrip("/") + self.path
        try:
            upstream.request(self.command, target, body=payload, headers=headers)
            response = upstream.getresponse()
        except OSError as exc:
            upstream.close()
            log.warning("upstream %s unreachable: %s", self.upstream.netloc, exc)
            self._error(502, "DICOMweb server unreachable")
            return
        try:
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            declared = response.getheader("Content-Length")
            chunked = declared is None and self.command != "HEAD"
            if declared is not None:
                self.send_header("Content-Length", declared)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self._isolation_headers()
            self.end_headers()
            if self.command == "HEAD":
                return
            while block := response.read(CHUNK):
                if chunked:
                    self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                else:
                    self.wfile.write(block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()

    # --- helpers --------------------------------------------------------------------------------
    def _isolation_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)

    def _error(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self._isolation_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # request paths carry UIDs only
        log.debug("%s %s", self.address_string(), format % args)


def make_server(dist: Path, orthanc_url: str, *, bind: str = "127.0.0.1", port: int = 3000,
                app_config: Path = DEFAULT_APP_CONFIG, timeout: float = 60.0) -> ThreadingHTTPServer:
    """A ready (not yet serving) server; ``port`` 0 picks a free one (``server.server_address``)."""
    dist = Path(dist).resolve()
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"{dist} has no index.html (unpack `npm pack @ohif/app` and pass package/dist)")
    if not Path(app_config).is_file():
        raise FileNotFoundError(f"app config {app_config} not found")
    upstream = urllib.parse.urlsplit(orthanc_url)
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        raise ValueError(f"--orthanc must be an http(s) URL, got {orthanc_url!r}")
    handler = partial(ViewerHandler, dist=dist, upstream=upstream, app_config=Path(app_config).resolve(),
                      timeout=timeout)
    server = ThreadingHTTPServer((bind, port), handler)
    server.daemon_threads = True
    return server


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, required=True, help="the unpacked @ohif/app package/dist folder")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042",
                        help="Orthanc's HTTP root (DICOMweb plugin at /dicom-web, WADO-URI at /wado)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000; 0 = any free)")
    parser.add_argument("--app-config", type=Path, default=DEFAULT_APP_CONFIG,
                        help="OHIF app-config.js served at /app-config.js (default: the one next to serve.py)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = make_server(args.dist, args.orthanc, bind=args.bind, port=args.port, app_config=args.app_config)
    except (OSError, ValueError) as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, port = server.server_address[:2]
    # one line a launcher can wait for
    print(f"OHIF at http://{host}:{port}/ (DICOMweb → {args.orthanc})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
