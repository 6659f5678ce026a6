"""Preemption: SIGTERM (or SIGINT) asks the job to stop at the end of the current step, with a checkpoint.

Invariant: the signal only sets a flag (a handler can run between any two Python bytecodes); the training loop
calls `agreed(group)` once per step on every rank, a MAX all-reduce of that flag over the whole job, so every
rank stops after the same step even if the signal reached them at different moments, or reached only one.
A second signal in a process that is not a rank of meshtron's launcher restores the default behaviour.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch

_REQUESTED = {"signal": None}


def _handler(signum, _frame) -> None:
    _REQUESTED["signal"] = signal.Signals(signum).name


def install() -> dict:
    """Handle SIGTERM and SIGINT by setting the flag (main thread only); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}


@contextlib.contextmanager
def handling():
    """Handle the signals for the duration, then put the old handlers back. Where they were not handled yet
    (a fresh process, not a rank `meshtron.launch` started with the handler in place) the flag starts clear."""
    if signal.getsignal(signal.SIGTERM) is not _handler:
        _REQUESTED["signal"] = None
    saved = install()
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def requested() -> str | None:
    """The name of the signal received on this rank ('SIGTERM'), or None."""
    return _REQUESTED["signal"]


def agreed(group) -> bool:
    """True on every rank of `group` (the whole job) if any of them received the signal. Collective."""
    from meshtron.comm import collectives as C
    flag = torch.tensor([1.0 if requested() else 0.0])
    C.all_reduce(flag, group, torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
