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
- Loading never runs code from the checkpoint: DCP's `.metadata` (a pickle) goes through an unpickler that
  admits only DCP's metadata classes, every entry must be a tensor in a file the CRC table lists, and the
  shards themselves are read by torch's weights-only loader.
- A write that fails (a full disk on any rank) fails on every rank with the same message, removes its partial
  folder and leaves the previous checkpoint the latest.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import warnings
import zlib

import torch
from torch import nn

from meshtron import faults
from meshtron.comm import collectives as C

FORMAT_VERSION = 1
META = "meshtron.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (or written); the message says which and what to do."""


class DiskFullError(CheckpointError):
    """No space left while writing a checkpoint: restarting would fail the same way."""


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
    which also calls `write_extra(folder)` (e.g. to save the tokenizer). Keeps the newest `keep` (of the steps
    up to this one) if given. Raises DiskFullError on every rank when any rank runs out of space."""
    final = step_dir(root, step)
    partial = os.path.join(root, f".step_{step:08d}.partial")
    lead = mesh.rank == 0
    failure = None
    if lead:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as e:
            failure = e
    _agree(mesh, failure, root, step, partial)
    import torch.distributed.checkpoint as dcp
    try:
        with _quiet_single_process():
            dcp.save(_state(model, mesh, optimizer)[0], storage_writer=_writer(partial, mesh.rank, step),
                     no_dist=mesh.device_mesh is None)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if not _no_space(e):
            raise
        raise _disk_full(root, step, partial, lead) from None    # DCP raised on every rank: no need to agree
    if lead:
        try:
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
        except OSError as e:
            failure = e
        if failure is None and keep:
            older = [c for c in list_checkpoints(root) if checkpoint_step(c) <= step]
            for old in older[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _agree(mesh, failure, root, step, partial)
    return final


def _writer(folder: str, rank: int, step: int):
    """DCP's file-system writer, with the 'checkpoint' fault point after this rank's shards are on disk (before
    DCP gathers the ranks' results and writes .metadata, before meshtron commits the folder)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            fut.wait()
            faults.maybe_kill("checkpoint", rank, step)
            return fut
    return Writer(folder)


def _agree(mesh, failure: BaseException | None, root: str, step: int, partial: str) -> None:
    """Rank 0's file work succeeded, or every rank raises (the same error on rank 0, a pointer to it elsewhere)."""
    flag = torch.tensor([0.0 if failure is None else 2.0 if _no_space(failure) else 1.0], device=mesh.device)
    C.all_reduce(flag, C.world(), torch.distributed.ReduceOp.MAX)
    if flag.item() == 0:
        return
    if flag.item() == 2:
        raise _disk_full(root, step, partial, mesh.rank == 0) from None
    if failure is not None:
        raise failure
    raise CheckpointError(f"rank 0 could not write checkpoint step {step} to {root} (its error says why)")


def _no_space(e: BaseException) -> bool:
    """Whether `e` (or what it wraps: DCP's per-rank failures, causes) is 'no space left on device'."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        for wrapped in getattr(x, "failures", {}).values():
            todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo += [x.__cause__, x.__context__]
    return False


def _disk_full(root: str, step: int, partial: str, lead: bool) -> DiskFullError:
    if lead:
        shutil.rmtree(partial, ignore_errors=True)     # give the space back
    mount = os.path.realpath(root)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    previous = latest_checkpoint(root)
    kept = (f"the previous checkpoint, step {checkpoint_step(previous)}, is intact ({previous})" if previous
            else "no earlier checkpoint exists")
    run = os.path.dirname(os.path.abspath(root))
    return DiskFullError(f"no space left on the device mounted at {mount} ({_device(mount)}) while writing "
                         f"checkpoint step {step} to {root}; {kept}. Free space there (or lower --keep), then "
                         f"continue with --resume {run}")


def _device(mount: str) -> str:
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, point, fstype = line.split()[:3]
                if point == mount:
                    return f"{dev}, {fstype}"
    except OSError:
        pass
    return "device unknown"


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


def checkpoint_step(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(os.path.normpath(path))).group(1))


def find_resume(path: str, step: int | None = None) -> tuple[str, str | None]:
    """(run folder, checkpoint) for `--resume PATH [--resume-step N]`: PATH is a run folder (its newest complete
    checkpoint, or step N) or one of its `checkpoints/step_N` folders. The checkpoint is None if the run has none
    yet. Raises CheckpointError naming the complete checkpoints there is to choose from."""
    path = os.path.normpath(path)
    if _STEP_DIR.match(os.path.basename(path)):
        run = os.path.dirname(os.path.dirname(path))
        if step is not None and step != checkpoint_step(path):
            raise CheckpointError(f"--resume {path} is checkpoint step {checkpoint_step(path)} but --resume-step "
                                  f"says {step}: give one of them")
        if not os.path.exists(os.path.join(path, META)):
            raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); {_choices(run)}")
        return run, path
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: no such folder; give a run folder or one of its "
                              f"checkpoints/step_N folders")
    found = list_checkpoints(os.path.join(path, "checkpoints"))
    if step is None:
        return path, (found[-1] if found else None)
    for c in found:
        if checkpoint_step(c) == step:
            return path, c
    raise CheckpointError(f"--resume {path} --resume-step {step}: there is no complete checkpoint of step {step}; "
                          f"{_choices(path)}")


def _choices(run: str) -> str:
    steps = [checkpoint_step(c) for c in list_checkpoints(os.path.join(run, "checkpoints"))]
    if not steps:
        return f"{run} holds no complete checkpoint"
    return f"complete checkpoints of {run}: steps {', '.join(map(str, steps))} (pick one with --resume-step N)"


def _earlier(path: str) -> str:
    """'; resume from an earlier one with --resume RUN --resume-step M (complete: ...)' for a bad checkpoint."""
    root = os.path.dirname(os.path.normpath(path))
    run = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root
    steps = [checkpoint_step(c) for c in list_checkpoints(root) if os.path.normpath(c) != os.path.normpath(path)]
    if not _STEP_DIR.match(os.path.basename(os.path.normpath(path))) or not steps:
        return "; no other complete checkpoint is there to use instead"
    return (f"; resume from another one with --resume {run} --resume-step {steps[-1]} (complete checkpoints: "
            f"steps {', '.join(map(str, steps))})")


def supersede_after(root: str, step: int) -> list[str]:
    """Move the checkpoints newer than `step` (a run resumed from an earlier one rewrites their steps) into
    `root/superseded/`, so they are neither loaded after a restart nor mixed with the new ones. Returns them."""
    moved = []
    for c in list_checkpoints(root):
        if checkpoint_step(c) > step:
            target = os.path.join(root, "superseded", f"{os.path.basename(c)}-after-step-{step}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(c, target)
            moved.append(target)
    return moved


def read_meta(path: str, verify: bool = True) -> dict:
    """The checkpoint's record; with `verify`, every file's size and CRC32 are checked against it."""
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not a complete meshtron checkpoint (no {META}); "
                              f"use a step_N folder, or a run folder with --resume")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupted ({e}){_earlier(path)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path} is not a meshtron checkpoint record{_earlier(path)}")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this meshtron reads "
                              f"{FORMAT_VERSION}")
    if verify:
        for name, (size, crc) in meta["files"].items():
            fpath = os.path.join(path, name)
            if not os.path.exists(fpath):
                raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing{_earlier(path)}")
            if os.path.getsize(fpath) != size:
                raise CheckpointError(f"checkpoint {path} is truncated: {name} has {os.path.getsize(fpath)} "
                                      f"bytes, {size} were written{_earlier(path)}")
            if _crc32(fpath) != crc:
                raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its CRC32 check"
                                      f"{_earlier(path)}")
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
    files = read_meta(path, verify=False)["files"]
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=_SafeReader(path, set(files)), planner=_TensorsOnlyPlanner(),
                     no_dist=mesh.device_mesh is None)
    except CheckpointError:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP raises many kinds (CheckpointException is a BaseException)
        inner = _inner_error(e)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"could not load checkpoint {path}: {type(inner).__name__}: "
                              f"{str(inner).splitlines()[0] if str(inner) else ''}{_earlier(path)}") from e
    if optimizer is not None:
        for n, p in model.named_parameters():
            adam[p]["step"] = state["optim"][n]["step"]
        if hasattr(optimizer, "scatter_state"):
            optimizer.scatter_state(adam)
    return state


def _inner_error(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (else `e`)."""
    failures = getattr(e, "failures", None)
    if failures:
        wrapped = failures[min(failures)]
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return e


# ------------------------------------------------------------------------------------ safe metadata
_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                      "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
                                      "BytesStorageMetadata")}   # admitted, then refused by the checks below
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
             ("pathlib._local", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch.Size, dtypes and layouts: a pickle naming any other
    global (os.system, builtins.eval, ...) is refused before anything of it runs."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where} refers to {module}.{name}, which is not part of a checkpoint's "
                              f"metadata; refusing to load it, since unpickling it could run code. Use a "
                              f"checkpoint meshtron wrote, from a source you trust")


