"""One trainer per run folder: `RUN_DIR/.lock`, held with flock(2) by the process that owns the run.

Invariant: while a `RunLock` is held, another one on the same folder fails at once with a ValueError naming the
holder's PID and host (recorded in the file). The kernel drops the flock when its holder exits in any way
(SIGKILL included), so a lock left by a dead process is simply taken over; the file's old contents only say
whose it was. Taken before anything else is written into the folder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time


class RunLockedError(ValueError):
    """The run folder is in use by another live trainer."""


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, ".lock")
        self.fd: int | None = None
        self.previous: dict | None = None      # the stale holder we took over from, if any

    def __enter__(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (f"PID {holder.get('pid')} on {holder.get('host')}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}"
                   if holder else "another process")
            raise RunLockedError(f"run folder {self.run_dir} is in use by a meshtron train ({who}; lock file "
                                 f"{self.path}): wait for it to finish or stop it, or choose another --out") from None
        except OSError as e:                     # a filesystem without locks: say so, and go on unlocked
            os.close(fd)
            print(f"meshtron: warning: cannot lock {self.path} ({e.strerror}); make sure no other trainer uses "
                  f"{self.run_dir}", flush=True)
            return self
        self.previous = _read(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)                    # closing drops the flock
            self.fd = None


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}
