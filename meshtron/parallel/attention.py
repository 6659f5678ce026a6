"""Self-attention split by heads (Megatron): column-parallel Q, K, V, local attention, row-parallel output.

Invariant: rank r of the heads axis holds query heads [r*H/t, (r+1)*H/t) and key/value heads
[r*K/t, (r+1)*K/t), which are exactly the kv heads its query heads read under grouped-query attention, so
attention is local. Q, K and V are one GEMM behind one `f` on entry, and one `g` on exit: two all-reduces
per call (with sequence parallelism: an all-gather and a reduce-scatter along the sequence).
With selective recompute (`recompute`, Korthikanti et al. 2022) the core attention — scores, softmax, dropout
and the probability-weighted values, whose s² activations dominate — keeps only q, k, v and is recomputed in
backward with the forward's dropout mask. Without attention dropout, the fused kernel keeps no s² tensor, so
there is nothing to recompute.
Decoding passes a per-layer `cache` (meshtron.inference.kv_cache.LayerCache): it holds this rank's local kv
heads only, appends the new keys and values, and supplies positions and the padding mask; no extra collective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtron.mesh import MeshAxis
from meshtron.parallel.linear import ColumnParallelLinear, RowParallelLinear, column_parallel_group
from meshtron.parallel.random import ATTENTION_PROBS, DropoutRNG, dropout
from meshtron.parallel.rotary import Rotary


class ParallelAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, axis: MeshAxis, *, bias: bool,
                 std: float, out_std: float, dropout_p: float = 0.0, rng: DropoutRNG | None = None,
                 rotary: Rotary | None = None, layer: int = 0):
        super().__init__()
        for name, n in (("heads", n_head), ("kv_heads", n_kv_head)):
            if n % axis.size:
                raise ValueError(f"{name}={n} is not divisible by mesh axis {axis.name!r} of size {axis.size}")
        self.axis, self.head_dim = axis, d_model // n_head
        self.n_local, self.n_kv_local = n_head // axis.size, n_kv_head // axis.size
        kv_dim = n_kv_head * self.head_dim
        self.q_proj = ColumnParallelLinear(d_model, d_model, axis, bias=bias, std=std)
        self.k_proj = ColumnParallelLinear(d_model, kv_dim, axis, bias=bias, std=std)
        self.v_proj = ColumnParallelLinear(d_model, kv_dim, axis, bias=bias, std=std)
        self.o_proj = RowParallelLinear(d_model, d_model, axis, bias=bias, std=out_std)
        self.dropout_p, self.rng, self.layer, self.n_head = dropout_p, rng, layer, n_head
        self.recompute = False        # selective recompute: core attention is recomputed in backward
        self.rotary = [rotary]  # shared module, kept out of this module's children

    def forward(self, x: torch.Tensor, cache=None, seq: MeshAxis | None = None) -> torch.Tensor:
        """x (B, T, d), or with sequence parallelism (`seq`) this rank's chunk (B, T/t, d); attention itself
        always sees the whole sequence (the entry all-gathers it)."""
        q, k, v = column_parallel_group(x, (self.q_proj, self.k_proj, self.v_proj), seq)  # f, one GEMM
        B, T = q.shape[:2]
        q = q.view(B, T, self.n_local, self.head_dim).transpose(1, 2)                # (B, h, T, hd)
        k = k.view(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)             # (B, kv, T, hd)
        v = v.view(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)
        if cache is not None:
            return self._decode(q, k, v, cache)
        if self.rotary[0] is not None:
            q, k = self.rotary[0](q, k)
            v = v.contiguous()    # q and k are new tensors now: v alone keeps the Q|K|V output for backward
        y = self._attend(q, k, v)                                                 # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return self.o_proj(y, seq)                                                # g

    def _decode(self, q, k, v, cache) -> torch.Tensor:
        """Attention over the cached keys and values plus these (KV cache: prefill, then a token per step)."""
        B, _, T, _ = q.shape
        if self.rotary[0] is not None:
            q, k = self.rotary[0].at(q, k, cache.positions)                        # per-sequence positions
        k, v = cache.update(k, v)                                                 # (B, kv, S, hd), S >= T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, is_causal=cache.causal,
                                           enable_gqa=self.n_kv_local != self.n_local)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return self.o_proj(y)                                                     # g

    def _attend(self, q, k, v):
        gqa = self.n_kv_local != self.n_local
        if not (self.training and self.dropout_p > 0):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        position = self.rng.position
        if self.recompute and torch.is_grad_enabled():       # Megatron's selective recompute of core attention
            return checkpoint(self._core_attention, q, k, v, position, use_reentrant=False,
                              preserve_rng_state=False)
        return self._core_attention(q, k, v, position)

    def _core_attention(self, q, k, v, position):
        """Scores, softmax, dropout and the probability-weighted values: the s² part of attention. `position` is the
        dropout position captured at the forward, so a recomputation draws the same mask."""
        gqa = self.n_kv_local != self.n_local
        # dropout on attention probabilities (B, h_local, T, T): this rank's heads of the logical mask
        if gqa:
            rep = self.n_local // self.n_kv_local
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        head0 = self.axis.coord * self.n_local
        att = dropout(att, self.dropout_p, self.rng, self.layer, ATTENTION_PROBS, True,
                      offsets=(head0, 0, 0), full=(self.n_head, T, T), position=position)
        return att @ v
