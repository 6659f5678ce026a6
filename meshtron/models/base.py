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
from torch.utils.checkpoint import checkpoint

from meshtron.layout import Layout, LayoutRules
from meshtron.mesh import Mesh
from meshtron.models.config import ModelConfig
from meshtron.parallel.random import DropoutRNG
from meshtron.parallel.sharding import init_parameters

RECOMPUTE = ("none", "selective", "full")


class CausalLM(nn.Module):
    """Subclasses build this rank's layers in `build(config, layout)` (those of `self.stage`: all of them without
    a pipeline axis), and define `embed_tokens(idx, seq, cache)` and `final_norm`; `self.head` is the output
    layer and loss. Construction happens on the mesh's device.

    With a `pipe` axis (layout rule `layers:pipe`) a rank holds only its stage's blocks (plus the embedding on
    the first stage and the norm, head and loss on the last; with tied embeddings the last stage holds a copy of
    the embedding, initialised identically: `tied_copy`); the pipeline runner drives it chunk by chunk
    (`chunk_forward`)."""

    def __init__(self, config: ModelConfig, mesh: Mesh, rules: LayoutRules | str | None = None, seed: int = 0,
                 virtual_stages: int = 1):
        super().__init__()
        from meshtron.pipeline.stages import StagePlan
        self.config, self.mesh, self.seed = config, mesh, seed
        self.layout = Layout.build(mesh, rules, config.dim_sizes())
        self.seq_axis = self.layout.axis("seq")
        pipe = self.layout.axis("layers")
        self.stage = StagePlan(config.n_layer, pipe.size, pipe.coord, virtual_stages)
        self.rng = DropoutRNG(seed)
        self.recompute = "none"
        with torch.device(mesh.device):
            self.build(config, self.layout)
        init_parameters(self, seed)

    @property
    def pipelined(self) -> bool:
        return self.stage.stages > 1

    def tied_copy(self) -> nn.Parameter | None:
        """The last stage's copy of a tied embedding (its gradient is summed with the first stage's), or None."""
        return None

    def tied_embedding(self) -> nn.Parameter | None:
        """On the first and last stage of a pipeline with tied embeddings, this stage's embedding weight (whose
        gradients the two stages sum); None otherwise."""
        if not (self.pipelined and self.config.tied and (self.stage.first or self.stage.last)):
            return None
        return self.head._weight() if self.stage.last else self.embedding_weight()

    def embedding_weight(self) -> nn.Parameter:
        raise NotImplementedError

    def build(self, config: ModelConfig, layout: Layout) -> None:
        raise NotImplementedError

    def set_recompute(self, kind: str) -> None:
        """Activation recompute in training: 'none'; 'selective' (core attention: scores, softmax, dropout,
        probability-weighted values); 'full' (each block keeps only its input and runs again in backward)."""
        if kind not in RECOMPUTE:
            raise ValueError(f"recompute {kind!r} is unknown: use one of {', '.join(RECOMPUTE)}")
        self.recompute = kind
        for block in self.blocks:
            block.attn.recompute = kind == "selective"

    def run_blocks(self, x: torch.Tensor, cache=None, seq=None, layers=None) -> torch.Tensor:
        """The transformer blocks in order (those of `layers`, global indices, or all this rank holds); under full
        recompute each keeps only its input for backward and runs again there, at the dropout position of its
        forward (so with the same masks)."""
        full = self.recompute == "full" and self.training and cache is None and torch.is_grad_enabled()
        blocks = self.blocks if layers is None else [self.blocks.get(i) for i in layers]
        for i, block in enumerate(blocks):
            if full:
                x = checkpoint(self._recomputed, block, x, seq, self.rng.position, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = block(x, None if cache is None else cache.layers[i], seq)
        return x

    def _recomputed(self, block, x, seq, position):
        with self.rng.at(position):
            return block(x, None, seq)

    def embed_tokens(self, idx: torch.Tensor, seq=None, cache=None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """`cache` (a KVCache, for decoding): positions come from it, keys and values go into it. Without a cache,
        under sequence parallelism, the result is this rank's chunk of the sequence."""
        if self.pipelined:
            raise ValueError(f"this model is split over a {self.stage.stages}-stage pipeline (mesh "
                             f"{self.mesh.spec!r}): run it through meshtron.pipeline, or load its checkpoint on a "
                             f"mesh without a 'pipe' axis to generate or evaluate")
        seq = self.sequence_axis(idx, cache)
        x = self.embed_tokens(idx, seq, cache)
        return self.final_norm(self.run_blocks(x, cache, seq))

    def chunk_forward(self, chunk: int, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One virtual stage of the pipeline: token ids (the first chunk) or the previous stage's hidden state in;
        the mean loss (the last chunk) or this stage's hidden state out."""
        seq = self.seq_axis if self.seq_axis.size > 1 else None
        if self.stage.is_first_chunk(chunk):
            seq = self.sequence_axis(x)
            x = self.embed_tokens(x, seq)
        x = self.run_blocks(x, None, seq, self.stage.chunk_layers(chunk))
        if self.stage.is_last_chunk(chunk):
            return self.head.loss(self.final_norm(x), targets, seq)
        return x

    def sequence_axis(self, idx: torch.Tensor, cache=None):
        """The axis the residual stream's sequence is split over in this forward (the layout's `seq` rule), or
        None: decoding with a KV cache, layouts without the rule, and evaluation of a length the axis does not
        divide keep whole sequences."""
        seq = self.seq_axis
        if cache is not None or seq.size == 1:
            return None
        if idx.shape[1] % seq.size and not self.training:     # inference on any length: whole sequences
            return None
        if idx.shape[1] % seq.size:
            raise ValueError(f"sequence parallelism over {seq.name!r} (size {seq.size}) needs sequences whose length "
                             f"is a multiple of {seq.size}; got {idx.shape[1]} tokens")
        return seq

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean loss (logits never gathered). Without: this rank's vocabulary slice of the
        logits, shape (B, T, V_local)."""
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        h = self.hidden(idx)
        seq = self.sequence_axis(idx)
        if targets is not None:
            return self.head.loss(h, targets, seq)
        return self.head.full_logits(h, seq) if seq is not None and self.head.axis.size == 1 else \
            self.head.local_logits(h, seq)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V) on every rank."""
        return self.head.full_logits(self.hidden(idx), self.sequence_axis(idx))
