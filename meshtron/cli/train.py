"""`meshtron train`: validate the options, then start the mesh's ranks (or join torchrun's) and train."""
from __future__ import annotations

import argparse
import sys

MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_kv_head": int, "d_model": int, "d_ff": int, "dropout": float}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="model:1", help="mesh axes and sizes, e.g. 'batch:2,model:2' (last axis "
                   "varies fastest: put the model axis last). Default: model:1 (one rank)")
    p.add_argument("--layout", default=None, help="layout rules, e.g. 'batch:batch;heads:model;d_ff:model;"
                   "vocab:model'. Default: Mesh-TensorFlow's rules for the axes the mesh has")
    p.add_argument("--model", default="gpt-mini", help="model preset (see meshtron.models.PRESETS)")
    for name, kind in MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"override the preset's {name}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, in sequences")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps per update")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="run folder (metrics.jsonl, config.json)")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate at the end (0: none)")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--threads-per-rank", type=int, default=None)


def config_from_args(args):
    from meshtron.train.loop import TrainConfig
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    return TrainConfig(mesh=args.mesh, layout=args.layout, model=args.model, overrides=overrides, steps=args.steps,
                       batch_size=args.batch_size, micro_batches=args.micro_batches, seq_len=args.seq_len,
                       lr=args.lr, warmup_steps=min(args.warmup_steps, args.steps), weight_decay=args.weight_decay,
                       clip=args.clip, seed=args.seed, out=args.out, sample_tokens=args.sample_tokens,
                       prompt=args.prompt)


def run(args) -> int:
    from meshtron.launch import RankError, run_ranks, under_launcher
    from meshtron.mesh import parse_mesh_spec
    from meshtron.train.data import ByteTokenizer
    from meshtron.train.loop import run_training
    try:
        cfg = config_from_args(args)
        cfg.check(ByteTokenizer.vocab_size)
        world = 1
        for size in parse_mesh_spec(cfg.mesh).values():
            world *= size
    except ValueError as e:
        print(f"meshtron train: error: {e}", file=sys.stderr)
        return 2
    if under_launcher() or world == 1:
        run_training(cfg)
        return 0
    try:
        run_ranks(run_training, world, cfg, threads_per_rank=args.threads_per_rank, timeout_s=7 * 24 * 3600)
    except RankError as e:
        print(f"meshtron train: {e}", file=sys.stderr)
        return 1
    return 0
