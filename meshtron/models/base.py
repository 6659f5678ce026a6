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

from meshtron.layout import Layout, LayoutRules
from meshtron.mesh import Mesh
from meshtron.models.config import ModelConfig
from meshtron.parallel.random import DropoutRNG
from meshtron.parallel.sharding import init_parameters


class CausalLM(nn.Module):
    """Subclasses build their layers in `build(config, layout)`, define `hidden(idx, cache)` and set
    `self.head`; construction happens on the mesh's device."""

    def __init__(self, config: ModelConfig, mesh: Mesh, rules: LayoutRules | str | None = None, seed: int = 0):
        super().__init__()
        self.config, self.mesh, self.seed = config, mesh, seed
        self.layout = Layout.build(mesh, rules, config.dim_sizes())
        self.rng = DropoutRNG(seed)
        with torch.device(mesh.device):
            self.build(config, self.layout)
        init_parameters(self, seed)

    def build(self, config: ModelConfig, layout: Layout) -> None:
        raise NotImplementedError

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean loss (logits never gathered). Without: this rank's vocabulary slice of the
        logits, shape (B, T, V_local)."""
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        h = self.hidden(idx)
        return self.head.loss(h, targets) if targets is not None else self.head.local_logits(h)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V) on every rank."""
        return self.head.full_logits(self.hidden(idx))
