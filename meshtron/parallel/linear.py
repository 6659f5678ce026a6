"""Megatron's column- and row-parallel linear layers.

Invariant: `ColumnParallelLinear` holds rows [r*n/t, (r+1)*n/t) of the weight (output features split over
its axis); its input enters through `f`, fused into the GEMM: the backward starts the all-reduce of the input
gradient and computes the weight gradient while it runs (Megatron's asynchronous tensor-parallel all-reduce).
Several column layers reading one input (Q, K, V; gate and up) run as one GEMM behind one `f`
(`column_parallel_group`). `RowParallelLinear` holds the matching input-feature columns and ends with `g`
(all-reduce), adding its bias once, after the sum.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm import collectives as C
from meshtron.comm.ops import reduce_from_parallel
from meshtron.mesh import MeshAxis
from meshtron.parallel.sharding import make_param, replicated_spec, split_spec


class _CopyThenLinear(torch.autograd.Function):
    """Y = f(X)·[W_1; …; W_n]ᵀ + [b_1; …; b_n]: one GEMM for n column layers sharing an input. Backward:
    dX = dY·W, all-reduced over the axis (the `f` backward) while dW = dYᵀ·X and db = Σ dY are computed.
    Only the parameters are saved, not their concatenation (it is rebuilt for dX), so fusing costs no
    memory; under autocast the GEMMs run in the autocast dtype and saves what F.linear would."""

    @staticmethod
    def forward(ctx, x, axis, n, *params):
        weights, biases = params[:n], params[n:]
        ctx.axis, ctx.n, ctx.has_bias = axis, n, bool(biases)
        ctx.dtypes = (x.dtype,) + tuple(p.dtype for p in params)
        ctx.sizes = [w.shape[0] for w in weights]
        weight = weights[0] if n == 1 else torch.cat(weights)
        bias = None if not biases else biases[0] if n == 1 else torch.cat(biases)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
            ctx.save_for_backward(x, weight)       # the cast copy, as F.linear under autocast keeps
        else:
            ctx.save_for_backward(x, *weights)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, *weights = ctx.saved_tensors
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        grad_y = grad_y.to(weight.dtype)
        grad_x = pending = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, weight)
            pending = C.all_reduce_async(grad_x, ctx.axis.group)            # `f` backward, overlapped ...
        del weight
        gy2 = grad_y.reshape(-1, grad_y.shape[-1])
        n, wants = ctx.n, ctx.needs_input_grad[3:]
        grad_w = (gy2.t().mm(x.reshape(-1, x.shape[-1])).split(ctx.sizes) if any(wants[:n])   # ... with dW
                  else (None,) * n)
        grad_b = (gy2.sum(0).split(ctx.sizes) if any(wants[n:]) else (None,) * n) if ctx.has_bias else ()
        if pending is not None:
            grad_x = pending.wait().to(ctx.dtypes[0])
        grads = [None if g is None else g.to(dt) for g, dt in zip(tuple(grad_w) + tuple(grad_b), ctx.dtypes[1:])]
        return (grad_x, None, None, *grads)


def copy_then_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                     axis: MeshAxis) -> torch.Tensor:
    """`F.linear(f(x), cat(weights), cat(biases))`, the `f` all-reduce overlapped with the weight gradients.
    `biases` is empty or holds one bias per weight."""
    return _CopyThenLinear.apply(x, axis, len(weights), *weights, *biases)


class ColumnParallelLinear(nn.Module):
    """Y = X·Aᵀ with A split by output features; its input enters through `f` (one all-reduce in backward)."""

    def __init__(self, in_features: int, out_features: int, axis: MeshAxis, *, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        if out_features % axis.size:
            raise ValueError(f"ColumnParallelLinear: {out_features} output features do not split over "
                             f"axis {axis.name!r} of size {axis.size}")
        self.axis = axis
        self.weight = make_param(split_spec((out_features, in_features), 0, axis, std=std))
        self.bias = make_param(split_spec((out_features,), 0, axis, init="zeros", decay=False)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = () if self.bias is None else (self.bias,)
        return copy_then_linear(x, (self.weight,), biases, self.axis)   # (..., out_features / t)


def column_parallel_group(x: torch.Tensor, layers: Sequence[ColumnParallelLinear]) -> tuple[torch.Tensor, ...]:
    """The outputs of several column-parallel layers that read the same input (one axis), computed as one
    GEMM behind one `f`; each layer's parameters get their own gradients. Without autograd (generation)
    the layers run one by one, so no weight is copied per token."""
    if not torch.is_grad_enabled():
        return tuple(F.linear(x, layer.weight, layer.bias) for layer in layers)
    biases = [layer.bias for layer in layers if layer.bias is not None]
    y = copy_then_linear(x, [layer.weight for layer in layers], biases, layers[0].axis)
    return y.split([layer.weight.shape[0] for layer in layers], dim=-1)


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
