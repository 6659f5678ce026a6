"""The order of training sequences: a deterministic, resumable stream of windows, sliced per batch-axis rank.

Global position p (sequences consumed since the start of the run) maps to window perm_e[p mod n], e = p div n,
where n is the number of training windows and perm_e a permutation drawn from (seed, e). A global batch of B
is positions [p, p + B); data-parallel rank r of d owns its contiguous rows [r*B/d, (r+1)*B/d), as
`meshtron.train.step.local_rows` does. Invariant: batches depend only on (data, seed, position, batch size):
not on the mesh, and not on whether the run was stopped and resumed from `state_dict()`.
"""
from __future__ import annotations

import numpy as np
import torch

from meshtron.data.errors import DataError


def rank_rows(batch_size: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that data-parallel rank `dp_rank` of `dp_size` owns."""
    if batch_size < 1 or batch_size % dp_size:
        raise DataError(f"global batch {batch_size} is not a positive multiple of the batch axis size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    per = batch_size // dp_size
    return dp_rank * per, (dp_rank + 1) * per


class Sampler:
    """Training batches in a fixed order; `position` is the only state (save it with `state_dict()`).

    `windows` is a `meshtron.data.dataset.Windows` (anything with `count` and `read(ids)`).
    """

    def __init__(self, windows, seed: int, position: int = 0, data_fingerprint: str = ""):
        if seed < 0 or position < 0:
            raise ValueError(f"seed and position must be non-negative, not {seed} and {position}")
        self.windows, self.seed, self.position = windows, int(seed), int(position)
        self.data_fingerprint = data_fingerprint
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """Passes over the training windows so far (fractional)."""
        return self.position / self.windows.count

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the training windows in `epoch`, a pure function of (seed, epoch, number of windows)."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs unless it is longer than one
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(self.windows.count)
        return self._perms[epoch]

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window ids of global positions start .. start + count - 1."""
        n = self.windows.count
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // n):
            sel = pos // n == e
            out[sel] = self.permutation(int(e))[pos[sel] % n]
        return out

    def batch_at(self, position: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """This rank's rows of the global batch at `position`: LongTensor (batch_size/dp_size, seq_len + 1).
        Reads only those rows' windows. Pure: does not move `position`."""
        lo, hi = rank_rows(batch_size, dp_rank, dp_size)
        return self.windows.read(self.window_ids(position + lo, hi - lo))

    def local_batch(self, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """The next global batch's rows for this rank; advances `position` by the global `batch_size`
        (every rank calls it once per batch, so all ranks' positions stay equal)."""
        out = self.batch_at(self.position, batch_size, dp_rank, dp_size)
        self.position += batch_size
        return out

    def global_batch(self, batch_size: int) -> torch.Tensor:
        """The next whole global batch (B, seq_len + 1); advances `position` by B."""
        return self.local_batch(batch_size, 0, 1)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n_windows": self.windows.count,
                "seq_len": self.windows.seq_len, "data": self.data_fingerprint}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from `state`. With `strict`, refuse a state from other data, seed or sequence length: its
        position would then mean different batches."""
        if strict:
            mine = self.state_dict()
            diff = [k for k in ("seed", "n_windows", "seq_len", "data") if k in state and state[k] != mine[k]]
            if diff:
                raise DataError(
                    "the saved data position is for different data or settings (" +
                    ", ".join(f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in diff) +
                    "): resume with the same --data, --tokenizer, --seq-len, --val-fraction and --seed, "
                    "or load with strict=False to keep only the position")
        self.position = int(state["position"])
        self._perms.clear()
