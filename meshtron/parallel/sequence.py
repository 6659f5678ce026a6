"""Sequence parallelism's gradient rule (Korthikanti et al. 2022).

Invariant: under sequence parallelism over mesh axis `a` (layout rule `seq:a`), a parameter that is not split
over `a` — norm gains and biases, row-parallel biases, learned positions, a replicated vocabulary — is applied
to this rank's chunk of the sequence only, so its gradient is a partial sum over those tokens. After the
backward pass these gradients are summed over `a` once, in one flat buffer, which makes them identical on
every rank of the axis (as without sequence parallelism). Skipping this sum was Megatron-LM's issue #1446:
final LayerNorm gradients that differ across tensor-parallel ranks.
"""
from __future__ import annotations

import torch
from torch import nn

from meshtron.comm import collectives as C


def partial_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients are partial under the model's sequence parallelism (none without it)."""
    seq = model.seq_axis
    if seq.size == 1:
        return []
    return [p for p in model.parameters() if p.requires_grad and not (p.shard.is_split and p.shard.axis == seq.name)]


@torch.no_grad()
def reduce_partial_grads(model: nn.Module) -> None:
    """Sum the partial gradients over the sequence axis (call once per optimizer step, after backward)."""
    grads = [p.grad for p in partial_grad_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    C.all_reduce(flat, model.seq_axis.group)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
