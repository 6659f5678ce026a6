"""The distributed optimizer (ZeRO stage 1, Rajbhandari et al. 2020; Megatron's `--use-distributed-optimizer`)
over the batch axis.

Invariants:
- Parameters and gradients live in flat float32 buckets (each parameter's `.data` and `.grad` are views into
  them), padded to a multiple of the batch-axis size N. Rank r of the batch axis owns chunk r of every bucket:
  it keeps Adam's moments only for that chunk (1/N of the optimizer state) and updates only those elements.
- Micro-batches accumulate the full gradients locally; during the last micro-batch's backward each bucket is
  reduce-scattered (averaged) over the batch axis as soon as all its gradients are ready, in bucket order on
  every rank, overlapping the rest of the backward pass (as DDP's all-reduce does). After the update each
  bucket's owned chunk is all-gathered back into every rank's parameters. Batch-axis traffic per step is one
  reduce-scatter of the gradients and one all-gather of the parameters, each of the local parameters' bytes.
- The global gradient norm counts every element once: each batch rank its own chunks, and, over model axes, a
  parameter replicated there only on coordinate 0.
- `gather_state` / `scatter_state` give and take Adam's state per parameter, shaped like the parameter, so
  checkpoints stay the same as without ZeRO (reshardable onto any mesh, with or without `--zero`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from meshtron.comm import collectives as C


@dataclass
class _Piece:
    """The part of one parameter that falls in this rank's chunk of a bucket."""
    param: nn.Parameter
    start: int          # offset in the parameter's flat view
    length: int
    bucket: int
    offset: int         # offset in the bucket


