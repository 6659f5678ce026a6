"""Text and JSON renderings of a Plan: the ranked table, the chosen `--mesh`, and why.

Invariant: rendering only; every number shown comes from a Prediction, nothing is recomputed here.
"""
from __future__ import annotations

import json

from meshtron.planner.cost_model import Prediction
from meshtron.planner.hardware import GIB
from meshtron.planner.search import Plan

COLUMNS = ["#", "mesh", "dp", "tp", "pp", "v", "mb", "recomp", "sp", "zero", "mem GiB", "fits", "step s",
           "tok/s", "TFLOP/s", "MFU"]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def row(rank: int, p: Prediction) -> list[str]:
    lay = p.layout
    return [str(rank), lay.mesh, str(lay.dp), str(lay.tp), str(lay.pp), str(lay.virtual_stages),
            str(lay.micro_batch), {"none": "-", "selective": "sel", "full": "full"}[lay.recompute],
            _yes(lay.sequence_parallel) if lay.tp > 1 else "-", ("1" if lay.sharded_optimizer else "0")
            if lay.dp > 1 else "-", f"{p.memory_gb:.1f}", "yes" if p.fits else "NO", f"{p.step_time_s:.4g}", f"{p.tokens_per_s:,.0f}",
            f"{p.tflops_per_gpu:.4g}", f"{p.mfu:.1%}"]


def table(preds: list[Prediction]) -> str:
    cells = [COLUMNS] + [row(i, p) for i, p in enumerate(preds, 1)]
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    left = {1}                                                  # the mesh column reads best left-aligned
    return "\n".join("  ".join(v.ljust(w) if c in left else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
                     for r in cells)


def header(plan: Plan, model_name: str) -> str:
    cfg, hw = plan.config, plan.hardware
    where = f"{plan.devices} x {hw.name}" + ("" if hw.cores_per_node else f", {hw.devices_per_node} per node")
    fitting = sum(p.fits for p in plan.per_mesh)
    return (f"meshtron plan: {model_name} ({cfg.num_params() / 1e9:.3g} B parameters, {cfg.n_layer} layers, "
            f"d_model {cfg.d_model}, {cfg.n_head} heads) on {where}\n"
            f"global batch {plan.global_batch} x {plan.seq_len} tokens, {plan.dtype}; {len(plan.ranked)} legal "
            f"layouts over {len(plan.per_mesh)} meshes, {fitting} of the meshes fit in {hw.memory_gib:.3g} GiB")


def _options(lay) -> str:
    parts = [f"micro-batch {lay.micro_batch}", f"activation recompute {lay.recompute}"]
    if lay.tp > 1:
        parts.append(f"sequence parallel {'on' if lay.sequence_parallel else 'off'}")
    if lay.dp > 1:
        parts.append(f"sharded optimizer {'on' if lay.sharded_optimizer else 'off'}")
    if lay.virtual_stages > 1:
        parts.append(f"interleaved schedule, {lay.virtual_stages} chunks per pipeline rank")
    return "; ".join(parts)


def train_flags(p: Prediction, model_args: str = "") -> str:
    """The `meshtron train` command line that runs prediction `p`: mesh, layout, recompute, ZeRO, and the global
    batch as --batch-size with --micro-batches the accumulation count (micro-batches per step per batch rank)."""
    lay = p.layout
    flags = [f"--mesh {lay.mesh}"]
    if lay.sequence_parallel:
        rules = [r for r in ("batch:batch", "heads:model", "kv_heads:model", "d_ff:model", "vocab:model",
                             "seq:model") if lay.dp > 1 or not r.startswith("batch")]
        flags.append(f'--layout "{";".join(rules)}"')
    if lay.recompute != "none":
        flags.append(f"--recompute {lay.recompute}")
    if lay.sharded_optimizer:
        flags.append("--zero 1")
    if lay.pp > 1:
        flags.append("--pipeline-schedule " + ("interleaved --virtual-stages " + str(lay.virtual_stages)
                                               if lay.virtual_stages > 1 else "1f1b"))
    accumulation = p.global_batch // (lay.dp * lay.micro_batch)
    flags += [f"--batch-size {p.global_batch}", f"--micro-batches {accumulation}", f"--seq-len {p.seq_len}"]
    return "meshtron train " + (model_args + " " if model_args else "") + " ".join(flags)


def explain(p: Prediction) -> str:
    """Where the step time and the memory go."""
    t, m = p.time, p.memory
    time_parts = [("compute", "compute"), ("tp_comm", "model-axis collectives"), ("pp_comm", "pipe sends"),
                  ("bubble", "pipeline bubble"), ("dp_comm", "exposed gradient reduction"),
                  ("optimizer", "optimizer")]
    mem_parts = ["params", "grads", "optimizer", "activations", "accumulation", "optimizer_step", "allocator",
                 "runtime"]
    return (f"  step {t['step']:.4g} s = " + " + ".join(f"{label} {t[k]:.3g}" for k, label in time_parts if t[k])
            + f"\n  memory {p.memory_gb:.3g} GiB = " + " + ".join(f"{k.replace('_', ' ')} {m[k] / GIB:.3g}"
                                                                 for k in mem_parts
                                                                 if m.get(k) or k not in ("optimizer_step",
                                                                                          "accumulation",
                                                                                          "allocator")))


def chosen(plan: Plan, model_args: str = "") -> str:
    best = plan.best
    lines = [f"chosen: --mesh {best.layout.mesh}   ({_options(best.layout)})", explain(best),
             f"  run it: {train_flags(best, model_args)}"]
    return "\n".join(lines)


def to_json(preds: list[Prediction], model_args: str = "") -> str:
    return json.dumps([{**p.as_dict(), "train_command": train_flags(p, model_args) if p.layout.runnable else None}
                       for p in preds], indent=1)
