"""Start the ranks of a mesh on this machine, or join the ones `torchrun` started.

Invariants: `run_ranks(fn, n, ...)` starts n processes (forkserver with torch preloaded: about 0.1 s per
group once warm), each with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set to a port free at run time, and
returns each rank's result in rank order. If any rank fails, the others are stopped (SIGKILL) and the root
cause is raised as a `RankError`: a rank killed by a signal we did not send, else a rank that is stopped
(SIGSTOP) while its peers timed out, else the lowest rank's own error ahead of the collective errors it
caused in its peers (a free port that another process takes before rank 0 binds it is simply retried with a
new one). If the group exceeds `timeout_s`, all are stopped: it never hangs. Ranks die with the
launcher: each asks the kernel for SIGKILL when its parent exits (PR_SET_PDEATHSIG) and a watchdog thread
kills it if the launcher's process is gone. With `sigterm_grace_s`, a SIGTERM to the launcher is passed to
the ranks (which finish their step and checkpoint: see meshtron.train.preempt) and they get that long.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
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
    """A rank failed: `rank`, `kind` (the exception's type name, or 'killed' for a signal or exit), `summary`
    (one line: 'rank R failed: Type: message'), `traceback` (the rank's, or ''), and `fatal`: True when
    restarting cannot help (bad input or state: a ValueError, a non-finite loss, a full disk)."""

    def __init__(self, rank: int, summary: str, kind: str = "killed", tb: str = "", fatal: bool = False):
        super().__init__(summary + ("\n" + tb if tb else ""))
        self.rank, self.kind, self.summary, self.traceback, self.fatal = rank, kind, summary, tb, fatal


def fatal_error(e: BaseException) -> bool:
    """Whether a rank's exception means a restart would fail the same way."""
    import errno
    return isinstance(e, (ValueError, FloatingPointError)) or \
        (isinstance(e, OSError) and e.errno == errno.ENOSPC)


# ----------------------------------------------------------------------------------------- rank side
def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat), or None if it does not exist (or is a
    zombie): with the pid, it names one process even after pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _die_with_launcher(launcher_pid: int, launcher_start: str | None) -> None:
    """SIGKILL this rank when its parent (the forkserver, which exits with the launcher) exits, and poll the
    launcher itself every 0.5 s in case the parent outlives it."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                    # not Linux: the watchdog alone
        pass
    if os.getppid() != parent:                           # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        while _proc_start(launcher_pid) == launcher_start:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    if launcher_start is not None:
        threading.Thread(target=watch, name="meshtron-launcher-watchdog", daemon=True).start()


def _entry(rank, world, port, threads, fn, args, result_dir, env, launcher, preemptible):
    _die_with_launcher(*launcher)
    if preemptible:                                      # before anything slow: a SIGTERM now is remembered
        from meshtron.train import preempt
        preempt.install(launched=True)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        result = fn(*args)
        torch.save({"ok": result}, path + ".tmp")
    except BaseException as e:  # noqa: BLE001 - reported to the parent with the rank
        torch.save({"kind": type(e).__name__, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "fatal": fatal_error(e)}, path + ".tmp")
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


# ------------------------------------------------------------------------------------- launcher side
def run_ranks(fn, world_size: int, *args, threads_per_rank: int | None = None, timeout_s: float = 600,
              env: dict | None = None, sigterm_grace_s: float | None = None) -> list:
    """Run `fn(*args)` on `world_size` fresh ranks of one process group; return their results in rank order.
    With `sigterm_grace_s`, a SIGTERM (or SIGINT) to this process is passed on to the ranks, which then have that
    many seconds to return (a preemptible `fn` saves its state and returns); after that they are killed."""
    global _PRELOADED
    if not _PRELOADED:
        multiprocessing.set_forkserver_preload(["torch", "meshtron.models"])
        _PRELOADED = True
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    for tries in range(3):
        try:
            return _run_once(fn, world_size, args, threads, free_port(), timeout_s, env, sigterm_grace_s)
        except RankError as e:
            # the free port was taken by another process before rank 0's store bound it: nothing ran yet
            if e.kind != "DistNetworkError" or "EADDRINUSE" not in e.summary or tries == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn, world_size, args, threads, port, timeout_s, env, sigterm_grace_s) -> list:
    launcher = (os.getpid(), _proc_start(os.getpid()))
    with tempfile.TemporaryDirectory(prefix="meshtron-ranks-") as result_dir:
        ctx = torch.multiprocessing.start_processes(
            _entry, args=(world_size, port, threads, fn, args, result_dir, {**os.environ, **(env or {})}, launcher,
                          sigterm_grace_s is not None),
            nprocs=world_size, join=False, start_method="forkserver")
        group = _Group(ctx.processes, result_dir)
        try:
            with _forward_sigterm(group, sigterm_grace_s):
                group.wait(timeout_s)
        finally:
            group.kill_all()
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)["ok"]
                for r in range(world_size)]


class _Group:
    """The launched ranks: wait for all to succeed, or find the root cause of a failure."""

    def __init__(self, processes, result_dir: str):
        self.processes, self.result_dir = processes, result_dir
        self.killed_by_us: set[int] = set()
        self.term_deadline: float | None = None
        self.grace_s = 0.0

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {p.sentinel: r for r, p in enumerate(self.processes)}
        while pending:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{len(self.processes)} ranks did not finish within {timeout_s:.0f} s; "
                                   f"stopped them")
            if self.term_deadline is not None and now > self.term_deadline:
                raise RankError(-1, f"the ranks did not finish their step and checkpoint within "
                                    f"{self.grace_s:.0f} s of SIGTERM; stopped them", kind="preempt-timeout")
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=0.2):
                r = pending.pop(sentinel)
                self.processes[r].join()
                if self.processes[r].exitcode != 0:
                    raise self._root_cause(r)

    def kill_all(self) -> None:
        for r, p in enumerate(self.processes):
            if p.is_alive():
                self.killed_by_us.add(r)
                p.kill()
        for p in self.processes:
            p.join(5)

    def _root_cause(self, first: int) -> RankError:
        stopped = [r for r, p in enumerate(self.processes) if p.is_alive() and _state(p.pid) == "T"]
        settle = time.monotonic() + 1.0   # peers of a failed rank usually fail within moments: hear them out
        while time.monotonic() < settle and any(p.is_alive() for r, p in enumerate(self.processes)
                                                 if r not in stopped):
            time.sleep(0.05)
        self.kill_all()
        for r, p in enumerate(self.processes):
            code = p.exitcode
            if r not in self.killed_by_us and code is not None and code < 0 \
                    and -code not in (signal.SIGTERM, signal.SIGINT):
                return RankError(r, f"rank {r} was killed by {signal.Signals(-code).name}", kind="killed")
        reports = {r: self._report(r) for r in range(len(self.processes))}
        raised = {r: d for r, d in reports.items() if d is not None and "error" in d}
        primary = [r for r, d in raised.items() if d["kind"] != "CollectiveError"]
        pick = min(primary) if primary else min(raised) if raised else None
        note = "".join(f"; rank {r} (pid {self.processes[r].pid}) was stopped (SIGSTOP?) and never joined its "
                       f"collectives" for r in stopped)
        if pick is not None:
            d = raised[pick]
            return RankError(pick, f"rank {pick} failed: {d['error']}{note}", kind=d["kind"], tb=d["traceback"],
                             fatal=d.get("fatal", False))
        if stopped:
            return RankError(stopped[0], note.lstrip("; "), kind="stopped")
        code = self.processes[first].exitcode
        return RankError(first, f"rank {first} exited with code {code}", kind="killed")

    def _report(self, r: int) -> dict | None:
        path = os.path.join(self.result_dir, f"rank{r}.pt")
        if not os.path.exists(path):
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # noqa: BLE001 - a torn report of a killed rank
            return None


def _state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped, Z, ...), or '?'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


class _forward_sigterm:
    """While active (and `grace_s` is set, in the main thread), SIGTERM or SIGINT to this process is passed to every
    live rank as SIGTERM, and the group gets `grace_s` seconds to finish; a second signal kills the ranks at once."""

    def __init__(self, group: _Group, grace_s: float | None):
        self.group, self.grace_s, self.saved = group, grace_s, {}

    def __enter__(self):
        if self.grace_s is None or threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame):
        g = self.group
        if g.term_deadline is not None:                   # asked twice: stop now
            g.term_deadline = time.monotonic()
            return
        g.grace_s = self.grace_s
        g.term_deadline = time.monotonic() + self.grace_s
        print(f"meshtron: {signal.Signals(signum).name}: the ranks finish their step, save a checkpoint and exit "
              f"(at most {self.grace_s:.0f} s)", flush=True)
        for p in g.processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False
