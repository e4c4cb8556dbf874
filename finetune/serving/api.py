"""OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
streaming as server-sent events in the chunk format the official `openai` client parses, errors in OpenAI's
JSON error shape. The web chat page is served from the package's static folder at `/`.

Imported only by `finetune serve` (FastAPI is not needed elsewhere). No `from __future__ import annotations`:
FastAPI reads the handlers' annotations at runtime.
"""

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from finetune.serving.engine import Engine, Job

STATIC = Path(__file__).resolve().parent.parent / "static"


class Limits(BaseModel):
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    api_key: str | None = None


class _Request(BaseModel):
    # unknown OpenAI fields (user, logprobs=False, ...) are accepted and ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:  # the array form: only text parts can be served by a text model
        if p.get("type") != "text":
            raise APIError(400, f"content part of type {p.get('type')!r} is not supported by a text model — send text", param="messages")
        parts.append(p.get("text", ""))
    return "".join(parts)


def create_app(engine: Engine, limits: Limits):
    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def fail(exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return fail(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return fail(APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error"))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # never a traceback to the client; the server keeps serving
        return fail(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    async def check_key(request: Request) -> None:
        """A dependency of every /v1 route (not an HTTP middleware: Starlette's BaseHTTPMiddleware hides client
        disconnects from the endpoint and turns shutdown cancellations into logged tracebacks)."""
        if limits.api_key:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not reveal how much of the key matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), limits.api_key.encode()):
                raise APIError(401, "invalid or missing API key — send `Authorization: Bearer KEY`", "authentication_error",
                               code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    async def read_json(request: Request, schema):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body is larger than {limits.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"request body is larger than {limits.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(x) for x in e["loc"])
            raise APIError(400, f"{where}: {e['msg']}", param=where) from None

    def served_for(req):
        if req.model not in engine.models:
            raise APIError(404, f"the model `{req.model}` does not exist — GET /v1/models lists the served names: "
                           + ", ".join(engine.models), code="model_not_found", param="model")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        return engine.models[req.model]

    def make_job(req, served, prompt_ids: list[int], emit) -> Job:
        room = served.context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and the model's context is {served.context} — "
                           "shorten the prompt or the conversation", param="messages", code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens} (--max-tokens)", param="max_tokens")
        if asked is not None and asked > room:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({asked}) exceeds the model's context of "
                           f"{served.context} tokens — ask for at most {room}", param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return Job(served, prompt_ids, min(asked or limits.max_tokens, room), req.temperature, req.top_p, stop, req.seed, emit)

    async def run(request: Request, req, served, prompt_ids, kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = make_job(req, served, prompt_ids, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())
        engine.submit(job)

        def usage(done: dict) -> dict:
            n = done.get("completion_tokens", 0)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not req.stream:
            parts, done = [], None
            try:
                while done is None:
                    try:
                        ev = await asyncio.wait_for(events.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled.set()
                            return JSONResponse({}, status_code=499)
                        continue
                    if "error" in ev:
                        raise APIError(500, "generation failed: " + ev["error"], "server_error")
                    parts.append(ev.get("text", ""))
                    done = ev if "done" in ev else None
            finally:
                job.cancelled.set()  # no effect once finished; stops the row if this handler was cancelled
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": done["done"]}
                      if kind == "chat" else {"index": 0, "text": text, "logprobs": None, "finish_reason": done["done"]})
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": served.name, "choices": [choice],
                                 "usage": usage(done)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict | None, finish=None, text: str | None = None) -> str:
            if kind == "chat":
                choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
                body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": served.name, "choices": [choice]}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                body = {"id": rid, "object": "text_completion", "created": now, "model": served.name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events_out():
            try:
                if kind == "chat":
                    yield chunk({"role": "assistant", "content": ""})
                while True:
                    ev = await events.get()
                    if "error" in ev:
                        yield "data: " + json.dumps(error_body(500, "generation failed: " + ev["error"], "server_error")) + "\n\n"
                        return
                    if ev.get("text"):
                        yield chunk({"content": ev["text"]}, text=ev["text"])
                    if "done" in ev:
                        yield chunk({}, finish=ev["done"])
                        if include_usage:
                            body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                    "created": now, "model": served.name, "choices": [], "usage": usage(ev)}
                            yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                # Starlette cancels this generator when the client disconnects: stop the row's generation
                job.cancelled.set()

        return StreamingResponse(events_out(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "finetune",
             "kind": "adapter" if s.adapter else "model", "source": s.source, "context_length": s.context}
            for name, s in engine.models.items()]}

    @v1.get("/models/{name:path}")
    async def one_model(name: str):
        if name not in engine.models:
            raise APIError(404, f"the model `{name}` does not exist", code="model_not_found", param="model")
        return {"id": name, "object": "model", "created": created, "owned_by": "finetune"}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatRequest)
        served = served_for(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in req.messages]
        try:
            with served.lock:
                ids = served.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        except Exception as exc:  # a template may reject an order of roles (e.g. two user turns in a row)
            raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        return await run(request, req, served, list(ids), "chat")

    @v1.post("/completions")
    async def completions(request: Request):
        req = await read_json(request, CompletionRequest)
        served = served_for(req)
        prompt = req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if len(req.prompt) == 1 else None)
        if prompt is None:
            raise APIError(400, "send one prompt per request (a list of several prompts is not supported)", param="prompt")
        with served.lock:
            ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return await run(request, req, served, list(ids), "completion")

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engine.models), **engine.stats}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.engine = engine
    return app
