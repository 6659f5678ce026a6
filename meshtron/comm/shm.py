"""All-reduce, all-gather and reduce-scatter through shared memory for a group whose ranks share one host (CPU
tensors), beside gloo.

gloo all-reduces over TCP loopback: about 0.6 ms for a few bytes and 2.4 ms for 1 MB between two ranks here,
which is most of tensor parallelism's cost on a CPU. Here each rank copies its tensor into its own slot of
a segment mapped by every rank of the group, publishes a sequence number, waits until every peer has
published the same number, and sums the slots.

Invariants:
- Every rank of the group calls in the same order, as for any collective.
- Every rank sums the slots in rank order, so all ranks get bitwise-identical results.
- Each rank has two slots, used alternately. A rank writes slot k % 2 for call k only after it has seen
  every peer publish call k-1, which a peer does only after it has finished reading call k-2 (the last
  use of that slot).
- Each slot carries a header: (sequence, call number, bytes of the call, bytes of this chunk, dtype and op).
  Before reducing, every rank checks that each peer's header equals its own: a mismatched call (another
  size, dtype or op, or ranks out of step after an earlier failure) raises CollectiveError naming both
  ranks' calls instead of combining misaligned data. After any failure the transport refuses every later
  call, so stale slots are never read.
- Tensors larger than a slot go through in slot-sized chunks.
- A wait longer than the group's timeout, or a peer whose process has exited, raises CollectiveError naming
  the rank, the operation and the group.
- Setup is collective and falls back to gloo on every rank of the group if any rank cannot map the segment.
- A rank that waits for a peer polls, then yields its core, then polls every 0.1 ms. `MESHTRON_SHM_WAIT=futex`
  instead polls for 0.2 ms and then sleeps in the kernel on the peer's sequence word (a futex on the shared
  mapping; every publish wakes its sleepers), using no core at all while it waits. Measured on 2 cores it was
  no faster, with 2 or 4 ranks, overlapped with GEMMs or not (README, "How the ranks talk"), so it is opt-in.

Why this is safe: loads and stores are ordered as on x86 (TSO), where a peer that sees the sequence number
also sees the data written before it. Other architectures keep gloo. `MESHTRON_SHM=0` turns this off.
"""
from __future__ import annotations

import ctypes
import os
import platform
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist


def _wait_mode() -> str:
    mode = os.environ.get("MESHTRON_SHM_WAIT", "spin")
    if mode not in ("futex", "spin"):
        raise ValueError(f"MESHTRON_SHM_WAIT={mode!r}: use 'spin' (poll, yield, then 0.1 ms sleeps; the default) or "
                         f"'futex' (poll 0.2 ms, then sleep in the kernel until the peer publishes)")
    return mode if _SYS_FUTEX is not None else "spin"


class _Futex:
    """FUTEX_WAIT / FUTEX_WAKE on the low 32 bits of an int64 word of the shared segment (little-endian)."""

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._timeout = (ctypes.c_long * 2)()

    def wait(self, addr: int, value: int, timeout_s: float) -> None:
        """Sleep while the word at `addr` still holds `value` (returns at once if it does not), at most
        timeout_s, or until woken."""
        self._timeout[0] = int(timeout_s)
        self._timeout[1] = int((timeout_s % 1) * 1e9)
        self._syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_int(_low32(value)),
                      self._timeout, None, 0)

    def wake(self, addr: int) -> None:
        self._syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


def _low32(value: int) -> int:
    v = value & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class ShmError(RuntimeError):
    """A failed shared-memory all-reduce (mismatched calls, a late or exited peer); the transport is then unusable."""


def _slot_bytes() -> int:
    raw = os.environ.get("MESHTRON_SHM_SLOT_MB", "4")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MESHTRON_SHM_SLOT_MB={raw!r}: give a whole number of MiB, at least 1 (default 4)")
    return int(raw) * 2 ** 20


SLOT_BYTES = _slot_bytes()
_FLAG_STRIDE = 16           # int64s per rank's header line (128 bytes): [0] its sequence flag, [1] its pid,
_DESC = 2                   # [2:7] the descriptor of its slot 0, [7:12] of its slot 1 (see _descriptor)
_DESC_LEN = 5
_SPIN_S = 200e-6            # a waiting rank polls this long before it sleeps on the peer's word (futex wait)
_LIVENESS_S = 0.5           # while waiting, how often to check that the late peers' processes still exist
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1       # shared (not FUTEX_PRIVATE): the word lives in a mapping of several processes
_REDUCE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}
_OPS = list(_REDUCE) + ["all_gather", "reduce_scatter"]     # the op field of a slot's descriptor
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8]


def _code(dtype: torch.dtype, op: str) -> int:
    d = _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0
    return d * 16 + _OPS.index(op)


