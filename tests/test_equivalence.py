"""Every mesh computes the same model as one process: loss, full gradients and updated parameters over three
optimizer steps with gradient accumulation (2 micro-batches), clipping and dropout (embedding, attention
probabilities, residual branches: masks keyed by logical position), for both model families.

Tolerance, float32: |got - ref| <= 1e-5 * |ref| + 1e-5 * max|REF|, where REF is all gradients (or all
parameters) of that step: 1e-5 relative per element, and 1e-5 relative to the step's scale for entries near
zero. Parallel runs sum the same products in another order (row-parallel partial sums, all-reduced gradients),
which moves float32 results by a few ulps (measured: at most 7e-8 absolute on gradients, 2.4e-7 on parameters);
a wrong layer shows as 1e-2 or more. Some gradients are exactly zero in exact arithmetic and pure rounding
noise (~1e-9) in float32: GPT-2's key bias (softmax ignores a per-query constant). Adam with eps=1e-8 divides
that noise by itself, so no two summation orders agree on those updates; the test uses eps=1e-6, which keeps
such updates ~1e-3 of the learning rate while real gradients (1e-4 .. 1e-1) are unaffected.
"""
import pytest
import torch

from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.sharding import full_state_dict
from meshtron.train.step import TrainStep, local_rows

GPT = ModelConfig("gpt", vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16,   # 97: prime vocab
                  dropout=0.1)
LLAMA = ModelConfig("llama", vocab_size=97, n_layer=2, n_head=8, n_kv_head=4, d_model=64, d_ff=96, max_seq_len=16,
                    dropout=0.1)
LLAMA_KV2 = LLAMA.replace(n_head=4, n_kv_head=2)
CONFIGS = {"gpt": GPT, "llama": LLAMA}
GLOBAL_BATCH, SEQ, STEPS, MICRO = 8, 16, 3, 2
MESHES = ["model:2", "batch:2", "batch:2,model:2", "model:4", "batch:4"]


def batches(vocab):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


OPT = dict(lr=3e-3, weight_decay=0.1, eps=1e-6, clip=0.05, micro_batches=MICRO)


def train_and_record(config, mesh_spec, rules=None, opt=None):
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(config, mesh, rules, seed=7)
    trainer = TrainStep(model, mesh, **(opt or OPT))
    losses, grads, params = [], [], []
    for step, batch in enumerate(batches(config.vocab_size)):
        model.rng.reseed(step)
        loss = trainer.forward_backward(local_rows(batch, trainer.batch_axis))
        losses.append(trainer.global_loss(loss))
        if trainer.zero:                      # the sharded optimizer keeps only its chunk of each reduced gradient
            trainer.optimizer.gather_grads()
        grads.append(full_state_dict(model, mesh, grads=True))
        trainer.update()
        params.append(full_state_dict(model, mesh))
    return (losses, grads, params) if mesh.rank == 0 else None


def train_save_resume(config, mesh_spec, root, steps, resume_from=None, rules=None, opt=None, virtual_stages=1):
    """Train `steps` steps of `batches` (after resuming from the checkpoint `resume_from`, optimizer included,
    if given) and save at the end. Returns (per-step losses, checkpoint path): the resharding tests' run."""
    from meshtron import checkpoint
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(config, mesh, rules, seed=7, virtual_stages=virtual_stages)
    trainer = TrainStep(model, mesh, **(opt or OPT))
    start = 0
    if resume_from:
        checkpoint.load_checkpoint(resume_from, model, mesh, trainer.optimizer)
        start = checkpoint.read_meta(resume_from)["step"]
    losses = []
    for step, batch in list(enumerate(batches(config.vocab_size)))[start:start + steps]:
        model.rng.reseed(step)
        losses.append(trainer.step(local_rows(batch, trainer.batch_axis))["loss"])
    path = checkpoint.save_checkpoint(root, start + steps, model, mesh, trainer.optimizer, meta={"model": {}})
    return losses, path


_REFS = {}


def reference(config, opt=None):
    key = (config, tuple(sorted((opt or {}).items())))
    if key not in _REFS:
        _REFS[key] = train_and_record(config, "model:1", None, opt)
    return _REFS[key]


def world_of(mesh_spec: str) -> int:
    world = 1
    for part in mesh_spec.split(","):
        world *= int(part.split(":")[1])
    return world


