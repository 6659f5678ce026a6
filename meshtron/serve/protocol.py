"""The OpenAI completions API as data: a request body checked field by field, the responses and stream chunks,
and errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

Invariant: `parse_completion` either returns a request every rank can run or raises `APIError` with a 4xx status
naming the offending field; nothing invalid reaches the engine. Fields meshtron does not implement (`suffix`,
`tools`, `response_format`, ...: `UNSUPPORTED`) are refused by name rather than ignored. A body is plain JSON
text: no lone surrogate, nesting at most MAX_DEPTH deep.
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
    max_sequences: int = 64           # prompts x best_of (or n) in one request
    max_stop: int = 16                # stop sequences per request
    default_max_tokens: int = 16      # OpenAI's default for /v1/completions


MAX_DEPTH = 32                        # JSON nesting a body may have
MAX_LOGPROBS = 20                     # OpenAI's limit on logprobs / top_logprobs
# field -> the values that mean "not used"; anything else is refused with a 400 naming the field
UNSUPPORTED = {"suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "parallel_tool_calls": (None, False, True), "audio": (None,), "prediction": (None,),
               "modalities": (None, ["text"]), "guided_json": (None,), "guided_regex": (None,),
               "guided_choice": (None,), "guided_grammar": (None,)}


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
    n: int = 1                        # choices per prompt
    best_of: int = 1                  # sequences per prompt, the n likeliest returned (mean logprob per token)
    logprobs: int | None = None       # completions: top-k per token (None: none); chat: top_logprobs if enabled
    echo: bool = False                # the prompt (and its logprobs) before each completion
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    texts: list[str | None] = field(default_factory=list)   # each prompt's text, if given as text (for echo)
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_plain(body)
    return body


def _check_plain(body) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that are not Unicode text (a lone surrogate such as
    "\\ud800" parses, but cannot be encoded, tokenized or echoed). Iterative: no recursion on hostile input."""
    todo = [(body, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)",
                           code="invalid_json")
        if isinstance(value, dict):
            todo.extend((k, depth) for k in value)
            todo.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request body holds a string that is not valid Unicode (a lone surrogate "
                               "escape such as \\ud800): send UTF-8 text", code="invalid_json") from None


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


def reject_unsupported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise APIError(400, f"'{name}' is not supported by meshtron serve (got {body[name]!r}); leave it out",
                           param=name, code="unsupported_parameter")


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise APIError(400, "'logit_bias' must be an object mapping token ids to biases (at most 1024 entries)",
                       param="logit_bias")
    out = {}
    for key, value in bias.items():
        tid = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if tid is None or not 0 <= tid < vocab_size:
            raise APIError(400, f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key!r}",
                           param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, f"'logit_bias' values must be numbers in [-100, 100], got {value!r}",
                           param="logit_bias")
        out[tid] = float(value)
    return out


def parse_completion(body: dict, encode, limits: Limits, eot_id: int | None = None,
                     chat: bool = False) -> CompletionRequest:
    """Check a /v1/completions body; `encode(text) -> ids`. Raises APIError (400) naming the field. With `chat`,
    the body is a chat request's (its prompt already rendered): `logprobs` is a flag, `top_logprobs` the k."""
    reject_unsupported(body)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required: a string, a list of strings, or token ids", param="prompt",
                       code="missing_prompt")
    prompts, texts = _prompts(body["prompt"], encode, limits, eot_id)
    echo = False if chat else _flag(body, "echo")
    if chat:
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True) if _flag(body, "logprobs") \
            else None
        if logprobs is None and body.get("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    lowest = 0 if echo else 1                 # max_tokens 0: only the echoed prompt (and its logprobs)
    max_tokens = _number(body, "max_tokens", limits.default_max_tokens, lowest, limits.max_tokens, integer=True)
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
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    top_k = _number(body, "top_k", 0, -1, 1 << 30, integer=True)
    ignore_eos = _flag(body, "ignore_eos")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be greater than 0", param="top_p")
    n = _number(body, "n", 1, 1, limits.max_sequences, integer=True)
    best_of = n if chat else _number(body, "best_of", n, 1, limits.max_sequences, integer=True)
    if best_of < n:
        raise APIError(400, f"'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of")
    if stream and best_of > n:
        raise APIError(400, "'best_of' larger than 'n' cannot be streamed: the best are known only at the end",
                       param="best_of")
    if best_of * len(prompts) > limits.max_sequences:
        raise APIError(400, f"{len(prompts)} prompts x {best_of} sequences each exceed the {limits.max_sequences} "
                       f"sequences one request may ask for", param="n")
    min_tokens = _number(body, "min_tokens", 0, 0, limits.max_tokens, integer=True)
    if min_tokens > max_tokens:
        raise APIError(400, f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})",
                       param="min_tokens")
    return CompletionRequest(
        prompts=prompts, texts=texts, max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)), top_p=float(top_p), top_k=max(top_k, 0),
        stop=tuple(stop), seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True), stream=stream,
        include_usage=bool(options.get("include_usage", False)), ignore_eos=ignore_eos, model=model, n=n,
        best_of=best_of, logprobs=logprobs, echo=echo,
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0)),
        logit_bias=_logit_bias(body, limits.vocab_size), min_tokens=min_tokens)


def _prompts(prompt, encode, limits: Limits, eot_id: int | None) -> tuple[list[list[int]], list[str | None]]:
    """A string, a list of strings, a list of token ids, or a list of such lists -> token ids per prompt, and
    each prompt's text (None for token ids)."""
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
    out, texts = [], []
    for item in items:
        texts.append(item if isinstance(item, str) else None)
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
    return out, texts


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


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