def _describe(desc) -> str:
    """A slot descriptor as a reader sees it: 'all_reduce #12 (sum, float32, 4,096 bytes; chunk 3)'."""
    seq, call, total, _, code = (int(v) for v in desc)
    if call < 0:
        return f"abandoned all_reduce #{-call} (it failed there)"
    d, o = divmod(code, 16)
    dtype = str(_DTYPES[d - 1]).replace("torch.", "") if 0 < d <= len(_DTYPES) else "?"
    op = _OPS[o] if o < len(_OPS) else "?"
    if op in ("all_gather", "reduce_scatter"):
        return f"{op} #{call} ({'sum, ' if op == 'reduce_scatter' else ''}{dtype}, {total:,} bytes; chunk {seq})"
    return f"all_reduce #{call} ({op}, {dtype}, {total:,} bytes; chunk {seq})"


def enabled() -> bool:
    return os.environ.get("MESHTRON_SHM", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64")


class ShmAllReduce:
    """The shared segment of one group; build it with `setup` (collective over the group)."""

    def __init__(self, group, ranks: tuple[int, ...], segment: torch.Tensor, timeout_s: float, name: str):
        self.group, self.ranks, self.timeout_s, self.name = group, tuple(ranks), timeout_s, name
        self.rank, self.world = dist.get_rank(group), len(ranks)
        world = self.world
        header = world * _FLAG_STRIDE * 8
        self.segment = segment                       # keeps the mapping alive under the numpy view
        self.header = segment[:header].numpy().view(np.int64).reshape(world, _FLAG_STRIDE)
        self.peer_flags = self.header[:, 0]
        self.peer_pids = [int(p) for p in self.header[:, 1]]   # 0: not checkable
        self.slots = segment[header:].view(world, 2, SLOT_BYTES)
        self.seq = 0
        self.calls = 0                               # all-reduces issued (a call of several chunks counts once)
        self.broken: str | None = None               # why an earlier call failed; then every call refuses
        self.spin = 0 if _oversubscribed() else 64   # busy-wait polls before yielding the core
        self.pending: "PendingShm | None" = None
        self.futex = _Futex() if _wait_mode() == "futex" else None
        base = self.header.ctypes.data
        self.flag_addr = [base + r * _FLAG_STRIDE * 8 for r in range(world)]   # each rank's sequence word

    # one chunk: publish (copy in, describe, raise the flag), then complete (wait for peers, check that their
    # descriptors equal ours, reduce in rank order)
    def _publish(self, flat: torch.Tensor, call_bytes: int, op: str) -> int:
        self.seq += 1
        nbytes = flat.numel() * flat.element_size()
        self.slots[self.rank, self.seq % 2, :nbytes].view(flat.dtype).copy_(flat)
        base = _DESC + (self.seq % 2) * _DESC_LEN
        self.header[self.rank, base:base + _DESC_LEN] = (self.seq, self.calls, call_bytes, nbytes,
                                                         _code(flat.dtype, op))
        self.peer_flags[self.rank] = self.seq                # last: a peer that sees it sees the rest
        if self.futex is not None:
            self.futex.wake(self.flag_addr[self.rank])       # peers asleep on this word (no-op if none)
        return self.seq

    def _arrive(self, seq: int) -> None:
        """Wait until every peer has published chunk `seq`, and check that they all describe the same call."""
        try:
            self._wait_peers(seq)
        except ShmError as e:
            self.broken = str(e)
            base = _DESC + (seq % 2) * _DESC_LEN     # withdraw this call, so a late peer fails too, not combines
            self.header[self.rank, base + 1] = -self.calls
            raise
        try:
            self._check_peers(seq)                   # a mismatch: every peer sees it as well (nothing withdrawn)
        except ShmError as e:
            self.broken = str(e)
            raise

    def _complete(self, flat: torch.Tensor, seq: int, op: str) -> None:
        self._arrive(seq)
        nbytes = flat.numel() * flat.element_size()
        views = [self.slots[r, seq % 2, :nbytes].view(flat.dtype) for r in range(self.world)]
        reduce = _REDUCE[op]
        reduce(views[0], views[1], out=flat)
        for v in views[2:]:
            reduce(flat, v, out=flat)

    def _check_peers(self, seq: int) -> None:
        base = _DESC + (seq % 2) * _DESC_LEN
        descs = self.header[:, base:base + _DESC_LEN]
        mine = descs[self.rank]
        if (descs == mine).all():
            return
        other = next(r for r in range(self.world) if not (descs[r] == mine).all())
        theirs = _describe(descs[other])
        raise ShmError(f"mismatched collectives on group {self.ranks}: rank {self.ranks[self.rank]} called "
                       f"{_describe(mine)} but rank {self.ranks[other]} "
                       f"{theirs if theirs.startswith('abandoned') else 'called ' + theirs}; every rank of a group "
                       f"must issue the same collectives in the same order")

    def _wait_peers(self, seq: int) -> None:
        if self.peer_flags.min() >= seq:
            return
        start = time.monotonic()
        next_check, spins = start + _LIVENESS_S, 0
        spin_until = start + (_SPIN_S if not _oversubscribed() else 0.0)
        while self.peer_flags.min() < seq:
            spins += 1
            if self.futex is not None and time.monotonic() < spin_until:
                continue                    # a peer in step arrives within microseconds: keep polling
            if self.futex is not None or spins > self.spin:   # a late peer: let other processes have the core
                if self.futex is not None:  # sleep on the first late peer's word until it publishes
                    late = int(np.argmin(self.peer_flags))
                    seen = int(self.peer_flags[late])
                    if seen < seq:
                        self.futex.wait(self.flag_addr[late], seen, 0.05)
                elif spins < 4096:
                    os.sched_yield()
                else:
                    time.sleep(1e-4)
                now = time.monotonic()
                if now > next_check:
                    next_check = now + _LIVENESS_S
                    late = [r for r in range(self.world) if int(self.peer_flags[r]) < seq]
                    gone = [r for r in late if not _alive(self.peer_pids[r])]
                    if gone:                # gloo would see its socket close; here, look for the process
                        raise ShmError(f"shared-memory all-reduce {seq}: the process of rank(s) "
                                           f"{[self.ranks[r] for r in gone]} has exited")
                    if now - start > self.timeout_s:
                        raise ShmError(f"shared-memory all-reduce {seq}: timed out: rank(s) "
                                           f"{[self.ranks[r] for r in late]} did not arrive within "
                                           f"{self.timeout_s:.0f} s")

    def _chunks(self, tensor: torch.Tensor):
        flat = tensor.view(-1)
        per = SLOT_BYTES // tensor.element_size()
        return [flat[i:i + per] for i in range(0, flat.numel(), per)]

    def _begin(self, tensor: torch.Tensor) -> int:
        """Refuse if an earlier call failed; count this call; returns its size in bytes."""
        if self.broken is not None:
            raise ShmError(f"this group's shared-memory transport failed earlier ({self.broken}); its ranks are "
                           f"out of step, so no later collective on it can be trusted")
        self.calls += 1
        return tensor.numel() * tensor.element_size()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place, blocking."""
        self.flush()
        total = self._begin(tensor)
        for chunk in self._chunks(tensor):
            self._complete(chunk, self._publish(chunk, total, op), op)
        return tensor

    def start(self, tensor: torch.Tensor) -> "PendingShm":
        """In-place SUM that completes at `wait()`: peers read this rank's data while it computes."""
        self.flush()
        chunks = self._chunks(tensor)
        if not chunks:                                  # nothing to reduce: already complete
            done = PendingShm(self, tensor, tensor, 0)
            done.done = True
            return done
        total = self._begin(tensor)
        for chunk in chunks[:-1]:                       # only the last chunk is left in flight
            self._complete(chunk, self._publish(chunk, total, "sum"), "sum")
        self.pending = PendingShm(self, tensor, chunks[-1], self._publish(chunks[-1], total, "sum"))
        return self.pending

    def flush(self) -> None:
        """Finish a call left in flight, so calls complete in the order they started."""
        if self.pending is not None:
            self.pending.wait()

    # all-gather and reduce-scatter: the same slots, one chunk in flight, read in rank order
    def start_all_gather(self, out: torch.Tensor, tensor: torch.Tensor) -> "PendingShm":
        """Every rank's `tensor` into `out` (concatenated along dim 0, in rank order), completing at `wait()`."""
        self.flush()
        flat, dst = tensor.reshape(-1), out.view(self.world, -1)
        chunks = self._chunks(flat)
        total = self._begin(tensor)
        off, last = 0, None
        for i, chunk in enumerate(chunks):
            seq = self._publish(chunk, total, "all_gather")
            if i < len(chunks) - 1:                     # every chunk but the last completes before the next
                self._gather_chunk(dst, seq, off, chunk.numel(), flat.dtype)
            else:
                last = (seq, off, chunk.numel())
            off += chunk.numel()
        return self._leave_in_flight(out, lambda: last and self._gather_chunk(dst, *last, flat.dtype))

    def _gather_chunk(self, dst, seq: int, off: int, n: int, dtype) -> None:
        self._arrive(seq)
        nbytes = n * dtype.itemsize
        for r in range(self.world):
            dst[r, off:off + n].copy_(self.slots[r, seq % 2, :nbytes].view(dtype))

    def start_reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor) -> "PendingShm":
        """Sum every rank's `tensor` (t equal parts along dim 0) and keep this rank's part in `out`, summing the
        slots in rank order; completes at `wait()`."""
        self.flush()
        flat, mine = tensor.reshape(-1), out.reshape(-1)
        part = flat.numel() // self.world
        lo, hi = self.rank * part, (self.rank + 1) * part
        total = self._begin(tensor)
        chunks = self._chunks(flat)
        off, last = 0, None
        for i, chunk in enumerate(chunks):
            seq = self._publish(chunk, total, "reduce_scatter")
            if i < len(chunks) - 1:
                self._scatter_chunk(mine, seq, off, chunk.numel(), lo, hi, flat.dtype)
            else:
                last = (seq, off, chunk.numel())
            off += chunk.numel()
        return self._leave_in_flight(out, lambda: last and self._scatter_chunk(mine, *last, lo, hi, flat.dtype))

    def _scatter_chunk(self, mine, seq: int, off: int, n: int, lo: int, hi: int, dtype) -> None:
        self._arrive(seq)
        a, b = max(lo, off), min(hi, off + n)
        if a >= b:
            return
        views = [self.slots[r, seq % 2, (a - off) * dtype.itemsize:(b - off) * dtype.itemsize].view(dtype)
                 for r in range(self.world)]
        dst = mine[a - lo:b - lo]
        torch.add(views[0], views[1], out=dst)
        for v in views[2:]:
            dst.add_(v)

    def _leave_in_flight(self, result: torch.Tensor, finish) -> "PendingShm":
        done = PendingShm(self, result, None, 0, finish)
        self.pending = done
        return done


