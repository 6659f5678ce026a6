"""Training-step time of meshtron vs PyTorch's own DTensor tensor parallelism, and meshtron's parallel efficiency.

    .venv/bin/python bench/bench_tp.py                     # full run, 3 separate runs per row (minutes on 2 cores)
    .venv/bin/python bench/bench_tp.py --quick --runs 1    # short run (fewer repeats, smaller efficiency model)

One training step = forward + backward + data-parallel gradient averaging + global-norm clipping (1.0) +
AdamW (weight decay 0.1 on matrices; the peer uses whichever implementation, foreach or fused, meshtron's
TrainStep uses) + zero_grad, fp32, the same global batch of text windows.
Both implementations run inside the same ranks (same mesh, same threads per rank), start from the same
weights (meshtron's, gathered with `full_state_dict`), see the same batches, and are timed in alternating
blocks; the table shows medians of the blocks and the ratio meshtron / DTensor (lower is better).

The peer (bench/common.py): a plain torch.nn GPT-2 with meshtron's shapes and parameter names, parallelized
with `parallelize_module`: vocab-parallel embedding (RowwiseParallel on nn.Embedding), q/k/v ColwiseParallel
behind one PrepareModuleInput (one input all-reduce in backward, as Megatron's `f`), o RowwiseParallel, MLP
up ColwiseParallel / down RowwiseParallel, tied head ColwiseParallel with vocab-sharded logits into
`loss_parallel` cross-entropy: the same 21 all-reduces per forward+backward as meshtron. Data parallelism
(DDP wrapped around DTensor-parallelized modules gave None gradients, see /work/shared/ENVIRONMENT.md),
`--peer-dp`:
  manual     (default) after backward, one all-reduce of all local gradient shards flattened together;
  overlap    DDP by hand: per-block buckets all-reduced asynchronously from post-accumulate-grad hooks;
  replicate  PyTorch's composable `replicate` (FSDP2-based DDP) on the batch sub-mesh, per block + root.
On this 2-core machine `manual` gave the peer its fastest steps (overlap and replicate were 3-17% slower on
`batch:2,model:2`), so it is the default: the peer gets its best data parallelism.

Two meshtron columns: its default transport (all-reduces through shared memory between the ranks of one host,
meshtron/comm/shm.py) and the same TrainStep with every all-reduce over gloo, as the peer's: the second
isolates the layers' and the step's own speed from the transport.

Parallel efficiency: meshtron on one rank with all cores' threads vs `model:2` with one thread per rank, at
hidden 1024, timed in alternating blocks inside one process group (rank 1 idles in a barrier while rank 0
runs the one-rank model). Other processes on the machine distort timings, the multi-threaded one-rank time
most: the script waits (up to --wait-idle seconds) for idle cores before each run, measures how many cores
other processes used during each row's timing, and warns when it was more than a quarter core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import median, others_cores, wait_for_idle, write_report  # noqa: E402

CORES = os.cpu_count() or 2
LR = 3e-4


def _setup_rank():
    warnings.filterwarnings("ignore")   # the TP styles' full-backward-hook warning, once per module


def _data(seq: int):
    from common import TextWindows
    return TextWindows(seq, seed=0)


DP_TEXT = {
    "manual": "one all-reduce of all local gradient shards, flattened, after backward (the fastest of the "
              "three peer DP modes here; `--peer-dp overlap|replicate` for the overlapped ones)",
    "overlap": "per-block buckets all-reduced asynchronously from post-accumulate-grad hooks (DDP by hand)",
    "replicate": "composable `replicate` (FSDP2-based DDP) on the batch sub-mesh, per block + root",
}


def _transport_switch(mesh):
    """use(shm: bool): route meshtron's all-reduces through shared memory (its default on one host) or gloo
    (the transport the DTensor peer uses). Returns whether shared memory is available at all."""
    from meshtron.comm import collectives as C
    saved = {a.name: (a.group, C.shm_transport(a.group)) for a in mesh.axes.values() if a.group is not None}

    def use(shm: bool) -> None:
        for group, transport in saved.values():
            C.register_shm(group, transport if shm else None)
    return use, all(t is not None for _, t in saved.values())


def _fused(train_step) -> bool:
    """The peer's AdamW uses the implementation meshtron's TrainStep picked (foreach or fused)."""
    return bool(train_step.optimizer.defaults.get("fused"))


def compare_worker(spec: str, cfg_kw: dict, batch: int, seq: int, warmup: int, repeats: int, steps: int,
                   dp_mode: str, check: bool) -> dict:
    """On every rank of `spec`: meshtron's TrainStep and the DTensor peer, same weights, batches and mesh."""
    _setup_rank()
    import torch.nn.functional as F
    import meshtron
    from meshtron.models import GPT, ModelConfig
    from meshtron.parallel import full_state_dict
    from meshtron.train.step import TrainStep, local_rows
    from common import PeerGPT, PeerStep, Usage, load_meshtron_weights, parallelize_peer, timed_block

    mesh = meshtron.Mesh.from_spec(spec)
    cfg = ModelConfig(**cfg_kw)
    model = GPT(cfg, mesh, None, seed=0)
    full = full_state_dict(model, mesh)
    data = _data(seq)
    batches = [data.global_batch(k, batch) for k in range(warmup + 4)]

    ref_loss = None
    if check:   # the plain model on one process (this rank, the whole batch): the step-0 reference
        ref = PeerGPT(cfg)
        load_meshtron_weights(ref, full)
        with torch.no_grad():
            b = batches[0]
            ref_loss = F.cross_entropy(ref(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).item()
        del ref

    peer = PeerGPT(cfg)
    load_meshtron_weights(peer, full)
    dm = mesh.device_mesh
    tp = dm["model"] if mesh.shape.get("model", 1) > 1 else None
    dp = dm["batch"] if mesh.shape.get("batch", 1) > 1 else None
    if tp is not None:
        parallelize_peer(peer, tp)
    mstep = TrainStep(model, mesh, lr=LR)
    pstep = PeerStep(peer, tp, dp, lr=LR, dp_mode=dp_mode, fused=_fused(mstep))
    baxis = mstep.batch_axis

    def local(k):
        return local_rows(batches[k], baxis)

    # warm-up steps on the same batches: both must log the same losses (correctness of the peer)
    losses = []
    for k in range(warmup):
        a, b = mstep.step(local(k)), pstep.step(local(k))
        losses.append((a["loss"], b["loss"], a["grad_norm"], b["grad_norm"]))

    use_shm, has_shm = _transport_switch(mesh)

    def run_m(i):
        mstep.step(local(warmup + i % 4))

    def run_g(i):
        use_shm(False)
        mstep.step(local(warmup + i % 4))
        use_shm(True)

    def run_p(i):
        pstep.step(local(warmup + i % 4))

    times = {"meshtron": [], "meshtron_gloo": [], "dtensor": []}
    runs = [("meshtron", run_m), ("meshtron_gloo", run_g), ("dtensor", run_p)]
    with Usage() as usage:
        for r in range(repeats):   # alternate, and rotate which goes first
            for name, fn in runs[r % 3:] + runs[:r % 3]:
                times[name].append(timed_block(fn, steps))
    return {**times, "losses": losses, "ref_loss": ref_loss, "fused": _fused(mstep), "shm": has_shm,
            "usage": usage.result()}


def efficiency_worker(cfg_kw: dict, batch: int, seq: int, warmup: int, repeats: int, steps: int,
                      dp_mode: str) -> dict:
    """Two ranks. Alternating blocks of: meshtron and the DTensor peer on `model:2` (1 thread per rank), and,
    on rank 0 alone with all the cores' threads while rank 1 waits idle in a barrier, meshtron on a one-rank
    mesh and the plain (unparallelized) torch.nn peer. Alternating inside one process group keeps the
    single-rank and the model:2 timings under the same machine conditions."""
    _setup_rank()
    import torch.distributed as dist
    import meshtron
    from meshtron.mesh import Mesh, MeshAxis
    from meshtron.models import GPT, ModelConfig
    from meshtron.parallel import full_state_dict
    from meshtron.train.step import TrainStep
    from common import PeerGPT, PeerStep, Usage, load_meshtron_weights, parallelize_peer, timed_block

    cfg = ModelConfig(**cfg_kw)
    mesh = meshtron.Mesh.from_spec("model:2")
    model = GPT(cfg, mesh, None, seed=0)
    full = full_state_dict(model, mesh)
    peer = PeerGPT(cfg)
    load_meshtron_weights(peer, full)
    tp = mesh.device_mesh["model"]
    parallelize_peer(peer, tp)
    mstep = TrainStep(model, mesh, lr=LR)
    steps_tp = {"meshtron": mstep, "dtensor": PeerStep(peer, tp, None, lr=LR, dp_mode=dp_mode, fused=_fused(mstep))}
    use_shm, _ = _transport_switch(mesh)
    rank = dist.get_rank()
    steps_solo = {}
    if rank == 0:
        solo_mesh = Mesh(shape={"model": 1}, axes={"model": MeshAxis("model", 1, 0, None, (0,))})
        solo = GPT(cfg, solo_mesh, None, seed=0)
        plain = PeerGPT(cfg)
        load_meshtron_weights(plain, full)
        steps_solo = {"meshtron_1": TrainStep(solo, solo_mesh, lr=LR), "plain_1": PeerStep(plain, None, None, lr=LR,
                                                                               fused=_fused(mstep))}
    data = _data(seq)
    batches = [data.global_batch(k, batch) for k in range(4)]
    threads = torch.get_num_threads()

    def block(name, n):
        if name in steps_tp:
            return timed_block(lambda i: steps_tp[name].step(batches[i % 4]), n)
        if name == "meshtron_gloo":
            use_shm(False)
            t = timed_block(lambda i: mstep.step(batches[i % 4]), n)
            use_shm(True)
            return t
        dist.barrier()
        t = 0.0
        if rank == 0:
            torch.set_num_threads(CORES)
            t = timed_block(lambda i: steps_solo[name].step(batches[i % 4]), n, sync=False)
            torch.set_num_threads(threads)
        dist.barrier()
        return t

    names = ["meshtron", "meshtron_gloo", "dtensor", "meshtron_1", "plain_1"]
    for name in names:
        block(name, warmup)
    times = {n: [] for n in names}
    with Usage() as usage:
        for r in range(repeats):
            for name in names[r % 5:] + names[:r % 5]:      # rotate which goes first
                times[name].append(block(name, steps))
    return {**times, "fused": _fused(mstep), "usage": usage.result()}


def spread(xs, fmt: str = "{:.2f}") -> str:
    """The median of `xs` and, over several, their range: '0.91 [0.88-0.95]'."""
    m = fmt.format(median(xs))
    return m if len(xs) < 2 else f"{m} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def world_of(spec: str) -> int:
    n = 1
    for item in spec.split(","):
        n *= int(item.split(":")[1])
    return n


def gpt_cfg(d_model: int, n_layer: int, n_head: int, seq: int, vocab: int = 257) -> dict:
    return dict(family="gpt", vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d_model,
                max_seq_len=seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller efficiency model")
    ap.add_argument("--peer-dp", choices=["manual", "overlap", "replicate"], default="manual",
                    help="the DTensor peer's data parallelism (see bench/common.py PeerStep)")
    ap.add_argument("--part", choices=["all", "compare", "efficiency"], default="all",
                    help="run only the meshtron-vs-DTensor table or only the efficiency measurement")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to leave the cores "
                         "idle (default 120; 0: do not wait)")
    ap.add_argument("--runs", type=int, default=3, help="separate runs per row, processes restarted (default 3): "
                    "each cell is their median, with the range")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp.md"))
    args = ap.parse_args()
    from meshtron.launch import run_ranks

    q = args.quick
    # (name, model kwargs, global batch, seq, meshes, warm-up steps, repeats, steps per timed block)
    small = gpt_cfg(256, 4, 4, 128)
    medium = gpt_cfg(512, 8, 8, 256)
    runs = [
        ("GPT h256 L4 s128", small, 8, 128, ["model:2", "batch:2,model:2"], 3, 6 if q else 15, 2),
        ("GPT h512 L8 s256", medium, 8, 256, ["model:2", "batch:2,model:2"], 1 if q else 2, 3 if q else 6, 1),
    ]
    eff_seq, eff_batch = (128, 4) if q else (128, 8)
    eff_cfg = gpt_cfg(1024, 4, 16, eff_seq)
    t_start = time.time()

    rows, checks, fused_seen, shm_seen = [], [], False, False
    R = args.runs
    # rows: (name, batch, spec, threads, [per-run (meshtron, over gloo, DTensor) ms], others' cores)
    for name, cfg, B, seq, meshes, warmup, repeats, steps in (runs if args.part != "efficiency" else []):
        for spec in meshes:
            world = world_of(spec)
            threads = max(1, CORES // world)
            per_run, others = [], 0.0
            for run in range(R):                         # separate runs: the processes restart each time
                wait_for_idle(args.wait_idle)
                res = run_ranks(compare_worker, world, spec, cfg, B, seq, warmup, repeats, steps, args.peer_dp,
                                run == 0, threads_per_rank=threads, timeout_s=1200)
                tm, tg, tp = (median([max(r[k][i] for r in res) for i in range(repeats)]) * 1e3
                              for k in ("meshtron", "meshtron_gloo", "dtensor"))
                per_run.append((tm, tg, tp))
                others = max(others, others_cores([r["usage"] for r in res]))
                shm_seen = res[0]["shm"]
                fused_seen = res[0]["fused"]
                print(f"  {name:18s} {spec:16s} run {run + 1}/{R}: meshtron {tm:8.1f} ms  (over gloo {tg:8.1f} ms)"
                      f"  DTensor {tp:8.1f} ms  ratio {tm / tp:.3f} (over gloo {tg / tp:.3f})   "
                      f"({time.time() - t_start:.0f} s)", flush=True)
                if run == 0:
                    r0 = res[0]
                    dloss = max(abs(a - b) for a, b, _, _ in r0["losses"])
                    dnorm = max(abs(c - d) / max(abs(c), 1e-12) for _, _, c, d in r0["losses"])
                    checks.append(f"{name} on {spec}: step-0 loss one-process reference {r0['ref_loss']:.6f}, "
                                  f"meshtron {r0['losses'][0][0]:.6f}, DTensor {r0['losses'][0][1]:.6f}; "
                                  f"over {len(r0['losses'])} steps max |loss diff| {dloss:.1e}, "
                                  f"max grad-norm rel. diff {dnorm:.1e}; losses "
                                  + " -> ".join(f"{a:.4f}" for a, *_ in r0["losses"]))
            rows.append((name, B, spec, threads, per_run, others))

    # parallel efficiency: 1 rank x CORES threads vs model:2 x 1 thread, alternating in one process group
    eff_name, eff_line, effs = f"GPT h1024 L4 s{eff_seq}", [], []
    if args.part != "compare":
        e_rep, e_steps = (3, 1) if q else (10, 1)
        per_run, others, solo = [], 0.0, []
        for run in range(R):
            wait_for_idle(args.wait_idle)
            res = run_ranks(efficiency_worker, 2, eff_cfg, eff_batch, eff_seq, 1, e_rep, e_steps, args.peer_dp,
                            threads_per_rank=max(1, CORES // 2), timeout_s=1200)
            fused_seen = res[0]["fused"]
            t2m, t2g, t2d = (median([max(r[k][i] for r in res) for i in range(e_rep)]) * 1e3
                             for k in ("meshtron", "meshtron_gloo", "dtensor"))
            t1m, t1p = median(res[0]["meshtron_1"]) * 1e3, median(res[0]["plain_1"]) * 1e3
            per_run.append((t2m, t2g, t2d))
            solo.append((t1m, t1p))
            effs.append((t1m / t2m, t1m / t2g))
            others = max(others, others_cores([r["usage"] for r in res]))
            print(f"  efficiency run {run + 1}/{R}: 1 rank {t1m:.0f} ms, model:2 {t2m:.0f} ms (over gloo {t2g:.0f}"
                  f" ms): {t1m / t2m:.2f} (over gloo {t1m / t2g:.2f})  ({time.time() - t_start:.0f} s)", flush=True)
        rows.append((eff_name, eff_batch, "model:2", max(1, CORES // 2), per_run, others))
        t1m, t1p = median([a for a, _ in solo]), median([b for _, b in solo])
        t2m, t2g, t2d = (median([x[i] for x in per_run]) for i in range(3))
        eff_line = [
            "",
            f"Parallel efficiency ({eff_name}, batch {eff_batch}; medians over {R} run(s)): meshtron on 1 rank x "
            f"{CORES} threads {t1m:.0f} ms, on `model:2` x 1 thread {t2m:.0f} ms: **efficiency "
            f"{median([e for e, _ in effs]):.2f}** ({spread([e for e, _ in effs])}; t_1rank / t_model:2; goal "
            f">= 0.9); with its all-reduces over gloo {t2g:.0f} ms: efficiency {median([g for _, g in effs]):.2f} "
            f"({spread([g for _, g in effs])}). For reference: plain torch.nn on 1 rank x {CORES} threads "
            f"{t1p:.0f} ms (meshtron / plain on one rank {t1m / t1p:.2f}); DTensor on `model:2` "
            f"{t2d:.0f} ms (efficiency against plain {t1p / t2d:.2f}). Measured in one process group, "
            f"alternating blocks (rank 1 idles in a barrier during the 1-rank blocks).",
        ]
    elapsed = time.time() - t_start
    others = [row[-1] for row in rows]
    busy = max(others, default=0.0) > 0.25

    lines = [
        "| config | mesh | threads/rank | meshtron ms/step | meshtron over gloo ms/step | DTensor ms/step "
        "| ratio (meshtron/DTensor) | ratio over gloo | meshtron / over gloo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for name, B, spec, th, per_run, _ in rows:
        rm = [a / c for a, _, c in per_run]
        rg = [b / c for _, b, c in per_run]
        rt = [a / b for a, b, _ in per_run]
        ratios[(name, spec)] = (rm, rg, rt)
        cells = [spread([x[i] for x in per_run], "{:.0f}") for i in range(3)]
        lines.append(f"| {name}, batch {B} | `{spec}` | {th} | " + " | ".join(cells)
                     + f" | {spread(rm)} | {spread(rg)} | {spread(rt)} |")
    goals = []
    if rows:
        worst = max(max(v[0]) for v in ratios.values())
        worst_g = max(max(v[1]) for v in ratios.values())
        goals.append(f"meshtron <= 1.0x DTensor on every row in every run: {'yes' if worst <= 1 else 'NO'} (worst "
                     f"{worst:.2f}; over gloo {'yes' if worst_g <= 1 else 'NO'}, {worst_g:.2f})")
        worst_t = max(max(v[2]) for v in ratios.values())
        goals.append(f"default transport / gloo, worst row and run: {worst_t:.2f}")
    small = [v for (n, _), v in ratios.items() if n == runs[0][0]]
    if small:
        sm = max(max(v[0]) for v in small)
        goals.append(f"small GPT <= 0.85x on both meshes in every run: {'yes' if sm <= 0.85 else 'NO'} "
                     f"(worst {sm:.2f})")
    if effs:
        low = min(e for e, _ in effs)
        goals.append(f"efficiency >= 0.9 in every run: {'yes' if low >= 0.9 else 'NO'} (lowest {low:.2f}; over "
                     f"gloo {min(g for _, g in effs):.2f})")
    lines += [
        "",
        "Goals: " + "; ".join(goals) + ".",
        *eff_line,
        "",
        "Correctness of the peer (rank 0):",
        "",
        *[f"- {c}" for c in checks],
        "",
        f"Step = forward + backward + DP gradient average + clip 1.0 + AdamW + zero_grad, fp32, vocab 257, "
        f"global batch in sequences; each cell: the median over {R} separate run(s) (processes restarted) "
        f"of each run's median of {'quick ' if q else ''}alternating timed blocks (slowest rank per block), with "
        f"the range over the runs in brackets. DTensor peer: `parallelize_module` (RowwiseParallel embedding, Colwise q/k/v/up "
        f"behind one PrepareModuleInput, Rowwise o/down, Colwise tied head + `loss_parallel`), DP = "
        f"{DP_TEXT[args.peer_dp]}; same AdamW implementation as meshtron's TrainStep "
        f"({'fused' if fused_seen else 'foreach'}), same global-norm clipping (one all-reduce over the model axis); "
        f"torch {torch.__version__}, {CORES} cores; cores kept busy by other processes during each row's "
        f"timing: {', '.join(f'{x:.2f}' for x in others)}; the run took {elapsed:.0f} s.",
        "",
        "Transports: `meshtron` all-reduces its layers' activations and gradients through shared memory between "
        "the ranks of one host (meshtron.comm.shm, its default on CPU"
        + ("" if shm_seen or args.part == "efficiency" else "; NOT available in this run, so both columns used gloo")
        + "); `meshtron over gloo` is the same TrainStep with every all-reduce over gloo, the transport the DTensor "
        "peer uses. meshtron's DDP gradient buckets (batch axis) follow the same switch: reduced through shared "
        "memory in its comm hook by default, over gloo in the second column; the DTensor peer's go over gloo.",
    ]
    if busy:
        noisy = [f"{r[0]} on `{r[2]}` ({r[-1]:.1f} cores)" for r in rows if r[-1] > 0.25]
        eff_noisy = bool(eff_line) and rows[-1][-1] > 0.25
        lines += ["", f"**Warning: other processes used this machine's {CORES} cores during the timing of "
                      + ", ".join(noisy) + ": those step times are inflated and noisy"
                      + (f"; the 1-rank x {CORES}-thread time suffers most (its threads wait for each other), so "
                         f"the efficiency is not meaningful" if eff_noisy else "")
                      + ". Re-run on an idle machine.**"]
    write_report(args.out, "meshtron vs DTensor tensor parallelism",
                 f".venv/bin/python bench/bench_tp.py{' --quick' if q else ''} --runs {R}", "\n".join(lines))

if __name__ == "__main__":
    main()
