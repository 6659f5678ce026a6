"""`meshtron eval RUN_DIR --data PATH`: loss and perplexity of a trained model on any text, on any mesh."""
from __future__ import annotations

import argparse
import math
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder, or a Hugging Face folder")
    p.add_argument("--data", required=True, help="text file, folder, .jsonl (maybe .gz), or 'builtin'")
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
