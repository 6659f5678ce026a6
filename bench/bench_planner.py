"""Planner vs. measurement on this machine: per-rank peak memory (target ±10%) and step time (±25%), cpu profile.

Invariant: every case is one exact layout (model shape, mesh, global batch, sequence length, micro-batch); the
prediction comes from `meshtron.planner.predict` with the calibrated `cpu` profile, the measurement from
`measure(case)`, which runs meshtron's trainer on that layout: `meshtron.launch.run_ranks` starts the mesh's
ranks (forkserver, torch preloaded, threads per rank = cores // ranks), each builds `Mesh.from_spec`,
`build_model` and `TrainStep` (DDP over the batch axis, fp32, fused AdamW, clipping) and trains on synthetic
token batches (`local_rows` of one global batch).

Memory. Measured: the fullest rank's peak resident set (ru_maxrss) over the whole run: Python, torch, gloo and
the glibc heap's retained free blocks included, which is what the machine must provide and what the cpu
profile's prediction includes (its runtime: the calibrated RSS of a rank after a tiny training step; its
allocator share). Because ~260 MiB of runtime in both would hide errors in the model's own memory, each rank
also notes its RSS after joining the mesh and training a tiny model for two steps (its runtime, measured), and
the table compares the rest, "tensors": measured peak - that runtime vs. predicted total - predicted runtime.
A case's memory is within tolerance only if both are.

Time. A step's time is its slowest rank's wall time; per step, the share of the cores other processes used
(the machine's busy time from /proc/stat less our ranks' CPU time) tells disturbed steps (> QUIET) apart. The
reported time is the median of the undisturbed timed steps after `warmup` steps; the bench waits for a quiet
second before each run and runs a case again while it has fewer than MIN_QUIET_STEPS undisturbed steps, within
--budget-s. A case measured busy throughout says so ('busy') instead of passing or failing on its step time.

Run: `.venv/bin/python bench/bench_planner.py [--json] [--budget-s S] [--repeats N] [--only I ...]`; the
table goes to stdout and bench/results/planner.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from meshtron.mesh import parse_mesh_spec
from meshtron.models.config import get_preset
from meshtron.planner import ParallelLayout, Prediction, predict
from meshtron.cli.calibrate import measure as calibrate_cpu
from meshtron.planner.calibrate import calibration_warning, cpu_profile

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MEMORY_TOLERANCE = 0.10
TIME_TOLERANCE = 0.25


@dataclass(frozen=True)
class Case:
    model: str                      # a preset of meshtron.models.config
    mesh: str                       # e.g. "batch:2,model:2", "pipe:2,batch:2"
    global_batch: int
    seq_len: int
    micro_batch: int | None = None  # None: the whole per-rank share at once (no gradient accumulation)
    recompute: str = "none"
    sequence_parallel: bool = False
    sharded_optimizer: bool = False
    schedule: str = "1f1b"          # with a pipe axis
    shape: tuple = ()               # ModelConfig fields overriding the preset's: (("d_model", 1024), ...)
    steps: int = 5                  # timed steps (their median is reported)
    warmup: int = 2                 # untimed steps first

    def config(self):
        cfg = get_preset(self.model).replace(**dict(self.shape))
        return cfg.replace(max_seq_len=max(cfg.max_seq_len, self.seq_len))

    @property
    def name(self) -> str:
        if not self.shape:
            return self.model
        c = self.config()
        return f"{c.family} {c.d_model}x{c.n_layer}" + (f" V{c.vocab_size}" if c.vocab_size != 257 else "")

    def layout(self) -> ParallelLayout:
        shape = parse_mesh_spec(self.mesh)
        unknown = set(shape) - {"batch", "model", "pipe"}
        if unknown:
            raise ValueError(f"case mesh {self.mesh!r}: the planner knows the axes batch, model and pipe, "
                             f"not {sorted(unknown)}")
        dp = shape.get("batch", 1)
        return ParallelLayout(dp=dp, tp=shape.get("model", 1), pp=shape.get("pipe", 1),
                              micro_batch=self.micro_batch or self.global_batch // dp, recompute=self.recompute,
                              sequence_parallel=self.sequence_parallel, sharded_optimizer=self.sharded_optimizer)


    def rules(self) -> str | None:
        """The layout rules the case trains with: the defaults, plus `seq:model` with sequence parallelism."""
        if not self.sequence_parallel:
            return None
        axes = parse_mesh_spec(self.mesh)
        rules = ["heads:model", "kv_heads:model", "d_ff:model", "vocab:model", "seq:model"]
        return ";".join((["batch:batch"] if "batch" in axes else []) + rules + (["layers:pipe"] if "pipe" in axes
                                                                                else []))


# Shapes large enough that the model's own memory (tens to hundreds of MiB per rank) dominates the runtime's and
# the allocator's noise, small enough that a step takes 0.3-3 s on two cores. fp32; no dropout (fused attention)
# unless a case needs attention's s² scores (selective recompute).
GPT_1024 = (("d_model", 1024), ("n_head", 8), ("n_layer", 4))
GPT_1024_DROP = GPT_1024 + (("dropout", 0.1),)
GPT_512_V = (("d_model", 512), ("n_head", 8), ("n_layer", 4), ("vocab_size", 16384))
LLAMA_768 = (("d_model", 768), ("n_head", 12), ("n_kv_head", 4), ("d_ff", 2048), ("n_layer", 6))
CASES = [
    Case("gpt-mini", "model:1", 4, 256, shape=GPT_1024),
    Case("gpt-mini", "model:2", 4, 256, shape=GPT_1024),
    Case("gpt-mini", "batch:2", 4, 256, shape=GPT_1024),
    Case("gpt-mini", "batch:2", 2, 256, shape=GPT_1024),                 # optimizer and gradient all-reduce heavy
    Case("gpt-mini", "batch:2,model:2", 4, 256, shape=GPT_1024),
    Case("gpt-mini", "batch:2", 4, 256, micro_batch=1, shape=GPT_1024),  # gradient accumulation
    Case("llama-mini", "model:1", 2, 512, shape=LLAMA_768),
    Case("llama-mini", "model:2", 2, 512, shape=LLAMA_768),
    Case("llama-mini", "batch:2,model:2", 2, 512, shape=LLAMA_768),
    Case("gpt-mini", "model:2", 8, 256, shape=GPT_512_V),                # logits heavy
    # the memory features and the pipeline
    Case("gpt-mini", "model:2", 4, 256, shape=GPT_1024_DROP, sequence_parallel=True),
    Case("gpt-mini", "model:2", 4, 256, shape=GPT_1024_DROP, recompute="selective"),
    Case("gpt-mini", "model:2", 4, 256, shape=GPT_1024_DROP, recompute="full"),
    Case("gpt-mini", "batch:2", 4, 256, shape=GPT_1024, sharded_optimizer=True),
    Case("gpt-mini", "batch:2,model:2", 4, 256, shape=GPT_1024_DROP, sequence_parallel=True,
         recompute="selective", sharded_optimizer=True),
    Case("gpt-mini", "pipe:2", 8, 256, micro_batch=2, shape=GPT_1024),
    Case("gpt-mini", "pipe:2", 8, 256, micro_batch=2, shape=GPT_1024, recompute="full", schedule="1f1b"),
]


def prediction(case: Case, hw) -> Prediction:
    """The planner's prediction for exactly this case's layout."""
    return predict(case.config(), case.layout(), hw, global_batch=case.global_batch,
                   seq_len=case.seq_len, dtype="fp32")


# --------------------------------------------------------------------------------------------------------------
# The measurement: meshtron's trainer on the case's mesh (TrainStep: DDP over the batch axis, fp32, fused
# AdamW, global-norm clipping), synthetic token batches, ranks started by meshtron.launch.run_ranks.
# --------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _busy_seconds() -> float:
    """CPU seconds this machine (every process, ours or not) has spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _train_rank(mesh_spec: str, cfg, global_batch: int, seq_len: int, micro_batches: int, warmup: int,
                steps: int, options: dict | None = None) -> dict:
    """One rank. First the runtime: join the mesh and train a tiny model for two steps (gloo, code pages,
    autograd and optimizer paths), then note the resident size. Then `cfg`: `warmup` + `steps` steps, each
    timed; the rank's CPU time and the machine's busy time over the timed steps (to see other load); and the
    peak resident size of the whole run (ru_maxrss)."""
    import gc
    import resource

    import torch
    import torch.distributed as dist
    from meshtron.mesh import Mesh
    from meshtron.models import build_model, get_preset
    from meshtron.train.step import TrainStep, local_rows

    mesh = Mesh.from_spec(mesh_spec)
    rss_start = _rss_bytes()
    g = torch.Generator().manual_seed(0)
    tiny = get_preset("gpt-tiny" if cfg.family == "gpt" else "llama-tiny")
    options = dict(options or {})
    rules = options.pop("rules", None)
    tiny_rules = None if rules is None else rules
    trainer = TrainStep(build_model(tiny, mesh, tiny_rules, seed=0), mesh, lr=1e-3, micro_batches=micro_batches,
                        **options)
    batch = torch.randint(0, tiny.vocab_size, (global_batch, 17), generator=g)
    for _ in range(2):
        trainer.step(local_rows(batch, trainer.batch_axis))
    del trainer, batch
    gc.collect()
    rss_runtime = _rss_bytes()

    trainer = TrainStep(build_model(cfg, mesh, rules, seed=0), mesh, lr=1e-4, micro_batches=micro_batches, **options)
    batches = [torch.randint(0, cfg.vocab_size, (global_batch, seq_len + 1), generator=g) for _ in range(2)]
    wall, cpu, busy = [], [], []
    for i in range(warmup + steps):
        if i == warmup and mesh.device_mesh is not None:
            dist.barrier()
        rows = local_rows(batches[i % 2], trainer.batch_axis)
        t0, c0, b0 = time.perf_counter(), time.process_time(), _busy_seconds()
        trainer.step(rows)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            busy.append(_busy_seconds() - b0)
    return {"rank": mesh.rank, "rss_start": rss_start, "rss_runtime": rss_runtime,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,     # KiB on Linux
            "wall": wall, "cpu": cpu, "busy": busy}


