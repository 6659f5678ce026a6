"""Megatron's column- and row-parallel linear layers.

Invariant: `ColumnParallelLinear` holds rows [r*n/t, (r+1)*n/t) of the weight (output features split over
its axis) and issues nothing in forward (its input enters through `f`); `RowParallelLinear` holds the
matching input-feature columns and ends with `g` (all-reduce), adding its bias once, after the sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm.ops import copy_to_parallel, gather_from_parallel, reduce_from_parallel
from meshtron.mesh import MeshAxis
from meshtron.parallel.sharding import make_param, replicated_spec, split_spec


class ColumnParallelLinear(nn.Module):
    """Y = X·Aᵀ with A split by output features. `copy_input=False` when the caller already applied `f`
    (several column layers reading one input share one `f`: one backward all-reduce, not several)."""

    def __init__(self, in_features: int, out_features: int, axis: MeshAxis, *, bias: bool = True,
                 std: float = 0.02, copy_input: bool = True, gather_output: bool = False):
        super().__init__()
        if out_features % axis.size:
            raise ValueError(f"ColumnParallelLinear: {out_features} output features do not split over "
                             f"axis {axis.name!r} of size {axis.size}")
        self.axis, self.copy_input, self.gather_output = axis, copy_input, gather_output
        self.weight = make_param(split_spec((out_features, in_features), 0, axis, std=std))
        self.bias = make_param(split_spec((out_features,), 0, axis, init="zeros", decay=False)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_parallel(x, self.axis)
        y = F.linear(x, self.weight, self.bias)  # (..., out_features / t)
        return gather_from_parallel(y, self.axis) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X·Aᵀ with A split by input features: each rank's partial product is summed by `g`."""

    def __init__(self, in_features: int, out_features: int, axis: MeshAxis, *, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        if in_features % axis.size:
            raise ValueError(f"RowParallelLinear: {in_features} input features do not split over "
                             f"axis {axis.name!r} of size {axis.size}")
        self.axis = axis
        self.weight = make_param(split_spec((out_features, in_features), 1, axis, std=std))
        self.bias = make_param(replicated_spec((out_features,), init="zeros", decay=False)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.axis)
        return y + self.bias if self.bias is not None else y
