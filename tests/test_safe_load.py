"""Nothing meshtron reads can run code: a checkpoint whose DCP `.metadata` pickle runs a command (and then returns
the real metadata, with the CRC table rewritten to match) is refused by every command that loads one (generate,
serve, eval, export, train --resume) and by the loader itself; so are pickled (non-tensor) entries, and a
`pytorch_model.bin` holding more than tensors (convert), with meshtron's own message."""
import io
import json
import os
import pickle
import shutil
import zlib

import pytest
import torch

from meshtron import checkpoint as ck
from meshtron.cli import main
from meshtron.launch import free_port
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model


class RunsCode:
    """Unpickles as a call of exec(...) that writes `marker`: what an attacker's pickle does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), "--model", "gpt-tiny", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--sample-tokens", "0"]) == 0
    return out


def _rewrite(ckpt, name: str, data: bytes):
    """Write `name` into checkpoint `ckpt` and record its size and CRC32, as an attacker can."""
    with open(os.path.join(ckpt, name), "wb") as f:
        f.write(data)
    meta_path = os.path.join(ckpt, ck.META)
    meta = json.load(open(meta_path))
    meta["files"][name] = [len(data), zlib.crc32(data)]
    json.dump(meta, open(meta_path, "w"))


def crafted_run(run, tmp_path):
    """A copy of `run` whose newest checkpoint's .metadata runs code when unpickled, then loads normally."""
    copy = tmp_path / "crafted"
    shutil.copytree(run, copy)
    ckpt = ck.latest_checkpoint(str(copy / "checkpoints"))
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)                      # our own file: trusted here
    md.storage_meta.modules = [RunsCode(tmp_path / "PWNED")]
    _rewrite(ckpt, ".metadata", pickle.dumps(md))
    return copy, ckpt


def test_the_crafted_metadata_really_runs_code_through_plain_dcp(run, tmp_path):
    """The attack is real: DCP's own reader executes it and then loads the model as usual."""
    import torch.distributed.checkpoint as dcp
    _, ckpt = crafted_run(run, tmp_path)
    mesh = Mesh.from_spec("model:1")
    model = build_model(ModelConfig(**ck.read_meta(ckpt)["model"]), mesh)
    dcp.load({"model": {n: p.data for n, p in model.named_parameters()}}, checkpoint_id=ckpt, no_dist=True)
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "export", "train-resume"])
def test_every_command_refuses_a_crafted_checkpoint(run, tmp_path, capsys, command):
    path, _ = crafted_run(run, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("some text to evaluate on. " * 50)
    argv = {"generate": ["generate", str(path), "--prompt", "The", "--max-new-tokens", "2"],
            "serve": ["serve", str(path), "--port", str(free_port())],
            "eval": ["eval", str(path), "--data", str(text), "--seq-len", "16", "--batch-size", "2"],
            "export": ["export", str(path), str(tmp_path / "hf")],
            "train-resume": ["train", "--resume", str(path), "--steps", "3"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "builtins.exec, which is not part of a checkpoint's metadata" in err and "could run code" in err
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "hf").exists()


def test_the_loader_itself_refuses_code_and_pickled_entries(run, tmp_path):
    _, ckpt = crafted_run(run, tmp_path)
    mesh = Mesh.from_spec("model:1")
    model = build_model(ModelConfig(**ck.read_meta(ckpt)["model"]), mesh)
    with pytest.raises(ck.CheckpointError, match="builtins.exec"):
        ck.load_checkpoint(ckpt, model, mesh)
    assert not (tmp_path / "PWNED").exists()

    # a tensor entry replaced by a pickled object (DCP would torch.load it with weights_only=False)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    other = tmp_path / "bytes"
    shutil.copytree(run, other)
    ckpt = ck.latest_checkpoint(str(other / "checkpoints"))
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    key = "model.wte.weight"
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != key}
    payload = io.BytesIO()
    torch.save(RunsCode(tmp_path / "PWNED"), payload)
    md.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(payload.getvalue()))
    _rewrite(ckpt, "evil.distcp", payload.getvalue())
    _rewrite(ckpt, ".metadata", pickle.dumps(md))
    with pytest.raises(ck.CheckpointError, match="entry 'model.wte.weight' is a BytesStorageMetadata, not a tensor"):
        ck.load_checkpoint(ckpt, model, mesh)
    assert not (tmp_path / "PWNED").exists()


def test_convert_refuses_a_pytorch_model_bin_that_holds_code(run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(run), str(hf)]) == 0
    from safetensors.torch import load_file
    tensors = load_file(hf / "model.safetensors")
    os.remove(hf / "model.safetensors")
    torch.save({**tensors, "extra": RunsCode(tmp_path / "PWNED")}, hf / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["convert", str(hf), str(tmp_path / "conv")]) == 2
    err = capsys.readouterr().err
    assert "holds a reference to" in err and "exec, not only tensors" in err and "could run code" in err
    assert "weights_only" not in err                     # not torch's advice to turn the protection off
    assert not (tmp_path / "PWNED").exists()
    torch.save(tensors, hf / "pytorch_model.bin")        # tensors only: converts
    assert main(["convert", str(hf), str(tmp_path / "conv")]) == 0
