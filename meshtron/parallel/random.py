"""Dropout random streams (Megatron's RNG tracker, without global state).

Invariant: `replicated` draws the same masks on every rank of the model axis (activations there are
replicated: all ranks must drop the same units); `parallel` is a per-rank stream seeded with
seed + 2718 + model-axis coordinate, for activations split across the axis (attention probabilities).
"""
from __future__ import annotations

import torch


class DropoutRNG:
    def __init__(self, seed: int, model_coord: int = 0):
        self.seed, self.model_coord = seed, model_coord
        self.replicated, self.parallel = torch.Generator(), torch.Generator()
        self.reseed(0)

    def reseed(self, step: int) -> None:
        """Streams are a function of (seed, step): a resumed run draws the masks an uninterrupted one would."""
        base = self.seed * 1_000_003 + step * 7919
        self.replicated.manual_seed(base)
        self.parallel.manual_seed(base + 2718 + self.model_coord)

    def state(self) -> dict:
        return {"replicated": self.replicated.get_state(), "parallel": self.parallel.get_state()}

    def load_state(self, state: dict) -> None:
        self.replicated.set_state(state["replicated"])
        self.parallel.set_state(state["parallel"])


def dropout(x: torch.Tensor, p: float, generator: torch.Generator, training: bool) -> torch.Tensor:
    """Inverted dropout drawing its mask from `generator` (CPU generator; the mask moves to x's device)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape, dtype=torch.float32).bernoulli_(1.0 - p, generator=generator)
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)
