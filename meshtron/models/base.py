"""What both model families share: layout validation, construction on the mesh's device, seeded
initialisation, the loss and the logits.

Invariant: a model is validated against its mesh (`Layout.build`) before any parameter or collective
exists; its parameters are created directly on `mesh.device` and initialised from the seed by the
counter-based scheme of `meshtron.parallel.random`, so every rank draws only its own shard and the logical
model is identical on every mesh and device.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtron.layout import Layout, LayoutRules
from meshtron.mesh import Mesh
from meshtron.models.config import ModelConfig
from meshtron.parallel.random import DropoutRNG
from meshtron.parallel.sharding import init_parameters

RECOMPUTE = ("none", "selective", "full")


class CausalLM(nn.Module):
    """Subclasses build their layers in `build(config, layout)`, define `hidden(idx, cache)` and set
    `self.head`; construction happens on the mesh's device."""

    def __init__(self, config: ModelConfig, mesh: Mesh, rules: LayoutRules | str | None = None, seed: int = 0):
        super().__init__()
        self.config, self.mesh, self.seed = config, mesh, seed
        self.layout = Layout.build(mesh, rules, config.dim_sizes())
        self.seq_axis = self.layout.axis("seq")
        self.rng = DropoutRNG(seed)
        self.recompute = "none"
        with torch.device(mesh.device):
            self.build(config, self.layout)
        init_parameters(self, seed)

    def build(self, config: ModelConfig, layout: Layout) -> None:
        raise NotImplementedError

    def set_recompute(self, kind: str) -> None:
        """Activation recompute in training: 'none'; 'selective' (core attention: scores, softmax, dropout,
        probability-weighted values); 'full' (each block keeps only its input and runs again in backward)."""
        if kind not in RECOMPUTE:
            raise ValueError(f"recompute {kind!r} is unknown: use one of {', '.join(RECOMPUTE)}")
        self.recompute = kind
        for block in self.blocks:
            block.attn.recompute = kind == "selective"

    def run_blocks(self, x: torch.Tensor, cache=None, seq=None) -> torch.Tensor:
        """The transformer blocks in order; under full recompute each keeps only its input for backward and runs
        again there, at the dropout position of its forward (so with the same masks)."""
        full = self.recompute == "full" and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if full:
                x = checkpoint(self._recomputed, block, x, seq, self.rng.position, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = block(x, None if cache is None else cache.layers[i], seq)
        return x

    def _recomputed(self, block, x, seq, position):
        with self.rng.at(position):
            return block(x, None, seq)

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        raise NotImplementedError

    def sequence_axis(self, idx: torch.Tensor, cache=None):
        """The axis the residual stream's sequence is split over in this forward (the layout's `seq` rule), or
        None: decoding with a KV cache, and layouts without the rule, keep whole sequences."""
        seq = self.seq_axis
        if cache is not None or seq.size == 1:
            return None
        if idx.shape[1] % seq.size:
            raise ValueError(f"sequence parallelism over {seq.name!r} (size {seq.size}) needs sequences whose length "
                             f"is a multiple of {seq.size}; got {idx.shape[1]} tokens")
        return seq

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean loss (logits never gathered). Without: this rank's vocabulary slice of the
        logits, shape (B, T, V_local)."""
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        h = self.hidden(idx)
        seq = self.sequence_axis(idx)
        if targets is not None:
            return self.head.loss(h, targets, seq)
        return self.head.full_logits(h, seq) if seq is not None and self.head.axis.size == 1 else \
            self.head.local_logits(h, seq)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V) on every rank."""
        return self.head.full_logits(self.hidden(idx), self.sequence_axis(idx))
