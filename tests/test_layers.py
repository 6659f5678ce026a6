"""Single layers against plain PyTorch; dropout masks and initial values as functions of logical position."""
import pytest
import torch
import torch.nn.functional as F

from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from meshtron.comm import collectives as C
from meshtron.parallel.random import ATTENTION_OUT, ATTENTION_PROBS, MLP_OUT, DropoutRNG, dropout, normal_


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


def test_dropout_mask_is_a_function_of_logical_position():
    """A rank's block of a mask (its batch rows, its heads) is the same block of the one-process mask."""
    rng, T = DropoutRNG(seed=3), 7                       # 7: the last dimension is not a multiple of 4
    rng.reseed(5)
    full = rng.mask(2, ATTENTION_PROBS, (8, 4, T, T), p=0.3)
    rng.at_row(4)
    block = rng.mask(2, ATTENTION_PROBS, (4, 2, T, T), offsets=(2, 0, 0), full=(4, T, T), p=0.3)
    assert torch.equal(block, full[4:8, 2:4])
    rng.at_row(0)
    resid = rng.mask(2, MLP_OUT, (8, T, 16), p=0.3)
    rng.at_row(6)                                        # another split of the same rows (micro-batches, replicas)
    assert torch.equal(rng.mask(2, MLP_OUT, (2, T, 16), p=0.3), resid[6:8])


def test_dropout_mask_is_the_same_drawn_in_blocks(monkeypatch):
    """Masks are drawn in cache-sized blocks of their leading dimensions: any block size gives the same mask."""
    from meshtron.parallel import cpu_kernels, random as R
    monkeypatch.setattr(cpu_kernels, "fill_keep_mask", lambda *a: False)      # PyTorch's composition, chunked
    rng = DropoutRNG(seed=3)
    whole = rng.mask(1, ATTENTION_PROBS, (3, 5, 7, 9), offsets=(1, 0, 0), full=(9, 7, 9), p=0.3)
    for hashes in (1, 3, 20):
        monkeypatch.setattr(R, "MASK_CHUNK_HASHES", hashes)
        assert torch.equal(rng.mask(1, ATTENTION_PROBS, (3, 5, 7, 9), offsets=(1, 0, 0), full=(9, 7, 9), p=0.3),
                           whole)
    monkeypatch.setattr(R, "MASK_CHUNK_HASHES", 1 << 40)
    assert torch.equal(rng.mask(1, ATTENTION_PROBS, (3, 5, 7, 9), offsets=(1, 0, 0), full=(9, 7, 9), p=0.3), whole)


def test_cpu_loops_give_the_pytorch_compositions_bits(monkeypatch):
    """The compiled CPU loops (mask drawing, mask application, dropout + residual add) against the PyTorch ops
    they replace, bit for bit (NaN payloads aside): odd shapes and offsets, p at the ends, float32 and bfloat16
    with inf, nan and -0."""
    from meshtron.parallel import cpu_kernels, random as R
    if not cpu_kernels.available():
        pytest.skip("no C compiler here: the CPU loops are off and PyTorch's composition runs")
    fill, apply, apply_add = cpu_kernels.fill_keep_mask, cpu_kernels.apply_mask, cpu_kernels.apply_mask_add

    def torch_only():
        monkeypatch.setattr(cpu_kernels, "fill_keep_mask", lambda *a: False)
        monkeypatch.setattr(cpu_kernels, "apply_mask", lambda *a: None)
        monkeypatch.setattr(cpu_kernels, "apply_mask_add", lambda *a: None)

    def loops():
        monkeypatch.setattr(cpu_kernels, "fill_keep_mask", fill)
        monkeypatch.setattr(cpu_kernels, "apply_mask", apply)
        monkeypatch.setattr(cpu_kernels, "apply_mask_add", apply_add)
    key = R.fold_key(7, 1, 2, 3)
    blocks = [((3, 5, 7), (2, 1, 0), (9, 8, 7)), ((2, 3, 130), (0, 4, 0), (2, 10, 130)), ((5, 1), (3, 0), (10, 1)),
              ((6,), (0,), (6,)), ((2, 2, 3, 4, 9), (1, 0, 1, 0, 0), (4, 2, 5, 6, 9))]
    for shape, offsets, full in blocks:
        for p in (0.0, 1e-5, 0.1, 0.5, 0.99):
            torch_only()
            ref = R.keep_mask(key, shape, offsets, full, p, "cpu")
            loops()
            assert torch.equal(R.keep_mask(key, shape, offsets, full, p, "cpu"), ref), (shape, p)
    torch_only()                                              # 2M elements: lanes equal to the threshold occur
    ref = R.keep_mask(key, (64, 128, 256), (0, 0, 0), (64, 128, 256), 0.1, "cpu")
    loops()
    assert torch.equal(R.keep_mask(key, (64, 128, 256), (0, 0, 0), (64, 128, 256), 0.1, "cpu"), ref)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 33, generator=g) >= 0.3
    for dtype in (torch.float32, torch.bfloat16):
        x, r = (torch.randn(4, 33, generator=g).to(dtype) for _ in range(2))
        x[0, :4] = torch.tensor([float("inf"), float("nan"), -0.0, -float("inf")])
        r[1, :2] = torch.tensor([float("inf"), -0.0])
        xg = x.clone().requires_grad_()
        rg = r.clone().requires_grad_()
        outs = []
        for mode in (torch_only, loops):
            mode()
            xg.grad = rg.grad = None
            y = R._DropoutAdd.apply(rg, xg, mask, 1 / 0.7)
            y.backward(torch.full_like(y, 1.5))
            outs.append([R.apply_mask(x, mask, 1 / 0.7), R.apply_mask(x, mask, 1.0), y.detach(), xg.grad, rg.grad])
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        for a, b in zip(*outs):                               # the same bits, NaN payloads aside
            assert a.dtype == dtype and torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.view(bits)[~a.isnan()], b.view(bits)[~b.isnan()])
    rng = DropoutRNG(seed=1)                                  # dropout_add is residual + dropout
    x, r = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    torch.testing.assert_close(R.dropout_add(r, x, 0.2, rng, 0, MLP_OUT, True),
                               r + R.dropout(x, 0.2, rng, 0, MLP_OUT, True), rtol=0, atol=0)


