"""Megatron's conjugate operators as autograd Functions, each over an explicit `MeshAxis`.

`f` (identity forward, all-reduce backward) is fused into the column-parallel GEMM that follows it
(`meshtron.parallel.linear.copy_then_linear`), so its backward all-reduce overlaps the weight gradients.

  reduce_from_parallel  `g`: all-reduce forward, identity backward (leaves it, after a row-parallel GEMM)
  gather_from_parallel  all-gather the last dimension forward, keep this rank's slice backward

With sequence parallelism (Korthikanti et al. 2022) the residual stream is split along the sequence over the
tensor-parallel axis, and `g` becomes a reduce-scatter along the sequence (the all-gather that replaces `f`
is fused into the column-parallel GEMM):
  reduce_scatter_to_sequence  reduce-scatter along `dim` forward, all-gather backward
  scatter_to_sequence         keep this rank's chunk of `dim` forward, all-gather backward
  gather_from_sequence        all-gather along `dim` forward, reduce-scatter backward
Invariant: on a trivial axis (size 1) every operator is the identity and issues nothing.
"""
from __future__ import annotations

import torch

from meshtron.comm import collectives as C
from meshtron.mesh import MeshAxis


def _gather_last(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    # all_gather concatenates along dim 0: move the last dim first, gather, move back.
    moved = x.movedim(-1, 0).contiguous()
    full = C.all_gather_into(moved, axis.group, axis.size)
    return full.movedim(0, -1).contiguous()


class _Reduce(torch.autograd.Function):
    """This is the `g` function of the Megatron paper."""
    @staticmethod
    def forward(ctx, x, axis):
        y = x.contiguous()
        if y is x:  # reduce in place, as Megatron does; tell autograd the input was overwritten
            ctx.mark_dirty(x)
        return C.all_reduce(y, axis.group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return _gather_last(x, axis)

    @staticmethod
    def backward(ctx, grad):
        n = grad.shape[-1] // ctx.axis.size
        return grad[..., ctx.axis.coord * n:(ctx.axis.coord + 1) * n].contiguous(), None


def reduce_from_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Reduce.apply(x, axis)


def gather_from_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Gather.apply(x, axis)



def seq_chunk(x: torch.Tensor, axis: MeshAxis, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of dimension `dim` (the sequence), as sequence parallelism splits it."""
    n = x.shape[dim] // axis.size
    return x.narrow(dim, axis.coord * n, n)


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return C.reduce_scatter_dim(x, axis.group, axis.size, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather_dim(grad, ctx.axis.group, ctx.axis.size, ctx.dim).contiguous(), None, None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return seq_chunk(x, axis, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather_dim(grad, ctx.axis.group, ctx.axis.size, ctx.dim).contiguous(), None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return C.all_gather_dim(x, axis.group, axis.size, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return C.reduce_scatter_dim(grad, ctx.axis.group, ctx.axis.size, ctx.dim).contiguous(), None, None


def reduce_scatter_to_sequence(x: torch.Tensor, axis: MeshAxis, dim: int = 1) -> torch.Tensor:
    return x if axis.group is None else _ReduceScatterSeq.apply(x, axis, dim)


def scatter_to_sequence(x: torch.Tensor, axis: MeshAxis, dim: int = 1) -> torch.Tensor:
    return x if axis.group is None else _ScatterSeq.apply(x, axis, dim)


def gather_from_sequence(x: torch.Tensor, axis: MeshAxis, dim: int = 1) -> torch.Tensor:
    return x if axis.group is None else _GatherSeq.apply(x, axis, dim)
