"""Metadata on every parameter saying how it is split, and the generic code built on it.

Invariant: every parameter of a meshtron model carries `param.shard` (a `ShardSpec`): its logical
(unpadded) full shape, the dimension split over which mesh axis (or none: replicated), the padded size
of that dimension, and how to initialise the full tensor. Initialisation keys each element's random number
by (seed, parameter name, logical index) (`meshtron.parallel.random`), so every rank draws only its own
slice, on its own device, and a seed gives the same logical model on every mesh. Gathering, loading,
clipping and checkpoints read only this metadata.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from meshtron.comm import collectives as C
from meshtron.mesh import Mesh, MeshAxis
from meshtron.parallel.random import fold_key, normal_


@dataclass(frozen=True)
class ShardSpec:
    full_shape: tuple[int, ...]      # logical shape, without vocabulary padding
    split_dim: int | None = None     # dimension split over `axis` (None: replicated)
    axis: str | None = None          # mesh axis name
    axis_size: int = 1
    axis_coord: int = 0
    padded: int | None = None        # size of split_dim after padding (None: no padding)
    init: str = "normal"             # normal | zeros | ones
    std: float = 0.02
    decay: bool = True               # weight decay applies (False for norms and biases)

    @property
    def is_split(self) -> bool:
        return self.split_dim is not None and self.axis_size > 1

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        if self.split_dim is not None:
            shape[self.split_dim] = (self.padded or shape[self.split_dim]) // self.axis_size
        return tuple(shape)

    def local_range(self) -> tuple[int, int]:
        """[start, end) of this rank's slice along split_dim, in padded coordinates."""
        n = self.local_shape()[self.split_dim]
        return self.axis_coord * n, (self.axis_coord + 1) * n

    def local_valid(self) -> int:
        """How many of this rank's rows along split_dim are real (not padding)."""
        start, end = self.local_range()
        return max(0, min(end, self.full_shape[self.split_dim]) - start)


def make_param(spec: ShardSpec) -> nn.Parameter:
    """An uninitialised parameter of the local shape, on the default device (the model's: see CausalLM)."""
    p = nn.Parameter(torch.empty(spec.local_shape()))
    p.shard = spec
    return p


def split_spec(full_shape, split_dim, axis: MeshAxis, *, padded=None, **kw) -> ShardSpec:
    if axis.size == 1:
        return ShardSpec(tuple(full_shape), split_dim, axis.name, 1, 0, padded, **kw)
    return ShardSpec(tuple(full_shape), split_dim, axis.name, axis.size, axis.coord, padded, **kw)


def replicated_spec(full_shape, **kw) -> ShardSpec:
    return ShardSpec(tuple(full_shape), None, None, 1, 0, None, **kw)


def local_slice(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's shard of a full logical tensor (padding with zeros where needed)."""
    if spec.split_dim is None:
        return full
    if spec.padded and spec.padded != full.shape[spec.split_dim]:
        pad_shape = list(full.shape)
        pad_shape[spec.split_dim] = spec.padded - full.shape[spec.split_dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=spec.split_dim)
    start, end = spec.local_range()
    return full.narrow(spec.split_dim, start, end - start)


def param_key(seed: int, name: str) -> int:
    return fold_key(seed, zlib.crc32(name.encode()))


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill each parameter's local shard with its slice of the seeded logical tensor (padding rows zero)."""
    for name, p in model.named_parameters():
        spec: ShardSpec = p.shard
        if spec.init == "zeros":
            p.zero_()
            continue
        if spec.init == "ones":
            p.fill_(1.0)
            continue
        offsets = [0] * len(spec.full_shape)
        real = p
        if spec.split_dim is not None:
            offsets[spec.split_dim] = spec.local_range()[0]
            valid = spec.local_valid()
            p.narrow(spec.split_dim, valid, p.shape[spec.split_dim] - valid).zero_()
            real = p.narrow(spec.split_dim, 0, valid)
        normal_(real, param_key(seed, name), offsets, spec.full_shape, spec.std)


def gather_full(tensor: torch.Tensor, spec: ShardSpec, mesh: Mesh) -> torch.Tensor:
    """Reassemble the full logical tensor (padding removed) from the shards on `spec.axis`."""
    if not spec.is_split:
        full = tensor
    else:
        axis = mesh.axis(spec.axis)
        moved = tensor.detach().movedim(spec.split_dim, 0).contiguous()
        full = C.all_gather_into(moved, axis.group, axis.size).movedim(0, spec.split_dim)
    return full.narrow(spec.split_dim, 0, spec.full_shape[spec.split_dim]) if spec.split_dim is not None \
        else full


def full_state_dict(model: nn.Module, mesh: Mesh, grads: bool = False) -> dict[str, torch.Tensor]:
    """name -> full logical parameter (or gradient), identical on every rank."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        if t is None:
            t = torch.zeros_like(p)
        out[name] = gather_full(t, p.shard, mesh).clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy each full logical tensor's local shard into the model; names and shapes must match."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        full = state[name]
        if tuple(full.shape) != p.shard.full_shape:
            raise ValueError(f"parameter {name}: checkpoint has shape {tuple(full.shape)}, model expects "
                             f"{p.shard.full_shape}: the checkpoint is from another model shape")
        p.copy_(local_slice(full.to(p.dtype), p.shard))
