"""Dropout through `meshtron train`: the same per-step losses on every mesh, and across a resume on another mesh
(masks are keyed by seed, step, layer, site, global row, position and feature, never by rank)."""
import json

import pytest

from meshtron.cli import main

COMMON = ["--model", "gpt-tiny", "--dropout", "0.1", "--batch-size", "8", "--seq-len", "32", "--micro-batches",
          "2", "--sample-tokens", "0", "--seed", "3", "--lr", "1e-2", "--warmup-steps", "2"]


def losses(run_dir, steps):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_dropout_losses_equal_across_meshes_and_a_resume_elsewhere(tmp_path):
    runs = {}
    for mesh in ["batch:1", "model:2", "batch:2", "batch:2,model:2", "model:4"]:
        out = tmp_path / mesh.replace(":", "").replace(",", "_")
        assert main(["train", "--mesh", mesh, "--steps", "6", "--out", str(out)] + COMMON) == 0
        runs[mesh] = losses(out, 6)
    ref = runs.pop("batch:1")
    for mesh, got in runs.items():
        assert got == pytest.approx(ref, rel=1e-5), mesh
    no_dropout = tmp_path / "plain"
    assert main(["train", "--steps", "6", "--out", str(no_dropout)] + COMMON[:2] + COMMON[4:]) == 0
    plain = losses(no_dropout, 6)
    assert max(abs(a - b) for a, b in zip(plain, ref)) > 1e-3       # dropout is really on in these runs

    split = tmp_path / "split"
    assert main(["train", "--mesh", "model:2", "--steps", "6", "--stop-after", "4", "--out", str(split)]
                + COMMON) == 0
    assert main(["train", "--resume", str(split), "--mesh", "batch:2"]) == 0
    assert losses(split, 6) == pytest.approx(ref, rel=1e-5)
