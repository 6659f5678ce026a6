"""The OpenAPI 3 description of `meshtron serve`'s API (`GET /openapi.json`): request bodies with every field the
parser in `protocol`/`chat` accepts, their types and ranges, and the OpenAI error shape.

Invariant: documentation only, never used to validate (the parser does that, with OpenAI-shaped errors); a body the
schema allows is either served or refused with a 4xx naming the field, never a 5xx (bench/soak_server.py fuzzes it).
"""
from __future__ import annotations

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}

SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 0},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "extension; 0 or -1: off"},
    "n": {"type": "integer", "minimum": 1},
    "stop": _STOP,
    "seed": _INT,
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "description": "extension; 1: off"},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    "min_tokens": {"type": "integer", "minimum": 0, "description": "extension"},
    "ignore_eos": {"type": "boolean", "description": "extension"},
}
COMPLETION = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             _TOKENS, {"type": "array", "items": _TOKENS, "minItems": 1}]},
        "echo": _BOOL, "best_of": {"type": "integer", "minimum": 1},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        **SAMPLING,
    },
}
_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]}
CHAT = {
    "type": "object", "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                           "content": _CONTENT}}},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": _BOOL, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **SAMPLING,
    },
}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _post(summary: str, body: dict) -> dict:
    errors = {str(s): {"description": d, "content": {"application/json": {"schema": ERROR}}}
              for s, d in ((400, "a bad field, named"), (401, "a missing or wrong API key"),
                           (404, "an unknown model"), (413, "a body above --max-body-bytes"),
                           (503, "shutting down, or overloaded"))}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": {"description": "the completion (JSON), or server-sent events with stream: true",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}}, **errors}}}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok", "content": {
        "application/json": {"schema": {"type": "object"}}}}}}}


def spec(model_name: str) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "meshtron serve", "version": "1", "description": f"OpenAI-compatible API serving "
                 f"{model_name}"},
        "paths": {
            "/v1/completions": _post("OpenAI completions (legacy logprobs, echo, n, best_of, penalties)", COMPLETION),
            "/v1/chat/completions": _post("OpenAI chat completions through the model's chat template", CHAT),
            "/v1/models": _get("the served model"),
            "/health": _get("200 while every rank serves, else 503"),
            "/stats": _get("scheduler counters"),
        },
    }