def test_cpu_loops_fall_back_without_a_compiler(tmp_path):
    """No compiler (or MESHTRON_CPU_KERNELS=0): the loops are off, nothing fails, and masks are the same."""
    import os
    import subprocess
    import sys
    code = ("from meshtron.parallel import cpu_kernels; from meshtron.parallel.random import DropoutRNG; "
            "m = DropoutRNG(3).mask(0, 3, (2, 5, 7), p=0.3); "
            "print(int(cpu_kernels.available()), ''.join(str(int(b)) for b in m.flatten().tolist()))")
    runs = {}
    for name, env in (("loops", {}), ("off", {"MESHTRON_CPU_KERNELS": "0"}),
                      ("no compiler", {"CC": str(tmp_path / "no-such-cc")})):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                             env={**os.environ, "MESHTRON_CACHE_DIR": str(tmp_path / name), **env})
        runs[name] = out.stdout.split()
    assert runs["off"][0] == runs["no compiler"][0] == "0"
    import shutil
    assert runs["loops"][0] == ("1" if shutil.which("cc") or shutil.which("gcc") else "0")   # built in a fresh cache
    assert runs["loops"][1] == runs["off"][1] == runs["no compiler"][1]


def test_dropout_masks_differ_by_row_step_layer_and_site():
    rng = DropoutRNG(seed=3)
    m = rng.mask(0, MLP_OUT, (4, 16, 32), p=0.5)
    assert all(not torch.equal(m[i], m[j]) for i in range(4) for j in range(i))   # no correlated replicas
    assert not torch.equal(m, rng.mask(1, MLP_OUT, (4, 16, 32), p=0.5))
    assert not torch.equal(m, rng.mask(0, ATTENTION_OUT, (4, 16, 32), p=0.5))
    assert not torch.equal(m, DropoutRNG(seed=4).mask(0, MLP_OUT, (4, 16, 32), p=0.5))
    rng.reseed(1)
    assert not torch.equal(m, rng.mask(0, MLP_OUT, (4, 16, 32), p=0.5))


def test_dropout_keep_rate_and_gradient():
    rng = DropoutRNG(seed=0)
    m = rng.mask(0, MLP_OUT, (64, 128, 128), p=0.1)
    assert abs(m.float().mean().item() - 0.9) < 2e-3
    assert (m.float().mean(dim=(0, 1)) - 0.9).abs().max() < 0.02           # every feature, every lane of a hash
    x = torch.randn(2, 8, 12, requires_grad=True)
    y = dropout(x, 0.25, rng, 0, MLP_OUT, True)
    keep = rng.mask(0, MLP_OUT, (2, 8, 12), p=0.25)
    torch.testing.assert_close(y, x.detach() * keep / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.75)
    assert dropout(x, 0.25, rng, 0, MLP_OUT, False) is x


