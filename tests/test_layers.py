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
