"""Checkpoints: resume equals uninterrupted (bitwise on one mesh), resharding onto other meshes with the
optimizer state, crash recovery under the restart launcher, atomic writes, and refused bad checkpoints."""
import json
import os

import pytest
import torch

from meshtron import checkpoint as ck
from meshtron.cli import main
from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.sharding import full_state_dict, gather_full
from meshtron.train.step import TrainStep, local_rows

COMMON = ["--model", "gpt-tiny", "--batch-size", "8", "--seq-len", "32", "--sample-tokens", "0", "--seed", "5",
          "--lr", "3e-3", "--warmup-steps", "2"]


def train(out, *argv, env=None):
    if env:
        os.environ.update(env)
    try:
        return main(["train", "--out", str(out)] + COMMON + list(argv))
    finally:
        for k in env or {}:
            os.environ.pop(k, None)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def final_params(out):
    path = ck.latest_checkpoint(os.path.join(out, "checkpoints"))
    meta = ck.read_meta(path)
    model = build_model(ModelConfig(**meta["model"]), Mesh.from_spec("model:1"), seed=99)
    ck.load_checkpoint(path, model, Mesh.from_spec("model:1"))
    return meta["step"], full_state_dict(model, Mesh.from_spec("model:1"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train(out, "--mesh", "batch:2,model:2", "--steps", "6", "--save-every", "3") == 0
    return out


def test_resume_equals_uninterrupted_bitwise(uninterrupted, tmp_path):
    assert train(tmp_path, "--mesh", "batch:2,model:2", "--steps", "6", "--stop-after", "3") == 0
    assert losses(tmp_path)[0] == [1, 2, 3]
    assert main(["train", "--resume", str(tmp_path)]) == 0
    assert losses(tmp_path) == losses(uninterrupted)                 # bitwise: same floats
    step, got = final_params(tmp_path)
    ref_step, ref = final_params(uninterrupted)
    assert step == ref_step == 6
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("mesh", [pytest.param("model:4", marks=pytest.mark.slow), pytest.param("batch:4", marks=pytest.mark.slow), "model:1"])
def test_resume_on_another_mesh(uninterrupted, tmp_path, mesh):
    assert train(tmp_path, "--mesh", "batch:2,model:2", "--steps", "6", "--stop-after", "3") == 0
    assert main(["train", "--resume", str(tmp_path), "--mesh", mesh]) == 0
    steps, got = losses(tmp_path)
    ref_steps, ref = losses(uninterrupted)
    assert steps == ref_steps
    assert got == pytest.approx(ref, rel=1e-5)


CFG = ModelConfig("gpt", vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16)


def _adam_full(model, opt, mesh):
    return {n: gather_full(opt.state[p][k], p.shard, mesh).clone() for n, p in model.named_parameters()
            for k in ("exp_avg", "exp_avg_sq")}


def _save(spec, root):
    mesh = Mesh.from_spec(spec)
    model = build_model(CFG, mesh, seed=1)
    tr = TrainStep(model, mesh, lr=1e-2)
    tr.step(local_rows(torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(0)), tr.batch_axis))
    ck.save_checkpoint(root, 1, model, mesh, tr.optimizer)
    return full_state_dict(model, mesh), _adam_full(model, tr.optimizer, mesh)


def _load(spec, root):
    mesh = Mesh.from_spec(spec)
    model = build_model(CFG, mesh, seed=2)
    tr = TrainStep(model, mesh, lr=1e-2)
    ck.load_checkpoint(ck.latest_checkpoint(root), model, mesh, tr.optimizer)
    return full_state_dict(model, mesh), _adam_full(model, tr.optimizer, mesh)


@pytest.mark.slow
def test_optimizer_state_is_resharded_not_reinitialised(tmp_path):
    params, adam = run_ranks(_save, 4, "batch:2,model:2", str(tmp_path))[0]
    assert all(v.abs().sum() > 0 for k, v in adam.items() if "exp_avg_sq" in k and "k_proj.bias" not in k)
    for spec, world in [("model:4", 4), ("batch:4", 4), ("model:2", 2)]:
        got_params, got_adam = run_ranks(_load, world, spec, str(tmp_path))[0]
        assert all(torch.equal(got_params[k], params[k]) for k in params), spec
        assert all(torch.equal(got_adam[k], adam[k]) for k in adam), spec
    got_params, got_adam = _load("model:1", str(tmp_path))
    assert all(torch.equal(got_adam[k], adam[k]) for k in adam)


def test_partial_checkpoint_is_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_00000009.partial").mkdir(parents=True)
    (root / "step_00000010").mkdir()                # no meshtron.json: incomplete
    assert ck.latest_checkpoint(str(root)) is None


def test_bad_checkpoints_refused(uninterrupted, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    # another model shape
    assert main(["train", "--resume", str(run), "--d-model", "64"]) == 2     # refused before any rank starts
    assert "from another model (d_model: checkpoint 32 vs model 64)" in capsys.readouterr().err
    # truncated shard file
    latest = ck.latest_checkpoint(str(run / "checkpoints"))
    shard = sorted(p for p in os.listdir(latest) if p.endswith(".distcp"))[0]
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(100)
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert f"is truncated: {shard}" in err
    assert f"--resume {run} --resume-step 3 (complete checkpoints: steps 3)" in err        # item 14: how to pick
    assert "Traceback" not in err
    # corrupted (same size)
    shutil.rmtree(run)
    shutil.copytree(uninterrupted, run)
    latest = ck.latest_checkpoint(str(run / "checkpoints"))
    with open(os.path.join(latest, shard), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2
    assert "fails its CRC32 check" in capsys.readouterr().err
    # item 14: the earlier checkpoint is usable by its step, or by its folder; the later (bad) one is set aside
    assert main(["train", "--resume", str(run), "--resume-step", "3", "--steps", "4"]) == 0
    steps, _ = losses(run)
    assert steps == [1, 2, 3, 4]
    assert [ck.checkpoint_step(c) for c in ck.list_checkpoints(str(run / "checkpoints"))] == [3, 4]
    assert os.listdir(run / "checkpoints" / "superseded") == ["step_00000006-after-step-3"]
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000003"), "--steps", "5"]) == 0
    assert losses(run)[0] == [1, 2, 3, 4, 5]


def test_resume_without_checkpoint_and_unknown_config_key(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"out": str(tmp_path)}}))
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "gpt-tiny"\nlearning_rate = 0.1\n')
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--mesh", "model:2", "--steps", "20", "--save-every", "1", "--lr", "1e12",
                 "--clip", "0", "--warmup-steps", "0") == 1
    err = capsys.readouterr().err
    assert "the loss is nan" in err or "the loss is inf" in err
    assert "Traceback" not in err and err.count("\n") == 1          # item 14: one clear line, no rank traceback
    latest = ck.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None
    meta = ck.read_meta(latest)
    assert meta["step"] >= 1


