"""The output layer and loss over a vocabulary split across the vocab axis.

Invariant: logits stay split (each rank holds its vocabulary slice, padding cut off); the loss comes from
`vocab_parallel_cross_entropy`. One `f` on entry, so the backward sums the hidden-state gradient once.
With tied embeddings the head reads the embedding's weight and owns no parameter.
With sequence parallelism the hidden state arrives split along the sequence: a vocabulary split over the same
axis gathers the hidden state (not the logits) on entry; a replicated vocabulary computes the logits and loss
of this rank's tokens only and sums the loss over the axis (`g`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm.ops import gather_from_parallel, gather_from_sequence, reduce_from_parallel, seq_chunk
from meshtron.layout import pad_to_multiple
from meshtron.mesh import MeshAxis
from meshtron.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from meshtron.parallel.embedding import VocabParallelEmbedding
from meshtron.parallel.linear import SEQ_DIM, copy_then_linear
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

    def _own_tokens(self, seq: MeshAxis | None) -> bool:
        """Sequence-split hidden state and a vocabulary not split over that axis: each rank keeps its tokens."""
        return seq is not None and seq.size > 1 and self.axis.name != seq.name

    def local_logits(self, h: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, V_local): this rank's real vocabulary columns (of its own tokens only, when
        `_own_tokens`)."""
        w = self._weight()
        if self.n_valid != w.shape[0]:
            w = w[: self.n_valid]                                 # cut the padded rows
        seq = None if self._own_tokens(seq) else seq
        return copy_then_linear(h, (w,), (), self.axis, seq)     # f, overlapped with dW in backward

    def full_logits(self, h: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        """All vocabulary columns on every rank (for generation; training never gathers)."""
        logits = self.local_logits(h, seq)
        if self._own_tokens(seq):
            logits = gather_from_sequence(logits, seq, SEQ_DIM)
        if self.axis.size == 1:
            return logits
        per_rank = self._weight().shape[0]
        if self.n_valid != per_rank:                              # re-pad so every slice has one width
            logits = F.pad(logits, (0, per_rank - self.n_valid), value=float("-inf"))
        return gather_from_parallel(logits, self.axis)[..., : self.vocab_size]

    def loss(self, h: torch.Tensor, targets: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        """Mean cross-entropy over the tokens whose target is not IGNORE_INDEX."""
        n = (targets != IGNORE_INDEX).sum().clamp(min=1)
        if self._own_tokens(seq):
            mine = seq_chunk(targets, seq, SEQ_DIM)
            per_token = vocab_parallel_cross_entropy(self.local_logits(h, seq), mine, self.axis, self.vocab_start)
            return reduce_from_parallel(per_token.sum(), seq) / n
        per_token = vocab_parallel_cross_entropy(self.local_logits(h, seq), targets, self.axis, self.vocab_start)
        return per_token.sum() / n
