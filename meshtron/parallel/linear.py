"""Megatron's column- and row-parallel linear layers, with and without sequence parallelism.

Invariant: `ColumnParallelLinear` holds rows [r*n/t, (r+1)*n/t) of the weight (output features split over
its axis); its input enters through `f`, fused into the GEMM: the backward starts the all-reduce of the input
gradient and computes the weight gradient while it runs (Megatron's asynchronous tensor-parallel all-reduce).
Several column layers reading one input (Q, K, V; gate and up) run as one GEMM behind one `f`
(`column_parallel_group`). `RowParallelLinear` holds the matching input-feature columns and ends with `g`
(all-reduce), adding its bias once, after the sum.

With sequence parallelism (`seq` given: the input is split along the sequence, dim 1, over the same axis) the
`f` becomes an all-gather of the input along the sequence, and its backward a reduce-scatter of the input
gradient; only this rank's chunk of the input is kept for backward, where it is gathered again, overlapped
with the input-gradient GEMM (as Megatron does, so that the stored activations shrink by t). The `g` becomes a
reduce-scatter along the sequence (all-gather backward); the bias is added to this rank's chunk.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm import collectives as C
from meshtron.comm.ops import reduce_from_parallel, reduce_scatter_to_sequence
from meshtron.mesh import MeshAxis
from meshtron.parallel.sharding import make_param, replicated_spec, split_spec

SEQ_DIM = 1


class _ColumnLinear(torch.autograd.Function):
    """Y = entry(X)·[W_1; …; W_n]ᵀ + [b_1; …; b_n]: one GEMM for n column layers sharing an input, where entry
    is `f` or, with `gather_seq`, the all-gather along the sequence. Backward: dX = dY·W, all-reduced (or
    reduce-scattered) over the axis while dW = dYᵀ·X and db = Σ dY are computed. Only the parameters are
    saved, not their concatenation (it is rebuilt for dX), so fusing costs no memory; under autocast the GEMMs
    run in the autocast dtype and save what F.linear would."""

    @staticmethod
    def forward(ctx, x, axis, gather_seq, n, *params):
        weights, biases = params[:n], params[n:]
        ctx.axis, ctx.gather_seq, ctx.n, ctx.has_bias = axis, gather_seq, n, bool(biases)
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
        if gather_seq:
            x = C.all_gather_dim(x, axis.group, axis.size, SEQ_DIM, "seq")
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, *weights = ctx.saved_tensors
        axis = ctx.axis
        regather = (C.all_gather_dim_async(x, axis.group, axis.size, SEQ_DIM, "seq regather") if ctx.gather_seq
                    else None)                                                 # overlapped with dX's GEMM
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        grad_y = grad_y.to(weight.dtype)
        grad_x = pending = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, weight)
        del weight
        if regather is not None:
            x = regather()
        if grad_x is not None:                                                 # `f` backward, overlapped ...
            pending = (C.reduce_scatter_dim_async(grad_x, axis.group, axis.size, SEQ_DIM, "seq")
                       if ctx.gather_seq else C.all_reduce_async(grad_x, axis.group).wait)
        gy2 = grad_y.reshape(-1, grad_y.shape[-1])
        n, wants = ctx.n, ctx.needs_input_grad[4:]
        grad_w = (gy2.t().mm(x.reshape(-1, x.shape[-1])).split(ctx.sizes) if any(wants[:n])   # ... with dW
                  else (None,) * n)
        grad_b = (gy2.sum(0).split(ctx.sizes) if any(wants[n:]) else (None,) * n) if ctx.has_bias else ()
        if pending is not None:
            grad_x = pending().to(ctx.dtypes[0]).contiguous()
        grads = [None if g is None else g.to(dt) for g, dt in zip(tuple(grad_w) + tuple(grad_b), ctx.dtypes[1:])]
        return (grad_x, None, None, None, *grads)


def copy_then_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                     axis: MeshAxis, seq: MeshAxis | None = None) -> torch.Tensor:
    """`F.linear(f(x), cat(weights), cat(biases))`, the `f` all-reduce overlapped with the weight gradients;
    with `seq` (sequence parallelism over `axis`), `f` is the all-gather of x along the sequence.
    `biases` is empty or holds one bias per weight."""
    gather = _gathers(seq, axis)
    if not torch.is_grad_enabled():                                    # evaluation: no backward to prepare
        if gather:
            x = C.all_gather_dim(x, axis.group, axis.size, SEQ_DIM, "seq")
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        bias = None if not biases else biases[0] if len(biases) == 1 else torch.cat(biases)
        return F.linear(x, weight, bias)
    return _ColumnLinear.apply(x, axis, gather, len(weights), *weights, *biases)


def _gathers(seq: MeshAxis | None, axis: MeshAxis) -> bool:
    if seq is None or seq.size == 1:
        return False
    if seq.name != axis.name:
        raise ValueError(f"sequence parallelism over axis {seq.name!r} needs the layer split over the same axis, "
                         f"not {axis.name!r}")
    return True


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

    def forward(self, x: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        biases = () if self.bias is None else (self.bias,)
        return copy_then_linear(x, (self.weight,), biases, self.axis, seq)   # (..., out_features / t)


def column_parallel_group(x: torch.Tensor, layers: Sequence[ColumnParallelLinear],
                          seq: MeshAxis | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs of several column-parallel layers that read the same input (one axis), computed as one
    GEMM behind one `f`; each layer's parameters get their own gradients. Without autograd (generation)
    the layers run one by one, so no weight is copied per token."""
    if not torch.is_grad_enabled():
        if _gathers(seq, layers[0].axis):
            x = C.all_gather_dim(x, layers[0].axis.group, layers[0].axis.size, SEQ_DIM, "seq")
        return tuple(F.linear(x, layer.weight, layer.bias) for layer in layers)
    biases = [layer.bias for layer in layers if layer.bias is not None]
    y = copy_then_linear(x, [layer.weight for layer in layers], biases, layers[0].axis, seq)
    return y.split([layer.weight.shape[0] for layer in layers], dim=-1)


class RowParallelLinear(nn.Module):
    """Y = X·Aᵀ with A split by input features: each rank's partial product is summed by `g` (with sequence
    parallelism: reduce-scattered along the sequence)."""

    def __init__(self, in_features: int, out_features: int, axis: MeshAxis, *, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        if in_features % axis.size:
            raise ValueError(f"RowParallelLinear: {in_features} input features do not split over "
                             f"axis {axis.name!r} of size {axis.size}")
        self.axis = axis
        self.weight = make_param(split_spec((out_features, in_features), 1, axis, std=std))
        self.bias = make_param(replicated_spec((out_features,), init="zeros", decay=False)) if bias else None

    def forward(self, x: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.axis, SEQ_DIM) if _gathers(seq, self.axis) else \
            reduce_from_parallel(y, self.axis)
        return y + self.bias if self.bias is not None else y
