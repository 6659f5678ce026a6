"""GPT-2 (Radford et al. 2019) on a mesh: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings.

Invariant: the same code builds the model for every mesh; which tensors are split, and over which axis,
comes only from the layout. No collective is called here: the parallel layers communicate. Dropout sites
(embedding, attention probabilities, attention and MLP outputs) are keyed by their layer, so their masks
depend on logical positions only.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from meshtron.layout import Layout
from meshtron.models.base import CausalLM
from meshtron.models.config import ModelConfig
from meshtron.parallel import LayerNorm, ParallelAttention, ParallelMLP, VocabParallelEmbedding
from meshtron.parallel.lm_head import VocabParallelHead
from meshtron.parallel.random import ATTENTION_OUT, EMBEDDING, MLP_OUT, DropoutRNG, dropout
from meshtron.parallel.sharding import make_param, replicated_spec


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout, rng: DropoutRNG, layer: int):
        super().__init__()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ParallelAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, layout.axis("heads"), bias=True,
                                      std=std, out_std=out_std, dropout_p=cfg.dropout, rng=rng, layer=layer)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = ParallelMLP(cfg.d_model, cfg.ffn_dim, layout.axis("d_ff"), activation="gelu", bias=True,
                               std=std, out_std=out_std)
        self.p, self.rng, self.layer = cfg.dropout, rng, layer

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        rng, p, i, on = self.rng, self.p, self.layer, self.training
        x = x + dropout(self.attn(self.ln_1(x), cache), p, rng, i, ATTENTION_OUT, on)
        return x + dropout(self.mlp(self.ln_2(x)), p, rng, i, MLP_OUT, on)


class GPT(CausalLM):
    def build(self, cfg: ModelConfig, layout: Layout) -> None:
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, layout.axis("vocab"), std=cfg.init_std)
        self.wpe = make_param(replicated_spec((cfg.max_seq_len, cfg.d_model), std=0.01))
        self.blocks = nn.ModuleList(Block(cfg, layout, self.rng, i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.head = VocabParallelHead(cfg.d_model, cfg.vocab_size, layout.axis("vocab"), std=cfg.init_std,
                                      tied=self.wte if cfg.tied else None)

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """`cache` (a KVCache, for decoding): positions come from it, keys and values go into it."""
        T = idx.shape[1]
        pos = self.wpe[:T] if cache is None else self.wpe[cache.positions]   # (T, d) or (B, T, d)
        x = self.wte(idx) + pos                                              # (B, T, d)
        x = dropout(x, self.config.dropout, self.rng, -1, EMBEDDING, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        return self.ln_f(x)
