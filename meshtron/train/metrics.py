"""What rank 0 reports while training: `RUN_DIR/metrics.jsonl`, TensorBoard events in `RUN_DIR/tb/`, a progress bar.

Invariant: after a run (resumed or not) metrics.jsonl holds each step once, in order: opening the logger at
`start_step` drops the entries a crashed attempt wrote after that step, and TensorBoard is told to purge the same
steps. Train entries carry `loss`, validation entries `val_loss`; both carry `step`. Other ranks pass
`enabled=False` and every call is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

TRAIN_SCALARS = ("loss", "lr", "tokens_per_s", "mfu", "grad_norm", "step_time_s")


def peak_memory_bytes(device) -> int:
    """This process's peak memory: on CUDA the caching allocator's peak allocation, on the CPU the peak resident
    set size (getrusage; Linux reports KiB)."""
    import torch
    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    import sys as _sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if _sys.platform == "darwin" else rss * 1024


def truncate_after(path: str, step: int) -> int:
    """Keep the lines of a metrics.jsonl whose step is <= `step` (a torn last line goes too); returns lines kept."""
    if not os.path.exists(path):
        return 0
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue                                  # torn write of a crashed attempt
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= step:
                kept.append(line.rstrip("\n") + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(kept)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsLogger:
    """One per run, on every rank; only the one made with `enabled=True` (rank 0) writes or prints.

    A fresh run (`start_step=0`) starts metrics.jsonl empty; a resumed one appends after `start_step`.
    """

    def __init__(self, run_dir: str, total_steps: int, enabled: bool = True, start_step: int = 0,
                 tensorboard: bool = True):
        self.enabled, self.total, self.start_step = enabled, total_steps, start_step
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        truncate_after(self.path, start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _summary_writer(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
        self._bar = _Progress(total_steps, start_step)

    def log_train(self, step: int, loss: float, lr: float, tokens_per_s: float, grad_norm: float | None = None,
                  step_time_s: float | None = None, mfu: float | None = None, **extra) -> None:
        """One optimizer step (1-based, as the loop counts them). `extra` goes to the JSON line as well, and to
        TensorBoard as `train/<name>` when it is a number."""
        if not self.enabled:
            return
        rec = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
               "step_time_s": step_time_s, "mfu": mfu, **extra}
        rec["elapsed_s"] = rec.get("elapsed_s", self._bar.elapsed())
        rec["time"] = rec.get("time", time.time())
        self._write(rec)
        if self._tb is not None:
            for name in TRAIN_SCALARS + tuple(extra):
                value = rec.get(name)
                if _is_number(value):
                    self._tb.add_scalar(f"train/{name}", value, step)
        self._bar.update(step, loss, tokens_per_s, mfu)

    def log_val(self, step: int, val_loss: float, **extra) -> None:
        """A validation pass after optimizer step `step`."""
        if not self.enabled:
            return
        rec = {"step": step, "val_loss": val_loss, **extra, "time": time.time()}
        self._write(rec)
        if self._tb is not None and _is_number(val_loss):
            self._tb.add_scalar("val/loss", val_loss, step)
            self._tb.flush()
        ppl = math.exp(val_loss) if _is_number(val_loss) and val_loss < 50 else float("inf")
        self._bar.message(f"step {step}/{self.total}  val_loss {val_loss:.4f}  (perplexity {ppl:.2f})")

    def close(self) -> None:
        if not self.enabled or self._file is None:
            return
        self._bar.close()
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()                                # a crash loses at most the step in flight


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _summary_writer(log_dir: str, purge_step: int):
    """TensorBoard's writer, or None (with a warning) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed, so no TensorBoard events are written "
                      "(pip install tensorboard); metrics.jsonl is complete without it", stacklevel=3)
        return None
    # purge_step: TensorBoard discards the events of earlier writers at steps >= purge_step (a crashed attempt).
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=30)


class _Progress:
    """A tqdm bar on a terminal; on a pipe or file, a plain line about every 5% of the run."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.tty = total, start, sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.t0 = time.perf_counter()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}"}
        if mfu is not None:
            post["MFU"] = f"{100 * mfu:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = self.elapsed() / done * (self.total - step) if done > 0 else 0.0
            mfu_s = f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s{mfu_s}  "
                  f"ETA {_fmt_duration(eta)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
