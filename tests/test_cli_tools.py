"""eval, export, convert and plot from the command line, on a run trained with a BPE tokenizer."""
import os

import pytest

from meshtron.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    text = out / "book.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    assert main(["train", "--model", "gpt-tiny", "--steps", "8", "--mesh", "batch:2", "--out", str(out),
                 "--data", str(text), "--tokenizer", "bpe", "--vocab-size", "300", "--batch-size", "4",
                 "--seq-len", "32", "--sample-tokens", "0", "--eval-every", "4"]) == 0
    return out


def _loss(capsys):
    line = [s for s in capsys.readouterr().out.splitlines() if "loss" in s][-1]
    return float(line.split("loss ")[1].split()[0])


def test_eval_export_convert_round_trip(run_dir, tmp_path, capsys):
    text = run_dir / "book.txt"
    assert main(["eval", str(run_dir), "--data", str(text), "--seq-len", "32", "--batch-size", "4",
                 "--max-batches", "4"]) == 0
    ref = _loss(capsys)
    assert main(["eval", str(run_dir), "--data", str(text), "--seq-len", "32", "--batch-size", "4",
                 "--max-batches", "4", "--mesh", "batch:2,model:2"]) == 0
    assert _loss(capsys) == pytest.approx(ref, rel=1e-5)
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "conv")]) == 0
    assert main(["eval", str(tmp_path / "conv"), "--data", str(text), "--seq-len", "32", "--batch-size", "4",
                 "--max-batches", "4", "--mesh", "model:2"]) == 0
    assert _loss(capsys) == pytest.approx(ref, rel=1e-5)


def test_plot_and_validation_entries(run_dir, capsys):
    import json
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "throughput.png"):
        with open(run_dir / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(run_dir / "tb")


def test_tool_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--data", "builtin"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "short.txt").write_text("tiny")
    assert main(["train", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "seq" in capsys.readouterr().err
