"""A request's logits processors, applied to one slice of the vocabulary: `min_tokens`, `logit_bias`, and the
repetition, frequency and presence penalties.

Invariant: processing each rank's slice [start, start + V_local) and putting the slices side by side equals
processing the full logits, so they run before the split argmax or the gather and touch no other rank's columns.
Order (vLLM's): min_tokens (end-of-sequence ids to -inf while fewer tokens exist), logit_bias (added), repetition
(over prompt and output tokens: positive logits divided by it, negative ones multiplied, as transformers'
`RepetitionPenaltyLogitsProcessor`), then frequency and presence (over output tokens: minus frequency x count, minus
presence once a token occurs, as OpenAI documents). Temperature, top-k and top-p come after, in `sampling`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from meshtron.inference.sampling import SamplingParams


def needs_processing(p: SamplingParams) -> bool:
    return bool(p.min_tokens or p.logit_bias or p.repetition_penalty != 1 or p.frequency_penalty
                or p.presence_penalty)


def _in_slice(ids: Iterable[int], start: int, width: int, device) -> torch.Tensor:
    """The local column of each id that falls in [start, start + width)."""
    t = torch.as_tensor(list(ids), dtype=torch.long, device=device) - start
    return t[(t >= 0) & (t < width)]


def process(logits: torch.Tensor, start: int, params: list[SamplingParams], prompts: list[list[int]],
            outputs: list[list[int]], eos_ids: Iterable[int] = ()) -> torch.Tensor:
    """Row b of `logits` (B, V_local, columns [start, start + V_local)) processed for request `params[b]`, which
    has `prompts[b]` and has generated `outputs[b]` so far. Returns float32 logits (a new tensor if any row changed)."""
    rows = [b for b, p in enumerate(params) if needs_processing(p)]
    if not rows:
        return logits
    x = logits.float().clone()
    V, dev = x.shape[-1], x.device
    eos = list(eos_ids)
    for b in rows:
        p, row = params[b], x[b]
        if len(outputs[b]) < p.min_tokens and eos:
            row[_in_slice(eos, start, V, dev)] = float("-inf")
        if p.logit_bias:
            cols = torch.as_tensor([t - start for t in p.logit_bias if 0 <= t - start < V], dtype=torch.long,
                                   device=dev)
            bias = torch.as_tensor([v for t, v in p.logit_bias.items() if 0 <= t - start < V], dtype=x.dtype,
                                   device=dev)
            row.index_add_(0, cols, bias)
        if p.repetition_penalty != 1:
            seen = _in_slice(list(prompts[b]) + list(outputs[b]), start, V, dev).unique()
            vals = row[seen]
            row[seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and outputs[b]:
            counts = torch.bincount(_in_slice(outputs[b], start, V, dev), minlength=V).to(x.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return x
