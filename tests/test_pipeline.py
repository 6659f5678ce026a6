"""Pipeline parallelism: schedules as data (each micro-batch crosses each stage boundary once forward and once
backward, the in-flight limits hold, the simulated run never deadlocks), and pipelined meshes computing what one
process does (loss, every gradient and every updated parameter, with dropout, clipping and 4 micro-batches, at
tests/test_equivalence.py's tolerance), tied embeddings across stages included."""
import pytest
import torch

from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import build_model
from meshtron.parallel.sharding import full_state_dict
from meshtron.pipeline import schedule as S
from meshtron.train.step import TrainStep, local_rows

from test_equivalence import CONFIGS, OPT, assert_same, batches, train_save_resume, world_of

MICRO = 4
PIPE_OPT = {**OPT, "micro_batches": MICRO}


# ---- schedules as data ----------------------------------------------------------------------------------------

CASES = [("gpipe", 2, 4, 1), ("gpipe", 4, 3, 1), ("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1),
         ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2), ("interleaved", 3, 6, 3)]


@pytest.mark.parametrize("schedule, stages, micro, chunks", CASES)
def test_every_microbatch_crosses_every_stage_once_each_way(schedule, stages, micro, chunks):
    actions = S.build(schedule, stages, micro, chunks)
    for rank, acts in enumerate(actions):
        fwd = [(a.microbatch, a.chunk) for a in acts if a.kind == "F"]
        bwd = [(a.microbatch, a.chunk) for a in acts if a.kind == "B"]
        want = sorted((m, c) for m in range(micro) for c in range(chunks))
        assert sorted(fwd) == want and sorted(bwd) == want, (rank, acts)
        for i, a in enumerate(acts):                         # a backward after its own forward
            if a.kind == "B":
                assert S.Action("F", a.microbatch, a.chunk) in acts[:i]
    # every boundary crossing: a forward's send matches the next virtual stage's receive, backward mirrors it
    sent, received = [], []
    for rank, acts in enumerate(actions):
        for a in acts:
            recv, send = S.comms(a, rank, stages, chunks)
            v = S.virtual_stage(rank, a.chunk, stages)
            if send:
                sent.append((a.kind, a.microbatch, v, send[0]))
            if recv:
                received.append((a.kind, a.microbatch, v + (-1 if a.kind == "F" else 1), rank))
    assert sorted(sent) == sorted(received)
    assert len(sent) == 2 * micro * (stages * chunks - 1)


@pytest.mark.parametrize("schedule, stages, micro, chunks", CASES)
def test_schedules_never_deadlock_and_have_their_bubble(schedule, stages, micro, chunks):
    result = S.simulate(S.build(schedule, stages, micro, chunks), stages, chunks)
    ideal = (stages - 1) / (chunks * micro)                  # bubble time / ideal time (Narayanan et al. 2021)
    assert result["bubble"] == pytest.approx(ideal / (1 + ideal))
    if schedule == "1f1b":
        assert result["peak_in_flight"] == [min(stages - s, micro) for s in range(stages)]
    if schedule == "gpipe":
        assert result["peak_in_flight"] == [micro] * stages


def test_simulate_finds_a_deadlock():
    bad = [[S.Action("F", 0), S.Action("B", 0)], [S.Action("B", 0), S.Action("F", 0)]]
    with pytest.raises(RuntimeError, match="before its forward|deadlocks"):
        S.simulate(bad, 2, 1)


def test_1f1b_order_is_pytorchs():
    """torch.distributed.pipelining's Schedule1F1B: stage s runs min(M, P - s) forwards, then alternates one
    backward and one forward ("1B1F"), then the remaining backwards: our order, action for action."""
    P, M = 4, 8
    for s, acts in enumerate(S.build("1f1b", P, M)):
        warm = min(M, P - s)
        want = [S.Action("F", m) for m in range(warm)]
        f = warm
        for b in range(M):
            want.append(S.Action("B", b))
            if f < M:
                want.append(S.Action("F", f))
                f += 1
        assert acts == want, s