def _oversubscribed() -> bool:
    """More compute threads on this host (ranks x threads) than cores: then a spinning rank would take the core
    from the peer it waits for, so waiting yields at once."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return local * torch.get_num_threads() > cores


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (0: unknown, assumed alive)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


class PendingShm:
    """A call whose last chunk is published and not yet read; `wait()` reads it (an all-reduce's sum, or the
    `finish` of an all-gather or reduce-scatter)."""

    def __init__(self, owner: ShmAllReduce, tensor: torch.Tensor, last: torch.Tensor | None, seq: int,
                 finish=None):
        self.owner, self.tensor, self.last, self.seq, self.done = owner, tensor, last, seq, False
        self.finish = finish

    def wait(self) -> torch.Tensor:
        if not self.done:
            self.done = True
            if self.owner.pending is self:
                self.owner.pending = None
            if self.finish is not None:
                self.finish()
            else:
                self.owner._complete(self.last, self.seq, "sum")
        return self.tensor


def setup(group, ranks: tuple[int, ...], timeout_s: float) -> ShmAllReduce | None:
    """Collective over `group` (gloo): map one segment on every rank, or return None on every rank."""
    from meshtron.comm import collectives as C          # named, counted collectives (C imports this module)
    world, me = len(ranks), dist.get_rank(group)
    size = world * _FLAG_STRIDE * 8 + world * 2 * SLOT_BYTES
    token = torch.frombuffer(bytearray(uuid.uuid4().bytes), dtype=torch.uint8)     # rank 0's is the one used
    C.broadcast(token, ranks[0], group)
    nonce = bytes(token.tolist())
    path, segment, ok = f"/dev/shm/meshtron-{nonce.hex()}", None, torch.ones(1)
    if me == 0:
        try:
            with open(path, "wb") as f:
                f.write(nonce)
                f.truncate(size)
        except OSError:
            ok.zero_()
    C.barrier(group)
    if ok.item() == 1:
        try:
            segment = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            if bytes(segment[:len(nonce)].tolist()) != nonce:   # another host's /dev/shm: not shared
                ok.zero_()
        except Exception:  # noqa: BLE001 - no shared /dev/shm between these ranks: gloo it is
            ok.zero_()
    C.barrier(group)   # everyone has read the nonce before the flags (which overlay it) move
    C.all_reduce(ok, group, dist.ReduceOp.MIN)   # every rank mapped it, or none uses it
    if me == 0 or ok.item() < 1:
        try:
            os.unlink(path)                                   # the mappings stay; nothing is left behind
        except OSError:
            pass
    if ok.item() < 1:
        return None
    segment[:len(nonce)] = 0                                  # the flags start at zero on every rank
    header = segment[:world * _FLAG_STRIDE * 8].view(torch.int64).view(world, _FLAG_STRIDE)
    C.barrier(group)
    header[me, 1] = os.getpid()
    C.barrier(group)
    # pids are only meaningful if every peer's process is visible here (one pid namespace)
    visible = torch.tensor([float(all(_alive(int(p)) for p in header[:, 1]))])
    C.all_reduce(visible, group, dist.ReduceOp.MIN)
    if visible.item() < 1:
        header[me, 1] = 0
    C.barrier(group)
    return ShmAllReduce(group, ranks, segment, timeout_s, path)