def test_initialisation_draws_only_the_local_slice():
    """A shard's initial values are its slice of the one-process tensor, whichever dimension is split."""
    full = normal_(torch.empty(10, 6, dtype=torch.float64), key=17, offsets=(0, 0), full=(10, 6), std=0.5)
    rows = normal_(torch.empty(4, 6, dtype=torch.float64), key=17, offsets=(5, 0), full=(10, 6), std=0.5)
    cols = normal_(torch.empty(10, 3, dtype=torch.float64), key=17, offsets=(0, 3), full=(10, 6), std=0.5)
    assert torch.equal(rows, full[5:9]) and torch.equal(cols, full[:, 3:])
    big = normal_(torch.empty(1000, 1000), key=1, offsets=(0, 0), full=(1000, 1000), std=0.02, chunk=1 << 16)
    assert abs(big.mean().item()) < 1e-4 and abs(big.std().item() - 0.02) < 1e-4


def _dropout_grads(mesh_spec):
    """The full gradients of one dropout forward/backward, as the trainer places the rows."""
    from meshtron.parallel.sharding import full_state_dict
    from meshtron.train.step import local_rows
    mesh = Mesh.from_spec(mesh_spec)
    cfg = ModelConfig("gpt", vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=8, dropout=0.2)
    model = build_model(cfg, mesh, seed=1)
    model.train()
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    batch_axis = model.layout.axis("batch")
    rows = local_rows(ids, batch_axis)
    model.rng.at_row(batch_axis.coord * rows.shape[0])
    loss = model(rows[:, :-1], rows[:, 1:]) * rows.shape[0] / ids.shape[0]
    loss.backward()
    grads = full_state_dict(model, mesh, grads=True)
    return {k: C.all_reduce(v, batch_axis.group) for k, v in grads.items()}


def test_dropout_gradients_are_the_same_on_every_mesh():
    """Replaces a check that compared a loss every rank agrees on by construction: the gradients themselves,
    which differ if any rank's mask differs from its block of the one-process mask."""
    ref = _dropout_grads("model:1")
    for mesh_spec, world in (("model:2", 2), ("batch:2", 2)):
        for got in run_ranks(_dropout_grads, world, mesh_spec):
            for name in ref:
                torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{mesh_spec} {name}")


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


def _unfused_dropped_attention(q, k, v, keep, p):
    import math
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    return (att * keep / (1 - p)) @ v


def test_dropped_attention_equals_the_unfused_composition(monkeypatch):
    """meshtron's dropout attention (one autograd Function that keeps probabilities and mask only) against the
    PyTorch ops it replaces, in float64: output and the q, k, v gradients to rounding, with as many kv heads as
    query heads and grouped (3 query heads per kv head); under bf16 it runs and keeps bf16 probabilities."""
    import math
    from meshtron.parallel.attention import _DroppedAttention
    from meshtron.parallel import attention
    g = torch.Generator().manual_seed(0)
    from meshtron.parallel import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "attention_fits", lambda *a: False)   # PyTorch's path (the loop: below)
    whole_batch = attention._chunks(2, 6, 9, 8, "meta")           # the one chunk a GPU takes
    # a batch row's heads (one chunk each), chunks of 3 or 2 heads (9·9·8 bytes each: 2 query heads of a kv
    # group of 3 span two kv heads), chunks of 2 query rows (score rows of 72 bytes), the whole batch; float64
    # (PyTorch's mask multiply) and float32 (the CPU loops); q, k, v contiguous or strided (views of the
    # model's (B, T, heads, d) projections)
    # chunks of one batch row's strided views (ROW_MIN_BYTES 0) or of (B·h) copies (the default at these sizes)
    cases = [(kv, chunk, dtype, strided, row_min) for kv in (6, 2) for chunk in (attention.CHUNK_BYTES, 3 * 648,
             2 * 648, 150) for dtype, strided in ((torch.float64, False), (torch.float64, True), (torch.float32, True))
             for row_min in (0, attention.ROW_MIN_BYTES) if chunk != 150 or row_min == 0]
    for kv, chunk, dtype, strided, row_min in cases + [(2, None, torch.float64, True, 0)]:
        monkeypatch.setattr(attention, "CHUNK_BYTES", chunk or attention.CHUNK_BYTES)
        monkeypatch.setattr(attention, "ROW_MIN_BYTES", row_min)
        if chunk is None:
            monkeypatch.setattr(attention, "_chunks", lambda *a: whole_batch)
        shapes = [(2, 6, 9, 8)] + [(2, kv, 9, 8)] * 2
        if strided:
            q, k, v = (torch.randn(s[0], s[2], s[1], s[3], dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
                       for s in shapes)
        else:
            q, k, v = (torch.randn(s, dtype=dtype, generator=g, requires_grad=True) for s in shapes)
        keep = torch.rand(2, 6, 9, 9, generator=g) >= 0.3
        ref = _unfused_dropped_attention(q, k, v, keep, 0.3)
        out = _DroppedAttention.apply(q, k, v, keep, 1 / 0.7, 1 / math.sqrt(8))
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, **tol)
        grad = torch.randn(ref.shape, dtype=dtype, generator=g)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, **tol)
    monkeypatch.undo()
    q, k, v = (t.detach().double() for t in (q, k, v))
    kept = []
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        out = _DroppedAttention.apply(q16, k16, v16, keep, 1 / 0.7, 1 / math.sqrt(8))
    assert out.dtype == torch.bfloat16 and (torch.bfloat16, (2, 6, 9, 9)) in kept and (torch.uint8, (2, 6, 9, 9)) in kept
    ref = _unfused_dropped_attention(q.detach(), k.detach(), v.detach(), keep, 0.3)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q16, k16, v16))