def assert_tensors_close(got: dict, ref: dict, what: str, step: int):
    assert got.keys() == ref.keys()
    scale = max(t.abs().max().item() for t in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{what} {name} after step {step}: {m}")


def assert_same(ref, got):
    ref_losses, ref_grads, ref_params = ref
    losses, grads, params = got
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for step in range(STEPS):
        assert_tensors_close(grads[step], ref_grads[step], "gradient", step)
        assert_tensors_close(params[step], ref_params[step], "parameter", step)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_mesh_equals_single_process(family, mesh_spec):
    config = CONFIGS[family]
    got = run_ranks(train_and_record, world_of(mesh_spec), config, mesh_spec)[0]
    assert_same(reference(config), got)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_without_dropout_equals_single_process(family):
    """Dropout 0 takes the fused attention kernel (scaled_dot_product_attention) instead of the explicit path."""
    config = CONFIGS[family].replace(dropout=0.0)
    got = run_ranks(train_and_record, 4, config, "batch:2,model:2")[0]
    assert_same(reference(config), got)


def test_gqa_kv_heads_equal_model_axis():
    got = run_ranks(train_and_record, 2, LLAMA_KV2, "model:2")[0]
    assert_same(reference(LLAMA_KV2), got)


def test_vocab_replicated_layout_equals_single_process():
    """A non-default layout: the vocabulary (embedding, head, loss) replicated over the model axis."""
    got = run_ranks(train_and_record, 4, GPT, "batch:2,model:2", "batch:batch;heads:model;d_ff:model")[0]
    assert_same(reference(GPT), got)


def test_bf16_autocast_with_dropout_equals_single_process():
    """bf16 autocast (float32 master weights and gradients) with dropout on batch:2,model:2 against one process
    under the same autocast. bf16 keeps 8 mantissa bits, and the model axis splits each GEMM's reduction (and the
    row-parallel partial sums are rounded to bf16 before the all-reduce), so results agree to bf16 precision,
    not float32's: per step the loss to 1e-2 relative, each gradient to 5% of its tensor's norm, and each
    parameter update to 10% of its norm plus 2% of the step's largest update per element (Adam turns the
    rounding noise of GPT-2's key-bias gradient, zero in exact arithmetic, into updates of any sign, and
    amplifies it where a gradient element is small: on a CPU with native bf16 GEMMs (AVX512-BF16) a row-parallel
    bias whose gradient agreed to 0.8% was updated 8.7% apart by the third step). A wrong mask or layer is off
    by O(1) of the norm."""
    opt = {**OPT, "bf16": True}
    ref_losses, ref_grads, ref_params = reference(GPT, opt)
    losses, grads, params = run_ranks(train_and_record, 4, GPT, "batch:2,model:2", None, opt)[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-2, atol=0)
    init = _initial_weights(GPT, "model:1", seed=7)
    worst = {"loss": (torch.tensor(losses) / torch.tensor(ref_losses) - 1).abs().max().item(), "grad": 0, "update": 0}
    for step in range(STEPS):
        before = init if step == 0 else ref_params[step - 1]
        updates = {n: ref_params[step][n] - before[n] for n in before}
        largest = max(u.abs().max().item() for u in updates.values())
        for name in ref_grads[step]:
            g, r = grads[step][name], ref_grads[step][name]
            assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6, (step, name, ((g - r).norm() / r.norm()).item())
            du, dr = params[step][name] - before[name], updates[name]
            floor = 2e-2 * largest * dr.numel() ** 0.5
            assert (du - dr).norm() <= 1e-1 * dr.norm() + floor, (step, name, (du - dr).norm().item(), floor)
            worst["grad"] = max(worst["grad"], ((g - r).norm() / r.norm().clamp(min=1e-6)).item())
            worst["update"] = max(worst["update"], ((du - dr).norm() / (dr.norm() + floor)).item())
    print("bf16 relative errors:", worst)


def test_reference_clips_drops_and_moves():
    """The reference itself must exercise clipping, dropout and change every parameter, or the comparison
    is weak."""
    losses, grads, params = reference(GPT)
    norm = sum(g.pow(2).sum() for g in grads[0].values()).sqrt().item()
    assert norm > 0.05  # the clip threshold: clipping is active
    init = build_model(GPT, Mesh.from_spec("model:1"), seed=7)
    for name, p in init.named_parameters():
        assert not torch.equal(p.data, params[-1][name]), name
    no_dropout = reference(GPT.replace(dropout=0.0))
    assert abs(no_dropout[0][0] - losses[0]) > 1e-3      # dropout changes the loss ...
    assert not torch.equal(no_dropout[1][0]["wte.weight"], grads[0]["wte.weight"])   # ... and the gradients


def _initial_weights(config, mesh_spec, seed=11):
    mesh = Mesh.from_spec(mesh_spec)
    return full_state_dict(build_model(config, mesh, seed=seed), mesh)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_initialisation_is_mesh_independent(family):
    config = GPT if family == "gpt" else LLAMA
    ref = _initial_weights(config, "model:1")
    got = run_ranks(_initial_weights, 4, config, "batch:2,model:2")
    for rank_state in got:            # every rank gathers the same full tensors, bit for bit
        assert rank_state.keys() == ref.keys()
        assert all(torch.equal(rank_state[k], ref[k]) for k in ref)
