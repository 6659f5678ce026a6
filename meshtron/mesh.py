"""The named device mesh: axes with sizes, this rank's coordinate on each, and one process group per axis.

Invariant: ranks are laid out row-major over the axes in the order the spec names them, so the last axis
varies fastest (write `batch:2,model:2` and the model axis is Megatron's fastest-varying tensor-parallel
axis, its groups inside one node). The world size is checked against the mesh before any collective.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = float(os.environ.get("MESHTRON_TIMEOUT", "300"))
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_pairs(spec: str, what: str) -> list[tuple[str, str]]:
    """Split a Mesh-TensorFlow string `a:x,b:y` (',' or ';' separate pairs) into [(a, x), (b, y)]."""
    pairs = []
    for item in re.split(r"[,;]", spec.strip()):
        item = item.strip()
        if not item:
            continue
        if item.count(":") != 1:
            raise ValueError(f"{what} {spec!r}: {item!r} is not a 'name:value' pair "
                             f"(write pairs like 'batch:2,model:2', separated by ',' or ';')")
        name, value = (s.strip() for s in item.split(":"))
        if not _NAME.match(name) or not value:
            raise ValueError(f"{what} {spec!r}: {item!r} needs an identifier before ':' and a value after it")
        pairs.append((name, value))
    if not pairs:
        raise ValueError(f"{what} is empty: give at least one 'name:value' pair, e.g. 'batch:2,model:2'")
    return pairs


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`batch:2,model:2` -> {'batch': 2, 'model': 2}, in order; sizes are positive integers, names unique."""
    axes: dict[str, int] = {}
    for name, value in parse_pairs(spec, "mesh"):
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} has size {value!r}; sizes are positive integers")
        if name in axes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} appears twice; name each axis once")
        axes[name] = int(value)
    return axes


@dataclass(frozen=True)
class MeshAxis:
    """One axis as seen from this rank: its size, this rank's coordinate, and the group of ranks along it.

    `group` is None when the axis has size 1 (or the dimension is not split): operators then do nothing."""
    name: str | None
    size: int = 1
    coord: int = 0
    group: object = None
    ranks: tuple[int, ...] = (0,)

    @staticmethod
    def trivial() -> "MeshAxis":
        return MeshAxis(name=None)

    def __repr__(self) -> str:
        return f"MeshAxis({self.name!r}, size={self.size}, coord={self.coord}, ranks={list(self.ranks)})"