def test_attention_loop_equals_the_unfused_composition(monkeypatch):
    """The compiled float32 attention loop (cpu_kernels: row blocks of 32 queries that multiply only the keys
    up to the block's last row, a polynomial exp, GEMMs through PyTorch's BLAS) against the unfused PyTorch ops
    in float64: output and the q, k, v gradients to float32 rounding, over sequences shorter than a block and
    across blocks (70: three, the last partial), grouped-query heads, and q, k, v as strided views of one Q|K|V
    output (the model's layout) or contiguous; on one thread, and on two (blocks of batch rows, or of kv-head
    groups where the batch is one row)."""
    import math
    from meshtron.parallel import cpu_kernels
    from meshtron.parallel.attention import _DroppedAttention
    if not cpu_kernels.attention_fits(*(torch.zeros(1, 1, 2, 2),) * 3):
        pytest.skip("no C compiler or no BLAS symbol in this PyTorch: the attention loop is off")
    calls = []
    forward = cpu_kernels.attention_forward
    monkeypatch.setattr(cpu_kernels, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(cpu_kernels, "THREAD_SCORES", 2000)
    threads = torch.get_num_threads()
    try:
        for B, h, kv, T, d, strided, n in ((2, 6, 6, 9, 8, True, 1), (2, 6, 2, 70, 8, True, 1),
                                           (3, 4, 4, 70, 16, False, 1), (1, 2, 1, 33, 64, True, 1),
                                           (3, 4, 2, 40, 8, True, 2), (1, 6, 2, 40, 8, True, 2)):
            torch.set_num_threads(n)
            assert len(cpu_kernels._parts(B, h, h // kv, T)) == n
            qkv = torch.randn(B, T, h + 2 * kv, d, generator=g)
            parts = (qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:])     # (B, T, heads, d) views
            q, k, v = ((t.transpose(1, 2) if strided else t.transpose(1, 2).contiguous()).requires_grad_()
                       for t in parts)
            keep = torch.rand(B, h, T, T, generator=g) >= 0.3
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = _unfused_dropped_attention(q64, k64, v64, keep, 0.3)
            before = len(calls)
            out = _DroppedAttention.apply(q, k, v, keep, 1 / 0.7, 1 / math.sqrt(d))
            assert len(calls) == before + 1 and out.dtype == torch.float32
            scale = ref.abs().max()
            torch.testing.assert_close(out.double() / scale, ref / scale, rtol=0, atol=2e-6)
            grad = torch.randn(B, T, h, d, dtype=torch.float64, generator=g).transpose(1, 2)  # as o_proj gives it
            got = torch.autograd.grad(out, (q, k, v), grad.float())
            want = torch.autograd.grad(ref, (q64, k64, v64), grad)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double() / b.abs().max(), b / b.abs().max(), rtol=0, atol=4e-6)
    finally:
        torch.set_num_threads(threads)
    # shapes the loop cannot take go to PyTorch's path and its errors, never to the C loop
    q, k = torch.randn(1, 6, 8, 4), torch.randn(1, 4, 8, 4)
    assert not cpu_kernels.attention_fits(q, k, k) and not cpu_kernels.attention_fits(q, k[:, :3], k[:, :2])
    assert not cpu_kernels.attention_fits(q, q[:, :, :7], q[:, :, :7])
    with pytest.raises(ValueError, match="keep must be"):
        cpu_kernels.attention_forward(q, q, q, torch.ones(1, 6, 8, 7, dtype=torch.uint8), 1.0, 0.5)
