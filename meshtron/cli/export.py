"""`meshtron export CKPT HF_DIR`: a meshtron checkpoint (or run folder) to a folder `transformers` loads."""
from __future__ import annotations

import argparse
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
        mesh = Mesh.from_spec("model:1")
        model, tok, src = open_model(args.checkpoint, mesh)
    except (ValueError, OSError) as e:
        print(f"meshtron export: error: {e}", file=sys.stderr)
        return 2
    export_hf(src.config, full_state_dict(model, mesh), args.hf_dir, tokenizer_dir=src.tokenizer_dir, tokenizer=tok)
    print(f"meshtron export: {src.path} -> {args.hf_dir}" + ("" if tok else " (the checkpoint holds no tokenizer)"))
    return 0
