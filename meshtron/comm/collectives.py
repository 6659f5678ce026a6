"""Every collective meshtron issues goes through this module: it is counted and its failures are named.

Invariant: a call on a trivial axis (group None) does nothing and is not counted; a failing call raises
`CollectiveError` naming the rank, the operation and the group (its axis name and ranks). Collectives
carry the process group's timeout (set when the mesh is built), so a dead peer ends in an error, not a hang.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshtron.comm import shm

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_GROUP_NAMES: dict[int, tuple[str, tuple[int, ...]]] = {}
_SHM: dict[int, "shm.ShmAllReduce"] = {}
_COUNTERS: list["CommCounter"] = []
_LOCK = threading.Lock()


def register_group(group, name: str, ranks: tuple[int, ...]) -> None:
    """Remember a group's axis name and ranks, for counters and error messages."""
    _GROUP_NAMES[id(group)] = (name, tuple(ranks))


def register_shm(group, transport: "shm.ShmAllReduce | None") -> None:
    """All-reduces over `group` go through `transport` (shared memory on one host) instead of the backend."""
    if transport is None:
        _SHM.pop(id(group), None)
    else:
        _SHM[id(group)] = transport


def shm_transport(group) -> "shm.ShmAllReduce | None":
    """The shared-memory transport registered for `group`, if any."""
    t = _SHM.get(id(group))
    return t if t is not None and t.group is group else None


def _shm_for(group, tensor: torch.Tensor, op: str):
    """The shared-memory transport for this call, or None (gloo/NCCL). Decided identically on every rank."""
    t = shm_transport(group)
    if (t is None or op not in shm._REDUCE or tensor.device.type != "cpu"
            or not tensor.is_contiguous() or tensor.dtype in (torch.bool, torch.complex64, torch.complex128)):
        return None
    return t


def world():
    """The group of every rank (for barriers and job-wide decisions), or None on one process."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def _names(group) -> tuple[str, tuple[int, ...]]:
    if id(group) in _GROUP_NAMES:
        return _GROUP_NAMES[id(group)]
    if dist.is_initialized() and group is dist.group.WORLD:
        return "world", tuple(range(dist.get_world_size()))
    return "?", ()


def group_name(group) -> str:
    name, ranks = _names(group)
    return f"{name}{list(ranks)}" if ranks else name


def group_axis(group) -> str:
    return _names(group)[0]


@dataclass(frozen=True)
class CollectiveRecord:
    op: str        # all_reduce, all_gather, reduce_scatter, broadcast, ...
    axis: str      # the mesh axis of the group
    numel: int     # elements this rank contributes
    nbytes: int
    dtype: torch.dtype
    detail: str = ""  # e.g. the reduce op


class CommCounter:
    """Context manager recording every collective issued inside it, on this rank: `with CommCounter() as c:`."""

    def __init__(self):
        self.records: list[CollectiveRecord] = []

    def __enter__(self):
        with _LOCK:
            _COUNTERS.append(self)
        return self

    def __exit__(self, *exc):
        with _LOCK:
            _COUNTERS.remove(self)

    def on(self, axis: str, op: str | None = None) -> list[CollectiveRecord]:
        return [r for r in self.records if r.axis == axis and (op is None or r.op == op)]

    def bytes_on(self, axis: str, op: str | None = None) -> int:
        return sum(r.nbytes for r in self.on(axis, op))

    def summary(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(axis, op) -> (count, bytes)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for r in self.records:
            c, b = out.get((r.axis, r.op), (0, 0))
            out[(r.axis, r.op)] = (c + 1, b + r.nbytes)
        return out


def record(op: str, group, tensor: torch.Tensor, detail: str = "") -> None:
    if not _COUNTERS:
        return
    rec = CollectiveRecord(op, group_axis(group), tensor.numel(), tensor.numel() * tensor.element_size(),
                           tensor.dtype, detail)
    with _LOCK:
        for c in _COUNTERS:
            c.records.append(rec)


class CollectiveError(RuntimeError):
    """A collective that failed or timed out; the message names the rank, the operation and the group."""


def _fail(op: str, group, err: Exception) -> CollectiveError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return CollectiveError(f"rank {rank}: {op} over group {group_name(group)} failed: {err}")


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group` (no-op when group is None)."""
    if group is None:
        return tensor
    opname = str(op).split(".")[-1].lower()
    record("all_reduce", group, tensor, opname)
    transport = _shm_for(group, tensor, opname)
    try:
        if transport is not None:
            transport.all_reduce(tensor, opname)
        else:
            dist.all_reduce(tensor, op=op, group=group)
    except Exception as e:  # noqa: BLE001 - re-raised with the rank, op and group named
        raise _fail("all_reduce", group, e) from e
    return tensor


