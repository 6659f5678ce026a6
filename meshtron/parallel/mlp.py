"""The transformer MLP split over d_ff (Megatron): column-parallel up-projection(s), local activation,
row-parallel down-projection.

Invariant: one `f` on entry and one `g` on exit, whatever the activation: GELU (GPT-2, one up-projection)
or SwiGLU (Llama, gate and up projections as one GEMM behind the `f`); with sequence parallelism they are
an all-gather and a reduce-scatter along the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.mesh import MeshAxis
from meshtron.parallel.linear import ColumnParallelLinear, RowParallelLinear, column_parallel_group


class ParallelMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, axis: MeshAxis, *, activation: str, bias: bool,
                 std: float, out_std: float):
        super().__init__()
        if d_ff % axis.size:
            raise ValueError(f"d_ff={d_ff} is not divisible by mesh axis {axis.name!r} of size {axis.size}")
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"unknown MLP activation {activation!r}; use 'gelu' or 'swiglu'")
        self.axis, self.activation = axis, activation
        if activation == "swiglu":
            self.gate_proj = ColumnParallelLinear(d_model, d_ff, axis, bias=bias, std=std)
        self.up_proj = ColumnParallelLinear(d_model, d_ff, axis, bias=bias, std=std)
        self.down_proj = RowParallelLinear(d_ff, d_model, axis, bias=bias, std=out_std)

    def forward(self, x: torch.Tensor, seq: MeshAxis | None = None) -> torch.Tensor:
        """x (B, T, d), or with sequence parallelism (`seq`) this rank's chunk of the sequence."""
        if self.activation == "swiglu":
            gate, up = column_parallel_group(x, (self.gate_proj, self.up_proj), seq)  # f, one GEMM
            h = F.silu(gate) * up                                            # (B, T, d_ff / t)
        else:
            h = F.gelu(self.up_proj(x, seq), approximate="tanh")             # f; GPT-2's gelu_new
        return self.down_proj(h, seq)                                        # g
