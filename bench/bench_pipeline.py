"""Pipeline schedules on this machine: measured bubble, per-stage activation memory and step time.

    .venv/bin/python bench/bench_pipeline.py            # about 4 minutes on 2 cores
    .venv/bin/python bench/bench_pipeline.py --quick

GPT (h 256, 8 layers, 4 heads, sequence 128, dropout 0.1), 1 thread per rank, global batch 16 sequences in m
micro-batches. For each schedule on `pipe:2` (and on `pipe:4`, where 4 ranks share 2 cores, so waiting ranks
give their core away and the bubble reads low):
- bubble: the share of the step a rank spends waiting for a receive (the runner's trace), averaged over ranks,
  against the schedule's (p-1)/(v·m) as a share of the step, (p-1)/(v·m) / (1 + (p-1)/(v·m));
- activations: the peak bytes a stage holds for backward (the saved tensors of its in-flight micro-batches,
  measured per micro-batch with saved-tensor hooks and followed through the action list), against the
  schedule's in-flight count x one micro-batch's bytes;
- step time: median ms per step, against `batch:p` on the same ranks (plain data parallelism, same batch).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)]


def worker(mesh_spec: str, schedule: str, chunks: int, micro: int, steps: int) -> dict:
    import torch
    import meshtron
    from meshtron.models import ModelConfig, build_model
    from meshtron.pipeline import schedule as S
    from meshtron.train.step import TrainStep, local_rows
    mesh = meshtron.Mesh.from_spec(mesh_spec)
    cfg = ModelConfig("gpt", vocab_size=512, n_layer=8, n_head=4, d_model=256, max_seq_len=128, dropout=0.1)
    model = build_model(cfg, mesh, seed=0, virtual_stages=chunks)
    trainer = TrainStep(model, mesh, lr=1e-4, micro_batches=micro, pipeline_schedule=schedule)
    data = torch.randint(0, 512, (16, 129), generator=torch.Generator().manual_seed(0))
    batch = local_rows(data, trainer.batch_axis)
    trainer.step(batch)                                          # warm-up
    times, bubbles = [], []
    runner = trainer.pipeline
    for _ in range(steps):
        if runner is not None:
            runner.trace = []
        t0 = time.perf_counter()
        trainer.step(batch)
        dt = time.perf_counter() - t0
        times.append(dt)
        if runner is not None:
            waited = sum(e - s for what, s, e in runner.trace if what == "wait")
            span = runner.trace[-1][2] - runner.trace[0][1]
            bubbles.append(waited / span)
    out = {"ms": statistics.median(times) * 1e3, "bubble": statistics.median(bubbles) if bubbles else 0.0}
    if runner is not None:                                       # activation bytes per micro-batch and chunk
        saved = {}
        forward = model.chunk_forward

        def counted(chunk, x, targets):
            seen = {}

            def pack(t):
                if not isinstance(t, torch.nn.Parameter):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = forward(chunk, x, targets)
            saved[chunk] = sum(seen.values())
            return y
        model.chunk_forward = counted
        trainer.step(batch)
        model.chunk_forward = forward
        live = peak = 0
        for a in runner.mine:
            live += saved[a.chunk] if a.kind == "F" else -saved[a.chunk]
            peak = max(peak, live)
        sim = S.simulate(runner.actions, runner.stages, runner.chunks)
        out.update(peak=peak, per_micro=sum(saved.values()), in_flight=sim["peak_in_flight"][runner.rank] / chunks,
                   stage=runner.rank)
    return out


def run(mesh_spec, world, *args):
    from meshtron.launch import run_ranks
    return run_ranks(worker, world, mesh_spec, *args, threads_per_rank=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else 6
    lines = ["| mesh | schedule | m | bubble measured | (p-1)/(v·m) as share | stage peak activations, MiB | "
             "in-flight x one micro-batch | step ms | `batch:p` ms | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in (2, 4):
        for micro in ((4, 8) if p == 2 else (8,)):
            flat = run(f"batch:{p}", p, "1f1b", 1, max(1, micro // p), steps)[0]["ms"]   # same micro-batch size
            for schedule, v in CASES:
                ranks = run(f"pipe:{p}", p, schedule, v, micro, steps)
                bubble = statistics.mean(r["bubble"] for r in ranks)
                ideal = (p - 1) / (v * micro)
                first = ranks[0]
                lines.append(
                    f"| `pipe:{p}` | {schedule}{f' v={v}' if v > 1 else ''} | {micro} | {bubble:.1%} | "
                    f"{ideal / (1 + ideal):.1%} | {first['peak'] / 2**20:.1f} (stage 0) | "
                    f"{first['in_flight'] * first['per_micro'] / 2**20:.1f} ({first['in_flight']:g} x "
                    f"{first['per_micro'] / 2**20:.2f}) | {first['ms']:.0f} | {flat:.0f} | {first['ms'] / flat:.2f} |")
    from common import write_report
    write_report(os.path.join(os.path.dirname(__file__), "results", "pipeline.md"), "Pipeline schedules",
                 "bench/bench_pipeline.py" + (" --quick" if args.quick else ""), "\n".join(lines))


if __name__ == "__main__":
    main()
