"""The CUDA path, on one GPU (NCCL refuses two ranks on one device, so multi-rank runs stay on the CPU suite):
training, bf16, generation, checkpoints and Hugging Face import on `cuda` against the same work on the CPU.

Run with `pytest -m gpu tests/test_gpu.py` (bench/gpu_check.sh does); without CUDA every test is skipped with the
reason. This module imports nothing the GPU image lacks (no fastapi or uvicorn).

Tolerances: cuBLAS and the CPU's GEMMs sum in different orders (and CUDA's fused attention kernels differ from
the CPU's), so float32 results agree to a few ulps per operation, not bitwise: losses to 1e-5 relative, and
parameters after Adam steps to 1e-4 of the largest parameter (Adam divides rounding noise in near-zero
gradients, such as GPT-2's key bias, by itself; see tests/test_equivalence.py). Dropout masks are the same on
both devices by construction (counter-based, keyed by logical position), so dropout is on. A wrong kernel,
mask or device mix-up moves these by 1e-2 or more.
"""
import importlib.util

import pytest
import torch

from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.sharding import full_state_dict
from meshtron.train.step import TrainStep

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")]

GPT = ModelConfig("gpt", vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=32, dropout=0.1)
LLAMA = ModelConfig("llama", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                    max_seq_len=32, dropout=0.1)
OPT = dict(lr=3e-3, weight_decay=0.1, eps=1e-6, clip=0.5, micro_batches=2)


def _batches(vocab, steps=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (8, 33), generator=g) for _ in range(steps)]


def _train(config, device, bf16=False, steps=3):
    mesh = Mesh.from_spec("model:1", device=device)
    model = build_model(config, mesh, seed=3)
    trainer = TrainStep(model, mesh, **OPT, bf16=bf16)
    losses = []
    for step, batch in enumerate(_batches(config.vocab_size, steps)):
        model.rng.reseed(step)
        losses.append(trainer.step(batch)["loss"])     # CPU batches: the trainer moves them
    return model, trainer, losses


@pytest.mark.parametrize("config", [GPT, LLAMA], ids=["gpt", "llama"])
def test_training_on_cuda_equals_cpu(config):
    cpu_model, _, cpu_losses = _train(config, "cpu")
    gpu_model, trainer, gpu_losses = _train(config, "cuda")
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    for state in trainer.optimizer.state.values():
        assert all(t.device.type == "cuda" for t in state.values() if torch.is_tensor(t))
    torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), rtol=1e-5, atol=0)
    ref = full_state_dict(cpu_model, cpu_model.mesh)
    got = full_state_dict(gpu_model, gpu_model.mesh)
    scale = max(t.abs().max().item() for t in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name].cpu(), ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_bf16_autocast_runs_bf16_gemms_on_cuda():
    mesh = Mesh.from_spec("model:1", device="cuda")
    model = build_model(GPT, mesh, seed=3)
    seen = []
    model.blocks[0].mlp.up_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    _, _, bf16_losses = _train(GPT, "cuda", bf16=True)
    _, _, fp32_losses = _train(GPT, "cuda")
    trainer = TrainStep(model, mesh, **OPT, bf16=True)
    trainer.step(_batches(GPT.vocab_size, 1)[0])
    assert seen and all(d == torch.bfloat16 for d in seen)          # the GEMMs ran in bf16 ...
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())   # ... masters fp32
    rel = max(abs(a / b - 1) for a, b in zip(bf16_losses, fp32_losses))
    assert 1e-6 < rel < 2e-2, rel                                    # bf16 rounding: visible, small


@pytest.mark.parametrize("config", [GPT, LLAMA], ids=["gpt", "llama"])
def test_greedy_generation_on_cuda_equals_cpu(config):
    from meshtron.inference import SamplingParams, generate
    config = config.replace(dropout=0.0, init_std=0.3)               # peaked logits: no near-ties
    prompts = torch.randint(0, config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    tokens = {}
    for device in ("cpu", "cuda"):
        model = build_model(config, Mesh.from_spec("model:1", device=device), seed=4).eval()
        tokens[device] = [c.token_ids for c in generate(model, prompts, greedy)]
    assert tokens["cuda"] == tokens["cpu"]


def test_checkpoint_moves_between_cpu_and_cuda(tmp_path):
    from meshtron import checkpoint
    batches = _batches(GPT.vocab_size, 4)
    runs = {}
    for first, second in (("cpu", "cuda"), ("cuda", "cpu")):
        model, trainer, _ = _train(GPT, first, steps=2)
        root = str(tmp_path / f"{first}-{second}")
        path = checkpoint.save_checkpoint(root, 2, model, model.mesh, trainer.optimizer, meta={"model": {}})
        mesh = Mesh.from_spec("model:1", device=second)
        resumed = build_model(GPT, mesh, seed=3)                     # the run's seed: the same dropout masks
        with torch.no_grad():
            for p in resumed.parameters():
                p.zero_()                                            # the load must replace every weight
        trainer2 = TrainStep(resumed, mesh, **OPT)
        checkpoint.read_meta(path)
        checkpoint.load_checkpoint(path, resumed, mesh, trainer2.optimizer)
        losses = []
        for step in (2, 3):
            resumed.rng.reseed(step)
            losses.append(trainer2.step(batches[step])["loss"])
        runs[first] = losses
    _, _, straight = _train(GPT, "cpu", steps=4)
    for losses in runs.values():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight[2:]), rtol=1e-5, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_import_onto_cuda_gives_hf_logits(tmp_path):
    import transformers
    from meshtron.interop import build_from_hf
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101,
                                                              n_positions=64)).eval()
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(idx).logits
        model = build_from_hf(str(tmp_path), Mesh.from_spec("model:1", device="cuda")).eval()
        got = model.logits(idx.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_parameters_are_drawn_on_the_device_as_on_the_cpu():
    """Weights are drawn where they live (no CPU copy), and the counter-based draw gives the CPU's values."""
    config = GPT.replace(d_model=256, n_head=8)
    before = torch.cuda.memory_allocated()
    model = build_model(config, Mesh.from_spec("model:1", device="cuda"), seed=0)
    assert all(p.is_cuda for p in model.parameters())
    assert torch.cuda.memory_allocated() - before >= sum(p.numel() * 4 for p in model.parameters())
    cpu = build_model(config, Mesh.from_spec("model:1", device="cpu"), seed=0)
    for (n, a), (_, b) in zip(model.named_parameters(), cpu.named_parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7, msg=n)
