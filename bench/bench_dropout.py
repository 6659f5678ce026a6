"""What dropout costs in a training step: masks keyed by logical position against no dropout.

    .venv/bin/python bench/bench_dropout.py            # about 3 minutes
    .venv/bin/python bench/bench_dropout.py --quick

For the two bench_tp GPTs (h256 L4 s128 and h512 L8 s256, batch 8, 1 thread per rank) on `model:1` and
`model:2`, three variants train in alternating blocks in one run:
  none     dropout 0: attention through `scaled_dot_product_attention`
  dropout  dropout 0.1 on the embedding, attention probabilities and both residual branches (meshtron's dropout
           attention, masks drawn from the counter-based generator)
  cached   dropout 0.1 with every mask drawn once and replayed: the same work minus drawing masks
  pytorch  dropout 0.1 with the compiled CPU loops off (`parallel/cpu_kernels.py`): masks drawn and applied by
           the PyTorch composition they replace (the same bits), attention through PyTorch ops
The table gives median ms per step; "masks" = (dropout - cached) / dropout is the share of the step spent
drawing masks, "dropout" = dropout / none - 1 is the whole cost of dropout (drawing, applying, and the
explicit attention that dropout on probabilities needs), "without the loops" = pytorch / none - 1. Every
variant runs under the trainer's heap policy (`train/host_memory.py`). Also: attention alone at the ranks' shapes
of both models, forward + backward: meshtron's dropout attention (mask given; the compiled loop), its PyTorch
path, the unfused composition of PyTorch ops, and `scaled_dot_product_attention` without dropout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("none", "dropout", "cached", "pytorch")


MODELS = {   # name: (config overrides of gpt-small-bench, sequence length, blocks, steps per block) for full runs
    "GPT h256 L4 s128": (dict(), 128, 7, 4),
    "GPT h512 L8 s256": (dict(d_model=512, n_layer=8, n_head=8, max_seq_len=256), 256, 4, 1),
}


def worker(mesh_spec: str, overrides: dict, seq: int, blocks: int, steps: int) -> dict:
    import torch
    import meshtron
    from meshtron.models import build_model, get_preset
    from meshtron.train.step import TrainStep, local_rows
    mesh = meshtron.Mesh.from_spec(mesh_spec)
    base = get_preset("gpt-small-bench").replace(**overrides)
    data = torch.randint(0, base.vocab_size, (8, seq + 1), generator=torch.Generator().manual_seed(0))
    trainers = {}
    for name in VARIANTS:
        model = build_model(base.replace(dropout=0.0 if name == "none" else 0.1), mesh, seed=0)
        trainers[name] = TrainStep(model, mesh, lr=1e-4)
    rng = trainers["cached"].model.rng
    cache, draw = {}, rng.mask

    def replay(layer, site, shape, *args, **kw):          # the same masks, drawn once
        key = (layer, site, tuple(shape))
        if key not in cache:
            cache[key] = draw(layer, site, shape, *args, **kw)
        return cache[key]
    rng.mask = replay
    batch = local_rows(data, trainers["none"].batch_axis)
    from meshtron.parallel import cpu_kernels
    cpu_kernels.available()
    loops = cpu_kernels._lib
    times = {n: [] for n in VARIANTS}
    for b in range(blocks + 1):
        order = VARIANTS if b % 2 == 0 else VARIANTS[::-1]
        for name in order:
            cpu_kernels._lib = None if name == "pytorch" else loops
            t0 = time.perf_counter()
            for _ in range(steps):
                trainers[name].step(batch)
            if b:                                         # block 0 warms up
                times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


ATTENTION_SHAPES = ((8, 4, 128, 64), (8, 2, 128, 64), (8, 8, 256, 64), (8, 4, 256, 64))  # model:1, model:2 ranks'


def attention_only(repeats: int, shape) -> dict:
    """ms for forward + backward of causal attention of `shape` (1 thread), q, k, v and the output's gradient as
    the model gives them: (B, heads, T, d) views of (B, T, 3, heads, d) and (B, T, heads, d) tensors."""
    import math
    import torch
    import torch.nn.functional as F
    from meshtron.parallel.attention import _DroppedAttention
    torch.set_num_threads(1)
    B, h, T, d = shape
    qkv = torch.randn(B, T, 3, h, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))     # leaves: no select-backward
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = torch.rand(B, h, T, T, generator=torch.Generator().manual_seed(0)) >= 0.1
    grad = torch.randn(B, T, h, d).transpose(1, 2)      # as the output projection's backward gives it

    def unfused():
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d)).masked_fill(~causal, float("-inf")).softmax(-1)
        return (att * keep.view(torch.uint8).to(att.dtype) / 0.9) @ v

    def meshtrons():
        return _DroppedAttention.apply(q, k, v, keep, 1 / 0.9, 1 / math.sqrt(d))

    def fused():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from meshtron.parallel import cpu_kernels
    loop = cpu_kernels.attention_fits
    out = {}
    for name, fn in (("meshtron", meshtrons), ("pytorch", meshtrons), ("unfused", unfused), ("sdpa", fused)):
        cpu_kernels.attention_fits = (lambda *a: False) if name == "pytorch" else loop
        best = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(3):
                fn().backward(grad)
            best.append((time.perf_counter() - t0) / 3 * 1e3)
        out[name] = statistics.median(best)
    cpu_kernels.attention_fits = loop
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer blocks (noisier)")
    args = ap.parse_args()
    from meshtron.launch import run_ranks
    rows = []
    for model, (overrides, seq, blocks, steps) in MODELS.items():
        if args.quick:
            blocks, steps = max(2, blocks // 2), max(1, steps - 1)
        for mesh_spec, world in (("model:1", 1), ("model:2", 2)):
            r = run_ranks(worker, world, mesh_spec, overrides, seq, blocks, steps, threads_per_rank=1)[0]
            rows.append((model, mesh_spec, r))
    lines = ["| model | mesh | no dropout ms | dropout 0.1 ms | masks replayed ms | masks share | dropout cost | "
             "without the CPU loops ms | cost without them |", "|---|---|---|---|---|---|---|---|---|"]
    for model, mesh_spec, r in rows:
        lines.append(f"| {model} | `{mesh_spec}` | {r['none']:.1f} | {r['dropout']:.1f} | {r['cached']:.1f} | "
                     f"{(r['dropout'] - r['cached']) / r['dropout']:+.1%} | {r['dropout'] / r['none'] - 1:+.1%} | "
                     f"{r['pytorch']:.1f} | {r['pytorch'] / r['none'] - 1:+.1%} |")
    lines += ["", "Attention alone, forward + backward, 1 thread, ms (median of repeats):", "",
              "| B, heads, T, head dim | meshtron's dropout attention | its PyTorch path (the CPU loops off) | "
              "the unfused PyTorch composition | scaled_dot_product_attention, no dropout |", "|---|---|---|---|---|"]
    for shape in ATTENTION_SHAPES:
        attn = attention_only(5 if args.quick else 9, shape)
        lines.append(f"| {', '.join(map(str, shape))} | {attn['meshtron']:.2f} | {attn['pytorch']:.2f} | "
                     f"{attn['unfused']:.2f} | {attn['sdpa']:.2f} |")
    text = "\n".join(lines)
    from common import write_report
    write_report(os.path.join(os.path.dirname(__file__), "results", "dropout.md"), "Dropout's cost per step",
                 "bench/bench_dropout.py" + (" --quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
