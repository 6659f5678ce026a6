"""Preemption: SIGTERM (or Ctrl-C) asks the job to stop at the end of the current step, with a checkpoint.

Invariants: the signal only sets a flag (a handler can run between any two Python bytecodes); the training loop
calls `agreed(group)` once per step on every rank, a MAX all-reduce of that flag over the whole job, so every
rank stops after the same step even if the signal reached them at different moments, or reached only one.
The same signal a second time gets its default effect (so a second Ctrl-C interrupts at once), except in the
ranks of meshtron's launcher, which ignore SIGINT (the launcher passes Ctrl-C on as SIGTERM, and a second one
makes it kill them).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch

_STATE: dict = {"signal": None, "launched": False}


def _handler(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if _STATE["signal"] == name and not _STATE["launched"]:      # asked twice: stop now
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
    _STATE["signal"] = name


def install(launched: bool = False) -> dict:
    """Handle SIGTERM (and SIGINT, or ignore it in a rank of meshtron's launcher) by setting the flag; main
    thread only. Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _STATE["launched"] = launched
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, _handler),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN if launched else _handler)}


@contextlib.contextmanager
def handling():
    """Handle the signals for the duration, then put the old handlers back. In a rank of meshtron's launcher
    the handler has been in place since the process started (a SIGTERM during startup is not lost)."""
    if _STATE["launched"]:
        yield
        return
    _STATE["signal"] = None
    saved = install()
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def requested() -> str | None:
    """The name of the signal received on this rank ('SIGTERM'), or None."""
    return _STATE["signal"]


def agreed(group, device=None) -> bool:
    """True on every rank of `group` (the whole job) if any of them received the signal. Collective; the flag
    lives on `device` (the mesh's: NCCL reduces only GPU tensors)."""
    from meshtron.comm import collectives as C
    flag = torch.tensor([1.0 if requested() else 0.0], device=device)
    C.all_reduce(flag, group, torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
