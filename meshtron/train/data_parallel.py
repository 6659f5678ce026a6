"""Gradient synchronisation beyond one stage's backward: the batch axis (when DDP's hooks cannot be used, as
under a pipeline schedule, whose micro-batches interleave forwards and backwards) and tied embeddings split over
pipeline stages.

Invariants:
- `average_grads` leaves every gradient averaged over the batch axis: flat buckets, one all-reduce each.
- `EmbeddingGroup` joins the first and last pipeline stage of each (batch, model) coordinate (Megatron's embedding
  group): after backward, the two copies of a tied embedding get the sum of both stages' gradients, so they stay
  identical after every update, as the single tensor of one process does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshtron.comm import collectives as C


@torch.no_grad()
def average_grads(params, axis, bucket_mb: float = 25.0) -> None:
    """Average the gradients of `params` over `axis` (no-op on a trivial axis)."""
    if axis.group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    cap = max(1, int(bucket_mb * 2 ** 20 / 4))
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None and (not bucket or size + g.numel() <= cap):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch._utils._flatten_dense_tensors(bucket)
            C.all_reduce(flat.div_(axis.size), axis.group)
            for t, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t.copy_(reduced)
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


class EmbeddingGroup:
    """The first and last rank of this rank's pipeline (same coordinates on every other axis)."""

    def __init__(self, mesh, pipe_axis: str):
        self.group = None
        names = list(mesh.shape)
        grid = mesh.rank_grid().movedim(names.index(pipe_axis), 0)
        pairs = grid.reshape(grid.shape[0], -1)
        for col in range(pairs.shape[1]):                   # every rank creates every group, in the same order
            ranks = sorted({int(pairs[0, col]), int(pairs[-1, col])})
            group = dist.new_group(ranks)
            if mesh.rank in ranks:
                self.group = group
                C.register_group(group, "embedding", tuple(ranks))

    @torch.no_grad()
    def sum_tied(self, param: torch.nn.Parameter | None) -> None:
        """Sum the tied embedding's gradient over the two stages (call on both, after backward)."""
        if param is not None and param.grad is not None:
            C.all_reduce(param.grad, self.group)