@pytest.mark.parametrize("stages, micro, chunks", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 8, 4)])
def test_interleaved_order_is_pytorchs(stages, micro, chunks):
    """The compute order of every rank equals torch.distributed.pipelining's ScheduleInterleaved1F1B, read from
    its own rank-order function (a private one: skipped if it changes)."""
    from types import SimpleNamespace
    try:
        from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType
        fake = SimpleNamespace(n_local_stages=chunks, pp_group_size=stages, _n_microbatches=micro,
                               microbatches_per_round=micro // max(1, micro // stages))
        theirs = [ScheduleInterleaved1F1B._calculate_single_rank_operations(fake, r) for r in range(stages)]
        kinds = {_ComputationType.FORWARD: "F", _ComputationType.FULL_BACKWARD: "B"}
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"torch.distributed.pipelining's internals differ in this torch: {e}")
    ours = S.build("interleaved" if chunks > 1 else "1f1b", stages, micro, chunks)
    for rank in range(stages):
        want = [S.Action(kinds[a.computation_type], a.microbatch_index, a.stage_index // stages)
                for a in theirs[rank] if a is not None]
        assert ours[rank] == want, f"rank {rank}:\nours   {S.describe([ours[rank]])}\ntheirs {S.describe([want])}"


@pytest.mark.parametrize("args, message", [
    (("interleaved", 4, 6, 2), "multiple of the pipeline size"),
    (("1f1b", 2, 4, 2), "needs --pipeline-schedule interleaved"),
    (("zb-v", 2, 4, 1), "unknown"),
])
def test_bad_schedules_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        S.build(*args)


# ---- equivalence ----------------------------------------------------------------------------------------------

def pipeline_record(config, mesh_spec, rules=None, opt=None, chunks=1):
    """Like test_equivalence.train_and_record, on every rank: the full tensors this rank's stage holds."""
    opt = {**PIPE_OPT, **(opt or {})}
    mesh = Mesh.from_spec(mesh_spec)
    model = build_model(config, mesh, rules, seed=7, virtual_stages=chunks)
    trainer = TrainStep(model, mesh, **opt)
    losses, grads, params = [], [], []
    for step, batch in enumerate(batches(config.vocab_size)):
        model.rng.reseed(step)
        loss = trainer.forward_backward(local_rows(batch, trainer.batch_axis))
        losses.append(trainer.global_loss(loss))
        if trainer.zero:
            trainer.optimizer.gather_grads()
        grads.append(full_state_dict(model, mesh, grads=True))
        trainer.update()
        params.append(full_state_dict(model, mesh))
    return losses, grads, params


def merged(results):
    """One process's view: the union of every stage's tensors (the two copies of a tied embedding are equal)."""
    losses = results[0][0]
    grads = [{} for _ in losses]
    params = [{} for _ in losses]
    for rank_losses, rank_grads, rank_params in results:
        assert rank_losses == losses                         # every rank reports the step's loss
        for step in range(len(losses)):
            for name, t in rank_grads[step].items():
                if name in grads[step]:
                    torch.testing.assert_close(t, grads[step][name], rtol=0, atol=0, msg=name)
                grads[step][name] = t
            for name, t in rank_params[step].items():
                if name in params[step]:
                    torch.testing.assert_close(t, params[step][name], rtol=0, atol=0, msg=name)
                params[step][name] = t
    return losses, grads, params


_REFS = {}


def reference(config):
    if config not in _REFS:
        _REFS[config] = run_ranks(pipeline_record, 1, config, "model:1")[0]
    return _REFS[config]


EQUIV = [
    pytest.param("gpt", "pipe:2", "1f1b", 1, marks=pytest.mark.slow),
    ("llama", "pipe:2", "interleaved", 2),
    ("gpt", "pipe:4", "1f1b", 1),
    ("llama", "pipe:4", "gpipe", 1),
    ("gpt", "pipe:2,model:2", "interleaved", 2),
    ("llama", "pipe:2,model:2", "1f1b", 1),
    ("gpt", "pipe:2,batch:2", "1f1b", 1),
    pytest.param("llama", "pipe:2,batch:2", "interleaved", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family, mesh_spec, schedule, chunks", EQUIV)
def test_pipeline_equals_single_process(family, mesh_spec, schedule, chunks):
    config = CONFIGS[family].replace(n_layer=4)
    results = run_ranks(pipeline_record, world_of(mesh_spec), config, mesh_spec, None,
                        {"pipeline_schedule": schedule}, chunks)
    assert_same(reference(config), merged(results))


def test_sp_selective_recompute_and_zero1_on_a_pipe_mesh():
    config = CONFIGS["llama"].replace(n_layer=4)
    results = run_ranks(pipeline_record, 8, config, "pipe:2,batch:2,model:2",
                        "batch:batch;heads:model;kv_heads:model;d_ff:model;vocab:model;seq:model;layers:pipe",
                        {"pipeline_schedule": "1f1b", "recompute": "selective", "zero": 1})
    assert_same(reference(config), merged(results))


@pytest.mark.slow
def test_pipe_batch_model_8_ranks_interleaved():
    config = CONFIGS["gpt"].replace(n_layer=4)
    results = run_ranks(pipeline_record, 8, config, "pipe:2,batch:2,model:2", None,
                        {"pipeline_schedule": "interleaved", "recompute": "full"}, 2)
    assert_same(reference(config), merged(results))


# ---- checkpoints ----------------------------------------------------------------------------------------------

def _train_save_resume(mesh_spec, root, steps, resume_from=None, opt=None, chunks=1):
    return train_save_resume(CONFIGS["gpt"].replace(n_layer=4), mesh_spec, root, steps, resume_from,
                             opt={**PIPE_OPT, **(opt or {})}, virtual_stages=chunks)


@pytest.mark.parametrize("first, second", [
    pytest.param(("pipe:2,model:2", {"pipeline_schedule": "interleaved"}, 2), ("model:4", {}, 1),
                 marks=pytest.mark.slow),
    pytest.param(("pipe:2,model:2", {}, 1), ("batch:1", {}, 1), marks=pytest.mark.slow),
    pytest.param(("model:4", {}, 1), ("pipe:4", {"pipeline_schedule": "gpipe"}, 1), marks=pytest.mark.slow),
    (("pipe:2,batch:2", {"zero": 1}, 1), ("pipe:4", {}, 1)),
], ids=["pipe-model-to-model4", "pipe-model-to-one", "model4-to-pipe4", "pipe-zero-to-pipe4"])
def test_pipeline_checkpoints_reshard_with_optimizer_state(first, second, tmp_path):
    ref = reference(CONFIGS["gpt"].replace(n_layer=4))[0]
    (m1, o1, c1), (m2, o2, c2) = first, second
    losses1, path = run_ranks(_train_save_resume, world_of(m1), m1, str(tmp_path / "a"), 1, None, o1, c1)[-1]
    losses2, _ = run_ranks(_train_save_resume, world_of(m2), m2, str(tmp_path / "b"), 2, path, o2, c2)[-1]
    torch.testing.assert_close(torch.tensor(losses1 + losses2), torch.tensor(ref), rtol=1e-5, atol=0)


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh, message", [
    ({"model": 2, "pipe": 2}, "must be the first \\(outermost\\) mesh axis"),
    ({"pipe": 3}, "layers=4 is not divisible by mesh axis 'pipe' of size 3"),
    ({"pipe": 2, "batch": 2}, "mesh axis 'pipe' splits the layers into pipeline stages and cannot also split"),
])
def test_bad_pipeline_layouts_fail_before_any_collective(mesh, message):
    from meshtron.layout import LayoutRules, validate
    rules = "layers:pipe;batch:pipe" if "batch" in mesh else None
    rules = LayoutRules.parse(rules) if rules else LayoutRules.default_for(mesh)
    with pytest.raises(ValueError, match=message):
        validate(rules, mesh, CONFIGS["gpt"].replace(n_layer=4).dim_sizes())


def test_layers_must_split_into_stages_times_virtual_stages():
    from meshtron.pipeline.stages import StagePlan
    with pytest.raises(ValueError, match="4 layers do not split into 2 pipeline stages x 3 virtual stages"):
        StagePlan(4, 2, 0, 3)
