"""Memory per rank of sequence parallelism, activation recompute and the distributed optimizer, measured against
Korthikanti et al. 2022 (activations) and Rajbhandari et al. 2020 (model state), and what each costs in time.

    .venv/bin/python bench/bench_memory.py            # about 8 minutes on 2 cores
    .venv/bin/python bench/bench_memory.py --quick    # memory only, no timing

Model: GPT (h 512, 8 heads, d_ff 4h, dropout 0.1 so attention keeps its s² tensors), micro-batch b = 4 sequences
of s = 256 tokens per rank, float32, on `batch:2,model:2` (t = 2, N = 2).

Activations per layer are measured as what a forward pass keeps for backward: the distinct storages of every
tensor autograd saves (saved-tensor hooks; parameters excluded) plus the inputs that recomputed regions keep,
at 2 and 4 layers: the difference / 2 is one layer. Korthikanti's
formulas count 16-bit activations (2 bytes) and 1-byte dropout masks; meshtron keeps float32 activations
(4 bytes) and 1-byte masks, so each formula is rescaled term by term:
  no SP:             sbh(10 + 24/t + 5as/(ht))  ->  sbh(18 + 48/t + 9as/(ht))
  SP:                (sbh/t)(34 + 5as/h)        ->  (sbh/t)(66 + 9as/h)
  SP + selective:    34 sbh/t                   ->  66 sbh/t
  full recompute:    2 sbh (the block input)    ->  4 sbh (4 sbh/t with SP: the input is the sequence chunk)
The paper's 5as/h (9as/h in fp32) counts the softmax output, the dropout mask and the dropout output; meshtron's
dropout attention recomputes the dropout output in backward, so its own terms (meshtron/planner/cost_model.py)
keep 5as/h in fp32: the "meshtron" column, which the error is taken against.
Model state (parameters + gradients + Adam's two moments, all float32 in meshtron, bf16 runs included: bf16
autocast keeps float32 weights and gradients) is the bytes of the tensors each rank holds, against Rajbhandari's
float32 formula (4 + 4 + 8)·Φ, and (4 + 4 + 8/N)·Φ with ZeRO-1, Φ = this rank's parameters.
Time: median ms per step over alternating runs (processes restarted each run) of each pair, on the mesh the
feature is about: recompute and SP on `model:2`, ZeRO-1 against DDP on `batch:2`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

H, A, S, MB = 512, 8, 256, 4
SP = "batch:batch;heads:model;d_ff:model;vocab:model;seq:model"
TP = "batch:batch;heads:model;d_ff:model;vocab:model"
FEATURES = [  # name, layout, recompute, zero
    ("TP + DDP", TP, "none", 0),
    ("SP", SP, "none", 0),
    ("SP + selective", SP, "selective", 0),
    ("full recompute", TP, "full", 0),
    ("SP + full recompute", SP, "full", 0),
    ("ZeRO-1", TP, "none", 1),
    ("SP + selective + ZeRO-1", SP, "selective", 1),
]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class SavedActivations:
    """Counts the distinct storages autograd saves for backward (saved-tensor hooks), parameters excluded, and
    the tensor arguments of `torch.utils.checkpoint` regions (which keep their inputs, not their insides)."""

    def __init__(self, model):
        import torch
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.add(t)
        return t

    def add(self, t) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in self.params and t.device.type != "meta":
            self.seen[key] = t.untyped_storage().nbytes()

    def wrap_checkpoint(self, checkpoint):
        import torch

        def counted(fn, *args, **kw):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.add(a)
            return checkpoint(fn, *args, **kw)
        return counted

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def model_state_bytes(model, trainer) -> int:
    opt = trainer.optimizer
    inner = getattr(opt, "inner", opt)
    state = [t for s in inner.state.values() for t in s.values() if hasattr(t, "untyped_storage") and t.dim()]
    params = [p for p in model.parameters()]
    return _tensor_bytes(params) + _tensor_bytes([p.grad for p in params]) + _tensor_bytes(state)


def measure(mesh_spec: str, rules: str, recompute: str, zero: int, layers: int, d_model: int = H,
            steps: int = 0) -> dict:
    """On every rank: activation bytes of one micro-batch's forward, model-state bytes after a step, Φ, and the
    median step time over `steps` steps (0: not timed)."""
    import torch
    import meshtron
    import meshtron.models.base as base_module
    import meshtron.parallel.attention as attention_module
    from meshtron.models import ModelConfig, build_model
    from meshtron.train.step import TrainStep, local_rows
    mesh = meshtron.Mesh.from_spec(mesh_spec)
    if "batch" not in mesh.shape:
        rules = rules.replace("batch:batch;", "")
    if "model" not in mesh.shape:
        rules = ";".join(r for r in rules.split(";") if not r.endswith(":model")) or None
    cfg = ModelConfig("gpt", vocab_size=512, n_layer=layers, n_head=A, d_model=d_model, max_seq_len=S, dropout=0.1)
    model = build_model(cfg, mesh, rules, seed=0)
    trainer = TrainStep(model, mesh, lr=1e-4, recompute=recompute, zero=zero)
    dp = trainer.batch_axis.size
    data = torch.randint(0, 512, (MB * dp, S + 1), generator=torch.Generator().manual_seed(0))
    batch = local_rows(data, trainer.batch_axis)
    trainer.step(batch)                                        # optimizer state exists from here on
    model.train()
    saved = SavedActivations(model)
    plain = base_module.checkpoint, attention_module.checkpoint
    base_module.checkpoint, attention_module.checkpoint = (saved.wrap_checkpoint(c) for c in plain)
    try:
        with saved.hooks:
            loss = model(batch[:, :-1], batch[:, 1:])
    finally:
        base_module.checkpoint, attention_module.checkpoint = plain
    activations = saved.bytes
    loss.backward()
    out = {"activations": activations, "state": model_state_bytes(model, trainer),     # gradients still held
           "phi": sum(p.numel() for p in model.parameters())}
    trainer.optimizer.zero_grad()
    if steps:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step(batch)
            times.append(time.perf_counter() - t0)
        out["ms"] = statistics.median(times) * 1e3
    return out


def formula_activations(name: str, t: int, scores: float = 9) -> float:
    """Korthikanti's per-layer bytes in fp32 (`scores` 9: softmax output, mask, dropout output per a·s²·b), or
    meshtron's with `scores` 5 (the dropout output recomputed)."""
    sbh, as_h = S * MB * H, A * S / H
    if "full" in name:
        return 4 * sbh / (t if "SP" in name else 1)
    if "selective" in name:
        return 66 * sbh / t
    if "SP" in name:
        return sbh / t * (66 + scores * as_h)
    return sbh * (18 + 48 / t + scores * as_h / t)


