"""The node's HTTP endpoint: one FastAPI app served by uvicorn in a thread of `radvlm serve`.

* ``GET /healthz`` — JSON, 200 or 503; open (load balancers), no patient data.
* ``GET /metrics`` — Prometheus text (the node's counters, then the API's: requests, latency,
  errors, tokens, prefix-cache hits); when ``node.http_token`` is set it needs
  ``Authorization: Bearer <token>`` (401 text otherwise), as before.
* ``/v1/models``, ``/v1/chat/completions`` — the OpenAI-compatible chat API (inference/api.py),
  images by data: URL or ``dicom:study/<uid>``; bearer ``[api] token``.
* ``/viewer/`` (static page) and ``/api/studies…`` (its JSON/PNG data, bearer ``[api] token``).
* ``/api/operations/…`` — studies, timelines, deliveries with attempts, queue; retry and re-run
  (dicom_node/operations.py, bearer ``[api] token``); the page is ``/viewer/operations.html``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from config.settings import Settings
from dicom_node.jobstore import JobStore
from dicom_node.study_images import StudyImages
from inference.api import api_metrics, chat_router, install_basics
from inference.chat_service import ChatService
from inference.serving import ThreadedServer

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_node_app(settings: Settings, health: Callable[[], dict], metrics: Callable[[], str],
                    jobs: JobStore, chat: ChatService, images: StudyImages) -> FastAPI:
    app = FastAPI(title="RadVLM node", docs_url=None, redoc_url=None, openapi_url=None)
    http_metrics = api_metrics()
    install_basics(app, settings.api, http_metrics)
    metrics_token = settings.node.http_token

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        report = health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics")
    def get_metrics(request: Request) -> Response:
        if metrics_token and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                     f"Bearer {metrics_token}".encode()):
            return PlainTextResponse("missing or wrong bearer token\n", status_code=401)
        return Response((metrics() + http_metrics.render()).encode(), media_type=METRICS_TYPE)

    app.include_router(chat_router(chat, settings.api, images, allow_colour=settings.inference.allow_colour))
    from dicom_node.operations import operations_router

    app.include_router(operations_router(settings, jobs))  # /api/operations/… (page: /viewer/operations.html)
    if settings.api.viewer_enabled:
        from dicom_node.viewer import mount_viewer

        mount_viewer(app, settings, jobs, chat, images)

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/viewer/")

    return app


def start_http_server(app: FastAPI, bind: str, port: int) -> ThreadedServer:
    server = ThreadedServer(app, bind, port)
    server.start()
    return server
