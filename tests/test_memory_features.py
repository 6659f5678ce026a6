"""Sequence parallelism, activation recompute and the distributed optimizer (ZeRO-1): each computes what one
process does (loss, every gradient and every updated parameter, with dropout, clipping and 2 micro-batches, at
tests/test_equivalence.py's tolerance), alone and together; they send what Megatron's designs send; ZeRO-1
checkpoints reshard onto meshes without it and back; bad combinations fail before any collective.
"""
import pytest
import torch

from meshtron.comm import CommCounter
from meshtron.launch import run_ranks
from meshtron.layout import LayoutError
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.train.step import TrainStep, local_rows

from test_equivalence import (CONFIGS, OPT, assert_same, reference, train_and_record, train_save_resume,
                              world_of)

SP = "batch:batch;heads:model;d_ff:model;vocab:model;seq:model"
SP_VOCAB_REPLICATED = "batch:batch;heads:model;d_ff:model;seq:model"
# (family, mesh, layout, recompute, zero): every pair of features meets on batch:2,model:2
CASES = [
    ("gpt", "model:2", SP, "selective", 0),
    ("llama", "model:2", SP, "full", 0),
    ("gpt", "model:4", SP, "full", 0),
    ("llama", "batch:2", None, "full", 1),
    ("gpt", "batch:4", None, "selective", 1),
    ("gpt", "batch:2,model:2", SP, "selective", 1),
    ("llama", "batch:2,model:2", SP, "selective", 1),
    ("gpt", "batch:2,model:2", SP_VOCAB_REPLICATED, "full", 1),
    ("llama", "batch:2,model:2", SP, "full", 1),
]


@pytest.mark.parametrize("family, mesh_spec, rules, recompute, zero", CASES,
                         ids=[f"{f}-{m}-{'sp' if r else 'nosp'}{'-vrep' if r == SP_VOCAB_REPLICATED else ''}-"
                              f"{rc}-zero{z}" for f, m, r, rc, z in CASES])
def test_features_equal_single_process(family, mesh_spec, rules, recompute, zero):
    config = CONFIGS[family]
    if rules and "batch" not in mesh_spec:
        rules = rules.replace("batch:batch;", "")
    opt = {**OPT, "recompute": recompute, "zero": zero}
    got = run_ranks(train_and_record, world_of(mesh_spec), config, mesh_spec, rules, opt)[0]
    assert_same(reference(config), got)


def _replicated_grads(mesh_spec, rules, reduce_partial):
    """Every rank's own gradients of the parameters replicated over the model axis, after one backward."""
    import meshtron.train.step as step_module
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(CONFIGS["gpt"], mesh, rules, seed=7)
    trainer = TrainStep(model, mesh, lr=1e-3, micro_batches=2)
    if not reduce_partial:
        step_module.reduce_partial_grads = lambda m: None            # the bug of Megatron-LM issue #1446
    batch = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(1234))
    trainer.forward_backward(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if not p.shard.is_split}


@pytest.mark.parametrize("rules", [SP[len("batch:batch;"):], SP_VOCAB_REPLICATED[len("batch:batch;"):]],
                         ids=["vocab-split", "vocab-replicated"])
def test_norm_and_bias_gradients_are_summed_over_the_sequence_axis(rules):
    """Megatron-LM #1446: under sequence parallelism the final LayerNorm's (and every replicated parameter's)
    gradient is a partial sum on each rank; each rank must hold the whole one-process gradient."""
    ref = run_ranks(_replicated_grads, 1, "model:1", None, True)[0]
    ranks = run_ranks(_replicated_grads, 2, "model:2", rules, True)
    for got in ranks:
        assert "ln_f.weight" in got and "blocks.0.attn.o_proj.bias" in got
        for name in got:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    broken = run_ranks(_replicated_grads, 2, "model:2", rules, False)
    assert not torch.allclose(broken[0]["ln_f.weight"], ref["ln_f.weight"], rtol=1e-3)
    assert not torch.allclose(broken[0]["ln_f.weight"], broken[1]["ln_f.weight"], rtol=1e-3)