class PendingAllReduce:
    """An all-reduce in flight (`all_reduce_async`); `wait()` returns the reduced tensor or raises a
    `CollectiveError` naming the rank, the operation and the group."""

    def __init__(self, tensor: torch.Tensor, group, work):   # work: a dist Work or a shm.PendingShm
        self.tensor, self.group, self.work = tensor, group, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                self.work.wait()
            except Exception as e:  # noqa: BLE001
                raise _fail("all_reduce", self.group, e) from e
            self.work = None
        return self.tensor


def all_reduce_async(tensor: torch.Tensor, group) -> PendingAllReduce:
    """Start an in-place SUM all-reduce over `group` and return at once, so computation can overlap it.
    Every rank of the group must start its asynchronous collectives in the same order as its others."""
    if group is None:
        return PendingAllReduce(tensor, None, None)
    record("all_reduce", group, tensor, "sum")
    transport = _shm_for(group, tensor, "sum")
    try:
        work = transport.start(tensor) if transport is not None else dist.all_reduce(tensor, group=group,
                                                                                     async_op=True)
    except Exception as e:  # noqa: BLE001
        raise _fail("all_reduce", group, e) from e
    return PendingAllReduce(tensor, group, work)


def all_gather_into(tensor: torch.Tensor, group, world: int) -> torch.Tensor:
    """Gather every rank's `tensor` and concatenate along dim 0 (shape [world * n, ...])."""
    if group is None:
        return tensor
    record("all_gather", group, tensor)
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    try:
        _all_gather(out, tensor.contiguous(), group=group)
    except Exception as e:  # noqa: BLE001
        raise _fail("all_gather", group, e) from e
    return out


def broadcast(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    """Broadcast from global rank `src` within `group`."""
    if group is None:
        return tensor
    record("broadcast", group, tensor)
    try:
        dist.broadcast(tensor, src=src, group=group)
    except Exception as e:  # noqa: BLE001
        raise _fail("broadcast", group, e) from e
    return tensor


def all_reduce_future(tensor: torch.Tensor, group, detail: str = "") -> torch.futures.Future:
    """Start an in-place SUM all-reduce over `group` (the backend's, never shared memory) and return a Future of
    the reduced tensor whose failure is a `CollectiveError` naming the rank, the operation and the group: the form
    DDP's communication hooks return."""
    if group is None:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(tensor)
        return done
    record("all_reduce", group, tensor, detail)
    try:
        fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    except Exception as e:  # noqa: BLE001
        raise _fail("all_reduce", group, e) from e

    def unwrap(f):
        try:
            return f.value()[0]
        except Exception as e:  # noqa: BLE001
            raise _fail("all_reduce", group, e) from e
    return fut.then(unwrap)


def barrier(group) -> None:
    """Wait until every rank of `group` (e.g. `world()`) arrives; no-op for None."""
    if group is None:
        return
    record("barrier", group, torch.zeros(0))
    try:
        dist.barrier(group=group)
    except Exception as e:  # noqa: BLE001
        raise _fail("barrier", group, e) from e


def broadcast_objects(objects: list, src: int, group) -> list:
    """Broadcast a list of picklable objects in place from global rank `src` within `group` (meshtron's own
    control messages only: what is received is unpickled)."""
    if group is None:
        return objects
    record("broadcast_object", group, torch.zeros(0))
    try:
        dist.broadcast_object_list(objects, src=src, group=group)
    except Exception as e:  # noqa: BLE001
        raise _fail("broadcast_object", group, e) from e
    return objects
