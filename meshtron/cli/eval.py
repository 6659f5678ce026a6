"""`meshtron eval RUN_DIR --data PATH`: loss and perplexity of a trained model on any text, on any mesh; or
`--loglikelihood ITEMS.jsonl`: each item's log-likelihood of a continuation given a context, as lm-evaluation-harness
computes it (its context/continuation split, the sum of the continuation tokens' logprobs, and whether each was the
greedy choice), one JSON line per item.

Invariant: the log-likelihoods come from one full forward pass per batch of items (no KV cache, vocabulary split,
logits never gathered), an independent path from the server's prefill."""
from __future__ import annotations

import argparse
import math
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder, or a Hugging Face folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="text file, folder, .jsonl (maybe .gz), or 'builtin'")
    what.add_argument("--loglikelihood", metavar="ITEMS.jsonl", help="JSON lines with 'context' and 'continuation': "
                      "print each item's log-likelihood (lm-eval's loglikelihood request) as a JSON line")
    p.add_argument("--mesh", default="model:1")
    p.add_argument("--layout", default=None)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len (at most 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")


def _evaluate(args, seq_len: int) -> dict:
    from meshtron.data import Dataset, tokenize_data
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    from meshtron.train.step import evaluate
    mesh = Mesh.from_spec(args.mesh)
    model, tok, _ = open_model(args.checkpoint, mesh, args.layout, args.tokenizer)
    data = Dataset(tokenize_data(args.data, tok), seq_len, val_fraction=0.0)
    axis = model.layout.axis("batch")
    n = data.train.count // args.batch_size
    if args.max_batches:
        n = min(n, args.max_batches)
    if n == 0:
        raise ValueError(f"{args.data} holds {data.train.count} windows of {seq_len} tokens, fewer than one batch "
                         f"of {args.batch_size}: lower --batch-size or --seq-len")
    batches = (data.train.read(_rows(i, args.batch_size, axis)) for i in range(n))
    loss = evaluate(model, batches, axis)
    return {"loss": loss, "batches": n, "tokens": n * args.batch_size * seq_len}


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's tokens are
    those of context + continuation after the context's (an empty context is the end-of-text token)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        ctx = [tok.eot_id]
        return ctx, tok.encode(continuation)
    whole, ctx = tok.encode_prompt(context + continuation), tok.encode_prompt(context)
    return ctx, whole[len(ctx):]


def _loglikelihoods(args) -> list[dict]:
    import json

    import torch

    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    mesh = Mesh.from_spec(args.mesh)
    model, tok, _ = open_model(args.checkpoint, mesh, args.layout, args.tokenizer)
    with open(args.loglikelihood) as f:
        items = [json.loads(line) for line in f if line.strip()]
    pairs = [encode_pair(tok, it["context"], it["continuation"]) for it in items]
    out = []
    with torch.no_grad():
        for lo in range(0, len(pairs), args.batch_size):
            out += _score_batch(model, pairs[lo:lo + args.batch_size])
    return out


def _score_batch(model, batch: list[tuple[list[int], list[int]]]) -> list[dict]:
    """One forward pass over right-padded (context + continuation) rows; each continuation scored on the split
    vocabulary."""
    import torch

    from meshtron.inference.logprobs import score
    head, dev = model.head, model.mesh.device
    seqs = [(c + x)[-(model.config.max_seq_len + 1):] for c, x in batch]         # lm-eval keeps the right end
    T = max(len(s) for s in seqs) - 1
    idx = torch.tensor([s[:-1] + [0] * (T + 1 - len(s)) for s in seqs], dtype=torch.long, device=dev)
    h = model.hidden(idx)                                                # (B, T, d): causal, right padding unused
    out = []
    for b, ((_, cont), s) in enumerate(zip(batch, seqs)):
        n = len(cont)
        rows = h[b, len(s) - 1 - n:len(s) - 1]                           # the positions predicting the continuation
        raw = head.local_logits(rows[None])[0]
        target = torch.tensor(s[-n:], dtype=torch.long, device=dev)
        sc = score(raw, head.vocab_start, head.axis, logz=True, targets=target, choose=raw)
        out.append({"loglikelihood": float(sc.logprob(sc.target).sum()), "is_greedy": bool((sc.pick == target).all()),
                    "tokens": n})
    return out


def _rows(i, batch, axis):
    import numpy as np
    per = batch // axis.size
    start = i * batch + axis.coord * per
    return np.arange(start, start + per)


def run(args) -> int:
    from meshtron.launch import RankError, run_ranks, under_launcher
    from meshtron.layout import LayoutRules, validate
    from meshtron.load import describe
    from meshtron.mesh import parse_mesh_spec
    if args.loglikelihood:
        return _run_loglikelihood(args)
    try:
        src = describe(args.checkpoint)
        seq_len = args.seq_len or min(src.config.max_seq_len, 1024)
        shape = parse_mesh_spec(args.mesh)
        rules = LayoutRules.parse(args.layout) if args.layout else LayoutRules.default_for(shape)
        validate(rules, shape, {**src.config.dim_sizes(), "batch": args.batch_size})
        world = math.prod(shape.values())
        if under_launcher() or world == 1:
            out = _evaluate(args, seq_len)
        else:
            out = run_ranks(_evaluate, world, args, seq_len)[0]
    except (ValueError, OSError) as e:
        print(f"meshtron eval: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"meshtron eval: {e}", file=sys.stderr)
        return 1
    print(f"meshtron eval: {args.checkpoint} on {args.data}: loss {out['loss']:.4f}  perplexity "
          f"{math.exp(min(out['loss'], 50)):.2f}  ({out['batches']} batches, {out['tokens']} tokens)")
    return 0


def _run_loglikelihood(args) -> int:
    import json

    from meshtron.cli.generate import check_model
    from meshtron.launch import RankError, run_ranks, under_launcher
    try:
        _, _, world = check_model(args.checkpoint, args.mesh, args.layout, args.tokenizer)
        with open(args.loglikelihood) as f:
            for i, line in enumerate(f):
                if line.strip():
                    item = json.loads(line)
                    if not isinstance(item.get("context"), str) or not isinstance(item.get("continuation"), str) \
                            or not item["continuation"]:
                        raise ValueError(f"{args.loglikelihood} line {i + 1}: give a string 'context' and a non-empty "
                                         f"string 'continuation'")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        out = _loglikelihoods(args) if under_launcher() or world == 1 else run_ranks(_loglikelihoods, world, args)[0]
    except (ValueError, OSError) as e:
        print(f"meshtron eval: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"meshtron eval: {e}", file=sys.stderr)
        return 1
    for row in out:
        print(json.dumps(row))
    return 0
