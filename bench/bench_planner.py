"""Planner vs. measurement on this machine: per-rank peak memory (target ±15%) and step time (±25%), cpu profile.

Invariant: every case is one exact layout (model preset, mesh, global batch, sequence length, micro-batch and
memory options); the prediction comes from `meshtron.planner.predict` with the calibrated `cpu` profile, the
measurement from `measure(case)`, which runs meshtron's trainer on that layout (to be filled in, see below).
Run: `.venv/bin/python bench/bench_planner.py [--json] [--threads-per-rank N] [--recalibrate]`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from meshtron.mesh import parse_mesh_spec
from meshtron.models.config import get_preset
from meshtron.planner import ParallelLayout, Prediction, predict
from meshtron.planner.calibrate import calibration_warning, cpu_profile

MEMORY_TOLERANCE = 0.15
TIME_TOLERANCE = 0.25


@dataclass(frozen=True)
class Case:
    model: str                      # a preset of meshtron.models.config
    mesh: str                       # e.g. "batch:2,model:2"; a pipe axis is understood but the trainer lacks it
    global_batch: int
    seq_len: int
    micro_batch: int | None = None  # None: the whole per-rank share at once (no gradient accumulation)
    recompute: bool = False
    sequence_parallel: bool = False
    sharded_optimizer: bool = False
    steps: int = 10                 # steps the measurement runs; the first ones warm up

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


CASES = [
    Case("gpt-mini", "batch:1", 8, 128),
    Case("gpt-mini", "batch:2", 8, 128),
    Case("gpt-mini", "model:2", 8, 128),
    Case("gpt-mini", "batch:2,model:2", 8, 128),
    Case("llama-mini", "batch:2,model:2", 8, 128),
    Case("gpt-small-bench", "batch:2", 16, 128),
    Case("gpt-small-bench", "batch:2,model:2", 16, 128),
    Case("gpt-small-bench", "batch:2,model:2", 16, 128, sharded_optimizer=True),
    Case("gpt-small-bench", "batch:2", 16, 128, micro_batch=2, recompute=True),
]


def prediction(case: Case, hw) -> Prediction:
    """The planner's prediction for exactly this case's layout."""
    return predict(get_preset(case.model), case.layout(), hw, global_batch=case.global_batch,
                   seq_len=case.seq_len, dtype="fp32")


# ==============================================================================================================
# TO FILL: run meshtron's trainer on `case` and return (peak RSS of one rank in bytes, seconds per step).
# - start len(ranks) = dp * tp * pp processes (e.g. the trainer's own launcher, or torch.multiprocessing with
#   the forkserver start method), OMP_NUM_THREADS = --threads-per-rank in each rank;
# - peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss * 1024 inside each rank at the end (Linux reports KiB);
#   report the largest rank, which is what the planner predicts (its fullest device, runtime included);
# - step time: median wall time of case.steps optimizer steps after 2 warm-up steps, fp32, Adam.
# ==============================================================================================================
def measure(case: Case) -> tuple[float, float]:
    raise NotImplementedError("measure(case) is not written yet: it needs meshtron's trainer (see the note above)")


def relative_error(predicted: float, measured: float | None) -> float | None:
    return None if measured is None else predicted / measured - 1


def run(threads_per_rank: int, recalibrate: bool) -> list[dict]:
    hw = cpu_profile(threads_per_rank, recalibrate=recalibrate)
    warning = calibration_warning(hw)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    results = []
    for case in CASES:
        pred = prediction(case, hw)
        try:
            rss, step = measure(case)
        except NotImplementedError:
            rss = step = None
        mem_err, time_err = relative_error(pred.memory["total"], rss), relative_error(pred.step_time_s, step)
        results.append({"case": asdict(case), "predicted_rss_bytes": pred.memory["total"],
                        "measured_rss_bytes": rss, "memory_error": mem_err,
                        "predicted_step_s": pred.step_time_s, "measured_step_s": step, "time_error": time_err,
                        "ok": None if rss is None else (abs(mem_err) <= MEMORY_TOLERANCE
                                                        and abs(time_err) <= TIME_TOLERANCE)})
    return results


def print_table(results: list[dict]) -> None:
    def mib(x):
        return "-" if x is None else f"{x / 2 ** 20:.0f}"

    def pct(x):
        return "-" if x is None else f"{x:+.0%}"

    def sec(x):
        return "-" if x is None else f"{x:.3g}"

    head = ["model", "mesh", "batch", "seq", "mb", "options", "pred MiB", "meas MiB", "err", "pred s", "meas s",
            "err", "ok"]
    rows = [head]
    for r in results:
        c = r["case"]
        opts = ",".join(k for k in ("recompute", "sequence_parallel", "sharded_optimizer") if c[k]) or "-"
        rows.append([c["model"], c["mesh"], str(c["global_batch"]), str(c["seq_len"]), str(c["micro_batch"] or "all"),
                     opts, mib(r["predicted_rss_bytes"]), mib(r["measured_rss_bytes"]), pct(r["memory_error"]),
                     sec(r["predicted_step_s"]), sec(r["measured_step_s"]), pct(r["time_error"]),
                     "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    if any(r["measured_rss_bytes"] is None for r in results):
        print("\nmeasure(case) is not filled in yet: only the predictions are shown.")
    print(f"targets: memory within ±{MEMORY_TOLERANCE:.0%}, step time within ±{TIME_TOLERANCE:.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--recalibrate", action="store_true", help="measure the cpu profile again")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.threads_per_rank, args.recalibrate)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0 if all(r["ok"] is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
