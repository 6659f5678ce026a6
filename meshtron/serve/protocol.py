"""The OpenAI completions API as data: a request body checked field by field, the responses and stream chunks,
and errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

Invariant: `parse_completion` either returns a request every rank can run or raises `APIError` with a 4xx status
naming the offending field; nothing invalid reaches the engine. Fields meshtron does not implement (`n` > 1,
`logprobs`, `echo`, `best_of`, penalties, `logit_bias`, `suffix`) are refused by name rather than ignored.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_prompt_tokens: int            # per prompt, also capped by the model's context
    max_tokens: int                   # most new tokens one prompt may ask for
    max_seq_len: int                  # the model's context
    vocab_size: int                   # token ids given as prompts must be below it
    max_prompts: int = 64             # prompts in one request (a list)
    max_stop: int = 16                # stop sequences per request
    default_max_tokens: int = 16      # OpenAI's default for /v1/completions


@dataclass
class CompletionRequest:
    prompts: list[list[int]]          # token ids of each prompt
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    model: str | None = None
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _reject_unsupported(body: dict) -> None:
    for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)),
                          ("logprobs", (None,)), ("suffix", (None, "")), ("presence_penalty", (None, 0)),
                          ("frequency_penalty", (None, 0)), ("logit_bias", (None, {}))):
        if body.get(name) not in allowed:
            raise APIError(400, f"'{name}'={body[name]!r} is not supported by meshtron serve", param=name,
                           code="unsupported_parameter")


def parse_completion(body: dict, encode, limits: Limits, eot_id: int | None = None) -> CompletionRequest:
    """Check a /v1/completions body; `encode(text) -> ids`. Raises APIError (400) naming the field."""
    _reject_unsupported(body)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required: a string, a list of strings, or token ids", param="prompt",
                       code="missing_prompt")
    prompts = _prompts(body["prompt"], encode, limits, eot_id)
    max_tokens = _number(body, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens, integer=True)
    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > limits.max_seq_len:
            raise APIError(400, f"this model's maximum context length is {limits.max_seq_len} tokens, but prompt "
                           f"{i} has {len(ids)} tokens and max_tokens is {max_tokens}: shorten the prompt or lower "
                           f"max_tokens", param="max_tokens", code="context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop sequences, got {len(stop)}", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    top_k = _number(body, "top_k", 0, -1, 1 << 30, integer=True)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be greater than 0", param="top_p")
    return CompletionRequest(
        prompts=prompts, max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(top_p), top_k=max(top_k, 0), stop=tuple(stop),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True), stream=stream,
        include_usage=bool(options.get("include_usage", False)), ignore_eos=ignore_eos, model=model)


def _prompts(prompt, encode, limits: Limits, eot_id: int | None) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists -> token ids per prompt."""
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a non-empty list of strings, or token ids", param="prompt")
    if len(items) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(items)}", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = encode(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            if any(not 0 <= t < limits.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {limits.vocab_size})", param="prompt")
        else:
            raise APIError(400, "each prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            if eot_id is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = [eot_id]                        # an empty prompt starts from the end-of-text token, as GPT-2
        cap = min(limits.max_prompt_tokens, limits.max_seq_len - 1)
        if len(ids) > cap:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {cap}",
                           param="prompt", code="context_length_exceeded")
        out.append(ids)
    return out


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion(req: CompletionRequest, model: str, choices: list[dict], usage: dict | None) -> dict:
    out = {"id": req.id, "object": "text_completion", "created": req.created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


DONE = b"data: [DONE]\n\n"
