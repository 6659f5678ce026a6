"""The memory features and the pipeline through `meshtron train`, as a user runs them: the same per-step losses as
one rank (dropout on), and checkpoints that resume on another mesh with the uninterrupted run's losses."""
import json
import shutil

import pytest

from meshtron.cli import main

COMMON = ["--model", "gpt-tiny", "--n-layer", "4", "--dropout", "0.1", "--batch-size", "8", "--seq-len", "32",
          "--micro-batches", "4", "--sample-tokens", "0", "--seed", "5", "--lr", "1e-2", "--warmup-steps", "2",
          "--steps", "6"]
SP = "batch:batch;heads:model;d_ff:model;vocab:model;seq:model"


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--mesh", "batch:1", "--out", str(out)] + COMMON) == 0
    return losses(out)


@pytest.mark.parametrize("first, then", [
    (["--mesh", "batch:2,model:2", "--layout", SP, "--recompute", "selective", "--zero", "1"],
     [["--mesh", "model:4"], ["--mesh", "batch:1"]]),
    pytest.param(["--mesh", "pipe:2,batch:2", "--pipeline-schedule", "1f1b"], [["--mesh", "model:4"]],
                 marks=pytest.mark.slow),
    pytest.param(["--mesh", "pipe:2,model:2", "--pipeline-schedule", "interleaved", "--virtual-stages", "2"],
                 [["--mesh", "model:4"]], marks=pytest.mark.slow),
], ids=["sp-selective-zero1", "pipe-batch-1f1b", "pipe-model-interleaved"])
def test_stop_then_resume_elsewhere_logs_one_process_losses(first, then, reference, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--stop-after", "3"] + COMMON + first) == 0
    for i, mesh in enumerate(then):
        copy = tmp_path / f"resumed{i}"
        shutil.copytree(run, copy)
        assert main(["train", "--resume", str(copy)] + mesh) == 0
        assert losses(copy) == pytest.approx(reference, rel=1e-5), mesh


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "batch:2,model:2", "--layout", "batch:batch;heads:model;d_ff:model;seq:batch"],
     "sequence parallelism splits the residual stream over the axis"),
    (["--mesh", "model:2", "--layout", SP.replace("batch:batch;", ""), "--seq-len", "31"],
     "--seq-len 31 must be a multiple of 2"),
    (["--mesh", "pipe:2", "--n-layer", "3"], "layers=3 is not divisible by mesh axis 'pipe' of size 2"),
    (["--mesh", "pipe:2", "--pipeline-schedule", "interleaved", "--virtual-stages", "2", "--micro-batches", "3",
      "--batch-size", "6"], "needs the micro-batches \\(3\\) to be a multiple of the pipeline size"),
    (["--mesh", "model:2,pipe:2"], "must be the first \\(outermost\\) mesh axis"),
    (["--mesh", "pipe:2", "--pipeline-schedule", "zb"], "use one of gpipe, 1f1b, interleaved"),
    (["--recompute", "most"], "use one of none, selective, full"),
    (["--mesh", "model:2", "--virtual-stages", "2"], "needs a 'pipe' mesh axis"),
])
def test_bad_feature_options_fail_before_any_rank(argv, message, tmp_path, capsys):
    args = ["train", "--model", "gpt-tiny", "--n-layer", "4", "--batch-size", "8", "--seq-len", "32", "--out",
            str(tmp_path / "r")] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists()


def test_zero_without_a_batch_axis_is_a_noop_said_at_start(tmp_path, capsys):
    assert main(["train", "--mesh", "model:2", "--zero", "1", "--steps", "1", "--out", str(tmp_path / "r")]
                + COMMON[:-2]) == 0
    assert "--zero 1 has no effect" in capsys.readouterr().out


def test_pipelined_run_exports_and_generates_off_the_pipe(tmp_path, capfd):
    """A run trained on `pipe:2` exports the same weights as its one-rank twin and generates its greedy text on a
    mesh without a pipe axis; `generate`/`serve` on a pipe mesh are refused before any rank starts."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    base = ["--model", "gpt-tiny", "--n-layer", "4", "--batch-size", "4", "--seq-len", "32", "--micro-batches",
            "2", "--sample-tokens", "0", "--steps", "3", "--seed", "3"]
    runs = {}
    for name, mesh in (("one", "batch:1"), ("pipe", "pipe:2")):
        runs[name] = tmp_path / name
        assert main(["train", "--mesh", mesh, "--out", str(runs[name])] + base) == 0
        assert main(["export", str(runs[name]), str(tmp_path / f"{name}_hf")]) == 0
    one, pipe = (load_file(str(tmp_path / f"{n}_hf" / "model.safetensors")) for n in ("one", "pipe"))
    assert one.keys() == pipe.keys()
    for k in one:
        assert (one[k] - pipe[k]).abs().max() <= 1e-5, k
    texts = []
    for name, mesh in (("one", "model:1"), ("pipe", "model:2")):     # in a fresh process: its ranks' stdout
        run = subprocess.run([sys.executable, "-c", "import sys; from meshtron.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", "generate", str(runs[name]), "--mesh", mesh,
                              "--prompt", "The", "--max-new-tokens", "12", "--temperature", "0"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        texts.append(run.stdout)
    assert len(texts[0]) > 1 and texts[0] == texts[1]
    capfd.readouterr()
    for cmd in (["generate", str(runs["pipe"]), "--prompt", "The"], ["serve", str(runs["pipe"])]):
        assert main(cmd + ["--mesh", "pipe:2"]) == 2
        assert "e.g. --mesh model:1" in capfd.readouterr().err