def unsupported(case: Case) -> str | None:
    """Why meshtron's trainer cannot run this case, or None (it runs every layout the planner knows)."""
    return None


def measure(case: Case, threads_per_rank: int | None = None) -> dict:
    """Run meshtron's trainer on `case` once: the fullest rank's peak RSS and its runtime RSS; per timed step,
    its wall time (a step ends on its slowest rank) and the share of the cores other processes used meanwhile
    (the machine's busy time from /proc/stat less our ranks' CPU time)."""
    from meshtron.launch import run_ranks
    why = unsupported(case)
    if why:
        raise ValueError(f"case {case.name} {case.mesh}: {why}")
    layout = case.layout()
    world = layout.devices
    threads = threads_per_rank or max(1, CORES // world)
    micro_batches = case.global_batch // layout.dp // layout.micro_batch
    options = {"rules": case.rules(), "recompute": case.recompute, "zero": int(case.sharded_optimizer),
               "pipeline_schedule": case.schedule}
    out = run_ranks(_train_rank, world, case.mesh, case.config(), case.global_batch, case.seq_len,
                    micro_batches, case.warmup, case.steps, options, threads_per_rank=threads)
    fullest = max(out, key=lambda r: r["peak_rss"])
    steps = []
    for i in range(case.steps):
        wall = max(r["wall"][i] for r in out)
        ours = sum(r["cpu"][i] for r in out)
        # the step's CPU work spread over the cores it may use: a load-robust estimate of an undisturbed step
        cpu_bound = max(max(r["cpu"][i] for r in out) / threads, ours / min(CORES, world * threads))
        steps.append((wall, max(0.0, out[0]["busy"][i] - ours) / (CORES * out[0]["wall"][i]), cpu_bound))
    return {"peak_rss": fullest["peak_rss"], "runtime_rss": fullest["rss_runtime"], "steps": steps,
            "threads_per_rank": threads}


# --------------------------------------------------------------------------------------------------------------
# Prediction vs. measurement
# --------------------------------------------------------------------------------------------------------------
def relative_error(predicted: float, measured: float | None) -> float | None:
    return None if measured is None else predicted / measured - 1


QUIET = 0.15        # a step during which other processes used more than this share of the cores is disturbed
MIN_QUIET_STEPS = 3


def others_load(window_s: float = 1.0) -> float:
    """Share of the cores busy over the next `window_s` seconds (called while none of our ranks runs)."""
    b0, t0 = _busy_seconds(), time.monotonic()
    time.sleep(window_s)
    return (_busy_seconds() - b0) / (CORES * (time.monotonic() - t0))


def wait_for_quiet(until: float) -> None:
    """Wait, at most until `until` (time.monotonic()), for a second in which other processes leave the cores."""
    while time.monotonic() < until and others_load() > QUIET:
        pass


def measure_quietly(case: Case, threads_per_rank: int | None, runs: list[dict], repeats: int, deadline: float,
                    run_s: float) -> None:
    """Append runs of `case` to `runs`: at least `repeats` in all, more while fewer than MIN_QUIET_STEPS timed
    steps were undisturbed and `deadline` leaves `run_s` for one more; before each, wait for a quiet second."""
    while True:
        wait_for_quiet(deadline - run_s)
        runs.append(measure(case, threads_per_rank))
        if len(runs) >= repeats and (len(quiet_steps(runs)) >= MIN_QUIET_STEPS
                                     or time.monotonic() + run_s > deadline):
            return


def quiet_steps(runs: list[dict]) -> list[tuple]:
    return [s for r in runs for s in r["steps"] if s[1] <= QUIET]


def summarize(case: Case, runs: list[dict]) -> dict:
    """Memory: the median of the runs' peaks. Step time: the median of the undisturbed steps; if there are too
    few, of the case.steps least disturbed ones, and the result says it was measured busy."""
    steps = [s for r in runs for s in r["steps"]]
    quiet = quiet_steps(runs)
    used = quiet if len(quiet) >= MIN_QUIET_STEPS else sorted(steps, key=lambda s: s[1])[:case.steps]
    return {"peak_rss": statistics.median(r["peak_rss"] for r in runs),
            "runtime_rss": statistics.median(r["runtime_rss"] for r in runs),
            "step_s": statistics.median(s[0] for s in used), "other_load": statistics.median(s[1] for s in used),
            "cpu_bound_s": statistics.median(s[2] for s in used),
            "busy": len(quiet) < MIN_QUIET_STEPS, "quiet_steps": len(quiet), "steps": steps,
            "threads_per_rank": runs[0]["threads_per_rank"], "runs": len(runs),
            "peak_rss_runs": [r["peak_rss"] for r in runs]}


def compare(case: Case, pred: Prediction, m: dict, threads: int) -> dict:
    tensors_pred = pred.memory["total"] - pred.memory["runtime"]
    tensors_meas = m["peak_rss"] - m["runtime_rss"]
    mem_err = relative_error(pred.memory["total"], m["peak_rss"])
    tensor_err = relative_error(tensors_pred, tensors_meas)
    time_err = relative_error(pred.step_time_s, m["step_s"])
    r = {"case": {**asdict(case), "name": case.name}, "threads_per_rank": threads,
         "predicted_rss_bytes": pred.memory["total"], "measured_rss_bytes": m["peak_rss"], "memory_error": mem_err,
         "predicted_tensor_bytes": tensors_pred, "measured_tensor_bytes": tensors_meas,
         "tensor_memory_error": tensor_err,
         "predicted_runtime_bytes": pred.memory["runtime"], "measured_runtime_bytes": m["runtime_rss"],
         "predicted_step_s": pred.step_time_s, "measured_step_s": m["step_s"], "time_error": time_err,
         "other_load": m["other_load"], "busy": m["busy"], "measurement": m,
         "predicted_memory": pred.memory, "predicted_time": pred.time,
         "memory_ok": max(abs(mem_err), abs(tensor_err)) <= MEMORY_TOLERANCE,
         "time_ok": abs(time_err) <= TIME_TOLERANCE}
    r["ok"] = r["memory_ok"] and r["time_ok"]
    return r


def run(threads_per_rank: int | None, recalibrate: bool, repeats: int, budget_s: float,
        cases: list[Case] = CASES) -> list[dict]:
    """Every case once (its share of the budget), then the cases still without enough undisturbed steps again,
    while the budget lasts."""
    start = time.monotonic()
    end = start + budget_s
    preds, runs, threads = [], [[] for _ in cases], []
    for i, case in enumerate(cases):
        threads.append(threads_per_rank or max(1, CORES // case.layout().devices))
        hw = cpu_profile(threads[-1], recalibrate=recalibrate and i == 0, measure=calibrate_cpu)
        warning = calibration_warning(hw)
        if warning and i == 0:
            print(f"warning: {warning}", file=sys.stderr)
        preds.append(prediction(case, hw))

    def run_s(i: int) -> float:             # a run's length: start, tiny warm-up, steps
        return 8 + (cases[i].warmup + cases[i].steps + 2) * preds[i].step_time_s

    def report(i: int) -> None:
        m = summarize(cases[i], runs[i])
        r = compare(cases[i], preds[i], m, threads[i])
        print(f"[{time.monotonic() - start:5.0f} s] {cases[i].name} {cases[i].mesh}: memory {r['memory_error']:+.1%}, "
              f"step {r['time_error']:+.1%} ({m['quiet_steps']} quiet of {len(m['steps'])} steps, {m['runs']} run(s), "
              f"other load {m['other_load']:.0%})", file=sys.stderr)

    for i, case in enumerate(cases):
        share = (end - time.monotonic()) / (len(cases) - i)
        measure_quietly(case, threads_per_rank, runs[i], repeats, time.monotonic() + share, run_s(i))
        report(i)
    while True:
        again = [i for i in range(len(cases)) if len(quiet_steps(runs[i])) < MIN_QUIET_STEPS
                 and time.monotonic() + run_s(i) < end]
        if not again:
            break
        for i in again:                     # one more run each, round robin
            if time.monotonic() + run_s(i) < end:
                wait_for_quiet(end - run_s(i))
                runs[i].append(measure(cases[i], threads_per_rank))
                report(i)
    return [compare(case, preds[i], summarize(case, runs[i]), threads[i]) for i, case in enumerate(cases)]


def verdict(r: dict) -> str:
    """yes; NO; or 'busy' when the memory is within tolerance but the step time, off, was measured while other
    processes held more than QUIET of the cores in every step."""
    if r["ok"]:
        return "yes"
    return "busy" if r["memory_ok"] and r["busy"] else "NO"


def table(results: list[dict]) -> list[str]:
    def mib(x):
        return f"{x / 2 ** 20:.0f}"

    def pct(x):
        return f"{x:+.1%}"

    head = ["model", "mesh", "features", "batch", "seq", "micro", "ranks x threads", "pred MiB", "meas MiB", "err",
            "tensors pred", "tensors meas", "err", "pred s", "meas s", "err", "other load", "ok"]
    rows = [head, ["---"] * len(head)]
    for r in results:
        c = r["case"]
        lay = Case(**{k: v for k, v in c.items() if k != "name"}).layout()
        features = [f for f, on in (("SP", c["sequence_parallel"]), (f"recompute {c['recompute']}",
                                                                    c["recompute"] != "none"),
                                    ("ZeRO-1", c["sharded_optimizer"]),
                                    (c["schedule"], lay.pp > 1)) if on]
        rows.append([c["name"], c["mesh"], ", ".join(features) or "-", str(c["global_batch"]), str(c["seq_len"]),
                     str(c["micro_batch"] or c["global_batch"] // lay.dp), f"{lay.devices} x {r['threads_per_rank']}",
                     mib(r["predicted_rss_bytes"]), mib(r["measured_rss_bytes"]), pct(r["memory_error"]),
                     mib(r["predicted_tensor_bytes"]), mib(r["measured_tensor_bytes"]), pct(r["tensor_memory_error"]),
                     f"{r['predicted_step_s']:.3f}", f"{r['measured_step_s']:.3f}", pct(r["time_error"]),
                     f"{r['other_load']:.0%}", verdict(r)])
    return ["| " + " | ".join(row) + " |" for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="threads of each rank (default: the cores over the ranks, at least 1)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the cpu profile again")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case (more while the machine is busy)")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="seconds for all cases, waiting for quiet and retrying disturbed ones included")
    parser.add_argument("--only", type=int, nargs="*", help="run only these cases (indices into CASES)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "planner.md"))
    args = parser.parse_args(argv)
    start = time.monotonic()
    cases = [CASES[i] for i in args.only] if args.only else CASES
    results = run(args.threads_per_rank, args.recalibrate, args.repeats, args.budget_s, cases)
    elapsed = time.monotonic() - start
    if args.json:
        print(json.dumps(results, indent=1))
        return 0 if all(r["ok"] for r in results) else 1
    hw = cpu_profile(1, measure=calibrate_cpu)
    lines = table(results)
    footer = [f"targets: memory within ±{MEMORY_TOLERANCE:.0%}, step time within ±{TIME_TOLERANCE:.0%}; "
              f"{sum(r['ok'] for r in results)}/{len(results)} cases within both; {elapsed:.0f} s",
              f"cpu profile: {hw.description}"]
    print("\n".join(lines + [""] + footer))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(RESULTS_HEADER + "\n".join(lines) + "\n\n" + "\n\n".join(footer) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


RESULTS_HEADER = """# Planner vs. measurement on this machine

Written by `.venv/bin/python bench/bench_planner.py`. Each row runs meshtron's trainer for real (`run_ranks`,
`TrainStep`: DDP over the batch axis, fp32, fused AdamW, clipping; synthetic tokens) and compares it with
`meshtron.planner.predict` on the calibrated `cpu` profile. Memory: the fullest rank's peak RSS (ru_maxrss),
and "tensors", the same less the rank's measured runtime (its RSS after joining the mesh and training a tiny
model); the prediction less its runtime term. Time: the median wall time of the undisturbed steps (other
processes using at most 15% of the cores during the step; "other load" is theirs during the steps used); a
row measured while the machine was busy throughout says "busy". The bench's docstring has the details.

"""


if __name__ == "__main__":
    sys.exit(main())
