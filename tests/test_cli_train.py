"""`meshtron train` end to end: it starts its own ranks, writes metrics.jsonl, prints a sample, and logs the same
losses whatever the mesh; bad options fail before any rank starts."""
import json
import os

import pytest

from meshtron.cli import main

COMMON = ["--model", "gpt-tiny", "--steps", "4", "--batch-size", "8", "--seq-len", "32", "--micro-batches", "2",
          "--sample-tokens", "8", "--seed", "3"]


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in rows)
    return [r["loss"] for r in rows]


def test_losses_equal_across_meshes(tmp_path, capsys):
    runs = {}
    for mesh in ["model:1", "batch:2", "model:2", "batch:2,model:2"]:
        out = tmp_path / mesh.replace(":", "").replace(",", "_")
        assert main(["train", "--mesh", mesh, "--out", str(out)] + COMMON) == 0
        runs[mesh] = losses(out)
    assert "--- sample" in capsys.readouterr().out
    ref = runs.pop("model:1")
    for mesh, got in runs.items():
        assert got == pytest.approx(ref, rel=1e-5), mesh


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "model:3"], "heads=4 is not divisible by mesh axis 'model' of size 3"),
    (["--mesh", "batch:2", "--layout", "batch:batch;heads:batch"], "both 'batch' and 'heads'"),
    (["--mesh", "batch:2,model:2", "--layout", "batch:batch;heads:tensor"], "no axis 'tensor'"),
    (["--mesh", "batch:3"], "batch=8 is not divisible by mesh axis 'batch' of size 3"),
    (["--model", "gpt-huge"], "unknown model preset 'gpt-huge'"),
])
def test_bad_options_fail_fast(argv, message, tmp_path, capsys):
    assert main(["train", "--model", "gpt-tiny", "--batch-size", "8", "--out", str(tmp_path)] + argv) == 2
    assert message in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path):
    import shutil
    cfg = tmp_path / "run.toml"
    shutil.copy("examples/llama-mini.toml", cfg)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "2", "--out", str(out), "--d-model", "64",
                 "--sample-tokens", "0", "--eval-every", "0"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["micro_batches"] == 2 and saved["train"]["steps"] == 2
    assert saved["model"]["family"] == "llama" and saved["model"]["d_model"] == 64


# ---- item 8: every option is type- and range-checked before anything is written -----------------------------
@pytest.mark.parametrize("line, message", [
    ('bf16 = "no"', "bf16 = 'no': Input should be a valid boolean (expected true or false)"),
    ('steps = "ten"', "steps = 'ten': Input should be a valid integer (expected an integer >= 1)"),
    ("steps = [1, 2]", "steps = [1, 2]: Input should be a valid integer"),
    ("steps = 3.7", "steps = 3.7: Input should be a valid integer"),
    ('lr = "fast"', "lr = 'fast': Input should be a valid number (expected a number > 0.0)"),
    ("mesh = 4", "mesh = 4: Input should be a valid string"),
    ('seed = "abc"', "seed = 'abc': Input should be a valid integer"),
    ("keep = 0", "keep = 0: Input should be greater than or equal to 1"),
    ("dropout = 1.5", "dropout = 1.5: Input should be less than 1"),
])
def test_config_file_values_are_validated_before_anything_is_written(tmp_path, capsys, line, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "gpt-tiny"\n{line}\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: {message}" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--warmup-steps", "-1"], "--warmup-steps -1: Input should be greater than or equal to 0"),
    (["--save-every", "-1"], "--save-every -1: Input should be greater than or equal to 0"),
    (["--eval-every", "-1"], "--eval-every -1: Input should be greater than or equal to 0"),
    (["--keep", "-1"], "--keep -1: Input should be greater than or equal to 1"),
    (["--dropout", "2"], "--dropout 2.0: Input should be less than 1 (expected a number in [0.0, 1.0)"),
    (["--mesh", "model:²"], "--mesh model:²: write the mesh as 'name:size' pairs with sizes in digits 0-9"),
    (["--mesh", "model:4096"], "the mesh has 4096 ranks, but this machine has"),
    (["--max-restarts", "-2"], "--max-restarts -2: Input should be greater than or equal to 0"),
    (["--lr", "inf"], "--lr inf: Input should be a finite number"),
])
def test_bad_flag_values_are_refused(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--model", "gpt-tiny", "--out", str(out)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_large_local_meshes_warn_and_absurd_ones_are_refused():
    from meshtron.cli.train import LOCAL_MAX_PER_CORE, LOCAL_WARN_PER_CORE, check_local_world
    cores = len(os.sched_getaffinity(0))
    assert check_local_world(LOCAL_WARN_PER_CORE * cores) is None
    assert "expect a slow run" in check_local_world(LOCAL_WARN_PER_CORE * cores + 1)
    with pytest.raises(ValueError, match="use a smaller mesh"):
        check_local_world(LOCAL_MAX_PER_CORE * cores + 1)


# ---- item 9: overrides derive the sizes they imply; the context is not silently enlarged ---------------------
def test_shape_overrides_derive_dependent_sizes_and_print_the_shape(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "llama-tiny", "--d-model", "96", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--sample-tokens", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n_head=4 n_kv_head=2 d_model=96 d_ff=192" in printed and "(derived: d_ff)" in printed
    assert json.loads((out / "config.json").read_text())["model"]["d_ff"] == 192     # llama-tiny: d_ff = 2 d_model
    from meshtron.train.config import ModelOverrides, resolve_shape
    cfg, derived = resolve_shape("llama-mini", ModelOverrides(d_model=256, n_head=8), 257)
    assert (cfg.d_ff, cfg.n_kv_head, derived) == (768, 4, ["n_kv_head", "d_ff"])      # preset ratios kept


def test_seq_len_beyond_the_context_needs_an_explicit_context(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "gpt-tiny", "--seq-len", "100000", "--out", str(out)]) == 2
    assert "--seq-len 100000 is longer than gpt-tiny's context of 64 tokens" in capsys.readouterr().err
    assert main(["train", "--model", "gpt-tiny", "--seq-len", "96", "--max-seq-len", "96", "--steps", "1",
                 "--batch-size", "2", "--sample-tokens", "0", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["max_seq_len"] == 96


# ---- item 6: --keep, --resume A --out B, export into the run -------------------------------------------------
def test_resume_into_another_folder_and_export_into_the_run_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "gpt-tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--sample-tokens", "0", "--out", str(run)]) == 0
    config = (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "b"), "--steps", "2"]) == 2
    assert f"--resume {run} continues the run in its own folder {run}, but --out says {tmp_path / 'b'}" in \
        capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    for target in (run, run / "hf", run / "checkpoints"):
        assert main(["export", str(run), str(target)]) == 2
        assert "overlaps the run folder" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config and not (run / "hf").exists()
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0          # the run is still resumable
