"""Fault injection for crash-recovery tests: `MESHTRON_FAULT=where:rank=R:step=N[:signal=STOP]` sends rank R a
real signal (SIGKILL unless `signal` says otherwise) at one point of optimizer step N.

`where` is where in step N (1-based):
  data        while the step's batch is read
  forward     inside the forward pass (a middle layer's pre-hook), on a training forward only
  backward    inside the backward pass (a middle parameter's gradient hook)
  optimizer   inside the optimizer step (before the update)
  step        after the update (the step is complete on this rank)
  checkpoint  while checkpoint N is written (after this rank's shards, before DCP's metadata and the commit)
It fires on the first attempt only (launcher attempt 0 or torchrun restart count 0), so a restarted job runs
through. Unset in normal use: `arm` then installs nothing and `point` costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

PHASES = ("data", "forward", "backward", "optimizer", "step", "checkpoint")
_STATE = {"rank": None, "step": 0}


def _spec() -> dict | None:
    raw = os.environ.get("MESHTRON_FAULT")
    if not raw:
        return None
    where, *pairs = raw.split(":")
    spec = {"where": where}
    spec.update(p.split("=", 1) for p in pairs)
    if where not in PHASES:
        raise ValueError(f"MESHTRON_FAULT={raw!r}: where must be one of {', '.join(PHASES)}")
    return spec


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("MESHTRON_ATTEMPT", "0")))


def maybe_kill(where: str, rank: int, step: int) -> None:
    spec = _spec()
    if spec and spec["where"] == where and int(spec.get("rank", 0)) == rank and int(spec["step"]) == step \
            and attempt() == 0:
        os.kill(os.getpid(), getattr(signal, "SIG" + spec.get("signal", "KILL")))


def at_step(step: int) -> None:
    """The loop is now computing optimizer step `step` (1-based)."""
    _STATE["step"] = step


def point(where: str) -> None:
    """A fault point of the current step on the armed rank."""
    if _STATE["rank"] is not None:
        maybe_kill(where, _STATE["rank"], _STATE["step"])


def arm(rank: int, model, optimizer) -> None:
    """Install the forward, backward and optimizer points on this rank's model, if MESHTRON_FAULT names them."""
    spec = _spec()
    if not spec or int(spec.get("rank", 0)) != rank:
        return
    _STATE["rank"] = rank
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    middle = layers[len(layers) // 2]
    if spec["where"] == "forward":
        middle.register_forward_pre_hook(lambda m, _args: point("forward") if m.training else None)
    elif spec["where"] == "backward":
        next(middle.parameters(recurse=False)).register_hook(lambda g: point("backward"))
    elif spec["where"] == "optimizer":
        optimizer.register_step_pre_hook(lambda *_: point("optimizer"))
