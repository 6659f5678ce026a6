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
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
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


def _shm_for(group, tensor: torch.Tensor, op: str, out: torch.Tensor | None = None):
    """The shared-memory transport for this call, or None (gloo/NCCL). Decided identically on every rank."""
    t = shm_transport(group)
    if (t is None or op not in shm._OPS or tensor.device.type != "cpu"
            or not tensor.is_contiguous() or tensor.dtype not in shm._DTYPES
            or (out is not None and (not out.is_contiguous() or out.dtype != tensor.dtype))):
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
    detail: str = ""  # e.g. the reduce op, or what the call is for
    world: int = 0    # ranks in the group

    @property
    def wire_bytes(self) -> float:
        """Bytes each rank sends under the ring algorithm: an all-reduce of N bytes 2(t-1)/t·N, a reduce-scatter
        of N bytes (t-1)/t·N, an all-gather of N/t bytes per rank (t-1)/t·N; so an all-gather plus a
        reduce-scatter carry exactly what one all-reduce of the same tensor does."""
        t = self.world or 1
        if self.op == "all_reduce":
            return 2 * (t - 1) / t * self.nbytes
        if self.op == "reduce_scatter":
            return (t - 1) / t * self.nbytes
        if self.op == "all_gather":
            return (t - 1) * self.nbytes
        return float(self.nbytes)


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
    name, ranks = _GROUP_NAMES.get(id(group), ("?", ()))
    rec = CollectiveRecord(op, name, tensor.numel(), tensor.numel() * tensor.element_size(),
                           tensor.dtype, detail, len(ranks))
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
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    return all_gather_async(out, tensor.contiguous(), group).wait()


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


class Pending:
    """A collective in flight; `wait()` returns its result or raises a `CollectiveError` naming the rank, the
    operation and the group."""

    def __init__(self, result: torch.Tensor, group, work, op: str):
        self.result, self.group, self.work, self.op = result, group, work, op

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                self.work.wait()
            except Exception as e:  # noqa: BLE001
                raise _fail(self.op, self.group, e) from e
            self.work = None
        return self.result


def all_gather_async(out: torch.Tensor, tensor: torch.Tensor, group, detail: str = "") -> Pending:
    """Start gathering every rank's `tensor` into `out` (concatenated along dim 0; `tensor` may be `out`'s own
    chunk: in place)."""
    record("all_gather", group, tensor, detail)
    transport = _shm_for(group, tensor, "all_gather", out)
    try:
        work = (transport.start_all_gather(out, tensor) if transport is not None
                else _all_gather(out, tensor, group=group, async_op=True))
    except Exception as e:  # noqa: BLE001
        raise _fail("all_gather", group, e) from e
    return Pending(out, group, work, "all_gather")


def reduce_scatter_async(out: torch.Tensor, tensor: torch.Tensor, group, detail: str = "") -> Pending:
    """Start summing `tensor` (dim 0 of t equal chunks) over the group into `out`, this rank's chunk (`out` may
    be that chunk of `tensor`: in place)."""
    record("reduce_scatter", group, tensor, detail)
    transport = _shm_for(group, tensor, "reduce_scatter", out)
    try:
        work = (transport.start_reduce_scatter(out, tensor) if transport is not None
                else _reduce_scatter(out, tensor, group=group, async_op=True))
    except Exception as e:  # noqa: BLE001
        raise _fail("reduce_scatter", group, e) from e
    return Pending(out, group, work, "reduce_scatter")


def all_gather_dim_async(tensor: torch.Tensor, group, world: int, dim: int, detail: str = ""):
    """Start an all-gather along any dimension; returns a function that waits and gives the gathered tensor."""
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0],) + tuple(moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    pending = all_gather_async(out, moved, group, detail)
    return lambda: pending.wait().movedim(0, dim)


def reduce_scatter_dim_async(tensor: torch.Tensor, group, world: int, dim: int, detail: str = ""):
    """Start a SUM reduce-scatter along any dimension (its size divisible by `world`); returns a function that
    waits and gives this rank's chunk."""
    moved = tensor.movedim(dim, 0).contiguous()
    if moved.shape[0] % world:
        raise ValueError(f"reduce-scatter of dimension {dim} (size {moved.shape[0]}) over {world} ranks: the size "
                         f"must be divisible by the group")
    out = torch.empty((moved.shape[0] // world,) + tuple(moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    pending = reduce_scatter_async(out, moved, group, detail)
    return lambda: pending.wait().movedim(0, dim)


def all_gather_dim(tensor: torch.Tensor, group, world: int, dim: int, detail: str = "") -> torch.Tensor:
    """Gather every rank's `tensor` concatenated along `dim` (no-op when group is None)."""
    if group is None:
        return tensor
    return all_gather_dim_async(tensor, group, world, dim, detail)()


def reduce_scatter_dim(tensor: torch.Tensor, group, world: int, dim: int, detail: str = "") -> torch.Tensor:
    """Sum `tensor` over the group and keep this rank's chunk along `dim` (no-op when group is None)."""
    if group is None:
        return tensor
    return reduce_scatter_dim_async(tensor, group, world, dim, detail)()


def send_async(tensor: torch.Tensor, dst: int, group, tag: int, detail: str = "") -> Pending:
    """Start sending `tensor` to global rank `dst` of `group` (point to point, e.g. between pipeline stages); the
    tensor must stay alive until `wait()`."""
    record("send", group, tensor, detail)
    try:
        work = dist.isend(tensor.contiguous(), dst=dst, group=group, tag=tag)
    except Exception as e:  # noqa: BLE001
        raise _fail(f"send to rank {dst}", group, e) from e
    return Pending(tensor, group, work, f"send to rank {dst}")


def recv(tensor: torch.Tensor, src: int, group, tag: int, detail: str = "") -> torch.Tensor:
    """Receive into `tensor` from global rank `src` of `group`; a peer that never sends ends in the group's
    timeout, named (rank, operation, peer, group)."""
    record("recv", group, tensor, detail)
    try:
        dist.recv(tensor, src=src, group=group, tag=tag)
    except Exception as e:  # noqa: BLE001
        raise _fail(f"recv from rank {src}", group, e) from e
    return tensor
