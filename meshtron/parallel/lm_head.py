"""The output layer and loss over a vocabulary split across the vocab axis.

Invariant: logits stay split (each rank holds its vocabulary slice, padding cut off); the loss comes from
`vocab_parallel_cross_entropy`. One `f` on entry, so the backward sums the hidden-state gradient once.
With tied embeddings the head reads the embedding's weight and owns no parameter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm.ops import gather_from_parallel
from meshtron.layout import pad_to_multiple
from meshtron.mesh import MeshAxis
from meshtron.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from meshtron.parallel.embedding import VocabParallelEmbedding
from meshtron.parallel.linear import copy_then_linear
from meshtron.parallel.sharding import make_param, split_spec


class VocabParallelHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int, axis: MeshAxis, *, std: float = 0.02,
                 tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.axis, self.vocab_size = axis, vocab_size
        if tied is None:
            padded = pad_to_multiple(vocab_size, axis.size)
            self.weight = make_param(split_spec((vocab_size, d_model), 0, axis, padded=padded, std=std))
        self._tied = [tied]  # a list keeps the embedding out of this module's children
        spec = self._weight().shard
        self.vocab_start = spec.local_range()[0]
        self.n_valid = spec.local_valid()

    def _weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied[0] is not None else self.weight

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, V_local): this rank's real vocabulary columns."""
        w = self._weight()
        if self.n_valid != w.shape[0]:
            w = w[: self.n_valid]                                 # cut the padded rows
        return copy_then_linear(h, (w,), (), self.axis)          # f, overlapped with dW in backward

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """All vocabulary columns on every rank (for generation; training never gathers)."""
        logits = self.local_logits(h)
        if self.axis.size == 1:
            return logits
        per_rank = self._weight().shape[0]
        if self.n_valid != per_rank:                              # re-pad so every slice has one width
            logits = F.pad(logits, (0, per_rank - self.n_valid), value=float("-inf"))
        return gather_from_parallel(logits, self.axis)[..., : self.vocab_size]

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the tokens whose target is not IGNORE_INDEX."""
        per_token = vocab_parallel_cross_entropy(self.local_logits(h), targets, self.axis, self.vocab_start)
        n = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return per_token.sum() / n
