"""Vocab-parallel cross-entropy (Megatron): the loss from vocabulary-split logits, never gathering them.

Invariant: forward issues exactly three all-reduces of one value per token over the vocab axis
(MAX of the logits, SUM of the target logit, SUM of exp); backward is local: softmax minus one-hot.
Targets equal to `ignore_index` contribute zero loss and zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshtron.comm import collectives as C
from meshtron.mesh import MeshAxis

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, axis, vocab_start):
        # logits: (N, V_local) real columns of this rank's slice; target: (N,) global ids
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        C.all_reduce(logits_max, axis.group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        n_local = shifted.shape[-1]
        local_t = target - vocab_start
        in_slice = (local_t >= 0) & (local_t < n_local)
        local_t = local_t.masked_fill(~in_slice, 0)
        rows = torch.arange(shifted.shape[0], device=shifted.device)
        target_logit = shifted[rows, local_t].masked_fill(~in_slice, 0.0)
        C.all_reduce(target_logit, axis.group)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        C.all_reduce(sum_exp, axis.group)
        loss = sum_exp.log() - target_logit
        ignored = target == IGNORE_INDEX
        loss = loss.masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))                    # softmax, reused by backward
        ctx.save_for_backward(exp, local_t, in_slice, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, in_slice, ignored = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= in_slice.to(grad.dtype)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, axis: MeshAxis,
                                 vocab_start: int = 0) -> torch.Tensor:
    """Per-token loss, shape of `target`. `logits` (..., V_local) holds columns [vocab_start, +V_local)."""
    shape = target.shape
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            axis, vocab_start)
    return loss.view(shape)
