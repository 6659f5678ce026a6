"""Self-attention split by heads (Megatron): column-parallel Q, K, V, local attention, row-parallel output.

Invariant: rank r of the heads axis holds query heads [r*H/t, (r+1)*H/t) and key/value heads
[r*K/t, (r+1)*K/t), which are exactly the kv heads its query heads read under grouped-query attention, so
attention is local. Q, K and V are one GEMM behind one `f` on entry, and one `g` on exit: two all-reduces
per call (with sequence parallelism: an all-gather and a reduce-scatter along the sequence).
With selective recompute (`recompute`, Korthikanti et al. 2022) the core attention — scores, softmax, dropout
and the probability-weighted values, whose s² activations dominate — keeps only q, k, v and is recomputed in
backward with the forward's dropout mask. Without attention dropout, the fused kernel keeps no s² tensor, so
there is nothing to recompute.
Decoding passes a per-layer `cache` (meshtron.inference.kv_cache.LayerCache): it holds this rank's local kv
heads only, appends the new keys and values, and supplies positions and the padding mask; no extra collective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtron.mesh import MeshAxis
from meshtron.parallel import cpu_kernels
from meshtron.parallel.linear import ColumnParallelLinear, RowParallelLinear, column_parallel_group
from meshtron.parallel.random import ATTENTION_PROBS, DropoutRNG, apply_mask
from meshtron.parallel.rotary import Rotary


class ParallelAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, axis: MeshAxis, *, bias: bool,
                 std: float, out_std: float, dropout_p: float = 0.0, rng: DropoutRNG | None = None,
                 rotary: Rotary | None = None, layer: int = 0):
        super().__init__()
        for name, n in (("heads", n_head), ("kv_heads", n_kv_head)):
            if n % axis.size:
                raise ValueError(f"{name}={n} is not divisible by mesh axis {axis.name!r} of size {axis.size}")
        self.axis, self.head_dim = axis, d_model // n_head
        self.n_local, self.n_kv_local = n_head // axis.size, n_kv_head // axis.size
        kv_dim = n_kv_head * self.head_dim
        self.q_proj = ColumnParallelLinear(d_model, d_model, axis, bias=bias, std=std)
        self.k_proj = ColumnParallelLinear(d_model, kv_dim, axis, bias=bias, std=std)
        self.v_proj = ColumnParallelLinear(d_model, kv_dim, axis, bias=bias, std=std)
        self.o_proj = RowParallelLinear(d_model, d_model, axis, bias=bias, std=out_std)
        self.dropout_p, self.rng, self.layer, self.n_head = dropout_p, rng, layer, n_head
        self.recompute = False        # selective recompute: core attention is recomputed in backward
        self.rotary = [rotary]  # shared module, kept out of this module's children

    def forward(self, x: torch.Tensor, cache=None, seq: MeshAxis | None = None) -> torch.Tensor:
        """x (B, T, d), or with sequence parallelism (`seq`) this rank's chunk (B, T/t, d); attention itself
        always sees the whole sequence (the entry all-gathers it)."""
        q, k, v = column_parallel_group(x, (self.q_proj, self.k_proj, self.v_proj), seq)  # f, one GEMM
        B, T = q.shape[:2]
        q = q.view(B, T, self.n_local, self.head_dim).transpose(1, 2)                # (B, h, T, hd)
        k = k.view(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)             # (B, kv, T, hd)
        v = v.view(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)
        if cache is not None:
            return self._decode(q, k, v, cache)
        if self.rotary[0] is not None:
            q, k = self.rotary[0](q, k)
            v = v.contiguous()    # q and k are new tensors now: v alone keeps the Q|K|V output for backward
        y = self._attend(q, k, v)                                                 # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return self.o_proj(y, seq)                                                # g

    def _decode(self, q, k, v, cache) -> torch.Tensor:
        """Attention over the cached keys and values plus these (KV cache: prefill, then a token per step)."""
        B, _, T, _ = q.shape
        if self.rotary[0] is not None:
            q, k = self.rotary[0].at(q, k, cache.positions)                        # per-sequence positions
        k, v = cache.update(k, v)                                                 # (B, kv, S, hd), S >= T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, is_causal=cache.causal,
                                           enable_gqa=self.n_kv_local != self.n_local)
        y = y.transpose(1, 2).reshape(B, T, self.n_local * self.head_dim)
        return self.o_proj(y)                                                     # g

    def _attend(self, q, k, v):
        gqa = self.n_kv_local != self.n_local
        if not (self.training and self.dropout_p > 0):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        position = self.rng.position
        if self.recompute and torch.is_grad_enabled():       # Megatron's selective recompute of core attention
            return checkpoint(self._core_attention, q, k, v, position, use_reentrant=False,
                              preserve_rng_state=False)
        return self._core_attention(q, k, v, position)

    def _core_attention(self, q, k, v, position):
        """Scores, softmax, dropout and the probability-weighted values: the s² part of attention. `position` is the
        dropout position captured at the forward, so a recomputation draws the same mask."""
        T = q.shape[-2]
        # dropout on attention probabilities (B, h_local, T, T): this rank's heads of the logical mask
        head0 = self.axis.coord * self.n_local
        keep = self.rng.mask(self.layer, ATTENTION_PROBS, (q.shape[0], self.n_local, T, T), (head0, 0, 0),
                             (self.n_head, T, T), self.dropout_p, q.device, position)
        return _DroppedAttention.apply(q, k, v, keep, 1.0 / (1.0 - self.dropout_p), 1.0 / math.sqrt(self.head_dim))


def _causal_bias(T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above (a key after the query is never attended)."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


CHUNK_BYTES = 1 << 19   # scores per chunk: 512 KiB stays in a CPU core's L2 (measured: at s 256, 68 -> 44 ms)
ROW_MIN_BYTES = 96 << 10  # a batch row's scores under this: chunks over (B·h) copies instead. Measured, forward
                          # + backward on the model's strided q, k, v: (8, 1, 128, 64) 1.89 -> 1.61 ms and
                          # (4, 4, 64, 64) 1.34 -> 1.17 ms (64 KiB a row); (8, 2, 128, 64) 3.15 against 3.65 and
                          # (8, 12, 64, 64) 6.10 against 6.81 ms (128, 192 KiB) stay with the strided views


def _chunks(B: int, h: int, T: int, elem: int, device):
    """How the scores are worked through: (flat, chunks). Not flat: chunks (b, heads, query rows) of one batch
    row's strided views, about CHUNK_BYTES of scores each. Flat: chunks (heads of B·h, query rows) of
    (B·h, T, ·) copies of q, k, v — on CPU where a batch row's scores are small (under ROW_MIN_BYTES, where the
    overhead of many chunks outweighs the copies), and on other devices as one chunk (there each chunk would be
    kernel launches, and the caches are not a core's L2)."""
    per_head = T * T * elem
    if torch.device(device).type != "cpu":
        return True, [(slice(None), slice(None))]
    if h * per_head < ROW_MIN_BYTES:
        n = max(1, CHUNK_BYTES // per_head)
        return True, [(slice(i, min(i + n, B * h)), slice(None)) for i in range(0, B * h, n)]
    if per_head <= CHUNK_BYTES:
        n = max(1, CHUNK_BYTES // per_head)
        return False, [(b, slice(i, min(i + n, h)), slice(None)) for b in range(B) for i in range(0, h, n)]
    rows = max(1, CHUNK_BYTES // (T * elem))
    return False, [(b, slice(i, i + 1), slice(r, r + rows)) for b in range(B) for i in range(h)
                   for r in range(0, T, rows)]


def _kv_at(t: torch.Tensor, c, h: int, flat: bool) -> torch.Tensor:
    """The keys or values that chunk `c`'s query heads attend, (heads, T, d). Flat: `t` is already per query
    head (B·h, T, d). Else `t` is (B, kv, T, d), kv head j serving query heads j·g .. j·g + g - 1: a view for
    g = 1 or a one-head chunk, else a copy of the chunk's share."""
    if flat:
        return t[c[0]]
    g = h // t.shape[1]
    b, heads, _ = c
    if g == 1:
        return t[b, heads]
    if heads.stop - heads.start == 1:
        return t[b, heads.start // g:heads.start // g + 1]
    return t[b].index_select(0, torch.arange(heads.start, heads.stop, device=t.device) // g)


def _kv_grad_at(grad: torch.Tensor, c, h: int, flat: bool, a: torch.Tensor, b: torch.Tensor, alpha: float):
    """Chunk `c`'s share of a kv gradient, alpha · a @ b per query head ((heads, T, x) @ (heads, x, d)), written
    (the chunk that reaches a head first) or added (the rest) inside the GEMM. Flat: `grad` is per query head
    (B·h, T, d), summed onto kv heads afterwards. Else onto the kv heads of `grad` (B, kv, T, d); a chunk whose
    query heads span kv heads of a group > 1 adds its products (`grad` is zeroed for it)."""
    rows = c[-1]
    if flat:
        grad[c[0]].baddbmm_(a, b, beta=0 if rows.start in (None, 0) else 1, alpha=alpha)
        return
    g = h // grad.shape[1]
    bi, heads, _ = c
    first = rows.start in (None, 0) and heads.start % g == 0
    if g == 1:
        grad[bi, heads].baddbmm_(a, b, beta=0 if first else 1, alpha=alpha)
    elif heads.stop - heads.start == 1:
        grad[bi, heads.start // g:heads.start // g + 1].baddbmm_(a, b, beta=0 if first else 1, alpha=alpha)
    else:
        grad[bi].index_add_(0, torch.arange(heads.start, heads.stop, device=grad.device) // g, torch.bmm(a, b),
                            alpha=alpha)


class _DroppedAttention(torch.autograd.Function):
    """Causal attention with dropout on its probabilities, y = (softmax(q·kᵀ·c + causal) ⊙ keep)·v / (1 - p),
    in the inputs' dtype (a 16-bit softmax in float32); k and v may have fewer heads than q (grouped-query: each
    serves h/kv consecutive query heads). Saves q, k, v (the strided views of the Q|K|V output, or their
    copies: the same bytes, never per-query-head repeats), the probabilities and the one-byte mask; the dropped
    probabilities are recomputed in backward from those two (one multiply), so per a·s² it keeps e + m bytes,
    not autograd's 2·e + m (probabilities and their dropped copy). float32 on CPU runs as one compiled loop
    (`cpu_kernels.attention_forward`: causal row blocks, the same saved tensors). Else, on CPU, it works through
    the scores in cache-sized chunks (`_chunks`), each chunk's scores, softmax, mask and product done while they
    are in cache; chunks of one batch row read q, k, v and write y and the gradients in place through strided
    views (y and dq laid out (B, T, h, d), as the projections that follow want them). The 1/(1 - p) and c
    scales are applied inside the GEMMs, never as a pass over an s² tensor. Invariant: the arithmetic of the
    unfused composition, so outputs and gradients agree with it to rounding (tests/test_layers.py)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, keep_scale, score_scale):
        B, h, T, d = q.shape
        ctx.loop = cpu_kernels.attention_fits(q, k, v)      # float32 on CPU: one compiled loop (cpu_kernels)
        ctx.keep_scale, ctx.score_scale, ctx.shape = keep_scale, score_scale, (B, h, T, d)
        if ctx.loop:
            keep = keep.view(torch.uint8).contiguous()
            y, probs = cpu_kernels.attention_forward(q, k, v, keep, keep_scale, score_scale)
            ctx.save_for_backward(q, k, v, probs, keep)
            return y
        flat, chunks = _chunks(B, h, T, q.element_size(), q.device)
        bias = _causal_bias(T, q.dtype, q.device)
        soft = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        keep = keep.view(torch.uint8)
        probs = torch.empty(B, h, T, T, dtype=q.dtype, device=q.device)
        if flat:
            k, v = k.contiguous(), v.contiguous()
            q_, k_, v_ = q.reshape(B * h, T, d), _per_query_head(k, h), _per_query_head(v, h)
            probs_, keep_ = probs.view(B * h, T, T), keep.reshape(B * h, T, T)
            y = q.new_empty(B, h, T, d)
            y_ = y.view(B * h, T, d)
        else:
            q_, k_, v_, probs_, keep_ = q, k, v, probs, keep
            y = y_ = q.new_empty(B, T, h, d).transpose(1, 2)
        for c in chunks:
            qc = q_[c]
            scores = torch.baddbmm(bias[c[-1]].expand(qc.shape[0], -1, -1), qc,
                                   _kv_at(k_, c, h, flat).transpose(1, 2), alpha=score_scale)
            pc = probs_[c]                                                  # contiguous: whole rows
            if soft == q.dtype:
                torch.softmax(scores, -1, out=pc)
            else:
                pc.copy_(torch.softmax(scores, -1, dtype=soft))
            y_[c].baddbmm_(apply_mask(pc, keep_[c], 1.0), _kv_at(v_, c, h, flat), beta=0, alpha=keep_scale)
        ctx.save_for_backward(q_ if flat else q, k, v, probs, keep)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q_, k, v, probs, keep = ctx.saved_tensors
        B, h, T, d = ctx.shape
        if ctx.loop:
            return (*cpu_kernels.attention_backward(q_, k, v, keep, probs, grad_y.float(), ctx.keep_scale,
                                                    ctx.score_scale), None, None, None)
        flat, chunks = _chunks(B, h, T, q_.element_size(), q_.device)
        keep_scale, score_scale = ctx.keep_scale, ctx.score_scale
        gy = grad_y.to(q_.dtype)
        if flat:                               # the kv gradients per query head, summed onto kv heads at the end
            k_, v_, gy = _per_query_head(k, h), _per_query_head(v, h), gy.reshape(B * h, T, d)
            probs, keep = probs.view(B * h, T, T), keep.view(B * h, T, T)
            grad_q = q_.new_empty(B, h, T, d)
            grad_q_, grad_k, grad_v = grad_q.view(B * h, T, d), q_.new_empty(B * h, T, d), q_.new_empty(B * h, T, d)
        else:                                  # (B, T, heads, d) buffers, as the Q|K|V projection's backward wants
            k_, v_ = k, v
            spans = h != k.shape[1] and any(c[1].stop - c[1].start > 1 for c in chunks)
            grad_q = grad_q_ = q_.new_empty(B, T, h, d).transpose(1, 2)
            grad_k, grad_v = ((q_.new_zeros if spans else q_.new_empty)(B, T, t.shape[1], d).transpose(1, 2)
                              for t in (k, v))
        for c in chunks:
            kc, pc, gyc, qc = keep[c], probs[c], gy[c], q_[c]
            # the gradient of the dropped probabilities; baddbmm with beta 0 ignores its input (pc: the shape)
            grad_p = torch.baddbmm(pc, gyc, _kv_at(v_, c, h, flat).transpose(1, 2), beta=0, alpha=keep_scale)
            apply_mask(grad_p, kc, 1.0, out=grad_p)
            grad_s = torch._softmax_backward_data(grad_p, pc, -1, pc.dtype)
            grad_q_[c].baddbmm_(grad_s, _kv_at(k_, c, h, flat), beta=0, alpha=score_scale)
            _kv_grad_at(grad_k, c, h, flat, grad_s.transpose(1, 2), qc, score_scale)
            _kv_grad_at(grad_v, c, h, flat, apply_mask(pc, kc, 1.0).transpose(1, 2), gyc, keep_scale)
        if flat:
            grad_k, grad_v = _sum_query_heads(grad_k, k.shape), _sum_query_heads(grad_v, v.shape)
        return grad_q, grad_k, grad_v, None, None, None


def _per_query_head(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, kv, T, d) -> (B·h, T, d): kv head j repeated for its h/kv consecutive query heads."""
    B, kv, T, d = t.shape
    if kv != h:
        t = t.repeat_interleave(h // kv, dim=1)
    return t.reshape(B * h, T, d)


def _sum_query_heads(g: torch.Tensor, kv_shape) -> torch.Tensor:
    """The gradient (B·h, T, d) of a per-query-head repeat, summed back onto its (B, kv, T, d) kv heads."""
    B, kv, T, d = kv_shape
    return g.view(kv_shape) if g.shape[0] == B * kv else g.view(B, kv, -1, T, d).sum(2)
