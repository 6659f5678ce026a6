"""Rotary position embeddings (Su et al. 2021) in the half-split convention Llama checkpoints use.

Invariant: a rotation depends only on the position and the head-dimension index, so it is applied locally
to whatever heads this rank holds, with no communication. Training rotates positions 0..T-1 (`forward`);
decoding with a KV cache rotates each sequence's own positions (`at`), the same table rows.
"""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                    # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)             # (T, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int = 0):
        # q: (B, H, T, hd), k: (B, Hkv, T, hd); positions start..start+T-1
        T = q.shape[-2]
        cos = self.cos[start:start + T].to(q.dtype)
        sin = self.sin[start:start + T].to(q.dtype)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin

    def at(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """Rotate by per-sequence positions (B, T): a left-padded batch or a decoding step."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)       # (B, 1, T, hd)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin
