"""OpenAI-compatible HTTP API (FastAPI): ``/v1/chat/completions``, ``/v1/models``, ``/health``; chat page at ``/``.

Content is a plain string in responses, as in OpenAI's API. Media come as ``image_url`` / ``video_url``
parts: ``data:`` base64 URLs always; local paths and ``file://`` URLs only inside ``--allowed-media-dir``;
``http(s)`` only with ``--allow-remote-media`` (size and time limited). Every error is OpenAI's error
JSON with a fitting status, and no bad request takes the server down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from nvila.base.errors import NvilaError
from nvila.generate import SamplingParams
from nvila.serve.engine import Engine, Job, QueueFull
from nvila.serve.media_urls import MediaPolicy, to_nvila_messages


@dataclass
class ServerSettings:
    model_id: str
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    max_body_bytes: int = 48 * 1024 * 1024
    default_max_tokens: int = 512
    ui: bool = True  # the chat page at / (`--no-ui`: off)


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that applies to NVILA (unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)
    response_format: dict[str, Any] | None = None   # text | json_object | json_schema (nvila.grammar)
    frame_rate: float | None = Field(None, gt=0)     # frames per second of a frame-folder video (its duration)
    time_tokens: Literal["seconds", "raw"] = "seconds"   # NVILA-8B-Video's <tK> in answers: as seconds, or as is


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class BodyLimit:
    """ASGI middleware answering 413 to request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"request body exceeds {self.limit // 2**20} MiB", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(pipe: Any, settings: ServerSettings, max_queue: int = 64, max_batch: int = 8) -> Any:
    """Build the ASGI app around a loaded :class:`nvila.api.Pipeline`."""
    engine = Engine(pipe, max_queue=max_queue, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield
        engine.close()

    app = FastAPI(title="nvila", version="1", lifespan=lifespan)
    app.state.engine = engine
    _install_handlers(app, settings)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "engine": engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                            "owned_by": "nvila"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        if req.model != settings.model_id:
            return error_response(404, f"model {req.model!r} not found; this server serves {settings.model_id!r}",
                                  param="model", code="model_not_found")
        try:
            job = await _prepare(pipe, engine, settings, req)
        except QueueFull as e:
            return error_response(429, str(e), type_="rate_limit_error", code="queue_full")
        except NvilaError as e:
            return error_response(400, str(e), code=type(e).__name__)
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(job, rid, created, settings.model_id, include_usage),
                                     media_type="text/event-stream")
        return await _complete(job, rid, created, settings.model_id)

    if settings.ui:  # the chat page: static files shipped in the package; public (the API key guards /v1/*)
        static = Path(__file__).with_name("static")
        app.mount("/static", StaticFiles(directory=static), name="static")

        @app.get("/", include_in_schema=False)
        async def chat_page() -> FileResponse:
            return FileResponse(static / "index.html")

    return BodyLimit(app, settings.max_body_bytes)


def _install_handlers(app: Any, settings: ServerSettings) -> None:
    """Every error as OpenAI's error JSON (validation, routing, bugs), and the API-key check."""
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if "json" not in request.headers.get("content-type", ""):
            return error_response(422, "the request body must be JSON sent with Content-Type: application/json",
                                  code="invalid_content_type")
        if first.get("type") == "json_invalid":
            return error_response(422, f"the request body is not valid JSON: {first.get('msg', '')}",
                                  code="invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid value')}",
                              param=where or None, code="invalid_schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing errors (unknown path 404, wrong method 405) and body parse failures, in OpenAI's shape
        detail = exc.detail if isinstance(exc.detail, str) else "request error"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed as JSON (malformed, or nested too deeply)"
        return error_response(exc.status_code, detail, code=f"http_{exc.status_code}")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", type_="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_response(401, "invalid or missing API key", type_="authentication_error",
                                      code="invalid_api_key")
        return await call_next(request)


async def _prepare(pipe: Any, engine: Engine, settings: ServerSettings, req: ChatRequest) -> Job:
    grammar = await run_in_threadpool(pipe.response_grammar, req.response_format)   # compiled once per schema
    messages = await run_in_threadpool(to_nvila_messages, req.messages, settings.media)
    media = {k: v for k, v in (("num_frames", req.num_frames), ("fps", req.fps), ("frame_rate", req.frame_rate))
             if v is not None}
    prompt = await run_in_threadpool(pipe.prepare, messages, **media)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    params = SamplingParams(
        max_new_tokens=req.max_completion_tokens or req.max_tokens or settings.default_max_tokens,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed, stop=stop,
        grammar=grammar,
    )
    job = Job(prompt, params, asyncio.get_running_loop())
    if req.time_tokens == "seconds" and pipe.time_tokens is not None and pipe.clip_duration(prompt) is not None:
        job.render = lambda text: pipe.render_time_tokens(text, prompt)
    engine.submit(job)
    return job


def _usage(job: Job) -> dict[str, int]:
    prompt = job.prompt.fused_length
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens}


async def _complete(job: Job, rid: str, created: int, model: str) -> Any:
    text = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                text.append(value)
            elif kind == "error":
                status = 400 if isinstance(value, NvilaError) else 500
                return error_response(status, str(value) if status == 400 else "internal error during generation",
                                      type_="invalid_request_error" if status == 400 else "server_error")
            else:
                break
    finally:
        job.cancelled.set()
    content, segments = job.render("".join(text)) if job.render else ("".join(text), [])
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "finish_reason": job.finish_reason, "logprobs": None}
    if job.render:                                    # time tokens: the spans their pairs give, in seconds
        choice["segments"] = [{"start": s.start, "end": s.end} for s in segments]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": _usage(job)}


def _chunk(rid: str, created: int, model: str, delta: dict, finish: str | None, usage: Any = None,
           choices: bool = True) -> str:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(job: Job, rid: str, created: int, model: str, include_usage: bool) -> Any:
    try:
        yield _chunk(rid, created, model, {"role": "assistant", "content": ""}, None)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _chunk(rid, created, model, {"content": job.render(value)[0] if job.render else value}, None)
            elif kind == "error":
                msg = str(value) if isinstance(value, NvilaError) else "internal error during generation"
                yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                return
            else:
                yield _chunk(rid, created, model, {}, job.finish_reason)
                if include_usage:
                    yield _chunk(rid, created, model, {}, None, usage=_usage(job), choices=False)
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # client gone or stream finished: the engine stops generating for it