def formula_state(zero: int, phi: int, n: int) -> float:
    return (16 if not zero else 8 + 8 / n) * phi


def run(fn, world, *args):
    from meshtron.launch import run_ranks
    return run_ranks(fn, world, *args, threads_per_rank=1)


def memory_table() -> str:
    lines = ["| features | activations / layer, MiB | Korthikanti (fp32) | meshtron | error | model state, MiB | "
             "formula | error |", "|---|---|---|---|---|---|---|---|"]
    for name, rules, recompute, zero in FEATURES:
        two, four = (run(measure, 4, "batch:2,model:2", rules, recompute, zero, n)[0] for n in (2, 4))
        per_layer = (four["activations"] - two["activations"]) / 2
        paper, want = formula_activations(name, 2), formula_activations(name, 2, scores=5)
        state, want_state = four["state"], formula_state(zero, four["phi"], 2)
        lines.append(f"| {name} | {per_layer / 2**20:.2f} | {paper / 2**20:.2f} | {want / 2**20:.2f} | "
                     f"{per_layer / want - 1:+.1%} | "
                     f"{state / 2**20:.1f} | {want_state / 2**20:.1f} | {state / want_state - 1:+.1%} |")
    return "\n".join(lines)


def largest_gpt(budget_mib: float) -> str:
    """The most layers (h 512) whose measured activations + model state fit `budget_mib` per rank, without and
    with the features, from the measured cost per layer; the chosen depth is then built and measured."""
    lines = [f"Largest GPT (h {H}, {A} heads, s {S}, micro-batch {MB} per rank) within {budget_mib:.0f} MiB per rank "
             f"(activations + model state) on `batch:2,model:2`:", "",
             "| features | layers | parameters | measured at that depth, MiB |", "|---|---|---|---|"]
    for name, rules, recompute, zero in (FEATURES[0], FEATURES[-1]):
        two, four = (run(measure, 4, "batch:2,model:2", rules, recompute, zero, n)[0] for n in (2, 4))
        total = lambda r: r["activations"] + r["state"]                     # noqa: E731
        per_layer = (total(four) - total(two)) / 2
        base = total(two) - 2 * per_layer
        layers = int((budget_mib * 2**20 - base) // per_layer)
        check = run(measure, 4, "batch:2,model:2", rules, recompute, zero, layers)[0]
        from meshtron.models import ModelConfig
        params = ModelConfig("gpt", vocab_size=512, n_layer=layers, n_head=A, d_model=H, max_seq_len=S).num_params()
        lines.append(f"| {name} | {layers} | {params / 1e6:.1f}M | {total(check) / 2**20:.0f} |")
    return "\n".join(lines)


def time_table(repeats: int) -> str:
    pairs = [("selective recompute vs none", "model:2", (TP, "none", 0), (TP, "selective", 0), 0.05),
             ("full recompute vs none", "model:2", (TP, "none", 0), (TP, "full", 0), 0.40),
             ("SP vs no SP", "model:2", (TP, "none", 0), (SP, "none", 0), 0.05),
             ("ZeRO-1 vs DDP", "batch:2", (TP, "none", 0), (TP, "none", 1), 0.05)]
    lines = ["| comparison | mesh | baseline ms/step | with feature ms/step | ratio (spread) | goal |",
             "|---|---|---|---|---|---|"]
    for label, mesh, base, feat, goal in pairs:
        times = {"base": [], "feat": []}
        for r in range(repeats):
            for key in (("base", "feat") if r % 2 == 0 else ("feat", "base")):
                rules, recompute, zero = base if key == "base" else feat
                times[key].append(run(measure, 2, mesh, rules, recompute, zero, 4, H, 5)[0]["ms"])
        b, f = statistics.median(times["base"]), statistics.median(times["feat"])
        ratios = sorted(fv / bv for fv, bv in zip(times["feat"], times["base"]))
        lines.append(f"| {label} | `{mesh}` | {b:.0f} | {f:.0f} | {f / b:.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f}) | "
                     f"<= {1 + goal:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="memory only (no timing)")
    ap.add_argument("--budget-mib", type=float, default=768.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    parts = [memory_table(), "", largest_gpt(args.budget_mib)]
    if not args.quick:
        parts += ["", f"Step time (4 layers, median of {args.repeats} alternating runs per contender):", "",
                  time_table(args.repeats)]
    from common import write_report
    write_report(os.path.join(os.path.dirname(__file__), "results", "memory.md"), "Memory of SP, recompute, ZeRO-1",
                 "bench/bench_memory.py" + (" --quick" if args.quick else ""), "\n".join(parts))


if __name__ == "__main__":
    main()
