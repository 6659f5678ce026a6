"""Fault injection for crash-recovery tests: `MESHTRON_FAULT=where:rank=R:step=N` SIGKILLs rank R.

`where` is `step` (after optimizer step N) or `checkpoint` (while checkpoint N is being written: after the
shards, before it is made complete). It fires on the first attempt only (launcher attempt 0 or torchrun
restart count 0), so a restarted job runs through. Unset in normal use; the check costs one dict lookup.
"""
from __future__ import annotations

import os
import signal


def _spec() -> dict | None:
    raw = os.environ.get("MESHTRON_FAULT")
    if not raw:
        return None
    where, *pairs = raw.split(":")
    spec = {"where": where}
    spec.update(p.split("=", 1) for p in pairs)
    return spec


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("MESHTRON_ATTEMPT", "0")))


def maybe_kill(where: str, rank: int, step: int) -> None:
    spec = _spec()
    if spec and spec["where"] == where and int(spec.get("rank", 0)) == rank and int(spec["step"]) == step \
            and attempt() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
