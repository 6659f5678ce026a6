"""`meshtron calibrate`: measure this machine for the planner's `cpu` profile (GEMM rate, memory copy rate, gloo
and shared-memory all-reduce, a rank's runtime RSS) and cache it; `meshtron plan --gpu cpu` runs it when no
measurement is cached.

Invariant: the measurement runs in a fresh interpreter (`_cpu_measure.py`), so what it reports of memory is a
rank's runtime and nothing of this process; the planner itself never measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads-per-rank", type=int, default=1, help="threads each rank computes with")
    parser.add_argument("--json", action="store_true", help="print the measured numbers as JSON")


def measure() -> dict:
    """Run the measurement script in a fresh interpreter (one thread) and return its numbers."""
    from meshtron.planner.hardware import HardwareError
    script = os.path.join(os.path.dirname(__file__), "_cpu_measure.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        raise HardwareError("calibrating the cpu profile timed out after 120 s") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise HardwareError("calibrating the cpu profile failed: " + " | ".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    from meshtron.planner.calibrate import calibration_warning, cpu_profile
    from meshtron.planner.hardware import HardwareError
    try:
        profile = cpu_profile(args.threads_per_rank, recalibrate=True, measure=measure)
    except HardwareError as e:
        print(f"meshtron calibrate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(profile.measured, indent=1))
    else:
        print(f"meshtron calibrate: {profile.description}")
    warning = calibration_warning(profile)
    if warning:
        print(f"meshtron calibrate: warning: {warning}", file=sys.stderr)
    return 0
