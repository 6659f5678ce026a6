"""Open a trained model for inference or evaluation, from any of the places a user points at.

Accepted: a meshtron checkpoint folder (`step_N/`, holding `meshtron.json`), a run folder (its newest
checkpoint under `checkpoints/`), or a Hugging Face folder (`config.json` + weights), which is sharded on
load: each rank reads only its slices. Invariants: `describe` resolves the path and the model shape without
building anything, so bad paths, illegal meshes and checkpoints whose metadata is not plain DCP metadata are
refused before any rank starts; nothing read runs code (DCP metadata through meshtron.checkpoint's restricted
unpickler, `pytorch_model.bin` through torch's weights-only loader, with our own message when it refuses).
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
    checkpoint.read_dcp_metadata(ckpt, set(meta["files"]))       # refuse a crafted .metadata before any rank
    try:
        config = ModelConfig(**meta["model"])
    except (TypeError, KeyError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{ckpt}/{checkpoint.META} does not describe a model ({e})") from None
    tok = os.path.join(ckpt, "tokenizer")
    return ModelSource("meshtron", ckpt, config, tok if os.path.isdir(tok) else None)


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


def load_torch_weights(path: str) -> dict:
    """The tensors of a `pytorch_model.bin`, read by torch's weights-only unpickler (memory-mapped when the file
    is in the zip format). A file holding anything but tensors and plain containers is refused with a
    CheckpointError: unpickling it could run code."""
    import pickle
    import re

    import torch
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: cannot be mapped
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
        raise checkpoint.CheckpointError(
            f"{path} holds {what}, not only tensors: meshtron loads nothing else from pytorch_model.bin, since "
            f"unpickling it could run code. Use a model.safetensors from a source you trust instead") from None


def save_converted(model, mesh, out_dir: str, tokenizer=None, source: str = "") -> str:
    """Write `model` as a meshtron checkpoint any mesh can load: `out_dir/checkpoints/step_00000000`."""
    write = (lambda folder: tokenizer.save(os.path.join(folder, "tokenizer"))) if tokenizer else None
    return checkpoint.save_checkpoint(os.path.join(out_dir, "checkpoints"), 0, model, mesh,
                                      meta={"model": dataclasses.asdict(model.config), "source": source},
                                      write_extra=write)
