"""`meshtron serve CKPT_OR_HF_DIR --mesh model:2 --port 8000`: an OpenAI-compatible completions server.

Invariant: the model, mesh, layout, tokenizer, limits and the port are checked in this process before any rank
starts (exit code 2 with one error line); without torchrun this process becomes rank 0 and starts the others;
SIGINT or SIGTERM stops the server and every rank (exit code 0).
"""
from __future__ import annotations

import argparse
import socket
import sys

from meshtron.cli.generate import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the folder name)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted, in tokens "
                   "(default: the model's context minus one)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted (default: the "
                   "model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per replica (default 32)")
    p.add_argument("--log-requests", action="store_true", help="print an access log line per request")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the model folder's own, from "
                        "chat_template.jinja or tokenizer_config.json; without one, chat is refused)")


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None


def run(args) -> int:
    from meshtron.cli.generate import check_model
    from meshtron.launch import under_launcher
    from meshtron.serve.server import ServeOptions, launch, serve_rank
    try:
        src, _, _ = check_model(args.path, args.mesh, args.layout, args.tokenizer)
        ctx = src.config.max_seq_len
        for flag, value, hi in (("--max-prompt-tokens", args.max_prompt_tokens, ctx - 1),
                                ("--max-tokens-limit", args.max_tokens_limit, ctx)):
            if value is not None and not 1 <= value <= hi:
                raise ValueError(f"{flag} {value}: must be between 1 and {hi} (the model's context is {ctx})")
        for flag, value in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port} is not a TCP port")
        if args.api_key is not None and not args.api_key.strip():
            raise ValueError("--api-key is empty (an unset $VARIABLE?): a server with an empty key would refuse every "
                             "request; give the key, or leave --api-key out to serve without one")
        _check_chat_template(args.path, args.chat_template)
        launched = under_launcher()
        if not launched or _rank() == 0:
            _check_port(args.host, args.port)
    except ValueError as e:
        print(f"meshtron serve: error: {e}", file=sys.stderr)
        return 2
    opts = ServeOptions(path=args.path, mesh=args.mesh, layout=args.layout, tokenizer=args.tokenizer, host=args.host,
                        port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                        threads_per_rank=args.threads_per_rank, log_requests=args.log_requests,
                        chat_template=args.chat_template)
    return serve_rank(opts) if launched else launch(opts)


def _check_chat_template(path: str, override: str | None) -> None:
    """Compile the chat template before any rank starts: a missing file or a Jinja error fails here."""
    from jinja2 import TemplateError

    from meshtron.serve.chat import load_template
    try:
        load_template(path, override)
    except OSError as e:
        raise ValueError(f"--chat-template: cannot read {override}: {e.strerror}") from None
    except TemplateError as e:
        raise ValueError(f"the chat template {override or 'of ' + path} is not valid Jinja: {e}") from None


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))