# ---- what is sent ---------------------------------------------------------------------------------------------

L, B, S, D = 2, 4, 8, 32


def _records(config, mesh_spec, rules=None, recompute="none", zero=0):
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(config, mesh, rules, seed=0)
    trainer = TrainStep(model, mesh, lr=1e-3, micro_batches=1, recompute=recompute, zero=zero)
    batch = local_rows(torch.randint(0, config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0)),
                       trainer.batch_axis)
    with CommCounter() as c:
        trainer.forward_backward(batch)
        trainer.update()
    local_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return c.records, local_param_bytes


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_sequence_parallel_sends_what_the_all_reduces_did(family):
    """Each all-reduce of s·b·h becomes an all-gather plus a reduce-scatter carrying the same bytes (ring
    traffic); on top, Megatron's backward re-gather of each column GEMM's input (stored split) and one small
    all-reduce of the partial gradients. The loss's three all-reduces of s·b stay."""
    config = ModelConfig(family, vocab_size=101, n_layer=L, n_head=4, n_kv_head=2, d_model=D, max_seq_len=S,
                         dropout=0.1)
    plain, _ = run_ranks(_records, 2, config, "model:2")[0]
    sp, _ = run_ranks(_records, 2, config, "model:2", "heads:model;d_ff:model;vocab:model;seq:model")[0]
    sbh = S * B * D
    big_ar = [r for r in plain if r.op == "all_reduce" and r.numel == sbh]
    assert len(big_ar) == 4 * L + 2
    seq = [r for r in sp if r.detail == "seq" or (r.op in ("all_gather", "reduce_scatter") and not r.detail)]
    assert {r.op for r in seq} == {"all_gather", "reduce_scatter"}
    assert sum(r.wire_bytes for r in seq) == pytest.approx(sum(r.wire_bytes for r in big_ar))
    regather = [r for r in sp if r.detail == "seq regather"]
    assert len(regather) == 2 * L + 1 and all(r.numel * 2 == sbh for r in regather)   # QKV, MLP-in, head
    assert not [r for r in sp if r.op == "all_reduce" and r.numel == sbh]
    loss = lambda recs: [r.detail for r in recs if r.op == "all_reduce" and r.numel == S * B]  # noqa: E731
    assert loss(sp) == loss(plain) == ["max", "sum", "sum"]
    partial = [r for r in sp if r.op == "all_reduce" and r.numel not in (sbh, S * B) and r.axis == "model"]
    assert len(partial) == 2                                 # the partial gradients, and the gradient norm
    assert partial[0].numel > 1 and partial[1].numel == 1


@pytest.mark.parametrize("mesh_spec, rules", [("model:2", None), ("model:2", "sp")], ids=["tp", "tp-sp"])
def test_full_recompute_adds_one_more_forward_of_the_blocks(mesh_spec, rules):
    config = ModelConfig("gpt", vocab_size=101, n_layer=L, n_head=4, d_model=D, max_seq_len=S, dropout=0.1)
    rules = rules and "heads:model;d_ff:model;vocab:model;seq:model"
    none, _ = run_ranks(_records, 2, config, mesh_spec, rules)[0]
    full, _ = run_ranks(_records, 2, config, mesh_spec, rules, "full")[0]
    key = lambda r: (r.axis, r.op, r.numel, r.detail)   # noqa: E731
    extra = [key(r) for r in full]
    for r in none:
        extra.remove(key(r))
    # the blocks' forward collectives, once more: g (or its reduce-scatter) after attention and after the MLP,
    # and with sequence parallelism the all-gathers before them
    per_block = 2 if rules is None else 4
    assert len(extra) == per_block * L
    assert all(op in ("all_reduce", "all_gather", "reduce_scatter") for _, op, _, _ in extra)


