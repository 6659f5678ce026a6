"""Chat for `meshtron serve`: OpenAI's `POST /v1/chat/completions` on top of the completion path.

Invariant: a chat request is its messages rendered by the model's own chat template (Jinja, as Hugging Face
stores it in tokenizer_config.json or chat_template.jinja, or a file given with --chat-template), with the
generation prompt added, then tokenized and served exactly like a completion of that text. A model without a
template refuses chat with a 400 that says how to give one; there is no guessed default (as vLLM).
"""
from __future__ import annotations

import json
import os

from meshtron.serve.protocol import APIError, CompletionRequest, Limits, parse_completion, reject_unsupported

ROLES = ("system", "developer", "user", "assistant", "tool")


def find_template(model_path: str, override: str | None = None) -> str | None:
    """The chat template: the file `override`, else the model folder's, else None."""
    if override:
        with open(override) as f:
            return f.read()
    jinja = os.path.join(model_path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    config = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):      # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            return template
    return None


class ChatTemplate:
    """A compiled template: render(messages) -> the prompt text, generation prompt included."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as e:
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content} objects",
                       param="messages", code="missing_messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object whose 'role' is one of {list(ROLES)}",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):       # [{"type": "text", "text": ...}, ...]: text parts only
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: dict, template: ChatTemplate | None, encode, limits: Limits,
               eot_id: int | None = None) -> CompletionRequest:
    """Check a /v1/chat/completions body and turn it into the completion of its rendered prompt."""
    if template is None:
        raise APIError(400, "this model has no chat template, so it cannot chat: use /v1/completions, or start "
                       "meshtron serve with --chat-template FILE (a Jinja template, as in a Hugging Face "
                       "tokenizer_config.json)", code="no_chat_template")
    reject_unsupported(body)
    messages = _messages(body)
    ids = encode(template.render(messages))
    rest = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens", "prompt")}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:                  # OpenAI's chat default: as many as the context leaves
        max_tokens = max(1, min(limits.max_tokens, limits.max_seq_len - len(ids)))
    rest["max_tokens"] = max_tokens
    req = parse_completion({**rest, "prompt": ids}, encode, limits, eot_id, chat=True)
    req.id = "chatcmpl-" + req.id.split("-", 1)[1]
    return req


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(req: CompletionRequest, model: str, choices: list[dict], usage: dict | None,
                    chunk: bool = False) -> dict:
    out = {"id": req.id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": req.created,
           "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def load_template(model_path: str, override: str | None = None) -> ChatTemplate | None:
    """The model's chat template, compiled with its BOS and EOS strings, or None when it has none."""
    source = find_template(model_path, override)
    if source is None:
        return None
    tokens = {}
    config = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            cfg = json.load(f)
        for name in ("bos_token", "eos_token"):
            value = cfg.get(name)
            tokens[name] = value.get("content", "") if isinstance(value, dict) else value or ""
    return ChatTemplate(source, tokens.get("bos_token", ""), tokens.get("eos_token", ""))
