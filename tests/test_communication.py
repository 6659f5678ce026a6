"""What the parallel layers send, counted: Megatron's 4 all-reduces of s·b·h per layer on the model axis, plus
the embedding's and the head's, plus the loss's three of s·b; data-parallel traffic equal to the local
parameter bytes; nothing else."""
import pytest
import torch

from meshtron.comm import CommCounter
from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import ModelConfig, build_model
from meshtron.train.step import TrainStep, local_rows

L, B, S, D = 3, 4, 8, 32


def count(config, mesh_spec):
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(config, mesh, seed=0)
    trainer = TrainStep(model, mesh, lr=1e-3, micro_batches=1)
    batch = local_rows(torch.randint(0, config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0)),
                       trainer.batch_axis)
    with CommCounter() as c:
        trainer.forward_backward(batch)
    local_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return [(r.axis, r.op, r.numel, r.detail) for r in c.records], local_param_bytes


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("mesh_spec", ["model:2", "batch:2,model:2"])
def test_tensor_parallel_collectives(family, mesh_spec):
    config = ModelConfig(family, vocab_size=101, n_layer=L, n_head=4, n_kv_head=2, d_model=D, max_seq_len=S)
    world = 4 if "batch" in mesh_spec else 2
    results = run_ranks(count, world, config, mesh_spec)
    dp = 2 if "batch" in mesh_spec else 1
    sbh, sb = S * (B // dp) * D, S * (B // dp)
    for records, local_param_bytes in results:
        model_axis = [(op, n, d) for axis, op, n, d in records if axis == "model"]
        big = [r for r in model_axis if r[1] == sbh]
        small = [r for r in model_axis if r[1] == sb]
        assert all(op == "all_reduce" for op, _, _ in model_axis)
        # 4 per layer (f backward and g forward, attention and MLP) + embedding's g + the head's f
        assert len(big) == 4 * L + 2
        # the vocab-parallel loss: max, target logit, sum of exp, one value per token each
        assert [d for _, _, d in small] == ["max", "sum", "sum"]
        assert len(model_axis) == len(big) + len(small)
        batch_axis = [(op, n) for axis, op, n, _ in records if axis == "batch"]
        if dp == 1:
            assert batch_axis == []
        else:
            assert all(op == "all_reduce" for op, _ in batch_axis)
            assert sum(n for _, n in batch_axis) * 4 == local_param_bytes
        assert {axis for axis, *_ in records} <= {"model", "batch"}
