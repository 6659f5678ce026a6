"""The search: every legal layout of a model on a cluster, predicted and ranked best first.

Invariant: a layout reaches the cost model only if it is legal: dp·tp·pp equals the device count, the model
axis passes meshtron's layout-rule checks (heads, kv_heads, d_ff, batch divisible) and stays inside a node
unless allowed, pp divides the layers, the micro-batch divides each data-parallel rank's share of the batch.
Ranking: layouts that fit in memory first, then by step time; the chosen layout (`Plan.best`) is the first
one `meshtron train` runs (a pipeline axis is shown, marked not yet runnable, never chosen). Every rejection
keeps its reason.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from meshtron.layout import LayoutError, LayoutRules, validate
from meshtron.models.config import ModelConfig
from meshtron.planner.cost_model import RECOMPUTE, ParallelLayout, Prediction, predict
from meshtron.planner.hardware import HardwareProfile


class PlanError(ValueError):
    """No layout can run: the message lists why each candidate was refused and what to change."""


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _choices(option: bool | None) -> tuple[bool, ...]:
    return (False, True) if option is None else (option,)


def _recompute_choices(option, fused_attention: bool) -> tuple[str, ...]:
    """Recompute kinds to try: all (selective only where attention keeps s² scores), or the one asked for."""
    if option is None:
        return ("none", "full") if fused_attention else ("none", "selective", "full")
    kind = {True: "full", False: "none"}.get(option, option)
    return (kind,)


@dataclass
class Plan:
    """The ranked predictions of one planning question (every variant, and the best one per mesh)."""
    config: ModelConfig
    hardware: HardwareProfile
    devices: int
    global_batch: int
    seq_len: int
    dtype: str
    ranked: list[Prediction]
    rejected: list[str] = field(default_factory=list)

    @property
    def per_mesh(self) -> list[Prediction]:
        """The best variant (micro-batch and memory options) of each (dp, tp, pp), best first."""
        seen, out = set(), []
        for pred in self.ranked:
            key = (pred.layout.dp, pred.layout.tp, pred.layout.pp)
            if key not in seen:
                seen.add(key)
                out.append(pred)
        return out

    @property
    def best(self) -> Prediction | None:
        """The fastest layout that fits and that `meshtron train` runs, or None."""
        return next((p for p in self.ranked if p.fits and p.layout.runnable), None)

    @property
    def best_overall(self) -> Prediction | None:
        """The fastest layout that fits, runnable by meshtron or not (a pipeline axis)."""
        return next((p for p in self.ranked if p.fits), None)

    def rank_of(self, dp: int, tp: int, pp: int) -> int | None:
        """1-based rank of a mesh among `per_mesh`, or None if it was not legal."""
        for i, pred in enumerate(self.per_mesh, 1):
            if (pred.layout.dp, pred.layout.tp, pred.layout.pp) == (dp, tp, pp):
                return i
        return None


def legal_meshes(cfg: ModelConfig, devices: int, per_node: int, global_batch: int, *,
                 allow_cross_node_tp: bool = False, max_pp: int | None = None
                 ) -> tuple[list[tuple[int, int, int]], list[str]]:
    """[(dp, tp, pp)] that can run, and one reason per refused candidate."""
    ok, reasons = [], []
    sizes = {**cfg.dim_sizes(), "batch": global_batch}
    for tp in divisors(devices):
        if tp > 1 and not allow_cross_node_tp and devices > per_node and (tp > per_node or per_node % tp):
            reasons.append(f"tp={tp}: a model axis must fit inside a node of {per_node} devices and divide it "
                           f"(pass --allow-cross-node-tp to allow it across nodes)")
            continue
        for pp in divisors(devices // tp):
            dp = devices // (tp * pp)
            where = f"dp={dp}, tp={tp}, pp={pp}"
            if max_pp is not None and pp > max_pp:
                continue
            if cfg.n_layer % pp:
                reasons.append(f"{where}: pp={pp} does not divide the {cfg.n_layer} layers")
                continue
            if global_batch % dp:
                reasons.append(f"{where}: the global batch {global_batch} does not split into dp={dp} equal shares")
                continue
            shape = {k: v for k, v in (("batch", dp), ("model", tp)) if v > 1}
            try:
                validate(LayoutRules.default_for(shape), shape, sizes)
            except LayoutError as e:
                reasons.append(f"{where}: {e}")
                continue
            ok.append((dp, tp, pp))
    return ok, reasons


def enumerate_layouts(cfg: ModelConfig, devices: int, per_node: int, global_batch: int, *,
                      micro_batch: int | None = None, recompute=None,
                      sequence_parallel: bool | None = None, sharded_optimizer: bool | None = None,
                      interleave: bool = True, allow_cross_node_tp: bool = False, max_pp: int | None = None,
                      fused_attention: bool = False) -> tuple[list[ParallelLayout], list[str]]:
    """Every legal layout; an option left None is tried every way (sequence parallelism only when tp > 1 and
    the sequence splits over it, the sharded optimizer only when dp > 1, selective recompute only where
    attention keeps its s² scores: where they change anything). With `interleave`, pipelines of more than 2
    stages also try v > 1 layer chunks per rank where v divides the layers per stage and the micro-batch count
    is a multiple of pp (Megatron's conditions for the interleaved schedule)."""
    meshes, reasons = legal_meshes(cfg, devices, per_node, global_batch,
                                   allow_cross_node_tp=allow_cross_node_tp, max_pp=max_pp)
    layouts = []
    for dp, tp, pp in meshes:
        share = global_batch // dp
        if micro_batch is not None and share % micro_batch:
            reasons.append(f"dp={dp}, tp={tp}, pp={pp}: micro-batch {micro_batch} does not divide the "
                           f"{share} sequences each data-parallel rank gets")
            continue
        bs = [micro_batch] if micro_batch is not None else divisors(share)
        sps = _choices(sequence_parallel) if tp > 1 else (False,)
        zeros = _choices(sharded_optimizer) if dp > 1 else (False,)
        for b, rc, sp, zero in itertools.product(bs, _recompute_choices(recompute, fused_attention), sps, zeros):
            chunks = [1]
            if interleave and pp > 2 and (share // b) % pp == 0:
                chunks += [v for v in divisors(cfg.n_layer // pp) if v > 1]
            layouts += [ParallelLayout(dp, tp, pp, b, rc, sp, zero, v) for v in chunks]
    return layouts, reasons


def plan(cfg: ModelConfig, hw: HardwareProfile, devices: int, *, global_batch: int, seq_len: int,
         dtype: str | None = None, fused_attention: bool | None = None, **options) -> Plan:
    """Predict every legal layout (see `enumerate_layouts` for `options`) and rank them."""
    if devices < 1 or global_batch < 1 or seq_len < 1:
        raise PlanError(f"devices ({devices}), global batch ({global_batch}) and sequence length ({seq_len}) "
                        f"must be positive")
    if seq_len > cfg.max_seq_len:
        raise PlanError(f"sequence length {seq_len} exceeds the model's {cfg.max_seq_len} positions: use "
                        f"--seq-len {cfg.max_seq_len} or less")
    dtype = dtype or hw.default_dtype
    hw.peak_flops(dtype)                                   # fails early with a clear message
    fused = cfg.dropout == 0 if fused_attention is None else fused_attention
    layouts, reasons = enumerate_layouts(cfg, devices, hw.devices_per_node, global_batch, fused_attention=fused,
                                         **options)
    if seq_len is not None:
        kept = []
        for lay in layouts:
            if lay.sequence_parallel and seq_len % lay.tp:
                reasons.append(f"dp={lay.dp}, tp={lay.tp}, pp={lay.pp}: sequence parallelism needs the sequence "
                               f"({seq_len}) divisible by tp={lay.tp}")
            else:
                kept.append(lay)
        layouts = kept
    if not layouts:
        shown = reasons[:12] + ([f"... and {len(reasons) - 12} more"] if len(reasons) > 12 else [])
        raise PlanError(f"no legal layout of {devices} device(s) ({hw.devices_per_node} per node) for global "
                        f"batch {global_batch}; every candidate was refused:\n  - " + "\n  - ".join(shown))
    preds = [predict(cfg, lay, hw, global_batch=global_batch, seq_len=seq_len, dtype=dtype,
                     fused_attention=fused_attention) for lay in layouts]
    preds.sort(key=lambda x: (not x.fits, x.step_time_s if x.fits else x.memory["total"], x.memory["total"],
                              x.layout.pp, x.layout.tp, RECOMPUTE.index(x.layout.recompute)))
    return Plan(cfg, hw, devices, global_batch, seq_len, dtype, preds, reasons)
