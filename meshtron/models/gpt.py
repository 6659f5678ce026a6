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
from meshtron.parallel.random import (ATTENTION_OUT, EMBEDDING, MLP_OUT, DropoutRNG, dropout_add,
                                      residual_dropout)
from meshtron.parallel.sharding import make_param, replicated_spec
from meshtron.pipeline.stages import LayerStack


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

    def forward(self, x: torch.Tensor, cache=None, seq=None) -> torch.Tensor:
        """`seq`: the axis the residual stream's sequence is split over (sequence parallelism), or None."""
        rng, p, i, on = self.rng, self.p, self.layer, self.training
        x = dropout_add(x, self.attn(self.ln_1(x), cache, seq), p, rng, i, ATTENTION_OUT, on, seq)
        return dropout_add(x, self.mlp(self.ln_2(x), seq), p, rng, i, MLP_OUT, on, seq)


class GPT(CausalLM):
    def build(self, cfg: ModelConfig, layout: Layout) -> None:
        stage = self.stage
        if stage.first or (cfg.tied and stage.last):      # the last stage of a pipeline holds a tied copy
            self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, layout.axis("vocab"), std=cfg.init_std)
        if stage.first:
            self.wpe = make_param(replicated_spec((cfg.max_seq_len, cfg.d_model), std=0.01))
        self.blocks = LayerStack({i: Block(cfg, layout, self.rng, i) for i in stage.layers})
        if stage.last:
            self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps)
            self.head = VocabParallelHead(cfg.d_model, cfg.vocab_size, layout.axis("vocab"), std=cfg.init_std,
                                          tied=self.wte if cfg.tied else None)

    def tied_copy(self):
        return self.wte.weight if self.config.tied and self.stage.last and not self.stage.first else None

    def embedding_weight(self):
        return self.wte.weight

    @property
    def final_norm(self):
        return self.ln_f

    def embed_tokens(self, idx: torch.Tensor, seq=None, cache=None) -> torch.Tensor:
        """Token plus position embeddings (positions from the cache when decoding), then dropout; under sequence
        parallelism this rank's chunk of the sequence."""
        x = self.wte(idx, seq)                                               # (B, T, d) or (B, T/t, d)
        if cache is not None:
            x = x + self.wpe[cache.positions]                                # (B, T, d): per sequence
        else:
            T, t0 = x.shape[1], 0 if seq is None else seq.coord * x.shape[1]
            x = x + self.wpe[t0:t0 + T]
        return residual_dropout(x, self.config.dropout, self.rng, -1, EMBEDDING, self.training, seq)
