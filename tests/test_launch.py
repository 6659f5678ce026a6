"""Launching: torchrun restarts after a killed rank (meshtron's rendezvous fix inside), SLURM's environment,
and the one-machine launcher's error reporting."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from meshtron import checkpoint as ck
from meshtron.launch import RankError, adopt_slurm_env, first_host, run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.sharding import full_state_dict

ARGS = ["--model", "gpt-tiny", "--steps", "6", "--save-every", "2", "--mesh", "batch:2", "--batch-size", "8",
        "--seq-len", "32", "--sample-tokens", "0"]


def _final(out):
    path = ck.latest_checkpoint(os.path.join(out, "checkpoints"))
    meta = ck.read_meta(path)
    mesh = Mesh.from_spec("model:1")
    model = build_model(ModelConfig(**meta["model"]), mesh)
    ck.load_checkpoint(path, model, mesh)
    return meta["step"], full_state_dict(model, mesh)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
@pytest.mark.slow
def test_torchrun_restarts_killed_rank_from_checkpoint(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "MESHTRON_FAULT": "step:rank=1:step=3", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "meshtron", "train",
           "--out", str(tmp_path / "crash")] + ARGS
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "crash" / "run.log") as f:
        starts = [json.loads(line) for line in f]
    assert [(s["attempt"], s["start_step"]) for s in starts] == [(0, 0), (1, 2)]
    from meshtron.cli import main
    assert main(["train", "--out", str(tmp_path / "clean")] + ARGS) == 0
    step, got = _final(tmp_path / "crash")
    ref_step, ref = _final(tmp_path / "clean")
    assert step == ref_step == 6
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_slurm_environment_is_adopted():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == \
        ("5", "8", "1", "4", "gpu07")
    assert first_host("node3,node4") == "node3"
    assert first_host("a[1,4-5],b2") == "a1"
    assert not adopt_slurm_env({"RANK": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})


def _fail_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        raise ValueError("bad input on rank one")
    return "ok"


def test_launcher_names_the_failing_rank():
    with pytest.raises(RankError, match="rank 1 failed: ValueError: bad input on rank one") as e:
        run_ranks(_fail_on_rank_one, 2, timeout_s=60)
    assert e.value.kind == "ValueError"


def _hang():
    import time
    time.sleep(600)


def test_launcher_timeout_stops_hung_ranks():
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        run_ranks(_hang, 2, timeout_s=3)


def _stuck_peer():
    import time

    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2", timeout_s=3)
    if mesh.rank == 1:
        time.sleep(8)                      # never joins the collective
        return "slept"
    C.all_reduce(torch.ones(4), mesh.axis("model").group)


def test_collective_timeout_names_rank_op_and_group():
    with pytest.raises(RankError, match=r"rank 0: all_reduce over group model\[0, 1\] failed"):
        run_ranks(_stuck_peer, 2, timeout_s=60)


def _peer_gone_before_the_gradient_all_reduce(barrier: bool):
    from meshtron.comm import collectives as C
    from meshtron.train.step import TrainStep, local_rows
    mesh = Mesh.from_spec("batch:2", timeout_s=30)
    model = build_model(ModelConfig("gpt", vocab_size=61, n_layer=1, n_head=2, d_model=16, max_seq_len=16), mesh)
    trainer = TrainStep(model, mesh, lr=1e-2)
    if mesh.rank == 1:
        os._exit(0)                        # leaves without a word
    if barrier:
        C.barrier(C.world())
    trainer.step(local_rows(torch.randint(0, 61, (4, 17)), trainer.batch_axis))


@pytest.mark.parametrize("barrier, where", [(False, r"all_reduce over group batch\[0, 1\]"),
                                            (True, r"barrier over group (world|batch)\[0, 1\]")])
def test_collectives_outside_comm_name_rank_op_and_group(barrier, where):
    """DDP's gradient hook and barriers go through meshtron.comm's named wrappers (item 17)."""
    with pytest.raises(RankError, match=r"rank 0 failed: .*rank 0: " + where + " failed"):
        run_ranks(_peer_gone_before_the_gradient_all_reduce, 2, barrier, timeout_s=120)


def test_a_port_taken_before_rank_0_binds_it_is_retried(monkeypatch):
    """Another process takes the chosen free port first (a real listening socket here): the ranks start again
    on a new port instead of failing with EADDRINUSE."""
    import socket

    import meshtron.launch as launch
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: ports.pop() if ports else real())
    try:
        assert run_ranks(_rank_after_init, 2, timeout_s=120) == [0, 1]
    finally:
        taken.close()
    assert not ports


def _rank_after_init():
    mesh = Mesh.from_spec("model:2")
    return mesh.rank
