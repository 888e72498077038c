"""OpenAI-compatible chat API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Wire format: the OpenAI chat-completions request and response, so vLLM/SGLang clients and ours
are interchangeable. RadVLM specifics (docs/api.md):

* the image goes on the FIRST user message only, as an ``image_url`` part: a ``data:`` URL
  (base64 PNG, JPEG or DICOM) or ``dicom:study/<Study Instance UID>`` /
  ``dicom:instance/<SOP Instance UID>`` for a study the node received; later turns carry text;
* greedy decoding (sampling parameters are accepted and ignored), ``n`` must be 1;
* ``system`` / ``developer`` messages are accepted and IGNORED (rule): the prompt gets the configured
  ``[model] system_prompt`` (default none), never the client's. Upstream trained with "You are a
  helpful assistant." and evaluated without a system turn; front-ends send their own persona
  ("You are a helpful assistant ..." variants, tool instructions) that the model never saw, so
  the configured prompt keeps answers as evaluated. The response says so: ``radvlm.system_messages``
  = ``"ignored"`` with their count;
* a text-only FIRST user turn is a 400 (``code: image_required``, the rule in the message); a
  text-only turn after the image turn is a follow-up question about that image;
* the response has an extra top-level ``radvlm`` object with the boxes parsed from the answer
  (normalised ``[x1, y1, x2, y2]`` and DICOM pixel coordinates) and the unverified-result notice;
* ``stream: true`` answers as server-sent events, one content chunk per piece of text as the tokens
  are generated (``TextIteratorStreamer``; streaming requests bypass the batch scheduler), then a
  final chunk with ``finish_reason``, ``usage`` and ``radvlm``, then ``[DONE]``;
  errors are OpenAI-style JSON ``{"error": {...}}`` with a 4xx/5xx status;
* ``radvlm.cache_hit``: the image's encoded prefix came from the cache (``prefilled_tokens`` is then
  the question only);
* one access-log line per request on the ``radvlm.access`` logger (method, path with UIDs replaced
  by ``{uid}``, status, milliseconds, prompt/completion tokens, cache hit; no bodies, no query
  strings) and request/latency/error/cache counters for ``/metrics`` (``api_metrics``).

``create_app`` builds the stand-alone app of ``radvlm worker``; the node mounts ``chat_router``
into its own app (dicom_node/httpapi.py) with a resolver for received studies.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from config.settings import ApiSettings
from dicom_node.metrics import Metrics
from inference.api_images import (
    ImageReferenceConflictError,
    ImageRequestError,
    ReferenceResolver,
    UnknownImageReferenceError,
    resolve_image_url,
)
from inference.chat_service import ChatAnswer, ChatService, ModelUnavailableError, StreamedAnswer
from inference.errors import ModelError, ReservedTokenError
from inference.image import ModelImage
from inference.model import Generation, Turn
from inference.parsing import parse_boxes
from inference.result import UNVERIFIED_NOTICE


# ---- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {error.get('msg')}")
        return error_response(400, "invalid request: " + "; ".join(problems), code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "api_error"))


# ---- request limits, auth, CORS ----------------------------------------------------------------
class BodySizeLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before any handler parses them."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(413, f"request body larger than the limit of {self.max_bytes} bytes "
                                  "([api] max_request_bytes)", code="request_too_large")
        await response(scope, receive, send)


access_log = logging.getLogger("radvlm.access")
_UID_SEGMENT = re.compile(r"(?<=/)[0-9]+(?:\.[0-9]+)+(?=/|$)")
_PATH_CHARS = re.compile(r"[^A-Za-z0-9/._{}-]")


def loggable_path(path: str) -> str:
    """The request path for logs and metrics: DICOM UIDs (dotted digits) replaced by ``{uid}``,
    anything outside a plain path alphabet replaced by ``_``, at most 120 characters."""
    return _PATH_CHARS.sub("_", _UID_SEGMENT.sub("{uid}", path))[:120]


def api_metrics() -> Metrics:
    m = Metrics()
    m.counter("radvlm_api_requests_total", "HTTP API requests, by method, route and status")
    m.counter("radvlm_api_errors_total", "HTTP API responses with status >= 400, by route and status")
    m.counter("radvlm_api_tokens_total", "chat completion tokens, by kind (prompt, prefilled, completion)")
    m.counter("radvlm_api_prefix_cache_total", "chat requests whose encoded image prefix was a cache hit or miss")
    m.histogram("radvlm_api_request_seconds", "seconds per HTTP API request (to the last byte of the response)")
    return m


def _route(path: str) -> str:
    """A low-cardinality route label."""
    for prefix in ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics", "/api/", "/viewer"):
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return "other"


class AccessLog:
    """ASGI middleware: one ``radvlm.access`` line per request, and the API metrics. Handlers put
    token counts into ``request.state.usage`` (a dict); nothing from bodies or query strings."""

    def __init__(self, app, metrics: Metrics | None = None) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        status = 500
        logged = False

        def finish() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            seconds = time.perf_counter() - started
            usage = scope["state"].get("usage") or {}
            path = loggable_path(scope.get("path", ""))
            extra = "".join(f" {key}={value}" for key, value in usage.items())
            access_log.info("%s %s %d %.1fms%s", scope.get("method", "-"), path, status, seconds * 1000, extra)
            if self.metrics is not None:
                route = _route(scope.get("path", ""))
                self.metrics.inc("radvlm_api_requests_total", method=scope.get("method", "-"), route=route,
                                 status=str(status))
                if status >= 400:
                    self.metrics.inc("radvlm_api_errors_total", route=route, status=str(status))
                self.metrics.observe("radvlm_api_request_seconds", seconds)
                for kind in ("prompt", "prefilled", "completion"):
                    if f"{kind}_tokens" in usage:
                        self.metrics.inc("radvlm_api_tokens_total", float(usage[f"{kind}_tokens"]), kind=kind)
                if "cache_hit" in usage:
                    self.metrics.inc("radvlm_api_prefix_cache_total",
                                     result="hit" if usage["cache_hit"] else "miss")

        async def logging_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            finish()  # disconnects and exceptions are logged too


def bearer_auth(settings: ApiSettings) -> Callable[[Request], None]:
    """A dependency: 503 when no token is configured, 401 for a missing or wrong bearer token."""

    def check(request: Request) -> None:
        if not settings.token:
            raise ApiError(503, "the API is disabled: set [api] token (or RADVLM_API__TOKEN)",
                           type_="service_unavailable", code="api_disabled")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           type_="authentication_error", code="invalid_api_key")

    return check


def install_basics(app: FastAPI, settings: ApiSettings, metrics: Metrics | None = None) -> None:
    """Error handlers, the body-size limit, (only when origins are configured) CORS, and the access
    log with its metrics (outermost: 413s and CORS refusals are logged too)."""
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(AccessLog, metrics=metrics)


# ---- wire schemas ------------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageUrl(_Open):
    url: str = Field(min_length=1)


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Open):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: int = 1


SYSTEM_ROLES = ("system", "developer")


def conversation(messages: list[ChatMessage], max_messages: int) -> tuple[str, list[Turn]]:
    """(image URL, turns) from OpenAI messages: alternating user/assistant turns starting and
    ending with a user turn, exactly one image on the first user turn and none after it;
    system/developer messages (anywhere) are skipped."""
    if not messages:
        raise ApiError(400, "messages must not be empty: send at least one user message with an image",
                       param="messages", code="empty_messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"too many messages ({len(messages)} > {max_messages})", param="messages")
    image_url: str | None = None
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in SYSTEM_ROLES:
            continue  # ignored by rule (module docstring): the configured [model] system_prompt applies
        if message.role not in ("user", "assistant"):
            raise ApiError(400, f"{where}: role {message.role!r} is not supported; send user/assistant turns "
                           "(system messages are accepted and ignored)", param=where)
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(400, f"{where}: expected a {expected} message (turns alternate, starting with user)",
                           param=where)
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else list(message.content or [])
        images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart)).strip()
        if not turns:
            if len(images) != 1:
                raise ApiError(400, f"{where}: the first user message must carry exactly one image_url part "
                               f"(found {len(images)}): RadVLM answers questions about one chest X-ray, sent "
                               "with the first question; later questions may be text only", param=where,
                               code="image_required")
            image_url = images[0]
        elif images:
            raise ApiError(400, f"{where}: images are accepted on the first user message only (RadVLM sees one "
                           "image per conversation)", param=where, code="image_not_first")
        if not text and message.role == "user":
            raise ApiError(400, f"{where}: empty question text", param=where)
        turns.append(Turn(message.role, text))  # type: ignore[arg-type]
    if not turns:
        raise ApiError(400, "messages hold no user message: send a user message with an image (system "
                       "messages alone are not a question)", param="messages", code="empty_messages")
    if turns[-1].role != "user":
        raise ApiError(400, "the last message must be a user question", param="messages")
    assert image_url is not None
    return image_url, turns


def box_payload(text: str, image: ModelImage) -> dict[str, Any]:
    """The boxes an answer contains: normalised (model convention) and in DICOM pixel coordinates."""
    parsed = parse_boxes(text)
    return {"boxes": [b.as_list() for b in parsed.boxes],
            "boxes_pixels": [list(b.to_pixels(image.columns, image.rows)) for b in parsed.boxes],
            "dropped_boxes": list(parsed.dropped)}


def completion_body(model_id: str, generation: Generation, image: ModelImage, max_tokens: int,
                    image_ref: str | None, *, cache_hit: bool | None = None, system_messages: int = 0,
                    completion_id: str | None = None, created: int | None = None) -> dict[str, Any]:
    finish = "length" if generation.new_tokens >= max_tokens else "stop"
    return {
        "id": completion_id or f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                     "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": generation.total_tokens_in_prompt, "completion_tokens": generation.new_tokens,
                  "total_tokens": generation.total_tokens_in_prompt + generation.new_tokens},
        "radvlm": {**box_payload(generation.text, image), "notice": UNVERIFIED_NOTICE,
                   "image": {"columns": image.columns, "rows": image.rows, "reference": image_ref},
                   "prefilled_tokens": generation.prompt_tokens, "cache_hit": cache_hit,
                   "seconds": round(generation.seconds, 4), "batch_size": generation.batch_size,
                   "system_messages": {"count": system_messages, "handling": "ignored"} if system_messages else None},
    }


def usage_fields(generation: Generation, cache_hit: bool) -> dict[str, Any]:
    """Token counts for the access log and metrics (no text)."""
    return {"prompt_tokens": generation.total_tokens_in_prompt, "prefilled_tokens": generation.prompt_tokens,
            "completion_tokens": generation.new_tokens, "cache_hit": cache_hit}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def stream_events(streamed: StreamedAnswer, finish: Callable[[Generation], dict[str, Any]],
                  model_id: str, state: dict[str, Any]) -> Iterator[str]:
    """Server-sent events as the tokens are produced: the role chunk, one content chunk per text
    piece, the final chunk (``finish(generation)``: the completion body) and ``[DONE]``."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_id}
    yield _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})
    for piece in streamed.pieces():
        yield _event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    try:
        generation = streamed.generation
    except (ModelError, RuntimeError, ValueError) as exc:  # generation failed after the 200 was sent
        state["usage"] = {"stream_error": type(exc).__name__}
        yield _event({"error": {"message": f"generation failed: {exc}", "type": "api_error", "param": None,
                                "code": "generation_failed"}})
        return
    body = finish(generation)
    state["usage"] = usage_fields(generation, streamed.cache_hit)
    yield _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": body["choices"][0]["finish_reason"]}],
                  "usage": body["usage"], "radvlm": body["radvlm"]})
    yield "data: [DONE]\n\n"


