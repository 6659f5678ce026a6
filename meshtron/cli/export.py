"""`meshtron export CKPT HF_DIR`: a meshtron checkpoint (or run folder) to a folder `transformers` loads.

Invariant: HF_DIR is never the run folder, inside it, or around it (exporting there would overwrite the run's
config.json); that is refused before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a meshtron run folder or checkpoint folder")
    p.add_argument("hf_dir", help="output folder for transformers' from_pretrained")


def run(args) -> int:
    from meshtron.interop.hf import export_hf
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    from meshtron.parallel.sharding import full_state_dict
    try:
        _check_target(args.checkpoint, args.hf_dir)
        mesh = Mesh.from_spec("model:1")
        model, tok, src = open_model(args.checkpoint, mesh)
    except (ValueError, OSError) as e:
        print(f"meshtron export: error: {e}", file=sys.stderr)
        return 2
    export_hf(src.config, full_state_dict(model, mesh), args.hf_dir, tokenizer_dir=src.tokenizer_dir, tokenizer=tok)
    print(f"meshtron export: {src.path} -> {args.hf_dir}" + ("" if tok else " (the checkpoint holds no tokenizer)"))
    return 0


def _check_target(source: str, hf_dir: str) -> None:
    """Refuse an HF_DIR that overlaps the source's run folder, or that is some meshtron run folder."""
    from meshtron.load import describe
    src = describe(source)
    if src.kind != "meshtron":
        return
    ckpt = os.path.realpath(src.path)
    parent = os.path.dirname(ckpt)
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    target = os.path.realpath(hf_dir)
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)   # noqa: E731
    if inside(target, run) or inside(run, target):
        raise ValueError(f"{hf_dir} overlaps the run folder {run}: exporting there would overwrite the run's own "
                         f"files (config.json); give a new folder, e.g. {run.rstrip(os.sep)}-hf")
    if os.path.isdir(os.path.join(target, "checkpoints")):
        raise ValueError(f"{hf_dir} is a meshtron run folder (it holds checkpoints/): give a new folder")
