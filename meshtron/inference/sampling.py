"""What a sequence asks for (`SamplingParams`), and choosing its next token from full logits: greedy, or
temperature, top-k and top-p (nucleus) sampling. The logits processors (penalties, bias) are `penalties`.

Invariant: each sequence draws from its own generator, seeded by its request and advanced by exactly one
uniform per step, so a sequence's tokens do not depend on which other sequences share its batch; the draw is
an inverse-CDF lookup, so logits that differ by rounding (another mesh) pick the same token but at a boundary.
Order as in `transformers`: temperature, then top-k, then top-p.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    seed: int | None = None           # None: 0 (the server draws one per request)
    stop: tuple[str, ...] = field(default_factory=tuple)   # strings that end the text (trimmed from it)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: none; k >= 0: each new token's logprob and the k most likely
    prompt_logprobs: int | None = None   # likewise for the prompt's tokens (from the prefill pass)
    presence_penalty: float = 0.0     # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0   # transformers' (and vLLM's), over prompt and generated tokens; 1: off
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit
    min_tokens: int = 0               # end-of-sequence ids are masked until this many tokens exist

    MAX_LOGPROBS = 20

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {list(self.stop)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= self.MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {self.MAX_LOGPROBS}], got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.logit_bias is not None and any(not isinstance(t, int) or isinstance(t, bool) or not -100 <= b <= 100
                                               for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias maps token ids (integers) to biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator (its draws are the same whatever device the model is on), or None for greedy."""
    if params.greedy:
        return None
    return torch.Generator().manual_seed(params.seed if params.seed is not None else 0)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """Next token of each row of `logits` (B, V), full vocabulary, same on every rank that holds them."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out.tolist()
    x = logits[rows].float()                                              # (b, V)
    x = x / torch.tensor([params[i].temperature for i in rows], dtype=x.dtype, device=x.device)[:, None]
    V = x.shape[-1]
    limited = [j for j, i in enumerate(rows) if 0 < params[i].top_k < V]
    if limited:                                                           # top-k: below the k-th logit goes
        ks = torch.tensor([params[rows[j]].top_k for j in limited], device=x.device)
        sub = x[limited]
        kth = sub.topk(int(ks.max()), dim=-1).values.gather(1, ks[:, None] - 1)
        x[limited] = sub.masked_fill(sub < kth, float("-inf"))
    nucleus = [j for j, i in enumerate(rows) if params[i].top_p < 1]
    if nucleus:                                                           # top-p: the smallest likeliest set
        ps = torch.tensor([params[rows[j]].top_p for j in nucleus], dtype=x.dtype, device=x.device)[:, None]
        srt, order = x[nucleus].sort(dim=-1, descending=True)
        probs = srt.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                             # mass of the more likely tokens
        drop = before >= ps                                               # the top token is always kept
        kept = srt.masked_fill(drop, float("-inf"))
        x[nucleus] = torch.empty_like(kept).scatter_(1, order, kept)      # back to vocabulary order
    probs = x.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(cdf)[:, None]
    # the first token whose CDF exceeds u: tokens of probability 0 (flat CDF) are never picked
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=x.shape[-1] - 1)[:, 0]
    out[rows] = picked.to(out.dtype)
    return out.tolist()
