"""`meshtron convert HF_DIR OUT_DIR`: a Hugging Face GPT-2 or Llama folder to a meshtron checkpoint."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="local Hugging Face folder (config.json, *.safetensors or pytorch_model.bin)")
    p.add_argument("out_dir", help="output folder; the checkpoint goes to OUT_DIR/checkpoints/step_00000000")


def run(args) -> int:
    from meshtron.data import load_tokenizer
    from meshtron.interop.hf import read_hf, tokenizer_files
    from meshtron.load import save_converted
    from meshtron.mesh import Mesh
    from meshtron.models import build_model
    from meshtron.parallel.sharding import load_full_state_dict
    try:
        config, state = read_hf(args.hf_dir)
        mesh = Mesh.from_spec("model:1")
        model = build_model(config, mesh)
        load_full_state_dict(model, state)
        tok = load_tokenizer(args.hf_dir) if tokenizer_files(args.hf_dir) else None
    except (ValueError, OSError) as e:
        print(f"meshtron convert: error: {e}", file=sys.stderr)
        return 2
    path = save_converted(model, mesh, args.out_dir, tok, source=args.hf_dir)
    print(f"meshtron convert: {config.family} model, {config.num_params() / 1e6:.2f}M parameters -> {path}"
          + ("" if tok else " (no tokenizer found in the Hugging Face folder)"))
    return 0