def _step_with_infinite_gradient():
    """One real step whose loss is finite but one gradient is infinite (a backward hook makes it so)."""
    mesh = Mesh.from_spec("batch:2")
    model = build_model(CFG, mesh, seed=1)
    tr = TrainStep(model, mesh, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    next(model.parameters()).register_hook(lambda g: g * float("inf"))
    batch = local_rows(torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(0)), tr.batch_axis)
    try:
        tr.step(batch)
    except FloatingPointError as e:
        unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters())
        return str(e), unchanged
    return None, False


def test_non_finite_gradient_with_finite_loss_stops_before_the_update():
    for message, unchanged in run_ranks(_step_with_infinite_gradient, 2):
        assert message is not None and message.split(" (")[0] in ("the gradient norm is inf",
                                                                  "the gradient norm is nan")
        assert "(the loss was finite): stopped before the update" in message
        assert unchanged                                            # no rank updated its weights


def test_disk_full_names_the_step_and_the_intact_checkpoint_and_does_not_restart(tmp_path, capfd):
    """A real full disk: the run's checkpoints/ folder is a tmpfs, shrunk after the first checkpoint to leave room
    for half of another."""
    import subprocess
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        assert train(tmp_path / "run", "--mesh", "batch:2,model:2", "--steps", "2") == 0
        fs = os.statvfs(root)
        used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used * 3 // 2 // 1024}k", str(root)], check=True)
        capfd.readouterr()
        code = main(["train", "--resume", str(tmp_path / "run"), "--steps", "4", "--save-every", "2",
                     "--max-restarts", "2"])
        err = capfd.readouterr().err
        assert code == 1
        assert (f"no space left on the device mounted at {root} (tmpfs, tmpfs) while writing checkpoint step 4 to "
                f"{root}; the previous checkpoint, step 2, is intact ({root / 'step_00000002'})") in err
        assert "restarting" not in err and "Traceback" not in err and "CheckpointException" not in err
        assert ck.read_meta(str(root / "step_00000002"))["step"] == 2          # verifies every file's CRC32
        assert sorted(os.listdir(root)) == ["step_00000002"]                   # the partial write is gone
    finally:
        subprocess.run(["umount", str(root)], check=False)
