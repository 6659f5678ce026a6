"""What both model families share: layout validation, seeded initialisation, loss, logits and sampling.

Invariant: a model is validated against its mesh (`Layout.build`) before any parameter or collective
exists, and its parameters are initialised from the seed identically on every mesh.
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
    """Subclasses build their layers, define `hidden(idx)` and set `self.head`; then call `finish_init()`."""

    def __init__(self, config: ModelConfig, mesh: Mesh, rules: LayoutRules | str | None, seed: int):
        super().__init__()
        self.config, self.mesh, self.seed = config, mesh, seed
        self.layout = Layout.build(mesh, rules, config.dim_sizes())
        self.rng = DropoutRNG(seed, self.layout.axis("heads").coord)

    def finish_init(self) -> None:
        init_parameters(self, self.seed)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> torch.Tensor:
        """Sample continuation tokens (row b seeded with seed + b); every rank gets the same tokens. Decodes with
        a KV cache (meshtron.inference); past max_seq_len it slides a window without a cache."""
        if idx.shape[1] + max_new_tokens <= self.config.max_seq_len and max_new_tokens > 0:
            from meshtron.inference import SamplingParams, generate
            params = [SamplingParams(max_new_tokens, temperature, top_k or 0, seed=seed + b)
                      for b in range(idx.shape[0])]
            done = generate(self, idx.tolist(), params)
            return torch.cat([idx, torch.tensor([c.token_ids for c in done], dtype=idx.dtype, device=idx.device)], 1)
        g = torch.Generator().manual_seed(seed)
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.max_seq_len:]
            logits = self.logits(ctx)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=g).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
