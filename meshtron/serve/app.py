"""The HTTP side of `meshtron serve` (rank 0 only): OpenAI-compatible `POST /v1/completions` and
`POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /health`, and `GET /stats`
(scheduler counters).

Invariant: every failure is an OpenAI-shaped JSON error with a 4xx/5xx status, decided here before the
scheduler sees the request (auth, body size, JSON, fields, lengths); an accepted request becomes one scheduler
job per prompt, whose tokens arrive from the scheduler's thread through the event loop. A client that goes
away mid-stream has its sequences cancelled.
"""
from __future__ import annotations

import asyncio
import hmac
import secrets
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshtron.inference import Event, Request, SamplingParams
from meshtron.serve.chat import ChatTemplate, chat_choice, chat_completion, chat_delta, parse_chat
from meshtron.serve.protocol import (DONE, APIError, CompletionRequest, Limits, choice, completion, parse_completion,
                                     parse_json, sse, usage)
from meshtron.serve.scheduler import Job, Scheduler


def build_app(scheduler: Scheduler, tokenizer, model_name: str, limits: Limits, api_key: str | None = None,
              max_body_bytes: int = 1 << 20, max_queued: int = 4096,
              chat_template: ChatTemplate | None = None) -> FastAPI:
    app = FastAPI(title="meshtron", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    eot = getattr(tokenizer, "eot_id", None)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: HTTPRequest) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body has {declared} bytes; the limit is {max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "error": str(scheduler.error or "stopped")}, status_code=503)
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        """Scheduler counters: sequences admitted, iterations, tokens, most sequences decoded together."""
        return {"running": scheduler.engine.running, "queued": scheduler.queued(), **scheduler.stats}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "meshtron", "max_model_len": limits.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        authorize(request)
        body = parse_json(await read_body(request))
        return await serve(parse_completion(body, tokenizer.encode, limits, eot), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        authorize(request)
        body = parse_json(await read_body(request))
        return await serve(parse_chat(body, chat_template, tokenizer.encode, limits, eot), chat=True)

    async def serve(req: CompletionRequest, chat: bool):
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        if not scheduler.alive:
            raise APIError(503, "the server is shutting down", type="server_error")
        if scheduler.queued() + len(req.prompts) > max_queued:
            raise APIError(503, f"the server is overloaded ({scheduler.queued()} prompts waiting); retry later",
                           type="server_error", code="overloaded")
        queue: asyncio.Queue = asyncio.Queue()
        ids = _submit(scheduler, req, queue, asyncio.get_running_loop())
        if req.stream:
            return StreamingResponse(_stream(scheduler, req, ids, queue, model_name, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(scheduler, req, ids, queue, model_name, chat)

    return app


def _submit(scheduler: Scheduler, req: CompletionRequest, queue: asyncio.Queue, loop) -> list[str]:
    ids, jobs = [], []
    for i, prompt in enumerate(req.prompts):
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        params = SamplingParams(req.max_tokens, req.temperature, req.top_k, req.top_p, seed, req.stop, req.ignore_eos)
        rid = f"{req.id}-{i}"
        ids.append(rid)
        jobs.append(Job(Request(rid, prompt, params),
                        lambda item, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, item))))
    try:
        scheduler.submit(jobs)
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error") from None
    return ids


def _error_of(item: BaseException) -> APIError:
    if isinstance(item, ValueError):
        return APIError(400, str(item))
    return APIError(500, f"generation failed: {type(item).__name__}: {item}", type="server_error")


async def _collect(scheduler: Scheduler, req: CompletionRequest, ids: list[str], queue: asyncio.Queue,
                   model_name: str, chat: bool = False) -> dict:
    n = len(ids)
    texts, tokens, reasons = [[] for _ in range(n)], [0] * n, [None] * n
    try:
        while sum(r is not None for r in reasons) < n:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise _error_of(item)
            ev: Event = item
            texts[i].append(ev.text)
            tokens[i] += 1
            reasons[i] = ev.finish_reason
    finally:
        unfinished = [rid for rid, r in zip(ids, reasons) if r is None]
        if unfinished:
            scheduler.cancel(unfinished)
    make_choice, make = (chat_choice, chat_completion) if chat else (choice, completion)
    choices = [make_choice(i, "".join(texts[i]), reasons[i]) for i in range(n)]
    return make(req, model_name, choices, usage(sum(map(len, req.prompts)), sum(tokens)))


async def _stream(scheduler: Scheduler, req: CompletionRequest, ids: list[str], queue: asyncio.Queue,
                  model_name: str, chat: bool = False):
    n = len(ids)
    done, tokens = [False] * n, 0

    def chunk(i, text, finish_reason):
        if chat:
            return chat_completion(req, model_name, [chat_delta(i, {"content": text} if text else {}, finish_reason)],
                                   None, chunk=True)
        return completion(req, model_name, [choice(i, text, finish_reason)], None)
    try:
        if chat:                           # OpenAI's first chunk: the assistant's role, no content yet
            for i in range(n):
                yield sse(chat_completion(req, model_name, [chat_delta(i, {"role": "assistant", "content": ""},
                                                                       None)], None, chunk=True))
        while not all(done):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                yield sse(_error_of(item).body())
                break
            ev: Event = item
            tokens += 1
            done[i] = ev.finish_reason is not None
            if ev.text or ev.finish_reason:
                yield sse(chunk(i, ev.text, ev.finish_reason))
        if all(done) and req.include_usage:
            final = usage(sum(map(len, req.prompts)), tokens)
            yield sse(chat_completion(req, model_name, [], final, chunk=True) if chat
                      else completion(req, model_name, [], final))
        yield DONE
    finally:
        unfinished = [rid for rid, d in zip(ids, done) if not d]
        if unfinished:
            scheduler.cancel(unfinished)
