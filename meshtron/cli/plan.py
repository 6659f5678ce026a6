"""`meshtron plan`: the mesh to run a model on a cluster, ranked by predicted step time (see meshtron.planner).

Invariant: bad input (unknown model or GPU, no legal layout, nothing fits) ends with one clear message on
stderr and a nonzero exit, never a traceback: 2 for input no layout can serve, 1 when layouts exist but none
fits in memory (the table is still printed).
"""
from __future__ import annotations

import argparse
import os
import sys

TRI = {"auto": None, "on": True, "off": False}
MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_kv_head": int, "d_model": int, "d_ff": int, "dropout": float}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", help="a preset name (gpt2, llama-7b, ...) or a Hugging Face config.json / folder (default: the "
      "--config file's model, else gpt-mini)")
    a("--config", help="a `meshtron train` config file (TOML or YAML): its model and shape options are planned")
    for name, kind in MODEL_FLAGS.items():
        a("--" + name.replace("_", "-"), type=kind, help=f"override the model's {name} (as `meshtron train` does)")
    a("--gpus", type=int, required=True, help="number of devices (ranks)")
    a("--gpu", default="a100-80gb", help="a100-80gb, a100-40gb, h100-80gb, v100-32gb, l4, mi250x, cpu (measured "
      "on this machine), or a profile file (JSON/TOML; base = \"a100-80gb\" plus the fields to change)")
    a("--gpus-per-node", type=int, help="devices per node (default: the profile's, 8 for GPUs)")
    a("--global-batch", type=int, required=True, help="sequences per optimizer step")
    a("--seq-len", type=int, help="tokens per sequence (default: the model's maximum)")
    a("--dtype", choices=["bf16", "fp16", "fp32", "tf32"], help="training precision (default: the profile's)")
    a("--micro-batch", type=int, help="fix the micro-batch size (default: try every divisor)")
    a("--recompute", choices=["auto", "none", "selective", "full"], default="auto",
      help="activation recompute: try every kind (auto), or force one")
    for flag, what in (("--sequence-parallel", "sequence parallelism"),
                       ("--sharded-optimizer", "optimizer state sharded over the batch axis (ZeRO-1, --zero 1)")):
        a(flag, choices=list(TRI), default="auto", help=f"{what}: try both (auto), or force it")
    a("--max-pp", type=int, help="deepest pipeline to consider (1: no pipeline, as meshtron's trainer today)")
    a("--no-interleave", action="store_true", help="do not consider the interleaved pipeline schedule")
    a("--allow-cross-node-tp", action="store_true", help="let the model axis span nodes")
    a("--threads-per-rank", type=int, default=1, help="cpu profile: compute threads of each rank")
    a("--recalibrate", action="store_true", help="cpu profile: measure this machine again")
    a("--top", type=int, default=10, help="rows of the table (default 10)")
    a("--all", action="store_true", help="list every variant, not only the best one per mesh")
    a("--json", action="store_true", help="print the ranked layouts as JSON (a list, best first)")


def resolve_model(name: str):
    """A preset, or a Hugging Face config (folder or JSON file) with its dropout (which shapes attention's memory:
    `config_from_hf` leaves dropout to training, the planner needs the rate the model is trained with)."""
    from meshtron.models.config import PRESETS
    from meshtron.models.hf_config import config_from_hf, hf_dropout, load_hf_config
    if name in PRESETS:
        return PRESETS[name]
    if os.path.exists(name):
        hf = load_hf_config(name)
        return config_from_hf(hf).replace(dropout=hf_dropout(hf))
    raise ValueError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or the path of a Hugging Face "
                     f"config.json or model folder")


def model_from_args(args) -> tuple[object, str]:
    """(ModelConfig, the model options of the `meshtron train` command): --config's model and overrides, then
    --model, then the shape flags, as `meshtron train` resolves them."""
    overrides, name = {}, None
    if args.config:
        from meshtron.cli.train import read_config_file
        data = read_config_file(args.config)
        name = data.get("model")
        overrides.update({k: v for k, v in data.get("overrides", {}).items()})
        overrides.update({k.replace("-", "_"): v for k, v in data.items() if k.replace("-", "_") in MODEL_FLAGS})
        if args.seq_len is None and data.get("seq_len"):
            args.seq_len = int(data["seq_len"])
    name = args.model or name or "gpt-mini"
    overrides.update({k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None})
    cfg = resolve_model(name).replace(**overrides) if overrides else resolve_model(name)
    shown = [f"--config {args.config}"] if args.config else []
    if args.model or not args.config:
        shown.append(f"--model {name}")
    shown += [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in MODEL_FLAGS if getattr(args, k) is not None]
    return cfg, " ".join(shown)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from meshtron.planner import report
    from meshtron.planner.calibrate import calibration_warning, cpu_profile
    from meshtron.planner.hardware import get_profile
    from meshtron.planner.search import plan

    def fail(message: str, code: int = 2) -> int:
        print(f"meshtron plan: {message}", file=sys.stderr)
        return code

    try:
        cfg, model_args = model_from_args(args)
        if args.gpu == "cpu":
            from meshtron.cli.calibrate import measure
            hw = cpu_profile(args.threads_per_rank, recalibrate=args.recalibrate, measure=measure)
            warning = calibration_warning(hw)
            if warning:
                print(f"meshtron plan: warning: {warning}", file=sys.stderr)
        else:
            hw = get_profile(args.gpu)
        if args.gpus_per_node is not None:
            if args.gpus_per_node < 1:
                return fail(f"--gpus-per-node must be positive, not {args.gpus_per_node}")
            hw = dataclasses.replace(hw, devices_per_node=args.gpus_per_node)
        result = plan(cfg, hw, args.gpus, global_batch=args.global_batch, seq_len=args.seq_len or cfg.max_seq_len,
                      dtype=args.dtype, micro_batch=args.micro_batch,
                      recompute=None if args.recompute == "auto" else args.recompute,
                      sequence_parallel=TRI[args.sequence_parallel], sharded_optimizer=TRI[args.sharded_optimizer],
                      interleave=not args.no_interleave, allow_cross_node_tp=args.allow_cross_node_tp,
                      max_pp=args.max_pp)
    except ValueError as e:                  # PlanError, HardwareError, HFConfigError, LayoutError, ...
        return fail(str(e))

    shown = result.ranked if args.all else result.per_mesh
    if args.json:
        print(report.to_json(shown, model_args))
    else:
        print(report.header(result, model_args))
        print()
        print(report.table(shown[:args.top]))
        if len(shown) > args.top:
            print(f"... {len(shown) - args.top} more (--top N to show them, --json for all)")
        print()
        if result.best is not None:
            print(report.chosen(result, model_args))
    if result.best is None and result.best_overall is not None:
        return fail(f"only layouts with a pipeline axis fit (best: --mesh {result.best_overall.layout.mesh}), and "
                    f"meshtron's trainer has no pipeline axis yet: use more devices or a smaller global batch or "
                    f"model", code=1)
    if result.best is None:
        least = min(result.ranked, key=lambda p: p.memory["total"])
        return fail(f"no layout fits: the smallest needs {least.memory_gb:.1f} GiB per device "
                    f"(--mesh {least.layout.mesh}, micro-batch {least.layout.micro_batch}) but a {hw.name} has "
                    f"{hw.memory_gib:g} GiB; use more devices, a smaller global batch or model, or devices with "
                    f"more memory", code=1)
    return 0