# ---- routes ------------------------------------------------------------------------------------
def chat_router(service: ChatService, settings: ApiSettings, resolver: ReferenceResolver | None = None,
                *, allow_colour: bool = False) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(bearer_auth(settings))])

    def model_info() -> Any:
        try:
            return service.info
        except ModelUnavailableError as exc:
            raise ApiError(503, str(exc), type_="service_unavailable", code="model_unavailable") from exc

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        info = model_info()
        return {"object": "list", "data": [{
            "id": info.model_id, "object": "model", "created": 0, "owned_by": "radvlm-pacs",
            "radvlm": {"version": info.version, "weights_sha256": info.weights_sha256,
                       "demonstration": info.demonstration,
                       "max_new_tokens": service.max_new_tokens, "notice": UNVERIFIED_NOTICE}}]}

    @router.post("/chat/completions", response_model=None)
    def chat_completions(request: ChatCompletionRequest, http: Request) -> dict[str, Any] | StreamingResponse:
        info = model_info()
        if request.model != info.model_id:
            raise ApiError(404, f"model {request.model!r} is not served here; GET /v1/models lists "
                           f"{info.model_id!r}", type_="not_found_error", code="model_not_found", param="model")
        if request.n != 1:
            raise ApiError(400, "n must be 1 (greedy decoding gives one answer)", param="n")
        image_url, turns = conversation(request.messages, settings.max_messages)
        image = load_request_image(image_url, resolver, allow_colour)
        max_tokens = min(request.max_completion_tokens or request.max_tokens or service.max_new_tokens,
                         service.max_new_tokens)
        reference = image_url if image_url.startswith("dicom:") else None
        system_messages = sum(1 for m in request.messages if m.role in SYSTEM_ROLES)
        if request.stream:
            streamed = stream_or_400(service, image, turns, max_tokens)

            def finish(generation: Generation) -> dict[str, Any]:
                return completion_body(info.model_id, generation, image, max_tokens, reference,
                                       cache_hit=streamed.cache_hit, system_messages=system_messages)

            return StreamingResponse(stream_events(streamed, finish, info.model_id, http.scope["state"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        answer = respond_or_400(service, image, turns, max_tokens)
        http.state.usage = usage_fields(answer.generation, answer.cache_hit)
        return completion_body(info.model_id, answer.generation, image, max_tokens, reference,
                               cache_hit=answer.cache_hit, system_messages=system_messages)

    return router


def answer_or_400(service: ChatService, image: ModelImage, turns: list[Turn],
                  max_tokens: int | None = None) -> Generation:
    """service.answer with text the model cannot take (control tokens) mapped to a 400."""
    return respond_or_400(service, image, turns, max_tokens).generation


def respond_or_400(service: ChatService, image: ModelImage, turns: list[Turn],
                   max_tokens: int | None = None) -> ChatAnswer:
    """service.respond (the answer and whether its image prefix was cached), control tokens → 400."""
    try:
        return service.respond(image, turns, max_tokens)
    except ReservedTokenError as exc:
        raise ApiError(400, str(exc), param="messages", code="reserved_token") from exc


def stream_or_400(service: ChatService, image: ModelImage, turns: list[Turn],
                  max_tokens: int | None = None) -> StreamedAnswer:
    """service.stream with control tokens mapped to a 400 (before the stream starts)."""
    try:
        return service.stream(image, turns, max_tokens)
    except ReservedTokenError as exc:
        raise ApiError(400, str(exc), param="messages", code="reserved_token") from exc


def load_request_image(image_url: str, resolver: ReferenceResolver | None, allow_colour: bool) -> ModelImage:
    """resolve_image_url with its errors mapped to 400/404/409 ApiErrors."""
    try:
        return resolve_image_url(image_url, resolver, allow_colour=allow_colour)
    except ImageRequestError as exc:
        raise ApiError(400, str(exc), code="bad_image", param="image_url") from exc
    except UnknownImageReferenceError as exc:
        raise ApiError(404, str(exc), type_="not_found_error", code="unknown_study", param="image_url") from exc
    except ImageReferenceConflictError as exc:
        raise ApiError(409, str(exc), code="study_not_ready", param="image_url") from exc


def create_app(service: ChatService, settings: ApiSettings, resolver: ReferenceResolver | None = None,
               *, allow_colour: bool = False) -> FastAPI:
    """The stand-alone API app (``radvlm worker``): /v1/* plus an open /healthz."""
    app = FastAPI(title="RadVLM chat API", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = api_metrics()
    install_basics(app, settings, metrics)
    app.include_router(chat_router(service, settings, resolver, allow_colour=allow_colour))

    @app.get("/metrics", dependencies=[Depends(bearer_auth(settings))])
    def get_metrics() -> Response:
        """Prometheus text: request/latency/error/token/cache counters (bearer ``[api] token``)."""
        return Response(metrics.render().encode(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", response_model=None)
    def healthz() -> dict[str, Any] | JSONResponse:
        """200 with the served model once its weights are resident; 503 with the reason while the
        model cannot be loaded (a load balancer or the node's remote backend takes it out)."""
        try:
            info = service.info
        except ModelUnavailableError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return {"status": "ok", "model": info.model_id, "version": info.version,
                "weights_sha256": info.weights_sha256}

    return app
