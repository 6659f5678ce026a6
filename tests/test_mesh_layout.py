"""Mesh specs and layout rules: parsing, rank order, and every illegal layout refused with an actionable message
before any collective (and without a hang)."""
import pytest

from meshtron.launch import RankError, run_ranks
from meshtron.layout import LayoutError, LayoutRules, validate
from meshtron.mesh import Mesh, parse_mesh_spec
from meshtron.models import ModelConfig, build_model

SIZES = ModelConfig("gpt", n_head=4, d_model=32).dim_sizes()


def test_parse_mesh_spec_any_names_and_separators():
    assert parse_mesh_spec("batch:2,model:2") == {"batch": 2, "model": 2}
    assert parse_mesh_spec("dp:4; tp:2") == {"dp": 4, "tp": 2}
    assert list(parse_mesh_spec("model:2,batch:3")) == ["model", "batch"]


@pytest.mark.parametrize("spec, words", [("batch:0", "positive"), ("batch:two", "positive"),
                                         ("batch:2,batch:2", "twice"), ("batch2", "name:value"), ("", "empty")])
def test_bad_mesh_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_mesh_spec(spec)


def test_rank_grid_model_axis_fastest():
    mesh = Mesh(shape={"batch": 2, "model": 2})
    assert mesh.rank_grid().tolist() == [[0, 1], [2, 3]]   # tensor-parallel groups {0,1} and {2,3}


def test_rules_parse_and_defaults():
    rules = LayoutRules.parse("batch:batch;heads:model,d_ff:model;vocab:model")
    assert rules.as_dict() == {"batch": "batch", "heads": "model", "d_ff": "model", "vocab": "model"}
    assert LayoutRules.default_for({"batch": 4}).as_dict() == {"batch": "batch"}


def test_dimension_on_two_axes():
    with pytest.raises(LayoutError, match="'heads' is mapped to two mesh axes .*'model'.*'batch'"):
        LayoutRules.parse("heads:model;heads:batch")


def test_unknown_axis():
    with pytest.raises(LayoutError, match="no axis 'tensor'.*use one of \\['batch', 'model'\\]"):
        validate(LayoutRules.parse("heads:tensor"), {"batch": 2, "model": 2}, SIZES)


def test_unknown_dimension():
    with pytest.raises(LayoutError, match="unknown dimension 'hedas'"):
        LayoutRules.parse("hedas:model")


def test_heads_not_divisible():
    with pytest.raises(LayoutError, match=r"heads=4 is not divisible by mesh axis 'model' of size 3.*\[1, 2, 4\]"):
        validate(LayoutRules.parse("heads:model;d_ff:model"), {"model": 3}, SIZES)


def test_two_dims_of_one_tensor_on_one_axis():
    with pytest.raises(LayoutError, match="both 'batch' and 'heads' on mesh axis 'model'"):
        validate(LayoutRules.parse("batch:model;heads:model"), {"model": 2}, SIZES)


def test_unused_axis_and_unsplittable_dim():
    with pytest.raises(LayoutError, match="axis 'batch' \\(size 2\\) is used by no layout rule"):
        validate(LayoutRules.parse("heads:model"), {"batch": 2, "model": 2}, SIZES)
    with pytest.raises(LayoutError, match="cannot split 'd_model'"):
        validate(LayoutRules.parse("d_model:model"), {"model": 2}, SIZES)


def test_kv_heads_must_follow_heads():
    with pytest.raises(LayoutError, match="split kv_heads over the same axis as heads"):
        validate(LayoutRules.parse("heads:model;kv_heads:batch"), {"batch": 2, "model": 2}, SIZES)


def _build(mesh_spec, rules, config):
    mesh = Mesh.from_spec(mesh_spec)
    build_model(config, mesh, rules)
    import torch.distributed as dist
    return dist.is_initialized()


def test_wrong_world_size_fails_fast_on_every_rank():
    """Two ranks started for a four-rank mesh: each refuses before initialising any process group."""
    with pytest.raises(RankError, match="mesh 'batch:2,model:2' needs 4 ranks .* the world has 2"):
        run_ranks(_build, 2, "batch:2,model:2", None, ModelConfig("gpt"), timeout_s=60)


def test_heads_not_divisible_fails_before_collectives():
    """The model is refused at construction on every rank, before any parameter or collective exists."""
    config = ModelConfig("gpt", n_head=6, d_model=48)
    with pytest.raises(RankError, match="heads=6 is not divisible by mesh axis 'model' of size 4"):
        run_ranks(_build, 4, "model:4", None, config, timeout_s=60)
