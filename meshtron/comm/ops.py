"""Megatron's conjugate operators as autograd Functions, each over an explicit `MeshAxis`.

  copy_to_parallel      `f`: identity forward, all-reduce backward (enters a tensor-parallel region)
  reduce_from_parallel  `g`: all-reduce forward, identity backward (leaves it, after a row-parallel GEMM)
  gather_from_parallel  all-gather the last dimension forward, keep this rank's slice backward
  scatter_to_parallel   keep this rank's slice of the last dimension forward, all-gather backward
Invariant: on a trivial axis (size 1) every operator is the identity and issues nothing.
"""
from __future__ import annotations

import torch

from meshtron.comm import collectives as C
from meshtron.mesh import MeshAxis


def _split_last(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    n = x.shape[-1] // axis.size
    return x[..., axis.coord * n:(axis.coord + 1) * n].contiguous()


def _gather_last(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    # all_gather concatenates along dim 0: move the last dim first, gather, move back.
    moved = x.movedim(-1, 0).contiguous()
    full = C.all_gather_into(moved, axis.group, axis.size)
    return full.movedim(0, -1).contiguous()


class _Copy(torch.autograd.Function):
    """This is the `f` function of the Megatron paper."""
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x

    @staticmethod
    def backward(ctx, grad):
        return C.all_reduce(grad.contiguous(), ctx.axis.group), None


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
        return _split_last(grad, ctx.axis), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return _split_last(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.axis), None


def copy_to_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Copy.apply(x, axis)


def reduce_from_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Reduce.apply(x, axis)


def gather_from_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Gather.apply(x, axis)


def scatter_to_parallel(x: torch.Tensor, axis: MeshAxis) -> torch.Tensor:
    return x if axis.group is None else _Scatter.apply(x, axis)
