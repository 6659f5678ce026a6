"""Faults, with real processes and real signals: a rank SIGKILLed at each phase of a step (before and after the
first checkpoint) is restarted and the job ends bitwise where an uninterrupted one does, Adam state included; a
stopped rank (SIGSTOP) is reported as the collective timeout it causes; SIGTERM of the launcher saves the current
step and exits 0; SIGKILL of the launcher leaves nothing behind; two trainers cannot share a run folder.

The whole matrix (every rank x every phase x before/after the first checkpoint: 40 runs, 25 minutes here)
runs with `make test-faults` (`pytest -m fault_matrix tests/test_faults.py`); `make test` runs a representative
part of it.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from meshtron import checkpoint as ck
from meshtron.cli import main
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.sharding import full_state_dict, gather_full
from meshtron.train.step import TrainStep

MESH = "batch:2,model:2"
ARGS = ["--model", "gpt-tiny", "--mesh", MESH, "--batch-size", "8", "--seq-len", "32", "--sample-tokens", "0",
        "--seed", "7", "--warmup-steps", "1", "--steps", "4", "--save-every", "2"]
PHASES = ["data", "forward", "backward", "optimizer", "checkpoint"]


def final_state(out):
    """(step, full parameters, full Adam moments and step counts) of the run's newest checkpoint."""
    path = ck.latest_checkpoint(os.path.join(out, "checkpoints"))
    meta = ck.read_meta(path)
    mesh = Mesh.from_spec("model:1")
    model = build_model(ModelConfig(**meta["model"]), mesh, seed=123)
    trainer = TrainStep(model, mesh, lr=1.0)
    ck.load_checkpoint(path, model, mesh, trainer.optimizer)
    adam = {f"{n}.{k}": gather_full(trainer.optimizer.state[p][k], p.shard, mesh).clone()
            for n, p in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    adam.update({f"{n}.step": trainer.optimizer.state[p]["step"].clone() for n, p in model.named_parameters()})
    return meta["step"], full_state_dict(model, mesh), adam


def assert_bitwise_equal(got, ref):
    assert got[0] == ref[0] == 4
    for a, b in zip(got[1:], ref[1:]):
        assert a.keys() == b.keys()
        bad = [k for k in b if not torch.equal(a[k], b[k])]
        assert not bad, f"differ: {bad[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", "--out", str(out)] + ARGS) == 0
    return final_state(out)


def _cases():
    """(phase, rank, step): step 1 is before the first checkpoint (the restart starts from scratch), step 3 after
    it (the restart resumes from step 2); for 'checkpoint', the writes of steps 2 and 4."""
    for phase in PHASES:
        for rank in range(4):
            for before in (True, False):
                step = (2 if before else 4) if phase == "checkpoint" else (1 if before else 3)
                yield phase, rank, step


REPRESENTATIVE = {("forward", 1, 1), ("checkpoint", 2, 4)}      # before and after the first checkpoint
MATRIX = [pytest.param(*c, marks=() if c in REPRESENTATIVE else pytest.mark.fault_matrix,
                       id=f"{c[0]}-rank{c[1]}-step{c[2]}") for c in _cases()]


@pytest.mark.parametrize("phase, rank, step", MATRIX)
def test_sigkill_of_a_rank_recovers_bitwise(reference, tmp_path, capfd, phase, rank, step):
    os.environ["MESHTRON_FAULT"] = f"{phase}:rank={rank}:step={step}"
    try:
        assert main(["train", "--out", str(tmp_path), "--max-restarts", "1"] + ARGS) == 0
    finally:
        del os.environ["MESHTRON_FAULT"]
    assert f"rank {rank} was killed by SIGKILL; restarting" in capfd.readouterr().err
    with open(tmp_path / "run.log") as f:
        starts = [json.loads(line)["start_step"] for line in f]
    assert starts == [0, 2 if step > 2 else 0]        # item 3: before the first checkpoint, from scratch
    assert not glob.glob(str(tmp_path / "checkpoints" / ".step_*.partial"))
    assert_bitwise_equal(final_state(tmp_path), reference)


# ------------------------------------------------------------------------------ whole-job signals
def _spawn(out, *extra, env=None):
    base = {k: v for k, v in os.environ.items() if k != "MESHTRON_FAULT"}
    env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "meshtron", "train", "--out", str(out)] + ARGS[:-4] + list(extra)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_for_steps(proc, out, n: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with open(out / "metrics.jsonl") as f:
                steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
            if len(steps) >= n:
                return steps[-1]
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


def _wait_gone(pids, seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


def test_sigterm_of_the_launcher_saves_the_current_step_and_exits_0(tmp_path, capsys):
    shm_before = set(glob.glob("/dev/shm/meshtron-*"))
    out = tmp_path / "run"
    proc = _spawn(out, "--steps", "100000", "--save-every", "0")
    try:
        _wait_for_steps(proc, out, 3)
        ranks = _descendants(proc.pid)
        assert len(ranks) >= 4
        # item 5: a second trainer on the same folder is refused, naming the holder's PID
        assert main(["train", "--out", str(out)] + ARGS) == 2
        assert f"is in use by a meshtron train (PID {proc.pid} on" in capsys.readouterr().err
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr[-3000:]
        left = _wait_gone(ranks, 10 - (time.monotonic() - t0))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left after SIGTERM: {left}"
    with open(out / "metrics.jsonl") as f:
        last = [json.loads(line)["step"] for line in f if '"loss"' in line][-1]
    saved = ck.latest_checkpoint(str(out / "checkpoints"))
    assert saved is not None and ck.read_meta(saved)["step"] == last      # the step it was in, saved
    assert f"stopped after step {last}" in stdout
    assert set(glob.glob("/dev/shm/meshtron-*")) == shm_before


def test_sigkill_of_the_launcher_leaves_nothing_and_frees_the_run_folder(tmp_path, capsys):
    shm_before = set(glob.glob("/dev/shm/meshtron-*"))
    out = tmp_path / "run"
    proc = _spawn(out, "--steps", "100000", "--save-every", "0")
    try:
        _wait_for_steps(proc, out, 2)
        family = _descendants(proc.pid)
        assert len(family) >= 4
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        left = _wait_gone(family, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left 10 s after SIGKILL of the launcher: {left}"
    assert set(glob.glob("/dev/shm/meshtron-*")) == shm_before
    # item 5: the dead launcher's lock is taken over
    assert main(["train", "--out", str(out), "--model", "gpt-tiny", "--batch-size", "2", "--seq-len", "16",
                 "--sample-tokens", "0", "--steps", "1"]) == 0
    assert f"took over the lock of PID {proc.pid}" in capsys.readouterr().out


def test_a_stopped_rank_is_reported_as_the_timeout_it_causes(tmp_path):
    proc = _spawn(tmp_path / "run", "--steps", "50",
                  env={"MESHTRON_TIMEOUT": "3", "MESHTRON_FAULT": "step:rank=2:step=2:signal=STOP"})
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    assert "killed by SIGKILL" not in stderr
    assert "over group" in stderr and "failed" in stderr                # the collective, named
    assert "rank 2 (pid" in stderr and "was stopped (SIGSTOP?)" in stderr
    assert "Traceback" not in stderr
