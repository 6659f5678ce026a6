"""Single layers against plain PyTorch, and the dropout streams across the model axis."""
import torch
import torch.nn.functional as F

from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from meshtron.parallel.random import DropoutRNG, dropout


def test_cross_entropy_matches_torch_one_rank():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, requires_grad=True)
    target = torch.randint(0, 11, (6,), generator=g)
    target[2] = IGNORE_INDEX
    mine = vocab_parallel_cross_entropy(logits, target, Mesh(shape={"model": 1}).axis(None))
    ref = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(mine, ref)
    (ga,) = torch.autograd.grad(mine.sum(), logits)
    (gb,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(ga, gb)


def _parallel_ce(vocab):
    mesh = Mesh.from_spec("model:2")
    axis = mesh.axis("model")
    g = torch.Generator().manual_seed(0)
    full = torch.randn(5, vocab, generator=g)
    target = torch.randint(0, vocab, (5,), generator=g)
    per = -(-vocab // 2)
    start = axis.coord * per
    local = full[:, start:min(start + per, vocab)].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, axis, start)
    loss.sum().backward()
    return loss.detach(), local.grad, full, target


def test_cross_entropy_vocab_split_unevenly():
    results = run_ranks(_parallel_ce, 2, 7)
    full, target = results[0][2], results[0][3]
    full.requires_grad_()
    ref = F.cross_entropy(full, target, reduction="none")
    ref.sum().backward()
    for loss, _, _, _ in results:
        torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]], dim=1), full.grad)


def _dropout_masks():
    mesh = Mesh.from_spec("model:2")
    rng = DropoutRNG(seed=3, model_coord=mesh.axis("model").coord)
    x = torch.ones(4, 8)
    return dropout(x, 0.5, rng.replicated, True), dropout(x, 0.5, rng.parallel, True)


def test_dropout_replicated_identical_parallel_distinct():
    (rep0, par0), (rep1, par1) = run_ranks(_dropout_masks, 2)
    assert torch.equal(rep0, rep1)          # replicated activations: same mask on every model-axis rank
    assert not torch.equal(par0, par1)      # split activations: per-rank stream


def _dropout_train(mesh_spec):
    mesh = Mesh.from_spec(mesh_spec)
    cfg = ModelConfig("gpt", vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=8, dropout=0.2)
    model = build_model(cfg, mesh, seed=1)
    model.train()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.item()


def test_dropout_model_trains_consistently_across_model_axis():
    """With dropout on, the model-axis ranks still agree on the loss (replicated masks are identical)."""
    a, b = run_ranks(_dropout_train, 2, "model:2")
    assert a == b


def test_same_logical_model_on_every_mesh_one_rank():
    cfg = ModelConfig("llama", vocab_size=31, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=8)
    m1 = build_model(cfg, Mesh.from_spec("model:1"), seed=5)
    m2 = build_model(cfg, Mesh.from_spec("model:1"), seed=5)
    m3 = build_model(cfg, Mesh.from_spec("model:1"), seed=6)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not torch.equal(sd1["embed.weight"], sd3["embed.weight"])


def _fused_vs_separate(bf16: bool):
    """`column_parallel_group` (one GEMM, `f` fused, overlapped backward) against one F.linear per layer."""
    from meshtron.parallel.linear import ColumnParallelLinear, column_parallel_group
    torch.manual_seed(0)
    axis = Mesh(shape={"model": 1}).axis(None)
    layers = [ColumnParallelLinear(8, n, axis, bias=True) for n in (6, 4, 4)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 8, requires_grad=True)
    params = [x] + [p for layer in layers for p in (layer.weight, layer.bias)]
    outs = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ys = column_parallel_group(x, layers) if fused else [F.linear(x, l.weight, l.bias) for l in layers]
            loss = sum((y.float() * (i + 1)).square().sum() for i, y in enumerate(ys))
        outs.append((ys, torch.autograd.grad(loss, params)))
    (ya, ga), (yb, gb) = outs
    p64 = [p.detach().double().requires_grad_() for p in params]
    ys = [F.linear(p64[0], p64[1 + 2 * i], p64[2 + 2 * i]) for i in range(len(layers))]
    g64 = torch.autograd.grad(sum((y * (i + 1)).square().sum() for i, y in enumerate(ys)), p64)
    for a, b in zip(ya, yb):
        assert a.dtype == b.dtype == (torch.bfloat16 if bf16 else torch.float32)
        torch.testing.assert_close(a, b)
    for a, b, exact in zip(ga, gb, g64):
        assert a.dtype == b.dtype == torch.float32   # gradients of float32 parameters stay float32
        if bf16:   # one bf16 GEMM instead of three: no less accurate than the separate layers
            err_a, err_b = ((t.double() - exact).abs().max().item() for t in (a, b))
            assert err_a <= 1.5 * err_b + 1e-2 * exact.abs().max().item(), (err_a, err_b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_column_group_matches_separate_linears():
    _fused_vs_separate(bf16=False)


def test_fused_column_group_under_bf16_autocast():
    _fused_vs_separate(bf16=True)


def _bf16_losses(mesh_spec):
    from meshtron.train.step import TrainStep, local_rows
    mesh = Mesh.from_spec(mesh_spec)
    cfg = ModelConfig("llama", vocab_size=53, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
    model = build_model(cfg, mesh, seed=2)
    step = TrainStep(model, mesh, lr=1e-2, bf16=True)
    data = torch.randint(0, 53, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = [step.step(local_rows(data, step.batch_axis))["loss"] for _ in range(3)]
    return losses, all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_autocast_training_agrees_across_meshes():
    """bf16 autocast through the fused column GEMMs: the same losses on one rank and on batch:2,model:2
    (to bf16 precision: the model axis splits the GEMM reductions differently), float32 master weights."""
    (ref, ok), = run_ranks(_bf16_losses, 1, "model:1")
    assert ok and ref[-1] < ref[0]
    for losses, ok in run_ranks(_bf16_losses, 4, "batch:2,model:2"):
        assert ok
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-2, atol=0)


def test_frozen_column_weights_get_no_gradient_and_the_input_still_does():
    from meshtron.parallel.linear import ColumnParallelLinear, column_parallel_group
    torch.manual_seed(0)
    axis = Mesh(shape={"model": 1}).axis(None)
    layers = [ColumnParallelLinear(8, 4, axis) for _ in range(2)]
    for layer in layers:
        layer.weight.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    a, b = column_parallel_group(x, layers)
    (a.sum() + 2 * b.sum()).backward()
    assert all(layer.weight.grad is None for layer in layers)
    assert all(layer.bias.grad is not None for layer in layers)
    torch.testing.assert_close(x.grad, (layers[0].weight.sum(0) + 2 * layers[1].weight.sum(0)).expand(3, 8))
