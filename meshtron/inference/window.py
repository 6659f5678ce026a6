"""Sampling a continuation of token ids, past the model's context if asked: the training loop's final sample.

Invariant: while prompt + continuation fit the context, this is the KV-cache engine (`generate`); beyond it the
newest `max_seq_len` tokens are re-read at every step (no cache), as nanoGPT's sampler does. Row b is seeded
with seed + b; every rank of the mesh returns the same tokens.
"""
from __future__ import annotations

import torch

from meshtron.inference.engine import generate
from meshtron.inference.sampling import SamplingParams


@torch.no_grad()
def sample_ids(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               seed: int = 0) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens) ids."""
    if idx.shape[1] + max_new_tokens <= model.config.max_seq_len:
        if max_new_tokens <= 0:
            return idx
        params = [SamplingParams(max_new_tokens, temperature, top_k or 0, seed=seed + b, ignore_eos=True)
                  for b in range(idx.shape[0])]
        done = generate(model, idx.tolist(), params)
        new = torch.tensor([c.token_ids for c in done], dtype=idx.dtype, device=idx.device)
        return torch.cat([idx, new], 1)
    g = torch.Generator().manual_seed(seed)
    device = model.mesh.device
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.config.max_seq_len:].to(device)
        logits = model.logits(ctx)[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True).cpu()
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=g)
        idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
    return idx