def test_zero1_sends_one_reduce_scatter_of_gradients_and_one_all_gather_of_parameters():
    config = ModelConfig("llama", vocab_size=101, n_layer=L, n_head=4, n_kv_head=2, d_model=D, max_seq_len=S)
    for records, local_param_bytes in run_ranks(_records, 4, config, "batch:2,model:2", None, "none", 1):
        batch = [r for r in records if r.axis == "batch"]
        rs = [r for r in batch if r.op == "reduce_scatter"]
        ag = [r for r in batch if r.op == "all_gather"]
        assert {r.detail for r in rs} == {"grad"} and {r.detail for r in ag} == {"params"}
        padded = lambda n: -(-n // 2) * 2                          # noqa: E731 - buckets pad to the axis size
        assert sum(r.nbytes for r in rs) == sum(r.nbytes for r in ag) * 2 == padded(local_param_bytes // 4) * 4
        others = [r for r in batch if r.op == "all_reduce"]
        assert all(r.numel == 1 for r in others) and len(others) == 1   # the gradient norm


# ---- checkpoints ----------------------------------------------------------------------------------------------

def _train_save_resume(mesh_spec, zero, root, steps, resume_from=None, rules=None):
    """Train `steps` steps (after resuming from `resume_from` if given), saving at the end; losses logged."""
    return train_save_resume(CONFIGS["gpt"], mesh_spec, root, steps, resume_from, rules, {**OPT, "zero": zero})


@pytest.mark.parametrize("first, second", [(("batch:2,model:2", 1), ("model:4", 0)),
                                           pytest.param(("model:4", 0), ("batch:2,model:2", 1),
                                                        marks=pytest.mark.slow),
                                           pytest.param(("batch:4", 1), ("batch:2", 1), marks=pytest.mark.slow)],
                         ids=["zero-to-tp", "tp-to-zero", "zero4-to-zero2"])
def test_zero1_checkpoints_reshard_with_optimizer_state(first, second, tmp_path):
    ref_losses = reference(CONFIGS["gpt"])[0]
    (m1, z1), (m2, z2) = first, second
    losses1, path = run_ranks(_train_save_resume, world_of(m1), m1, z1, str(tmp_path / "a"), 1)[0]
    losses2, _ = run_ranks(_train_save_resume, world_of(m2), m2, z2, str(tmp_path / "b"), 2, path)[0]
    torch.testing.assert_close(torch.tensor(losses1 + losses2), torch.tensor(ref_losses), rtol=1e-5, atol=0)


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rules, message", [
    ("batch:batch;heads:model;d_ff:model;seq:batch", "sequence parallelism splits the residual stream over the axis"),
    ("heads:model;seq:model", "'d_ff' is on None"),
])
def test_bad_sequence_parallel_layouts_fail_before_any_collective(rules, message):
    mesh = Mesh(shape={"batch": 2, "model": 2})
    with pytest.raises(LayoutError, match=message):
        build_model(CONFIGS["gpt"], mesh, rules)


def _odd_sequence():
    mesh = Mesh.from_spec("model:2")
    model = build_model(CONFIGS["gpt"], mesh, "heads:model;d_ff:model;vocab:model;seq:model")
    model(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


def test_a_sequence_not_divisible_by_the_axis_is_refused_with_the_fix():
    from meshtron.launch import RankError
    with pytest.raises(RankError, match="needs sequences whose length is a multiple of 2; got 7"):
        run_ranks(_odd_sequence, 2)


def test_unknown_recompute_and_zero_stage_are_refused():
    mesh = Mesh.from_spec("model:1")
    model = build_model(CONFIGS["gpt"], mesh)
    with pytest.raises(ValueError, match="recompute 'most' is unknown: use one of none, selective, full"):
        TrainStep(model, mesh, lr=1e-3, recompute="most")
    with pytest.raises(ValueError, match="ZeRO stage 0 .* and 1"):
        TrainStep(model, mesh, lr=1e-3, zero=2)
    assert not TrainStep(model, mesh, lr=1e-3, zero=1).zero       # no batch axis > 1: ZeRO-1 is a no-op
