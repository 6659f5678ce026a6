"""`meshtron train`: resolve the options (defaults < resumed run < config file < flags), check them, then
start the mesh's ranks (or join torchrun's) and train; restart from the newest checkpoint after a crash."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_kv_head": int, "d_model": int, "d_ff": int, "dropout": float}
# flag -> (type, help); every one maps to a TrainConfig field of the same name
FLAGS = {
    "mesh": (str, "mesh axes and sizes, e.g. 'batch:2,model:2' (the last axis varies fastest: put the model "
                  "axis last). Default: model:1 (one rank)"),
    "layout": (str, "layout rules, e.g. 'batch:batch;heads:model;d_ff:model;vocab:model'. Default: "
                    "Mesh-TensorFlow's rules for the axes the mesh has"),
    "model": (str, "model preset (gpt-tiny, gpt-mini, llama-tiny, llama-mini, gpt2, ..., llama-7b)"),
    "data": (str, "training text: a file, a folder of .txt/.md, a .jsonl with a 'text' field (each maybe .gz), "
                  "or 'builtin' (CPython's documentation, the default)"),
    "tokenizer": (str, "'byte' (default), 'bpe' (train one on the data, see --vocab-size), 'gpt2', a "
                       "tokenizer.json, or a tokenizer folder"),
    "vocab_size": (int, "vocabulary of a trained BPE tokenizer"),
    "val_fraction": (float, "share of the data held out for validation"),
    "eval_every": (int, "steps between validation passes (0: only at the end)"),
    "eval_batches": (int, "batches per validation pass"),
    "peak_tflops": (float, "peak TFLOP/s of one GPU (or one CPU machine) for MFU; measured when not given"),
    "steps": (int, "optimizer steps (in total, counting resumed ones)"),
    "batch_size": (int, "global batch, in sequences"),
    "micro_batches": (int, "gradient accumulation steps per update"),
    "seq_len": (int, "tokens per sequence"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "final learning rate as a fraction of --lr (cosine decay)"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay (not on norms and biases)"),
    "clip": (float, "global gradient-norm clip (0: off)"),
    "seed": (int, "seed of weights, data order and dropout"),
    "out": (str, "run folder: config.json, metrics.jsonl, checkpoints/"),
    "save_every": (int, "steps between checkpoints (0: only at the end)"),
    "keep": (int, "newest checkpoints kept"),
    "sample_tokens": (int, "tokens to generate at the end (0: none)"),
    "prompt": (str, "prompt of the final sample"),
    "stop_after": (int, "leave after this many steps of this invocation, saving a checkpoint (resume later)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML or YAML file of options (keys as the flags, with '_')")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                   "(on this or another mesh)")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the job from its newest checkpoint this "
                   "many times after a rank dies")
    p.add_argument("--threads-per-rank", type=int, default=None)
    p.add_argument("--bf16", action="store_const", const=True, default=None,
                   help="bf16 autocast (float32 master weights, gradients and optimizer state)")
    for name, (kind, help_text) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    for name, kind in MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"override the preset's {name}")


def read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist")
    if path.endswith((".yaml", ".yml")):
        import yaml
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    else:
        import tomllib
        with open(path, "rb") as f:
            data = tomllib.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of options")
    return data


def resolve(args):
    """TrainConfig from defaults < resumed run's config < config file < flags; unknown keys are errors."""
    from meshtron.train.loop import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"overrides"}
    values: dict = {}
    overrides: dict = {}

    def merge(source: dict, where: str):
        for key, value in source.items():
            key = key.replace("-", "_")
            if key in MODEL_FLAGS:
                overrides[key] = value
            elif key == "overrides" and isinstance(value, dict):
                overrides.update(value)
            elif key in fields:
                values[key] = value
            else:
                raise ValueError(f"{where}: unknown option {key!r}; known options: "
                                 + ", ".join(sorted(fields | set(MODEL_FLAGS))))

    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"--resume {args.resume}: no config.json there; is it a meshtron run folder?")
        with open(path) as f:
            saved = json.load(f)["train"]
        saved.pop("stop_after", None)
        merge(saved, path)
        values["out"] = args.resume
    if args.config:
        merge(read_config_file(args.config), args.config)
    merge({k: getattr(args, k) for k in list(FLAGS) + ["bf16"] if getattr(args, k) is not None}, "flags")
    merge({k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}, "flags")
    cfg = TrainConfig(**values, overrides=overrides)
    if cfg.warmup_steps > cfg.steps:
        cfg.warmup_steps = cfg.steps
    return cfg


def get_vocab_for_check(cfg) -> int:
    """Under torchrun each rank opens the data itself; the shape checks use the preset's vocabulary."""
    from meshtron.models import get_preset
    return get_preset(cfg.model).vocab_size


def run(args) -> int:
    from meshtron.checkpoint import CheckpointError
    from meshtron.launch import RankError, run_ranks, under_launcher
    from meshtron.mesh import parse_mesh_spec
    from meshtron.train.loop import open_data, run_training
    try:
        cfg = resolve(args)
        if not under_launcher():   # tokenise once here (cached for the ranks); bad data fails before any rank
            tokenizer = None
            if args.resume:
                from meshtron.checkpoint import latest_checkpoint
                from meshtron.data import load_tokenizer
                from meshtron.train.loop import checkpoint_root
                latest = latest_checkpoint(checkpoint_root(cfg))
                tokenizer = load_tokenizer(os.path.join(latest, "tokenizer")) if latest else None
            vocab = open_data(cfg, tokenizer, log=lambda m: print(f"meshtron train: {m}", flush=True)).tokenizer.vocab_size
        else:
            vocab = get_vocab_for_check(cfg)
        cfg.check(vocab)
        world = 1
        for size in parse_mesh_spec(cfg.mesh).values():
            world *= size
    except ValueError as e:
        print(f"meshtron train: error: {e}", file=sys.stderr)
        return 2
    resume = bool(args.resume)
    if os.environ.get("RANK", "0") == "0":
        print("meshtron train: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()), flush=True)
    if under_launcher() or (world == 1 and args.max_restarts == 0):
        try:
            run_training(cfg, resume)
        except (CheckpointError, FloatingPointError, ValueError) as e:
            print(f"meshtron train: error: {e}", file=sys.stderr)
            return 1
        return 0
    for attempt in range(args.max_restarts + 1):
        try:
            run_ranks(run_training, world, cfg, resume or attempt > 0, threads_per_rank=args.threads_per_rank,
                      timeout_s=7 * 24 * 3600, env={"MESHTRON_ATTEMPT": str(attempt)})
            return 0
        except RankError as e:
            fatal = e.kind in ("ValueError", "LayoutError", "CheckpointError", "FloatingPointError", "DataError")
            if fatal or attempt == args.max_restarts:
                print(f"meshtron train: {e}", file=sys.stderr)
                return 1
            print(f"meshtron train: {str(e).splitlines()[0]}; restarting from the newest checkpoint "
                  f"(restart {attempt + 1} of {args.max_restarts})", file=sys.stderr, flush=True)
    return 1
