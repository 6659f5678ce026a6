"""meshtron's tensor-parallel layers against Megatron-Core's own, on this machine: a Column -> GELU -> Row MLP stack.

    make bench-megatron                                  # installs the peer (megatron-core 0.16.1, no deps), runs
    .venv/bin/python bench/bench_megatron.py --runs 3    # the same, once the peer is installed

Megatron-Core's `tensor_parallel.ColumnParallelLinear(gather_output=False)` -> GELU -> `RowParallelLinear(
input_is_parallel=True)`, stacked `--layers` times at hidden h (d_ff 4h), inputs [s, b, h] (its layout) with
s x b = 2,048 tokens, against meshtron's `ColumnParallelLinear` -> GELU -> `RowParallelLinear` on the same
shapes ([b, s, h], its layout), forward + backward, fp32, tp = 2, one thread per rank. Megatron-Core's layers
run on gloo after `parallel_state.initialize_model_parallel` (CPU initialisation); its attention needs CUDA, so
the comparison stops at the MLP stack. meshtron runs twice: on its default transport (shared memory between
the ranks of one host) and with every collective over gloo, as Megatron's. The three alternate in blocks inside
one process group; each run restarts the processes; the table gives, per run, the median ms per
forward+backward, and the ratios meshtron / Megatron-Core with their spread over the runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TOKENS = 2048


def worker(hidden: int, layers: int, repeats: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear as MColumn, RowParallelLinear as MRow
    import meshtron
    from meshtron.comm import collectives as C
    from meshtron.parallel.linear import ColumnParallelLinear, RowParallelLinear
    mesh = meshtron.Mesh.from_spec("model:2")
    axis = mesh.axis("model")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    init = torch.nn.init.normal_
    torch.manual_seed(0)
    mega = [(MColumn(hidden, 4 * hidden, config=cfg, init_method=init, gather_output=False, bias=True),
             MRow(4 * hidden, hidden, config=cfg, init_method=init, input_is_parallel=True, bias=True,
                  skip_bias_add=False)) for _ in range(layers)]
    mine = [(ColumnParallelLinear(hidden, 4 * hidden, axis), RowParallelLinear(4 * hidden, hidden, axis))
            for _ in range(layers)]
    for (mc, mr), (c, r) in zip(mega, mine):                     # the same weights
        with torch.no_grad():
            c.weight.copy_(mc.weight), c.bias.copy_(mc.bias), r.weight.copy_(mr.weight), r.bias.copy_(mr.bias)
    s, b = 512, TOKENS // 512
    x_m = torch.randn(s, b, hidden, requires_grad=True)
    x_t = x_m.detach().transpose(0, 1).contiguous().requires_grad_()
    shm = {g: C.shm_transport(g) for g in [axis.group]}

    def megatron_step():
        h = x_m
        for col, row in mega:
            h, _ = col(h)
            h, _ = row(F.gelu(h, approximate="tanh"))
        h.sum().backward()

    def meshtron_step():
        h = x_t
        for col, row in mine:
            h = row(F.gelu(col(h), approximate="tanh"))
        h.sum().backward()

    def use_shm(on: bool):
        for g, t in shm.items():
            C.register_shm(g, t if on else None)

    contenders = {"megatron": (megatron_step, False), "meshtron": (meshtron_step, True),
                  "meshtron_gloo": (meshtron_step, False)}
    times = {k: [] for k in contenders}
    for rep in range(repeats + 1):
        order = list(contenders) if rep % 2 == 0 else list(contenders)[::-1]
        for name in order:
            fn, on = contenders[name]
            use_shm(on)
            C.barrier(axis.group)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            C.barrier(axis.group)
            if rep:
                times[name].append((time.perf_counter() - t0) / steps)
    use_shm(True)
    # the same function: outputs agree (a check on the comparison, not a test)
    with torch.no_grad():
        h_m, h_t = x_m, x_t
        for (mc, mr), (c, r) in zip(mega, mine):
            h_m = mr(F.gelu(mc(h_m)[0], approximate="tanh"))[0]
            h_t = r(F.gelu(c(h_t), approximate="tanh"))
        diff = (h_m.transpose(0, 1) - h_t).abs().max().item() / h_m.abs().max().item()
    return {k: statistics.median(v) * 1e3 for k, v in times.items()} | {"rel_diff": diff,
                                                                        "shm": shm[axis.group] is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="separate runs (processes restarted)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        sys.exit("bench_megatron.py: Megatron-Core is not installed: `make bench-megatron`, or "
                 ".venv/bin/python -m pip install --no-deps megatron-core==0.16.1")
    from common import wait_for_idle, write_report
    from meshtron.launch import run_ranks
    shapes = [(1024, 4), (512, 8)]
    repeats, steps = (3, 1) if args.quick else (5, 2)
    lines = ["| stack | run | Megatron-Core ms | meshtron ms | meshtron over gloo ms | ratio | ratio over gloo |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for hidden, layers in shapes:
        ratios, ratios_g = [], []
        for run in range(args.runs):
            wait_for_idle(60)
            r = run_ranks(worker, 2, hidden, layers, repeats, steps, threads_per_rank=1, timeout_s=1200)
            t = {k: max(x[k] for x in r) for k in ("megatron", "meshtron", "meshtron_gloo")}
            ratios.append(t["meshtron"] / t["megatron"])
            ratios_g.append(t["meshtron_gloo"] / t["megatron"])
            lines.append(f"| h{hidden} x {layers} | {run + 1} | {t['megatron']:.1f} | {t['meshtron']:.1f} | "
                         f"{t['meshtron_gloo']:.1f} | {ratios[-1]:.2f} | {ratios_g[-1]:.2f} |")
            assert r[0]["rel_diff"] < 1e-4, f"the two stacks disagree: {r[0]['rel_diff']:.1e}"
        summary.append(f"h{hidden} x {layers}: meshtron / Megatron-Core median {statistics.median(ratios):.2f} "
                       f"(range {min(ratios):.2f}-{max(ratios):.2f}), over gloo {statistics.median(ratios_g):.2f} "
                       f"({min(ratios_g):.2f}-{max(ratios_g):.2f}); <= 1.0 in every run: "
                       f"{'yes' if max(ratios + ratios_g) <= 1.0 else 'NO'}")
    text = "\n".join(lines + [""] + summary + ["", f"{TOKENS} tokens, tp = 2, 1 thread per rank, fp32, forward + "
                                               f"backward; medians of {repeats} alternating blocks per run."])
    write_report(os.path.join(os.path.dirname(__file__), "results", "megatron.md"),
                 "meshtron vs Megatron-Core tensor-parallel layers", "bench/bench_megatron.py", text)


if __name__ == "__main__":
    main()