def read_dcp_metadata(path: str, files: set[str] | None = None):
    """DCP's Metadata of checkpoint folder `path`, unpickled safely and checked: every entry a tensor stored
    untransformed in one of `files` (the CRC table's names)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
    where = os.path.join(path, ".metadata")
    try:
        with open(where, "rb") as f:
            md = _MetadataUnpickler(io.BytesIO(f.read()), where).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or garbled pickle
        raise CheckpointError(f"{where} is corrupted ({type(e).__name__}: {e}){_earlier(path)}") from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where} is not the metadata of a meshtron checkpoint: {what}; refusing to load it")
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict) or \
            not isinstance(md.storage_data, dict):
        raise bad(f"it holds a {type(md).__name__}")
    for key, entry in md.state_dict_metadata.items():
        if type(entry) is not TensorStorageMetadata:
            raise bad(f"entry {key!r} is a {type(entry).__name__}, not a tensor (meshtron stores only tensors)")
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise bad("its storage table holds other objects")
        name = info.relative_path
        if not isinstance(name, str) or os.path.basename(name) != name or (files is not None and name not in files):
            raise bad(f"it points at file {name!r}, which is not one of the checkpoint's own files")
        if info.transform_descriptors:
            raise bad(f"file {name!r} is stored with transforms {info.transform_descriptors!r}")
    return md


def _reader_base():
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader


class _SafeReader(_reader_base()):
    """DCP's file-system reader, except that `.metadata` is read by `read_dcp_metadata`."""

    def __init__(self, path: str, files: set[str]):
        super().__init__(path)
        self._folder, self._files = path, files

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta
        md = read_dcp_metadata(self._folder, self._files)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = getattr(self, "load_id", None)
        return md


def _planner_base():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    return DefaultLoadPlanner


class _TensorsOnlyPlanner(_planner_base()):
    """DCP's default load planner, refusing pickled (non-tensor) entries, which it would load with
    torch.load(weights_only=False)."""

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, not a tensor; "
                              f"refusing to load it, since unpickling it could run code")
