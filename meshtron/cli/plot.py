"""`meshtron plot RUN_DIR`: PNG plots of a run's metrics.jsonl, training and validation loss, and throughput.

Writes `loss.png` (train loss, raw and smoothed, with validation loss) and `throughput.png` (tokens/s, with MFU
on a second axis when the run logged it) into `RUN_DIR/plots/` or `--out`. Reads the file a running job is
still writing: a torn last line is skipped, and a step logged twice keeps its last entry.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


class PlotError(Exception):
    """The run folder or its metrics cannot be plotted; the message says why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `meshtron train --out RUN_DIR`")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--smooth", type=int, default=None, metavar="STEPS",
                   help="width of the centred moving average, in steps (default: 1/25 of the run; 1: none)")


def run(args) -> int:
    try:
        train, val = read_metrics(args.run_dir)
        out = args.out or os.path.join(args.run_dir, "plots")
        paths = write_plots(train, val, out, title=os.path.basename(os.path.abspath(args.run_dir)),
                            window=args.smooth)
    except PlotError as e:
        print(f"meshtron plot: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train entries, validation entries), each sorted by step with one entry per step."""
    if not os.path.isdir(run_dir):
        raise PlotError(f"run folder {run_dir!r} does not exist")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir!r} has no metrics.jsonl: is it the --out folder of `meshtron train`?")
    train, val = {}, {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                continue
            if _finite(rec.get("loss")):
                train[rec["step"]] = rec
            if _finite(rec.get("val_loss")):
                val[rec["step"]] = rec
    if not train and not val:
        raise PlotError(f"{path} has no training steps yet (the file is empty or holds no finite loss)")
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends), so the curve does not lag the steps."""
    half, out = window // 2, []
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def write_plots(train: list[dict], val: list[dict], out_dir: str, title: str = "",
                window: int | None = None) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("meshtron plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, PercentFormatter

    os.makedirs(out_dir, exist_ok=True)
    window = window or max(1, len(train) // 25)
    if window < 1:
        raise PlotError(f"--smooth must be at least 1 step, got {window}")
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120, layout="constrained")
    if train:
        _raw_and_smoothed(ax, [r["step"] for r in train], [r["loss"] for r in train], window, "tab:blue", "train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], color="tab:orange", lw=1.6, marker="o",
                ms=4, label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats / token)", title=f"{title}: loss".strip(": "))
    _style(ax)
    ax.legend(frameon=False)
    paths.append(_save(fig, os.path.join(out_dir, "loss.png")))

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120, layout="constrained")
    rows = [r for r in train if _finite(r.get("tokens_per_s"))]
    if rows:
        steps, tps = [r["step"] for r in rows], [r["tokens_per_s"] for r in rows]
        _raw_and_smoothed(ax, steps, tps, window, "tab:green", "tokens/s")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(EngFormatter())
        mfu_rows = [r for r in rows if _finite(r.get("mfu"))]
        if mfu_rows:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in mfu_rows], moving_average([r["mfu"] for r in mfu_rows], window),
                     color="tab:purple", lw=1.2, ls="--", label="MFU" + (" (moving average)" if window > 1 else ""))
            ax2.set_ylabel("model FLOPs utilisation")
            ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax2.set_ylim(bottom=0)
            ax2.spines["top"].set_visible(False)
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [line.get_label() for line in lines], frameon=False, loc="lower right")
        else:
            ax.legend(frameon=False, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no throughput logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="throughput (tokens / s, all ranks)",
           title=f"{title}: throughput".strip(": "))
    _style(ax)
    paths.append(_save(fig, os.path.join(out_dir, "throughput.png")))
    return paths


def _raw_and_smoothed(ax, steps: list, values: list, window: int, color: str, name: str) -> None:
    """The per-step values as a faint line under their moving average (or alone, unsmoothed)."""
    if window <= 1:
        ax.plot(steps, values, color=color, lw=1.4, label=name)
        return
    ax.plot(steps, values, color=color, lw=0.8, alpha=0.35, label=f"{name} (per step)")
    ax.plot(steps, moving_average(values, window), color=color, lw=1.8, label=f"{name} (moving average)")


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