@dataclass
class Mesh:
    """A named mesh over the world's ranks. Build it with `Mesh.from_spec("batch:2,model:2")`."""
    shape: dict[str, int]
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    axes: dict[str, MeshAxis] = field(default_factory=dict)
    device_mesh: object = None

    @property
    def world_size(self) -> int:
        n = 1
        for s in self.shape.values():
            n *= s
        return n

    @property
    def spec(self) -> str:
        return ",".join(f"{k}:{v}" for k, v in self.shape.items())

    def axis(self, name: str | None) -> MeshAxis:
        if name is None:
            return MeshAxis.trivial()
        if name not in self.axes:
            raise KeyError(f"mesh {self.spec!r} has no axis {name!r}; its axes are {list(self.shape)}")
        return self.axes[name]

    def coords(self) -> dict[str, int]:
        return {n: a.coord for n, a in self.axes.items()}

    def rank_grid(self) -> torch.Tensor:
        """The single source of truth for groups: global rank at each mesh coordinate (row-major)."""
        return torch.arange(self.world_size).view(*self.shape.values())

    @classmethod
    def from_spec(cls, spec: str | dict, *, backend: str | None = None, device: str | None = None,
                  timeout_s: float | None = None) -> "Mesh":
        """Parse the spec, check it against the world size, then initialise `torch.distributed` if needed.

        A one-rank mesh needs no process group. `device` is 'cuda' or 'cpu' (default: `$MESHTRON_DEVICE`, else
        cuda when available); each rank uses `cuda:LOCAL_RANK`, selected before NCCL initialises. The backend
        is NCCL on cuda and gloo on the CPU."""
        shape = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
        world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
        mesh = cls(shape=shape)
        if world != mesh.world_size:
            plan = " x ".join(f"{k}={v}" for k, v in shape.items())
            raise ValueError(
                f"mesh {mesh.spec!r} needs {mesh.world_size} ranks ({plan}) but the world has {world}: "
                f"start {mesh.world_size} ranks (e.g. torchrun --nproc_per_node={mesh.world_size}) "
                f"or change the mesh so its sizes multiply to {world}")
        use_cuda = _use_cuda(device, backend)
        if use_cuda:
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            per_host = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            if per_host > gpus:
                raise ValueError(f"{per_host} ranks on this host but {gpus} CUDA device(s): NCCL needs one device "
                                 f"per rank. Use a mesh of at most {gpus} ranks per host, or MESHTRON_DEVICE=cpu")
            torch.cuda.set_device(local)               # before NCCL initialises: one device per rank
            mesh.device = torch.device("cuda", local)
        if mesh.world_size == 1 and not dist.is_initialized():
            mesh.axes = {n: MeshAxis(n, 1, 0, None, (0,)) for n in shape}
            return mesh
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        if not dist.is_initialized():
            backend = backend or ("nccl" if use_cuda else "gloo")
            _init_process_group(backend, timeout, mesh.device if use_cuda else None)
        mesh.rank = dist.get_rank()
        from torch.distributed.device_mesh import init_device_mesh
        mesh.device_mesh = init_device_mesh(mesh.device.type, tuple(shape.values()),
                                            mesh_dim_names=tuple(shape.keys()))
        grid = mesh.rank_grid()
        here = (grid == mesh.rank).nonzero()[0].tolist()
        for i, name in enumerate(shape):
            index = list(here)
            index[i] = slice(None)
            ranks = tuple(grid[tuple(index)].tolist())
            group = mesh.device_mesh.get_group(name) if shape[name] > 1 else None
            mesh.axes[name] = MeshAxis(name, shape[name], here[i], group, ranks)
        from meshtron.comm import shm
        from meshtron.comm.collectives import register_group, register_shm
        for a in mesh.axes.values():
            if a.group is not None:
                register_group(a.group, a.name, a.ranks)
                if mesh.device.type == "cpu":   # ranks of a group on one host all-reduce in shared memory
                    register_shm(a.group, shm.setup(a.group, a.ranks, timeout.total_seconds())
                                 if shm.enabled() else None)
        return mesh

    def __repr__(self) -> str:
        return f"Mesh({self.spec!r}, rank={self.rank}, coords={self.coords()})"


def _use_cuda(device: str | None, backend: str | None) -> bool:
    """Whether this mesh computes on CUDA: an explicit `device`, else `$MESHTRON_DEVICE`, else if available."""
    choice = (device or os.environ.get("MESHTRON_DEVICE") or "").lower()
    if choice not in ("", "cpu", "cuda"):
        raise ValueError(f"device {choice!r} is unknown: use 'cpu' or 'cuda' (or leave it unset: cuda if available)")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use 'cpu'")
    if choice == "cuda" and backend == "gloo":
        raise ValueError("backend 'gloo' with device 'cuda': meshtron's GPU groups use NCCL; drop the backend")
    if choice:
        return choice == "cuda"
    return torch.cuda.is_available() and backend != "gloo"


def _init_process_group(backend: str, timeout: datetime.timedelta, device: torch.device | None = None) -> None:
    """env:// initialisation, except after a torchrun restart: there each attempt rendezvouses under its own
    key prefix in the launcher's store, so restarted workers never read dead peers' addresses (the
    connectFullMesh hang of pytorch issue 135712). On CUDA the rank's device is bound to the group
    (`device_id`), as NCCL recommends."""
    kw = {"device_id": device} if device is not None else {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not use_agent_store), timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore(f"meshtron_attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **kw)
