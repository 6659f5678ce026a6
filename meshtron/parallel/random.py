"""Counter-based randomness keyed by logical position: dropout masks and initial weights.

Invariant: every random number is a pure function of a key (seed, what it is for) and the *logical* index of
the element it belongs to in the full, unsplit tensor: never of the mesh, the rank, the micro-batch split, or
how many numbers were drawn before. So each rank evaluates exactly its own slice, on its own device, and every
layout (and a run resumed anywhere) sees the same numbers as one process.

The generator is SplitMix64's output function (Steele et al. 2014): state = key + index * golden, then the
64-bit finaliser (two multiply-xorshift rounds). It is evaluated with int64 tensor arithmetic, which wraps
modulo 2**64 on CPU and CUDA alike; right shifts are masked to be logical. A dropout mask packs four 16-bit
uniforms into each 64-bit hash along the last dimension, so a mask costs a quarter of a hash per element.

Dropout positions: `DropoutRNG` holds the seed and the trainer's position — the optimizer step and the global
row of the first sequence of the current micro-batch — and each dropout site names its layer and kind, so a
mask element is keyed by (seed, step, layer, site, global row, position, head or feature).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from meshtron.parallel import cpu_kernels

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def fold_key(*parts: int) -> int:
    """A 64-bit key from integers (Python-side, exact): each part is absorbed by one SplitMix64 step."""
    z = 0x6A09E667F3BCC908
    for p in parts:
        z = _mix_int(z + _GOLDEN + (int(p) & _M64))
    return _signed(z)


def hash64(index: torch.Tensor, key: int) -> torch.Tensor:
    """SplitMix64 of `key + index * golden`, elementwise over an int64 tensor (the input is consumed)."""
    z = index.mul_(_signed(_GOLDEN)).add_(key)
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        z ^= (z >> shift) & ((1 << (64 - shift)) - 1)
        z.mul_(_signed(mult))
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def logical_index(shape, offsets, full, device, group: int = 1) -> torch.Tensor:
    """The row-major linear index, in the full tensor of shape `full`, of each element of the local block of
    `shape` that starts at `offsets`. With `group` > 1 the last dimension is counted in groups of `group`
    elements (the block must span it whole): the result's last dimension is ceil(n / group)."""
    shape, offsets, full = list(shape), list(offsets), list(full)
    if group > 1:
        if offsets[-1] != 0 or shape[-1] != full[-1]:
            raise ValueError("a grouped last dimension must be whole on every rank")
        shape[-1] = full[-1] = -(-full[-1] // group)
    idx = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        coord = torch.arange(offsets[d], offsets[d] + shape[d], dtype=torch.int64, device=device) * stride
        idx = idx + coord.view([-1 if i == d else 1 for i in range(len(shape))])
        stride *= full[d]
    return idx


MASK_CHUNK_HASHES = 1 << 15   # hashes per chunk: 256 KiB of int64 temporaries stay in cache (measured 35% faster
                              # than one pass over a 4M-element mask)


def keep_mask(key: int, shape, offsets, full, p: float, device) -> torch.Tensor:
    """Bool mask of the local block (True: keep), each element kept with probability 1 - round(p * 2**16) / 2**16.
    Drawn in cache-sized blocks along the leading dimensions (the same values: each is a function of its index)."""
    out = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    offsets, full, threshold = list(offsets), list(full), round(p * 65536) - 32768
    if out.dim() and (offsets[-1] != 0 or shape[-1] != full[-1]):
        raise ValueError("a grouped last dimension must be whole on every rank")
    if not cpu_kernels.fill_keep_mask(out, key, offsets, full, threshold):
        _fill_keep_mask(out, key, offsets, full, threshold)
    return out


def _fill_keep_mask(out: torch.Tensor, key: int, offsets, full, threshold: int) -> None:
    shape = list(out.shape)
    hashes = out.numel() // max(1, shape[-1]) * -(-shape[-1] // 4) if out.numel() else 0
    lead = next((d for d in range(len(shape) - 1) if shape[d] > 1), None)
    if hashes <= MASK_CHUNK_HASHES or lead is None:
        idx = logical_index(shape, offsets, full, out.device, group=4)
        bits = hash64(idx, key).view(torch.int16)           # four 16-bit uniforms per hash, little-endian lanes
        torch.ge(bits[..., : shape[-1]], threshold, out=out)
        return
    step = max(1, shape[lead] * MASK_CHUNK_HASHES // hashes)
    for i in range(0, shape[lead], step):
        block = out.narrow(lead, i, min(step, shape[lead] - i))
        _fill_keep_mask(block, key, offsets[:lead] + [offsets[lead] + i] + offsets[lead + 1:], full, threshold)


def normal_(t: torch.Tensor, key: int, offsets, full, std: float, chunk: int = 1 << 22) -> torch.Tensor:
    """Fill `t` (the block of the full tensor at `offsets`) with N(0, std²) by Box-Muller on one hash per element,
    in float64, chunked along dim 0 to bound the temporaries."""
    if t.numel() == 0:
        return t
    rows = max(1, chunk // max(1, t[0].numel())) if t.dim() else 1
    flat = t.view(1, *t.shape) if t.dim() == 0 else t
    offsets, full = ([0], [1]) if t.dim() == 0 else (list(offsets), list(full))
    for r0 in range(0, flat.shape[0], rows):
        block = flat[r0:r0 + rows]
        z = hash64(logical_index(block.shape, [offsets[0] + r0] + offsets[1:], full, t.device), key)
        hi = ((z >> 32) & 0xFFFFFFFF).double().add_(0.5).mul_(2.0 ** -32)     # (0, 1)
        lo = (z & 0xFFFFFFFF).double().mul_(2.0 ** -32)                       # [0, 1)
        n = hi.log_().mul_(-2.0).sqrt_().mul_(torch.cos(lo.mul_(2 * math.pi))).mul_(std)
        block.copy_(n)
    return t


# dropout sites within a layer
EMBEDDING, ATTENTION_PROBS, ATTENTION_OUT, MLP_OUT = 0, 1, 2, 3


@dataclass(frozen=True)
class DropoutPosition:
    """Where the trainer is: the optimizer step, and the global batch row of the micro-batch's first sequence."""
    step: int = 0
    row: int = 0


class DropoutRNG:
    """The seed of a model's dropout and the current `position`; masks come from `mask` (see the module)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.position = DropoutPosition()

    def reseed(self, step: int) -> None:
        """Masks of optimizer step `step` (a resumed run draws the masks an uninterrupted one would)."""
        self.position = DropoutPosition(step, self.position.row)

    def at_row(self, row: int) -> None:
        """The local batch's first sequence is row `row` of the step's global batch."""
        self.position = DropoutPosition(self.position.step, row)

    @contextlib.contextmanager
    def at(self, position: DropoutPosition):
        """Draw at `position` inside the block (a recomputation redraws its forward's masks), then restore."""
        saved, self.position = self.position, position
        try:
            yield
        finally:
            self.position = saved

    def key(self, layer: int, site: int, position: DropoutPosition | None = None) -> int:
        pos = position or self.position
        return fold_key(self.seed, pos.step, layer, site)

    def mask(self, layer: int, site: int, shape, offsets=None, full=None, p: float = 0.0, device=None,
             position: DropoutPosition | None = None) -> torch.Tensor:
        """Keep-mask of a local block whose dim 0 is batch rows; `offsets`/`full` describe dims 1.. (default:
        this rank holds them whole)."""
        pos = position or self.position
        inner = list(shape[1:])
        offsets = [pos.row] + list(offsets if offsets is not None else [0] * len(inner))
        full = [pos.row + shape[0]] + list(full if full is not None else inner)
        return keep_mask(self.key(layer, site, pos), shape, offsets, full, p, device)


class _Dropout(torch.autograd.Function):
    """y = x * mask / (1 - p); saves only the one-byte mask for backward. The mask is converted to x's dtype
    before it multiplies: a product of mixed dtypes takes PyTorch's casting, unvectorised loop on CPU (measured
    1.1 ms against 0.44 ms for the convert-then-multiply on a 2 MiB float32 block)."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return apply_mask(x, mask, scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return apply_mask(grad, mask, ctx.scale), None, None


def apply_mask(x: torch.Tensor, mask: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * mask * scale in x's dtype (into `out`, which may be x): one fused loop on CPU (`cpu_kernels`), else two
    same-dtype passes after one conversion of the mask (from its bytes: PyTorch converts uint8 to float 4x faster
    than bool). The two give the same bits."""
    fused = cpu_kernels.apply_mask(x, mask, scale, out)
    if fused is not None:
        return fused
    y = torch.mul(x, mask.view(torch.uint8).to(x.dtype), out=out)
    return y if scale == 1.0 else y.mul_(scale)


def dropout(x: torch.Tensor, p: float, rng: DropoutRNG | None, layer: int, site: int, training: bool,
            offsets=None, full=None, position: DropoutPosition | None = None) -> torch.Tensor:
    """Inverted dropout of `x` (dim 0: batch rows) with the mask of (layer, site) at the rng's position (or
    `position`, captured earlier: recomputation redraws the forward's masks). `offsets` and `full` place this
    rank's block of dims 1.. in the logical tensor (heads split, sequence split)."""
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout needs the model's DropoutRNG")
    mask = rng.mask(layer, site, x.shape, offsets, full, p, x.device, position)
    return _Dropout.apply(x, mask, 1.0 / (1.0 - p))


def residual_dropout(x: torch.Tensor, p: float, rng: DropoutRNG | None, layer: int, site: int, training: bool,
                     seq=None, position: DropoutPosition | None = None) -> torch.Tensor:
    """Dropout of a residual-stream tensor (B, T, d), or of this rank's sequence chunk under sequence
    parallelism over the mesh axis `seq`."""
    return dropout(x, p, rng, layer, site, training, *_sequence_block(x, seq), position=position)


def _sequence_block(x: torch.Tensor, seq):
    """(offsets, full) of this rank's (B, T, d) block of the residual stream (None, None: it holds it whole)."""
    if seq is None or seq.size == 1:
        return None, None
    T = x.shape[1]
    return (seq.coord * T, 0), (seq.size * T, x.shape[2])


class _DropoutAdd(torch.autograd.Function):
    """residual + x * mask / (1 - p) for one dtype, one loop on CPU (`cpu_kernels`; else PyTorch's two ops, the
    same bits); saves only the one-byte mask."""

    @staticmethod
    def forward(ctx, residual, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        fused = cpu_kernels.apply_mask_add(residual, x, mask, scale)
        return fused if fused is not None else residual + apply_mask(x, mask, scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad, apply_mask(grad, mask, ctx.scale), None, None


def dropout_add(residual: torch.Tensor, x: torch.Tensor, p: float, rng: DropoutRNG | None, layer: int, site: int,
                training: bool, seq=None) -> torch.Tensor:
    """residual + residual_dropout(x, ...): a residual branch's dropout and its add, in one pass where the two
    have one dtype."""
    if not training or p == 0.0:
        return residual + x
    if rng is None:
        raise ValueError("dropout needs the model's DropoutRNG")
    offsets, full = _sequence_block(x, seq)
    mask = rng.mask(layer, site, x.shape, offsets, full, p, x.device)
    if residual.dtype != x.dtype or residual.shape != x.shape:       # autocast: a 16-bit branch, fp32 stream
        return residual + _Dropout.apply(x, mask, 1.0 / (1.0 - p))
    return _DropoutAdd.apply(residual, x, mask, 1.0 / (1.0 - p))
