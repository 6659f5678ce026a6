"""Vocab-parallel embedding: each rank owns a contiguous slice of the (padded) vocabulary.

Invariant: ids outside this rank's slice look up nothing (their rows are zeroed) and `g` sums the slices,
so the result equals a full lookup. The vocabulary is padded to a multiple of the axis size; padded rows
are initialised to zero, are never looked up, and are cut from the logits before the loss. With sequence
parallelism (`seq`) the output is this rank's chunk of the sequence: the slices are reduce-scattered along
the sequence, or, with a vocabulary not split over that axis, only this rank's tokens are looked up.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.comm.ops import reduce_from_parallel, reduce_scatter_to_sequence, seq_chunk
from meshtron.layout import pad_to_multiple
from meshtron.mesh import MeshAxis
from meshtron.parallel.sharding import make_param, split_spec


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, axis: MeshAxis, *, std: float = 0.02):
        super().__init__()
        self.axis, self.vocab_size = axis, vocab_size
        padded = pad_to_multiple(vocab_size, axis.size)
        self.weight = make_param(split_spec((vocab_size, dim), 0, axis, padded=padded, std=std))
        self.vocab_start, self.vocab_end = self.weight.shard.local_range()
        self.n_valid = self.weight.shard.local_valid()   # real (unpadded) rows on this rank

    def forward(self, ids: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        if os.environ.get("MESHTRON_DEBUG") == "1" and ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0].item()   # a split vocabulary would look up nothing
            raise IndexError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) (MESHTRON_DEBUG=1)")
        split_seq = seq is not None and seq.size > 1
        if split_seq and seq.name != self.axis.name:
            ids = seq_chunk(ids, seq, 1)                  # this rank's tokens of the sequence
        if self.axis.size == 1 or (split_seq and seq.name != self.axis.name):
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight)            # (B, T, d), wrong rows where outside
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out, self.axis, 1) if split_seq else reduce_from_parallel(out, self.axis)
