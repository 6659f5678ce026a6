"""`meshtron train` end to end: it starts its own ranks, writes metrics.jsonl, prints a sample, and logs the same
losses whatever the mesh; bad options fail before any rank starts."""
import json

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
