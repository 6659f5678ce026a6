"""Llama (Touvron et al. 2023) on a mesh: rotary positions, pre-RMSNorm blocks, SwiGLU MLP, grouped-query
attention, untied input and output embeddings, no biases.

Invariant: the same code builds the model for every mesh; the layout decides what is split. No collective
is called here: the parallel layers communicate. Dropout (when configured: attention probabilities and the
residual branches) is keyed by layer and logical position only.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from meshtron.layout import Layout
from meshtron.models.base import CausalLM
from meshtron.models.config import ModelConfig
from meshtron.parallel import ParallelAttention, ParallelMLP, RMSNorm, Rotary, VocabParallelEmbedding
from meshtron.parallel.lm_head import VocabParallelHead
from meshtron.parallel.random import ATTENTION_OUT, MLP_OUT, DropoutRNG, dropout_add
from meshtron.pipeline.stages import LayerStack


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout, rng: DropoutRNG, rotary: Rotary, layer: int):
        super().__init__()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ParallelAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, layout.axis("heads"), bias=False,
                                      std=std, out_std=out_std, dropout_p=cfg.dropout, rng=rng, rotary=rotary,
                                      layer=layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = ParallelMLP(cfg.d_model, cfg.ffn_dim, layout.axis("d_ff"), activation="swiglu", bias=False,
                               std=std, out_std=out_std)
        self.p, self.rng, self.layer = cfg.dropout, rng, layer

    def forward(self, x: torch.Tensor, cache=None, seq=None) -> torch.Tensor:
        """`seq`: the axis the residual stream's sequence is split over (sequence parallelism), or None."""
        rng, p, i, on = self.rng, self.p, self.layer, self.training
        x = dropout_add(x, self.attn(self.attn_norm(x), cache, seq), p, rng, i, ATTENTION_OUT, on, seq)
        return dropout_add(x, self.mlp(self.mlp_norm(x), seq), p, rng, i, MLP_OUT, on, seq)


class Llama(CausalLM):
    def build(self, cfg: ModelConfig, layout: Layout) -> None:
        stage = self.stage
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        if stage.first or (cfg.tied and stage.last):      # the last stage of a pipeline holds a tied copy
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, layout.axis("vocab"), std=cfg.init_std)
        self.blocks = LayerStack({i: Block(cfg, layout, self.rng, self.rotary, i) for i in stage.layers})
        if stage.last:
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.head = VocabParallelHead(cfg.d_model, cfg.vocab_size, layout.axis("vocab"), std=cfg.init_std,
                                          tied=self.embed if cfg.tied else None)

    def tied_copy(self):
        return self.embed.weight if self.config.tied and self.stage.last and not self.stage.first else None

    def embedding_weight(self):
        return self.embed.weight

    @property
    def final_norm(self):
        return self.norm

    def embed_tokens(self, idx: torch.Tensor, seq=None, cache=None) -> torch.Tensor:
        """Token embeddings (rotary positions are applied in attention); under sequence parallelism this rank's
        chunk of the sequence."""
        return self.embed(idx, seq)
