"""Metrics: metrics.jsonl (append, truncate on resume), TensorBoard events, the plots, FLOPs per token and MFU,
and the measured, cached peak FLOP/s."""
import argparse
import json
import math

import pytest
import torch

from meshtron.cli import plot
from meshtron.models import get_preset
from meshtron.train import flops
from meshtron.train.metrics import MetricsLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def log_steps(run_dir, steps, start=0, total=10, val_every=None, base=1000.0, **kw):
    with MetricsLogger(str(run_dir), total, start_step=start, **kw) as m:
        for step in steps:
            m.log_train(step, loss=5.0 / step, lr=1e-3, tokens_per_s=base + step, grad_norm=0.5,
                        step_time_s=0.1, mfu=0.01 * step, micro_batches=2)
            if val_every and step % val_every == 0:
                m.log_val(step, 6.0 / step)


def test_jsonl_entries(tmp_path, capsys):
    log_steps(tmp_path, range(1, 5), total=4, val_every=2)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in val] == [2, 4] and val[1]["val_loss"] == pytest.approx(1.5)
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "step_time_s", "mfu", "elapsed_s"} <= train[0].keys()
    assert train[2]["micro_batches"] == 2 and train[2]["mfu"] == pytest.approx(0.03)
    err = capsys.readouterr().err                       # not a TTY under pytest: plain lines
    assert "step 4/4" in err and "MFU 4.0%" in err and "val_loss 1.5000" in err


def test_resume_truncates_then_appends(tmp_path):
    log_steps(tmp_path, range(1, 8))                    # a crashed attempt got to step 7 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')                       # ... and died mid-write
    log_steps(tmp_path, range(6, 11), start=5)          # resumed from the checkpoint at step 5
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    log_steps(tmp_path, range(1, 3))                    # a fresh run in the same folder starts over
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_writes_nothing(tmp_path):
    log_steps(tmp_path / "run", range(1, 3), enabled=False)
    assert not (tmp_path / "run").exists()


def scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), "a step logged twice"
    return {e.step: e.value for e in events}


def test_tensorboard_events(tmp_path):
    log_steps(tmp_path, range(1, 8), val_every=3)
    assert scalars(tmp_path / "tb", "train/loss") == pytest.approx({s: 5.0 / s for s in range(1, 8)})
    assert scalars(tmp_path / "tb", "val/loss") == pytest.approx({3: 2.0, 6: 1.0})
    assert scalars(tmp_path / "tb", "train/mfu")[2] == pytest.approx(0.02)
    log_steps(tmp_path, range(5, 11), start=4, base=2000.0)   # resume: steps 5-7 of the first attempt are purged
    tps = scalars(tmp_path / "tb", "train/tokens_per_s")
    assert tps == pytest.approx({s: (1000.0 if s <= 4 else 2000.0) + s for s in range(1, 11)})


def run_plot(argv):
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    return plot.run(parser.parse_args(argv))


def test_plot_writes_pngs(tmp_path, capsys):
    log_steps(tmp_path, range(1, 31), total=30, val_every=10)
    assert run_plot([str(tmp_path)]) == 0
    for name in ("loss.png", "throughput.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert run_plot([str(tmp_path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_errors(tmp_path, capsys):
    assert run_plot([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_plot([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert run_plot([str(tmp_path)]) == 2
    assert "no training steps yet" in capsys.readouterr().err


def test_flops_per_token_by_hand():
    cfg = get_preset("gpt-tiny")                        # V=97, L=2, d=32, d_ff=128, 4 heads, tied
    per_layer = 4 * 32 * 32 + 2 * 32 * 128              # q, k, v, out + MLP up, down
    n = 2 * per_layer + 97 * 32                         # + the (tied) head; no lookups, biases, norms
    assert flops.matmul_params(cfg) == n == 27680
    assert flops.model_flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 32 * 32 == 190656
    llama = get_preset("llama-tiny")                    # d=32, 2 of 4 kv heads (head_dim 8), d_ff=64, untied
    n = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 97 * 32
    assert flops.model_flops_per_token(llama, 64) == 6 * n + 12 * 2 * 32 * 64
    # agrees with the nanoGPT-style ModelConfig.flops_per_token up to GPT's biases and norm gains (< 3% here)
    assert flops.model_flops_per_token(cfg, 32) == pytest.approx(cfg.flops_per_token(32), rel=0.03)


def test_mfu_math():
    assert flops.mfu(1000.0, 6e6, 1e11) == pytest.approx(0.06)
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1.0, 1.0, 0.0)
    assert flops.peak_flops_total(world_size=4, peak_tflops=0.5) == 0.5e12          # 4 ranks on one machine
    assert flops.peak_flops_total(world_size=8, local_world_size=4, peak_tflops=0.5) == 1e12   # two machines


def test_peak_measured_and_cached(tmp_path, monkeypatch):
    cache = str(tmp_path / "peak.json")
    peak = flops.measure_peak_flops(threads=1, seconds=0.05, cache_path=cache)
    assert 1e8 < peak < 1e13                            # 0.1 GFLOP/s .. 10 TFLOP/s: a CPU core
    (key, stored), = json.load(open(cache)).items()
    assert stored == peak and "float32" in key and "threads=1" in key
    monkeypatch.setattr(flops, "_time_gemm", lambda *a: pytest.fail("measured again despite the cache"))
    assert flops.measure_peak_flops(threads=1, cache_path=cache) == peak
    assert torch.get_num_threads() >= 1 and math.isfinite(peak)
