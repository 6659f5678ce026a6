"""The KV cache of one model replica: per layer, the keys and values of this rank's local kv heads only.

Invariant: all rows share one column index; columns [start, end) are in use and column c of row b holds a real
token iff `valid[b, c]` (prompts are left-padded, so every row's newest token sits in the same column). A forward
pass writes its T new columns at [end, end + T); `mask` lets a query see only valid keys at or before its column,
and each query its own column (so padded rows stay finite and never reach a real row).
"""
from __future__ import annotations

import torch


class LayerCache:
    """What one attention layer sees: `update(k, v)` plus the step's `positions`, `mask` and `causal`."""

    def __init__(self, cache: "KVCache", layer: int):
        self.cache, self.layer = cache, layer

    @property
    def positions(self) -> torch.Tensor:
        return self.cache.positions

    @property
    def mask(self):
        return self.cache.mask

    @property
    def causal(self) -> bool:
        return self.cache.causal

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys and values (B, kv, T, hd); return all in use, (B, kv, S, hd)."""
        c = self.cache
        lo, hi = c.end, c.end + k.shape[2]
        c.k[self.layer, :, :, lo:hi] = k
        c.v[self.layer, :, :, lo:hi] = v
        return c.k[self.layer, :, :, c.start:hi], c.v[self.layer, :, :, c.start:hi]


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch, n_kv, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.start = self.end = 0
        self.padded = False                   # some used column is padding in some row
        self.layers = [LayerCache(self, i) for i in range(n_layer)]
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.causal = False
        self._pending = 0

    @classmethod
    def like(cls, model, batch: int, capacity: int) -> "KVCache":
        """An empty cache for `model`'s local attention heads on this rank, on the model's device."""
        attn = model.blocks[0].attn
        dtype = attn.k_proj.weight.dtype
        return cls(len(model.blocks), batch, attn.n_kv_local, attn.head_dim, capacity, dtype, model.mesh.device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def width(self) -> int:
        return self.end - self.start

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Prepare a forward of T new columns: `positions` (B, T) of the tokens, `valid` (B, T) (None: all)."""
        T = positions.shape[1]
        if self.end + T > self.capacity:
            self.reserve(T)
        lo, hi = self.end, self.end + T
        if valid is None:
            self.valid[:, lo:hi] = True
        else:
            self.valid[:, lo:hi] = valid
            self.padded = self.padded or not bool(valid.all())
        self.positions, self._pending = positions, T
        if not self.padded:
            fresh = self.end == self.start
            self.causal = fresh and T > 1
            self.mask = None if fresh or T == 1 else self._causal_mask(lo, hi)[None, None]
            return
        self.causal = False
        keys = self.valid[:, self.start:hi]                                  # (B, S)
        if T == 1:
            self.mask = keys[:, None, None, :]                               # (B, 1, 1, S)
        else:
            self.mask = keys[:, None, None, :] & self._causal_mask(lo, hi)[None, None]
            cols = torch.arange(self.start, hi, device=keys.device)
            self.mask |= (cols[None, :] == torch.arange(lo, hi, device=keys.device)[:, None])[None, None]

    def _causal_mask(self, lo: int, hi: int) -> torch.Tensor:
        cols = torch.arange(self.start, hi, device=self.valid.device)
        return cols[None, :] <= torch.arange(lo, hi, device=self.valid.device)[:, None]   # (T, S)

    def advance(self) -> None:
        """The forward prepared by `begin` has written its columns."""
        self.end += self._pending
        self._pending = 0
        self.positions = self.mask = None

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more columns (reallocating, and dropping unused columns on the left)."""
        if self.end + extra <= self.capacity:
            return
        w = self.width
        k = self.k.new_zeros(self.k.shape[:3] + (w + extra,) + self.k.shape[4:])
        v = torch.zeros_like(k)
        valid = self.valid.new_zeros(self.batch, w + extra)
        k[:, :, :, :w], v[:, :, :, :w] = self.k[:, :, :, self.start:self.end], self.v[:, :, :, self.start:self.end]
        valid[:, :w] = self.valid[:, self.start:self.end]
        self.k, self.v, self.valid, self.start, self.end = k, v, valid, 0, w

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); columns no remaining row uses are dropped from the left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)
        used = self.valid[:, self.start:self.end]
        if used.numel() and len(rows):
            any_col = used.any(0)
            self.start += int(any_col.to(torch.int8).argmax())              # first column some row uses
            used = self.valid[:, self.start:self.end]
        self.padded = bool(used.numel()) and not bool(used.all())

    @staticmethod
    def concat(a: "KVCache | None", b: "KVCache", extra: int) -> "KVCache":
        """Rows of `a` then rows of `b`, right-aligned on their newest column, with room for `extra` columns."""
        if a is None or a.batch == 0:
            b.reserve(extra)
            return b
        w = max(a.width, b.width)
        out = KVCache(a.k.shape[0], a.batch + b.batch, a.k.shape[2], a.k.shape[4], w + extra, a.k.dtype,
                      a.k.device)
        for rows, src in ((slice(0, a.batch), a), (slice(a.batch, a.batch + b.batch), b)):
            lo = w - src.width
            out.k[:, rows, :, lo:w] = src.k[:, :, :, src.start:src.end]
            out.v[:, rows, :, lo:w] = src.v[:, :, :, src.start:src.end]
            out.valid[rows, lo:w] = src.valid[:, src.start:src.end]
        out.end = w
        out.padded = not bool(out.valid[:, :w].all())
        return out