class _Bucket:
    def __init__(self, params: list[nn.Parameter], world: int, device):
        self.params = params
        numel = sum(p.numel() for p in params)
        self.size = -(-numel // world) * world
        self.chunk = self.size // world
        self.data = torch.zeros(self.size, dtype=torch.float32, device=device)
        self.grad = torch.zeros(self.size, dtype=torch.float32, device=device)
        self.offsets, at = {}, 0
        for p in params:
            self.offsets[p] = at
            at += p.numel()
        self.ready = 0


class ShardedOptimizer:
    """AdamW whose state and update are sharded over `batch_axis`; drop-in for TrainStep's optimizer."""

    def __init__(self, model: nn.Module, mesh, batch_axis, *, lr: float, weight_decay: float, betas, eps: float,
                 bucket_mb: float = 25.0):
        self.model, self.mesh, self.axis = model, mesh, batch_axis
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("the distributed optimizer keeps float32 parameters (bf16 runs use autocast)")
        world, rank = batch_axis.size, batch_axis.coord
        cap = max(1, int(bucket_mb * 2 ** 20 / 4))
        groups, current, size = [], [], 0
        for p in reversed(params):                 # roughly the order backward produces gradients
            if current and size + p.numel() > cap:
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            groups.append(current)
        device = mesh.device
        self.buckets = [_Bucket(g, world, device) for g in groups]
        self.bucket_of: dict[nn.Parameter, int] = {}
        for b, bucket in enumerate(self.buckets):
            for p in bucket.params:
                off = bucket.offsets[p]
                bucket.data[off:off + p.numel()].copy_(p.data.reshape(-1))
                p.data = bucket.data[off:off + p.numel()].view_as(p)
                p.grad = bucket.grad[off:off + p.numel()].view_as(p)
                self.bucket_of[p] = b
        # this rank's pieces and their optimizer
        self.pieces: list[_Piece] = []
        for b, bucket in enumerate(self.buckets):
            lo, hi = rank * bucket.chunk, (rank + 1) * bucket.chunk
            for p in bucket.params:
                off = bucket.offsets[p]
                s, e = max(lo, off), min(hi, off + p.numel())
                if s < e:
                    self.pieces.append(_Piece(p, s - off, e - s, b, s))
        self._views = [nn.Parameter(self.buckets[q.bucket].data[q.offset:q.offset + q.length], requires_grad=True)
                       for q in self.pieces]
        for view, q in zip(self._views, self.pieces):
            view.grad = self.buckets[q.bucket].grad[q.offset:q.offset + q.length]
        decay = [v for v, q in zip(self._views, self.pieces) if q.param.shard.decay]
        no_decay = [v for v, q in zip(self._views, self.pieces) if not q.param.shard.decay]
        self.inner = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps,
                                       fused=device.type in ("cpu", "cuda"))
        self.param_groups = self.inner.param_groups
        self.syncing = False
        self._next, self._pending = 0, []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # ---- gradients: reduce-scatter overlapped with backward ---------------------------------------------------

    def begin_sync(self) -> None:
        """The next backward is the last of this step: reduce-scatter each bucket as soon as it is complete."""
        self.syncing, self._next, self._pending = True, 0, []
        for bucket in self.buckets:
            bucket.ready = 0

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.syncing:
            return
        bucket = self.buckets[self.bucket_of[p]]
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        if self.axis.group is None:
            return
        bucket.grad.div_(self.axis.size)
        mine = bucket.grad[self.axis.coord * bucket.chunk:(self.axis.coord + 1) * bucket.chunk]
        self._pending.append(C.reduce_scatter_async(mine, bucket.grad, self.axis.group, "grad"))

    def finish_sync(self) -> None:
        """After the last backward: launch what has not been launched (unused parameters), wait for all."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for pending in self._pending:
            pending.wait()
        self._pending, self.syncing, self._next = [], False, 0    # ready for the next step, synced or not
        for bucket in self.buckets:
            bucket.ready = 0
        for p in self.bucket_of:                       # autograd accumulated in place: still the bucket's views
            if p.grad is None or p.grad.untyped_storage().data_ptr() != \
                    self.buckets[self.bucket_of[p]].grad.untyped_storage().data_ptr():
                raise RuntimeError("a gradient left its bucket (was .grad replaced?); the distributed optimizer "
                                   "needs gradients accumulated in place")

    @torch.no_grad()
    def gather_grads(self) -> None:
        """Make every `p.grad` the full reduced gradient (all-gather of the chunks; for tests and inspection —
        the update itself reads only this rank's chunks)."""
        if self.axis.group is None:
            return
        for bucket in self.buckets:
            mine = bucket.grad[self.axis.coord * bucket.chunk:(self.axis.coord + 1) * bucket.chunk]
            C.all_gather_async(bucket.grad, mine, self.axis.group, "inspect grads").wait()

    # ---- the update -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, batch_axis_name: str | None) -> float:
        """Scale this rank's gradient chunks so the global norm is at most max_norm; returns the norm before."""
        from meshtron.train.step import grad_norm_rule
        counts, axes = grad_norm_rule(self.model, self.mesh)
        counted = [view.grad for view, q in zip(self._views, self.pieces) if counts(q.param)]
        local = (torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float32)).square().sum() if counted
                 else torch.zeros((), dtype=torch.float32, device=self.mesh.device))
        for a in axes + [self.axis]:
            C.all_reduce(local, a.group)
        norm = local.sqrt().item()
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0 and self._views:
                torch._foreach_mul_([v.grad for v in self._views], coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """Adam on this rank's chunks, then every bucket's chunks all-gathered into every rank's parameters."""
        self.inner.step()
        if self.axis.group is None:
            return
        pending = []
        for bucket in self.buckets:
            mine = bucket.data[self.axis.coord * bucket.chunk:(self.axis.coord + 1) * bucket.chunk]
            pending.append(C.all_gather_async(bucket.data, mine, self.axis.group, "params"))
        for p in pending:
            p.wait()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Gradients stay views of the buckets: zeroed in place (set_to_none is ignored)."""
        for bucket in self.buckets:
            bucket.grad.zero_()

    # ---- checkpoints: Adam's state per parameter, as without ZeRO ---------------------------------------------

    @torch.no_grad()
    def gather_state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Adam's state of every local parameter (exp_avg, exp_avg_sq like the parameter; step), gathered from
        the batch axis's chunks (collective over the batch axis)."""
        flat = {}
        for key in ("exp_avg", "exp_avg_sq"):
            full = [torch.zeros(b.size, dtype=torch.float32, device=b.data.device) for b in self.buckets]
            for view, q in zip(self._views, self.pieces):
                st = self.inner.state.get(view)
                if st:
                    full[q.bucket][q.offset:q.offset + q.length].copy_(st[key])
            for b, bucket in enumerate(self.buckets):
                if self.axis.group is not None:
                    mine = full[b][self.axis.coord * bucket.chunk:(self.axis.coord + 1) * bucket.chunk]
                    C.all_gather_async(full[b], mine, self.axis.group, "optimizer state").wait()
            flat[key] = full
        step = self._step_value()
        out = {}
        for p, b in self.bucket_of.items():
            off = self.buckets[b].offsets[p]
            out[p] = {k: flat[k][b][off:off + p.numel()].view_as(p).clone() for k in flat}
            out[p]["step"] = step.clone()
        return out

    def _step_value(self) -> torch.Tensor:
        """Adam's step count, as a scalar tensor: the same on every rank (one with no pieces learns it from the
        others; collective over the batch axis)."""
        t = torch.zeros((), dtype=torch.float32, device=self.mesh.device)
        for view in self._views:
            st = self.inner.state.get(view)
            if st:
                t = st["step"].detach().to(self.mesh.device, torch.float32).clone()
                break
        C.all_reduce(t, self.axis.group, op=torch.distributed.ReduceOp.MAX)
        return t

    @torch.no_grad()
    def scatter_state(self, state: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Keep this rank's chunks of full per-parameter Adam state (the inverse of `gather_state`)."""
        for view, q in zip(self._views, self.pieces):
            s = state[q.param]
            self.inner.state[view] = {
                "step": s["step"].detach().to(dtype=torch.float32, device=view.device).clone(),
                "exp_avg": s["exp_avg"].reshape(-1)[q.start:q.start + q.length].to(view.device).clone(),
                "exp_avg_sq": s["exp_avg_sq"].reshape(-1)[q.start:q.start + q.length].to(view.device).clone()}
