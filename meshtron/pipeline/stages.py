"""Which layers a rank of the `pipe` axis holds (the layout rule `layers:pipe`).

Invariant: with P pipeline ranks and V chunks per rank, the L layers form P·V contiguous virtual stages of
L/(P·V) layers; rank s holds virtual stages c·P + s for c = 0..V-1 (Megatron-LM's interleaved assignment; with
V = 1, rank s holds layers [s·L/P, (s+1)·L/P)). The embedding belongs to virtual stage 0 (rank 0), the final
norm, the output layer and the loss to virtual stage P·V - 1 (rank P - 1). Layers keep their global index, so
parameter names, initial values and dropout masks are those of one process.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StagePlan:
    n_layer: int
    stages: int = 1         # P: the pipe axis size
    rank: int = 0           # this rank's coordinate on the pipe axis
    chunks: int = 1         # V: virtual stages per rank

    def __post_init__(self):
        if self.n_layer % (self.stages * self.chunks):
            fits = [k for k in range(1, self.n_layer + 1) if self.n_layer % (k * self.chunks) == 0]
            raise ValueError(f"{self.n_layer} layers do not split into {self.stages} pipeline stages x "
                             f"{self.chunks} virtual stages: use a 'pipe' size in {fits} (with --virtual-stages "
                             f"{self.chunks}) or a layer count divisible by {self.stages * self.chunks}")

    @property
    def per_chunk(self) -> int:
        return self.n_layer // (self.stages * self.chunks)

    def chunk_layers(self, chunk: int) -> range:
        v = chunk * self.stages + self.rank
        return range(v * self.per_chunk, (v + 1) * self.per_chunk)

    @property
    def layers(self) -> list[int]:
        return [i for c in range(self.chunks) for i in self.chunk_layers(c)]

    @property
    def first(self) -> bool:
        """Holds virtual stage 0: the embedding."""
        return self.rank == 0

    @property
    def last(self) -> bool:
        """Holds the last virtual stage: the final norm, the output layer and the loss."""
        return self.rank == self.stages - 1

    def is_first_chunk(self, chunk: int) -> bool:
        return self.first and chunk == 0

    def is_last_chunk(self, chunk: int) -> bool:
        return self.last and chunk == self.chunks - 1


class LayerStack(nn.Module):
    """The transformer blocks a rank holds, named by their global index (`blocks.7.attn...`), iterated and indexed
    in order like a ModuleList."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for i, block in blocks.items():
            self.add_module(str(i), block)

    @property
    def ids(self) -> list[int]:
        return [int(k) for k in self._modules]

    def get(self, layer: int) -> nn.Module:
        return self._modules[str(layer)]

    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __reversed__(self):
        return reversed(list(self._modules.values()))
