"""Open a trained model for inference or evaluation, from any of the places a user points at.

Accepted: a meshtron checkpoint folder (`step_N/`, holding `meshtron.json`), a run folder (its newest
checkpoint under `checkpoints/`), or a Hugging Face folder (`config.json` + weights), which is sharded on
load: each rank reads only its slices. Invariant: `describe` resolves the path and the model shape without
building anything, so bad paths and illegal meshes are refused before any rank starts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from meshtron import checkpoint
from meshtron.models import ModelConfig, build_model


@dataclass
class ModelSource:
    kind: str            # "meshtron" | "hf"
    path: str            # the checkpoint folder itself (resolved) or the HF folder
    config: ModelConfig
    tokenizer_dir: str | None


def describe(path: str) -> ModelSource:
    """Resolve `path` to a checkpoint and read its model config; raises ValueError saying what is wrong."""
    from meshtron.interop.hf import is_hf_dir, read_hf_config, tokenizer_files
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: give a run folder, a checkpoint folder or a Hugging Face folder")
    if os.path.exists(os.path.join(path, checkpoint.META)):
        ckpt = path
    elif is_hf_dir(path):
        tok = path if tokenizer_files(path) else None
        return ModelSource("hf", path, read_hf_config(path), tok)
    else:
        ckpt = checkpoint.latest_checkpoint(os.path.join(path, "checkpoints")) or checkpoint.latest_checkpoint(path)
        if ckpt is None:
            raise ValueError(f"{path} holds no meshtron checkpoint (no checkpoints/step_N/meshtron.json) and is "
                             f"not a Hugging Face folder (config.json + model.safetensors)")
    meta = checkpoint.read_meta(ckpt, verify=False)
    tok = os.path.join(ckpt, "tokenizer")
    return ModelSource("meshtron", ckpt, ModelConfig(**meta["model"]), tok if os.path.isdir(tok) else None)


def open_model(path: str, mesh, rules=None, tokenizer: str | None = None):
    """(model in eval mode on `mesh`, tokenizer or None, ModelSource)."""
    from meshtron.data import load_tokenizer
    src = describe(path)
    if src.kind == "hf":
        from meshtron.interop.hf import build_from_hf
        model = build_from_hf(src.path, mesh, rules)
    else:
        checkpoint.read_meta(src.path, verify=True)
        model = build_model(src.config, mesh, rules)
        checkpoint.load_checkpoint(src.path, model, mesh)
    model.eval()
    tok_spec = tokenizer or src.tokenizer_dir
    tok = load_tokenizer(tok_spec) if tok_spec else None
    return model, tok, src


def save_converted(model, mesh, out_dir: str, tokenizer=None, source: str = "") -> str:
    """Write `model` as a meshtron checkpoint any mesh can load: `out_dir/checkpoints/step_00000000`."""
    write = (lambda folder: tokenizer.save(os.path.join(folder, "tokenizer"))) if tokenizer else None
    return checkpoint.save_checkpoint(os.path.join(out_dir, "checkpoints"), 0, model, mesh,
                                      meta={"model": dataclasses.asdict(model.config), "source": source},
                                      write_extra=write)
