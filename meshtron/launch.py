"""Start the ranks of a mesh on this machine, or join the ones `torchrun` started.

Invariant: `run_ranks(fn, n, ...)` starts n processes (forkserver with torch preloaded: about 0.1 s per
group once warm), each with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set to a port free at run time, and
returns each rank's result in rank order. If any rank fails, the others are stopped and the first error is
raised with its rank and traceback; if the group exceeds `timeout_s`, all are stopped: it never hangs.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import tempfile
import time
import traceback

import torch

_PRELOADED = False


def under_launcher() -> bool:
    """True when torchrun (or another launcher that sets the env:// variables) started this process. Under
    SLURM (`srun`, one task per rank) the env:// variables are first derived from SLURM's."""
    adopt_slurm_env()
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def adopt_slurm_env(env=os.environ) -> bool:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from a SLURM job step
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE, SLURM_JOB_NODELIST), keeping any of them
    already set. Returns True if SLURM's variables were used."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        env.setdefault("LOCAL_WORLD_SIZE", per_node)
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
    env.setdefault("MASTER_PORT", "29500")
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[03-05,09],gpu1' -> 'node03'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A rank failed: `rank`, and `kind` (the exception's type name, or 'killed' for a signal/exit)."""

    def __init__(self, rank: int, message: str, kind: str = "killed"):
        super().__init__(message)
        self.rank, self.kind = rank, kind


def _entry(rank, world, port, threads, fn, args, result_dir, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        result = fn(*args)
        torch.save({"ok": result}, path + ".tmp")
    except BaseException as e:  # noqa: BLE001 - reported to the parent with the rank
        torch.save({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    os.replace(path + ".tmp", path)


def run_ranks(fn, world_size: int, *args, threads_per_rank: int | None = None, timeout_s: float = 600,
              env: dict | None = None) -> list:
    """Run `fn(*args)` on `world_size` fresh ranks of one process group; return their results in rank order."""
    global _PRELOADED
    if not _PRELOADED:
        multiprocessing.set_forkserver_preload(["torch", "meshtron.models"])
        _PRELOADED = True
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="meshtron-ranks-") as result_dir:
        ctx = torch.multiprocessing.start_processes(
            _entry, args=(world_size, port, threads, fn, args, result_dir, {**os.environ, **(env or {})}),
            nprocs=world_size,
            join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.05):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s; stopped them")
        except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as e:
            raise _first_error(result_dir, ctx.processes, e) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)["ok"]
                for r in range(world_size)]


def _first_error(result_dir: str, processes, exc: Exception) -> RankError:
    """The root cause: a rank killed by a signal (peers then fail on broken connections), else the lowest
    rank that raised, else what torch reported."""
    for r, p in enumerate(processes):
        code = p.exitcode
        if code is not None and code < 0 and -code not in (signal.SIGTERM, signal.SIGINT):
            return RankError(r, f"rank {r} was killed by {signal.Signals(-code).name}", kind="killed")
    for r in range(len(processes)):
        path = os.path.join(result_dir, f"rank{r}.pt")
        if os.path.exists(path):
            data = torch.load(path, weights_only=False)
            if "error" in data:
                return RankError(r, f"rank {r} failed: {data['error']}\n{data['traceback']}",
                                 kind=data["error"].split(":", 1)[0])
    rank = getattr(exc, "error_index", -1)
    return RankError(rank, f"rank {rank}: {exc}", kind="killed")
