"""Model shapes: one dataclass for both families, and named presets from test-sized to GPT-2 XL and Llama-7B.

Invariant: a config fully determines the logical model (with a seed, its weights); it says nothing about
the mesh. `family` picks the architecture: 'gpt' (GPT-2: learned positions, LayerNorm, GELU, tied
embeddings, biases) or 'llama' (rotary, RMSNorm, SwiGLU, grouped-query attention, untied, no biases).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    family: str = "gpt"
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    n_kv_head: int | None = None      # None: as many as n_head (multi-head attention)
    d_ff: int | None = None           # None: 4 * d_model (gpt) or Llama's 8/3 rule rounded to 256
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # None: True for gpt, False for llama
    init_std: float = 0.02

    def __post_init__(self):
        if self.family not in ("gpt", "llama"):
            raise ValueError(f"model family {self.family!r} is unknown; use 'gpt' or 'llama'")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1): it is the probability of zeroing a unit")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt":
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)
        return 256 * ((hidden + 255) // 256)

    @property
    def tied(self) -> bool:
        return self.family == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    def dim_sizes(self) -> dict[str, int]:
        """Sizes of the named dimensions the layout rules split."""
        return {"vocab": self.vocab_size, "heads": self.n_head, "kv_heads": self.kv_heads,
                "d_ff": self.ffn_dim, "d_model": self.d_model, "head_dim": self.head_dim,
                "seq": self.max_seq_len, "layers": self.n_layer}

    def num_params(self) -> int:
        """Parameters of the logical (unpadded) model."""
        d, f, v, L = self.d_model, self.ffn_dim, self.vocab_size, self.n_layer
        kv = self.kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        if self.family == "gpt":
            attn += d + 2 * kv + d
            mlp = 2 * d * f + f + d
            norms = 2 * 2 * d
            extra = self.max_seq_len * d + 2 * d
        else:
            mlp = 3 * d * f
            norms = 2 * d
            extra = d
        head = 0 if self.tied else v * d
        return L * (attn + mlp + norms) + v * d + head + extra

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, no recompute): 6N plus attention's 12·L·d·s."""
        n = self.num_params() - (self.max_seq_len * self.d_model if self.family == "gpt" else 0)
        return 6 * n + 12 * self.n_layer * self.d_model * seq_len

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # test and laptop sizes
    "gpt-tiny": ModelConfig("gpt", vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64),
    "llama-tiny": ModelConfig("llama", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                              d_ff=64, max_seq_len=64),
    "gpt-mini": ModelConfig("gpt", vocab_size=257, n_layer=4, n_head=4, d_model=128, max_seq_len=128),
    "llama-mini": ModelConfig("llama", vocab_size=257, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                              d_ff=384, max_seq_len=128),
    "gpt-small-bench": ModelConfig("gpt", vocab_size=257, n_layer=4, n_head=4, d_model=256, max_seq_len=128),
    # GPT-2 (Radford et al. 2019)
    "gpt2": ModelConfig("gpt", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-medium": ModelConfig("gpt", vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-large": ModelConfig("gpt", vocab_size=50257, n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
    "gpt2-xl": ModelConfig("gpt", vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    # Llama (Touvron et al. 2023)
    "llama-7b": ModelConfig("llama", vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008,
                            max_seq_len=4096, norm_eps=1e-6),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
