"""Scores over a vocabulary split across the ranks of an axis, without gathering the logits: log-softmax
normaliser, the logit of a target or chosen id, the argmax and the top-k, for many rows at once.

As Megatron's vocab-parallel cross-entropy does, each rank reduces its slice to a few numbers per row (its
log-sum-exp, a target's logit if it holds it, its argmax, its top-k), and one all-gather over the axis combines
them: about 5 + 2k numbers per row instead of V. Invariant: the results equal `log_softmax` of the full
logits to float rounding and are identical on every rank of the axis; the argmax is the first maximum (the lowest
id, as `torch.argmax`); top-k lists are in decreasing order, ties broken by the lower id. On a trivial axis (or on
logits already gathered) the same code runs with no collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshtron.comm import collectives as C
from meshtron.mesh import MeshAxis

CHUNK_ROWS = 256          # rows of local logits scored at once (prompt scoring: bounds the memory of one pass)


@dataclass
class Scores:
    """Per row (float64 on the logits' device): log-normaliser, the target's and the argmax's raw logits, top-k."""
    logz: torch.Tensor | None          # (N,) log sum exp of the raw logits
    target: torch.Tensor | None        # (N,) raw logit of the target id
    pick: torch.Tensor | None          # (N,) argmax id of the `choose` logits
    pick_raw: torch.Tensor | None      # (N,) raw logit at that id
    top_vals: torch.Tensor | None      # (N, k) raw logits of the k most likely ids
    top_ids: torch.Tensor | None       # (N, k)

    def logprob(self, raw: torch.Tensor) -> torch.Tensor:
        return raw - self.logz


def score(raw: torch.Tensor, start: int, axis: MeshAxis, *, logz: bool = False, targets: torch.Tensor | None = None,
          choose: torch.Tensor | None = None, k: int = 0) -> Scores:
    """Score rows of `raw` (N, V_local): this rank's columns [start, start + V_local) of the raw logits.

    `logz`: the log-normaliser; `targets` (N,) global ids: their raw logits; `choose` (N, V_local): other logits
    (processed: penalties, bias) whose argmax is picked, with the raw logit there; `k`: the top-k raw logits."""
    packed = pieces(raw, start, logz=logz, targets=targets, choose=choose, k=k)             # (N, C)
    N = raw.shape[0]
    every = C.all_gather_into(packed, axis.group, axis.size).view(axis.size, N, -1) if axis.size > 1 \
        else packed[None]
    return combine(every, logz, targets is not None, choose is not None, k)


def pieces(raw: torch.Tensor, start: int, *, logz: bool = False, targets: torch.Tensor | None = None,
           choose: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
    """This rank's part of `score`: (N, C) float64 numbers per row, all-gathered over the axis."""
    N, V = raw.shape
    dev = raw.device
    neg = torch.full((N,), float("-inf"), dtype=torch.float64, device=dev)
    cols: list[torch.Tensor] = []
    x = raw.float()
    if logz:                                                   # this slice's log-sum-exp (-inf if empty)
        cols.append(torch.logsumexp(x, dim=-1).double() if V else neg)
    if targets is not None:
        local = targets.to(dev) - start
        here = (local >= 0) & (local < V)
        val = x.gather(1, local.clamp(0, max(V - 1, 0))[:, None])[:, 0].double() if V else neg
        cols.append(torch.where(here, val, neg))
    if choose is not None:
        if V:
            idx = choose.argmax(dim=-1)
            cols += [choose.gather(1, idx[:, None])[:, 0].double(), (idx + start).double(),
                     x.gather(1, idx[:, None])[:, 0].double()]
        else:                                                  # this rank holds only vocabulary padding
            cols += [neg, torch.zeros(N, dtype=torch.float64, device=dev), neg]
    if k:
        kk = min(k, V)
        vals, ids = x.topk(kk, dim=-1) if kk else (x[:, :0], torch.zeros(N, 0, dtype=torch.long, device=dev))
        if kk < k:
            vals = torch.cat([vals, x.new_full((N, k - kk), float("-inf"))], 1)
            ids = torch.cat([ids + start, ids.new_full((N, k - kk), -1)], 1)
        else:
            ids = ids + start
        cols += [vals.double(), ids.double()]
    return torch.cat([c if c.ndim == 2 else c[:, None] for c in cols], 1)


def combine(every: torch.Tensor, logz: bool, target: bool, choose: bool, k: int) -> Scores:
    """(ranks, N, C) per-rank pieces -> the full vocabulary's Scores (the same on every rank)."""
    c, out = 0, Scores(None, None, None, None, None, None)
    if logz:
        out.logz = torch.logsumexp(every[..., c], dim=0)
        c += 1
    if target:
        out.target = every[..., c].max(dim=0).values
        c += 1
    if choose:
        best = every[..., c].argmax(dim=0)                    # first rank with the maximum: the lowest id
        rows = torch.arange(every.shape[1], device=every.device)
        out.pick = every[best, rows, c + 1].long()
        out.pick_raw = every[best, rows, c + 2]
        c += 3
    if k:
        vals = every[..., c:c + k].permute(1, 0, 2).reshape(every.shape[1], -1)     # (N, ranks * k)
        ids = every[..., c + k:c + 2 * k].permute(1, 0, 2).reshape(every.shape[1], -1)
        order = ids.argsort(dim=-1, stable=True)                                    # ties: the lower id first
        vals, ids = vals.gather(1, order), ids.gather(1, order)
        order = vals.argsort(dim=-1, descending=True, stable=True)[:, :k]
        out.top_vals, out.top_ids = vals.gather(1, order), ids.gather(1, order).long()
    return out


def score_chunked(h: torch.Tensor, head, targets: torch.Tensor, k: int) -> Scores:
    """Logz, target logits and top-k of `head`'s logits of hidden states h (N, d), CHUNK_ROWS rows at a time (the
    same number of chunks on every rank of the head's axis, since N is)."""
    parts = []
    for lo in range(0, h.shape[0], CHUNK_ROWS):
        raw = head.local_logits(h[None, lo:lo + CHUNK_ROWS])[0]                     # (n, V_local)
        parts.append(score(raw, head.vocab_start, head.axis, logz=True, targets=targets[lo:lo + CHUNK_ROWS], k=k))
    if not parts:
        empty = h.new_zeros(0, dtype=torch.float64)
        return Scores(empty, empty, None, None, empty.view(0, k), empty.view(0, k).long())
    cat = (lambda name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None
           else None)
    return Scores(cat("logz"), cat("target"), None, None, cat("top_vals"), cat("top_ids"))
