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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="a preset name (gpt2, llama-7b, ...) or a Hugging Face config.json / folder")
    a("--gpus", type=int, required=True, help="number of devices (ranks)")
    a("--gpu", default="a100-80gb", help="a100-80gb, a100-40gb, h100-80gb, v100-32gb, l4, mi250x, cpu (measured "
      "on this machine), or a profile file (JSON/TOML; base = \"a100-80gb\" plus the fields to change)")
    a("--gpus-per-node", type=int, help="devices per node (default: the profile's, 8 for GPUs)")
    a("--global-batch", type=int, required=True, help="sequences per optimizer step")
    a("--seq-len", type=int, help="tokens per sequence (default: the model's maximum)")
    a("--dtype", choices=["bf16", "fp16", "fp32", "tf32"], help="training precision (default: the profile's)")
    a("--micro-batch", type=int, help="fix the micro-batch size (default: try every divisor)")
    for flag, what in (("--recompute", "full activation recompute"), ("--sequence-parallel", "sequence parallelism"),
                       ("--sharded-optimizer", "optimizer state sharded over the batch axis")):
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
    """A preset, or a Hugging Face config (folder or JSON file)."""
    from meshtron.models.config import PRESETS
    from meshtron.models.hf_config import config_from_hf, load_hf_config
    if name in PRESETS:
        return PRESETS[name]
    if os.path.exists(name):
        return config_from_hf(load_hf_config(name))
    raise ValueError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or the path of a Hugging Face "
                     f"config.json or model folder")


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
        cfg = resolve_model(args.model)
        if args.gpu == "cpu":
            hw = cpu_profile(args.threads_per_rank, recalibrate=args.recalibrate)
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
                      dtype=args.dtype, micro_batch=args.micro_batch, recompute=TRI[args.recompute],
                      sequence_parallel=TRI[args.sequence_parallel], sharded_optimizer=TRI[args.sharded_optimizer],
                      interleave=not args.no_interleave, allow_cross_node_tp=args.allow_cross_node_tp,
                      max_pp=args.max_pp)
    except ValueError as e:                  # PlanError, HardwareError, HFConfigError, LayoutError, ...
        return fail(str(e))

    shown = result.ranked if args.all else result.per_mesh
    if args.json:
        print(report.to_json(shown))
    else:
        print(report.header(result, args.model))
        print()
        print(report.table(shown[:args.top]))
        if len(shown) > args.top:
            print(f"... {len(shown) - args.top} more (--top N to show them, --json for all)")
        print()
        if result.best is not None:
            print(report.chosen(result))
    if result.best is None:
        least = min(result.ranked, key=lambda p: p.memory["total"])
        return fail(f"no layout fits: the smallest needs {least.memory_gb:.1f} GiB per device "
                    f"(--mesh {least.layout.mesh}, micro-batch {least.layout.micro_batch}) but a {hw.name} has "
                    f"{hw.memory_gib:g} GiB; use more devices, a smaller global batch or model, or devices with "
                    f"more memory", code=1)
    return 0
