"""What dropout costs in a training step: masks keyed by logical position against no dropout.

    .venv/bin/python bench/bench_dropout.py            # about 2 minutes
    .venv/bin/python bench/bench_dropout.py --quick

For the bench GPT (h256 L4 s128, batch 8, 1 thread per rank) on `model:1` and `model:2`, three variants train
in alternating blocks in one run:
  none     dropout 0: attention through `scaled_dot_product_attention`
  dropout  dropout 0.1 on the embedding, attention probabilities and both residual branches (explicit attention,
           masks drawn from the counter-based generator)
  cached   dropout 0.1 with every mask drawn once and replayed: the same work minus drawing masks
The table gives median ms per step; "masks" = (dropout - cached) / dropout is the share of the step spent
drawing masks, "dropout" = dropout / none - 1 is the whole cost of dropout (drawing, applying, and the
explicit attention that dropout on probabilities needs). Also: attention alone, explicit vs
`scaled_dot_product_attention`, forward + backward, without dropout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("none", "dropout", "cached")


def worker(mesh_spec: str, blocks: int, steps: int) -> dict:
    import torch
    import meshtron
    from meshtron.models import build_model, get_preset
    from meshtron.train.step import TrainStep, local_rows
    mesh = meshtron.Mesh.from_spec(mesh_spec)
    base = get_preset("gpt-small-bench")
    data = torch.randint(0, base.vocab_size, (8, 129), generator=torch.Generator().manual_seed(0))
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
    times = {n: [] for n in VARIANTS}
    for b in range(blocks + 1):
        order = VARIANTS if b % 2 == 0 else VARIANTS[::-1]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                trainers[name].step(batch)
            if b:                                         # block 0 warms up
                times[name].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def attention_only(repeats: int) -> tuple[float, float]:
    """ms for forward + backward of causal attention (B 8, 4 heads, T 128, head 64): explicit vs sdpa."""
    import math
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    q, k, v = (torch.randn(8, 4, 128, 64, requires_grad=True) for _ in range(3))
    mask = torch.ones(128, 128, dtype=torch.bool).tril()

    def explicit():
        att = (q @ k.transpose(-2, -1)) / math.sqrt(64)
        return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    def fused():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = {}
    for name, fn in (("explicit", explicit), ("sdpa", fused)):
        best = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(10):
                fn().sum().backward()
            best.append((time.perf_counter() - t0) / 10 * 1e3)
        out[name] = statistics.median(best)
    return out["explicit"], out["sdpa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer blocks (noisier)")
    args = ap.parse_args()
    from meshtron.launch import run_ranks
    blocks, steps = (3, 3) if args.quick else (7, 4)
    rows = []
    for mesh_spec, world in (("model:1", 1), ("model:2", 2)):
        r = run_ranks(worker, world, mesh_spec, blocks, steps, threads_per_rank=1)[0]
        rows.append((mesh_spec, r))
    explicit, sdpa = attention_only(5 if args.quick else 9)
    lines = ["| mesh | no dropout ms | dropout 0.1 ms | masks replayed ms | masks share | dropout cost |",
             "|---|---|---|---|---|---|"]
    for mesh_spec, r in rows:
        lines.append(f"| `{mesh_spec}` | {r['none']:.1f} | {r['dropout']:.1f} | {r['cached']:.1f} | "
                     f"{(r['dropout'] - r['cached']) / r['dropout']:+.1%} | {r['dropout'] / r['none'] - 1:+.1%} |")
    lines.append("")
    lines.append(f"Attention alone (B 8, 4 heads, T 128, head 64, forward + backward, 1 thread): explicit "
                 f"{explicit:.2f} ms, scaled_dot_product_attention {sdpa:.2f} ms.")
    text = "\n".join(lines)
    from common import write_report
    write_report(os.path.join(os.path.dirname(__file__), "results", "dropout.md"), "Dropout's cost per step",
                 "bench/bench_dropout.py" + (" --quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
