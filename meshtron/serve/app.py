"""The HTTP side of `meshtron serve` (rank 0 only): OpenAI-compatible `POST /v1/completions` and
`POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /health`, `GET /stats`
(scheduler counters) and `GET /openapi.json`.

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
from meshtron.serve.openapi import spec
from meshtron.serve.outputs import (SeqOut, TokenText, best, chat_logprobs, completion_logprobs, merge,
                                    prompt_logprobs)
from meshtron.serve.protocol import (DONE, APIError, CompletionRequest, Limits, choice, completion, parse_completion,
                                     parse_json, sse, usage)
from meshtron.serve.scheduler import Job, Scheduler


def build_app(scheduler: Scheduler, tokenizer, model_name: str, limits: Limits, api_key: str | None = None,
              max_body_bytes: int = 1 << 20, max_queued: int = 4096,
              chat_template: ChatTemplate | None = None) -> FastAPI:
    app = FastAPI(title="meshtron", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    eot = getattr(tokenizer, "eot_id", None)
    encode_prompt = getattr(tokenizer, "encode_prompt", tokenizer.encode)   # a prompt as transformers encodes it
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")

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

    @app.get("/openapi.json")
    async def openapi():
        """The API's OpenAPI 3.1 description (documentation; the parser validates)."""
        return spec(model_name)

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
        return await serve(parse_completion(body, encode_prompt, limits, eot), chat=False)

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
        if scheduler.queued() + len(req.prompts) * req.best_of > max_queued:
            raise APIError(503, f"the server is overloaded ({scheduler.queued()} prompts waiting); retry later",
                           type="server_error", code="overloaded")
        queue: asyncio.Queue = asyncio.Queue()
        ids = _submit(scheduler, req, queue, asyncio.get_running_loop())
        if req.stream:
            return StreamingResponse(_stream(scheduler, req, ids, queue, model_name, tokenizer, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(scheduler, req, ids, queue, model_name, tokenizer, chat)

    return app


def _submit(scheduler: Scheduler, req: CompletionRequest, queue: asyncio.Queue, loop) -> list[str]:
    """One job per sequence: prompt p's best_of sequences (seed + j each, when seeded) share its prefill."""
    ids, jobs = [], []
    scored = req.logprobs if req.logprobs is not None else (0 if req.best_of > req.n else None)
    for p, prompt in enumerate(req.prompts):
        for j in range(req.best_of):
            seed = req.seed + j if req.seed is not None else secrets.randbits(63)
            params = SamplingParams(req.max_tokens, req.temperature, req.top_k, req.top_p, seed, req.stop,
                                    req.ignore_eos, logprobs=scored,
                                    prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                    repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias,
                                    min_tokens=req.min_tokens)
            rid = f"{req.id}-{p}-{j}"
            ids.append(rid)
            i = len(jobs)
            jobs.append(Job(Request(rid, prompt, params, share=f"{req.id}-{p}" if req.best_of > 1 else None),
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


def _echo_text(tokenizer, req: CompletionRequest, p: int) -> str:
    text = req.texts[p] if p < len(req.texts) else None
    return text if text is not None else tokenizer.decode(req.prompts[p])


def _choice(tokenizer, req: CompletionRequest, p: int, index: int, seq: SeqOut, chat: bool) -> dict:
    """The finished choice of sequence `seq` of prompt p."""
    text = "".join(seq.text)
    if chat:
        lp = None
        if req.logprobs is not None:
            lp = chat_logprobs(TokenText(tokenizer, req.prompts[p]), seq.tokens, seq.logprobs, seq.tops, final=True)
        return chat_choice(index, text, seq.finish_reason, lp)
    echo = _echo_text(tokenizer, req, p) if req.echo else ""
    lp = None
    if req.logprobs is not None:
        head = prompt_logprobs(tokenizer, req.prompts[p], seq.prompt)[0] if req.echo else None
        lp = merge(head, completion_logprobs(TokenText(tokenizer, req.prompts[p]), seq.tokens, seq.logprobs,
                                             seq.tops, len(echo), final=True))
    return choice(index, echo + text, seq.finish_reason, lp)


async def _collect(scheduler: Scheduler, req: CompletionRequest, ids: list[str], queue: asyncio.Queue,
                   model_name: str, tokenizer, chat: bool = False) -> dict:
    seqs = [SeqOut() for _ in ids]
    try:
        while any(s.finish_reason is None for s in seqs):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise _error_of(item)
            seqs[i].add(item)
            if seqs[i].error:
                raise APIError(500, f"generation failed: {seqs[i].error}", type="server_error")
    finally:
        unfinished = [rid for rid, s in zip(ids, seqs) if s.finish_reason is None]
        if unfinished:
            scheduler.cancel(unfinished)
    choices = []
    for p in range(len(req.prompts)):
        group = seqs[p * req.best_of:(p + 1) * req.best_of]
        picked = best(group, req.n) if req.best_of > req.n else range(req.n)
        for j, b in enumerate(picked):
            choices.append(_choice(tokenizer, req, p, p * req.n + j, group[b], chat))
    make = chat_completion if chat else completion
    return make(req, model_name, choices, usage(sum(map(len, req.prompts)), sum(len(s.tokens) for s in seqs)))


async def _stream(scheduler: Scheduler, req: CompletionRequest, ids: list[str], queue: asyncio.Queue,
                  model_name: str, tokenizer, chat: bool = False):
    """Server-sent events: each choice's pieces as they come (best_of == n here), then usage, then [DONE]."""
    n = len(ids)
    done, tokens = [False] * n, 0
    scored = req.logprobs is not None
    texts = [TokenText(tokenizer, req.prompts[i // req.n]) for i in range(n)] if scored else None
    offsets = [0] * n

    def chunk(i, text, finish_reason, lp=None):
        if chat:
            return chat_completion(req, model_name, [chat_delta(i, {"content": text} if text else {}, finish_reason,
                                                                lp)], None, chunk=True)
        return completion(req, model_name, [choice(i, text, finish_reason, lp)], None)
    try:
        if chat:                           # OpenAI's first chunk: the assistant's role, no content yet
            for i in range(n):
                yield sse(chat_completion(req, model_name, [chat_delta(i, {"role": "assistant", "content": ""},
                                                                       None)], None, chunk=True))
        started = [False] * n
        while not all(done):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                yield sse(_error_of(item).body())
                break
            ev: Event = item
            if ev.error:
                yield sse(APIError(500, f"generation failed: {ev.error}", type="server_error").body())
                break
            if req.echo and not started[i]:           # the prompt first (with its logprobs, from the prefill)
                p = i // req.n
                echo = _echo_text(tokenizer, req, p)
                offsets[i] = len(echo)
                lp = prompt_logprobs(tokenizer, req.prompts[p], ev.prompt)[0] if scored else None
                yield sse(chunk(i, echo, None, lp))
            started[i] = True
            tokens += ev.token is not None
            done[i] = ev.finish_reason is not None
            lp = None
            if scored and ev.token is not None:
                final = ev.finish_reason is not None
                if chat:
                    lp = chat_logprobs(texts[i], [ev.token], [ev.logprob], [ev.top or []], final)
                else:
                    lp = completion_logprobs(texts[i], [ev.token], [ev.logprob], [ev.top or []], offsets[i], final)
                    offsets[i] += sum(map(len, lp["tokens"]))
            if ev.text or ev.finish_reason or lp:
                yield sse(chunk(i, ev.text, ev.finish_reason, lp))
        if all(done) and req.include_usage:
            final = usage(sum(map(len, req.prompts)), tokens)
            yield sse(chat_completion(req, model_name, [], final, chunk=True) if chat
                      else completion(req, model_name, [], final))
        yield DONE
    finally:
        unfinished = [rid for rid, d in zip(ids, done) if not d]
        if unfinished:
            scheduler.cancel(unfinished)
