"""Replicated normalisation layers (LayerNorm for GPT-2, RMSNorm for Llama).

Invariant: their parameters are replicated on every rank; their inputs are replicated over the model axis,
and the `f` operators make their gradients identical there too, so they need no communication.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.parallel.sharding import make_param, replicated_spec


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = make_param(replicated_spec((dim,), init="ones", decay=False))
        self.bias = make_param(replicated_spec((dim,), init="zeros", decay=False)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = make_param(replicated_spec((dim,), init="ones", decay=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 as Llama does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
