"""Sharded, atomic checkpoints that load on any mesh (torch.distributed.checkpoint).

Invariants:
- Each rank writes its own shards: every parameter (and its Adam moments) is saved as a DTensor view of
  the logical, unpadded tensor (`Shard(split_dim)` on its mesh axis, `Replicate()` elsewhere), so DCP can
  reshard it on load into a model on another mesh, optimizer state included. A one-rank run saves plain
  full tensors, which any mesh loads the same way.
- A checkpoint exists only once complete: ranks write into `.step_N.partial/`; rank 0 then records every
  file's size and CRC32 in `meshtron.json` and renames the folder to `step_N/` (an atomic rename). A crash
  mid-write leaves the previous checkpoint as the latest. Loading verifies the files first, on every rank,
  so a truncated or corrupted checkpoint is refused before any collective.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zlib

import torch
import torch.distributed as dist
from torch import nn

from meshtron import faults

FORMAT_VERSION = 1
META = "meshtron.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and what to do."""


# ---------------------------------------------------------------------------------------------- views
def _stage_mesh(model, mesh):
    """(device mesh, its axis names) a stage's tensors live on: the whole mesh, or without a pipeline axis the
    sub-mesh of this rank's stage (each stage saves its own layers; a tensor two stages hold, a tied embedding,
    is one logical tensor that both save identically). None on one rank."""
    if mesh.device_mesh is None:
        return None, []
    pipe = model.layout.axis_name("layers") if hasattr(model, "layout") else None
    names = [n for n in mesh.shape if n != pipe]
    if not names or all(mesh.shape[n] == 1 for n in names) and pipe is not None:
        return None, []
    return (mesh.device_mesh if pipe is None else mesh.device_mesh[tuple(names)]), names


def _view(t: torch.Tensor, spec, dmesh, names):
    """The logical tensor behind this rank's shard `t`: a DTensor on a multi-rank mesh, `t` itself on one."""
    if spec.split_dim is not None:
        t = t.narrow(spec.split_dim, 0, spec.local_valid())           # drop vocabulary padding
    if dmesh is None:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard
    placements = [Replicate()] * len(names)
    if spec.is_split:
        placements[names.index(spec.axis)] = Shard(spec.split_dim)
    full = torch.Size(spec.full_shape)
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(t, dmesh, placements, run_check=False, shape=full, stride=stride)


def _adam_state(model: nn.Module, optimizer) -> dict:
    """Adam's state of every parameter, shaped like the parameter: the optimizer's own tensors (loaded in
    place), or, for the distributed optimizer, gathered from the batch axis's chunks (`gather_state`). Moments
    are created (zeros) where the optimizer has not stepped yet, so they can be loaded into; the step counter
    lives where torch's fused/capturable Adam keeps it, on the parameter's device."""
    if hasattr(optimizer, "gather_state"):
        return optimizer.gather_state()
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for p in model.parameters():
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return {p: optimizer.state[p] for p in model.parameters()}


def _state(model: nn.Module, mesh, optimizer=None) -> tuple[dict, dict]:
    """(what DCP saves or loads into, the per-parameter Adam state behind it)."""
    dmesh, names = _stage_mesh(model, mesh)
    state = {"model": {n: _view(p.data, p.shard, dmesh, names) for n, p in model.named_parameters()}}
    adam = {}
    if optimizer is not None:
        adam = _adam_state(model, optimizer)
        optim = {}
        for n, p in model.named_parameters():
            s = adam[p]
            optim[n] = {"exp_avg": _view(s["exp_avg"], p.shard, dmesh, names),
                        "exp_avg_sq": _view(s["exp_avg_sq"], p.shard, dmesh, names), "step": s["step"]}
        state["optim"] = optim
    return state, adam


# ----------------------------------------------------------------------------------------------- save
def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def save_checkpoint(root: str, step: int, model: nn.Module, mesh, optimizer=None, meta: dict | None = None,
                    write_extra=None, keep: int | None = None) -> str:
    """Write checkpoint `root/step_N` from every rank; returns its path. `meta` (JSON) is written by rank 0,
    which also calls `write_extra(folder)` (e.g. to save the tokenizer). Keeps the newest `keep` if given."""
    final = step_dir(root, step)
    partial = os.path.join(root, f".step_{step:08d}.partial")
    lead = mesh.rank == 0
    if lead:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier(mesh)
    import torch.distributed.checkpoint as dcp
    with _quiet_single_process():
        dcp.save(_state(model, mesh, optimizer)[0], checkpoint_id=partial, no_dist=mesh.device_mesh is None)
    faults.maybe_kill("checkpoint", mesh.rank, step)
    if lead:
        if write_extra is not None:
            write_extra(partial)
        record = {"format": FORMAT_VERSION, "step": step, "mesh": mesh.spec, **(meta or {}),
                  "files": _file_table(partial)}
        with open(os.path.join(partial, META), "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(root)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(mesh)
    return final


def _file_table(folder: str) -> dict[str, list[int]]:
    table = {}
    for dirpath, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            table[os.path.relpath(path, folder)] = [os.path.getsize(path), _crc32(path)]
    return table


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' when there is no process group: on one rank, that is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(mesh) -> None:
    if mesh.device_mesh is not None:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- load
def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first (partial folders are ignored)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [path for _, path in sorted(found) if os.path.exists(os.path.join(path, META))]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str, verify: bool = True) -> dict:
    """The checkpoint's record; with `verify`, every file's size and CRC32 are checked against it."""
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not a complete meshtron checkpoint (no {META}); "
                              f"use a step_N folder, or a run folder with --resume")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is corrupted ({e}); use an earlier checkpoint") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this meshtron reads "
                              f"{FORMAT_VERSION}")
    if verify:
        for name, (size, crc) in meta["files"].items():
            fpath = os.path.join(path, name)
            if not os.path.exists(fpath):
                raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; use an earlier one")
            if os.path.getsize(fpath) != size:
                raise CheckpointError(f"checkpoint {path} is truncated: {name} has {os.path.getsize(fpath)} "
                                      f"bytes, {size} were written; use an earlier checkpoint")
            if _crc32(fpath) != crc:
                raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its CRC32 check; "
                                      f"use an earlier checkpoint")
    return meta


def check_model_matches(meta: dict, model_config: dict, path: str) -> None:
    """Refuse a checkpoint of another model shape, naming the fields that differ."""
    saved = meta.get("model", {})
    diff = {k: (saved.get(k), v) for k, v in model_config.items() if k in saved and saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} is from another model ({detail}); train with the checkpoint's "
                              f"model options or start a new run folder")


def load_checkpoint(path: str, model: nn.Module, mesh, optimizer=None) -> dict:
    """Load `path` into `model` (and the optimizer's Adam state) on this mesh, resharding as needed.
    Call `read_meta` (which verifies the files) and `check_model_matches` first."""
    import torch.distributed.checkpoint as dcp
    state, adam = _state(model, mesh, optimizer)
    if optimizer is None:
        state.pop("optim", None)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=mesh.device_mesh is None)
    except Exception as e:  # noqa: BLE001 - DCP raises many kinds; name the checkpoint
        raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
    if optimizer is not None:
        for n, p in model.named_parameters():
            adam[p]["step"] = state["optim"][n]["step"]
        if hasattr(optimizer, "scatter_state"):
            optimizer.scatter_state(adam)
    return state
