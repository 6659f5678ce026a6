"""The shared-memory transport (meshtron.comm.shm) against gloo: all-reduce, all-gather and reduce-scatter give
the same results, bitwise equal on every rank, in the order collectives are issued, and no files left behind."""
import glob
import os

import pytest
import torch

from meshtron.launch import RankError, run_ranks
from meshtron.mesh import Mesh


def _reductions(use_shm):
    os.environ["MESHTRON_SHM"] = "1" if use_shm else "0"
    if use_shm == "futex":
        os.environ["MESHTRON_SHM_WAIT"] = "futex"       # the kernel sleep instead of the polling wait
    import torch.distributed as dist
    from meshtron.comm import collectives as C
    from meshtron.comm import shm
    mesh = Mesh.from_spec("batch:2,model:2")
    out = {"transport": {n: C._SHM.get(id(a.group)) is not None for n, a in mesh.axes.items()}}
    g = torch.Generator().manual_seed(mesh.rank)
    for name, axis in mesh.axes.items():
        big = torch.randn(shm.SLOT_BYTES // 4 * 2 + 77, generator=g)     # three chunks
        small = torch.randn(5, 3, generator=g)
        ints = torch.arange(6, dtype=torch.int64) * (mesh.rank + 1)
        mx = torch.randn(9, generator=g)
        half = torch.randn(33, generator=g).to(torch.bfloat16)
        inputs = {"big": big.clone(), "small": small.clone(), "ints": ints.clone(), "max": mx.clone(),
                  "bf16": half.clone()}
        C.all_reduce(big, axis.group)
        empty = C.all_reduce_async(torch.zeros(0), axis.group)   # nothing to send: completes at once
        assert empty.wait().numel() == 0
        pending = C.all_reduce_async(small, axis.group)      # in flight while another all-reduce starts
        C.all_reduce(ints, axis.group)
        pending.wait()
        C.all_reduce(mx, axis.group, op=dist.ReduceOp.MAX)
        C.all_reduce(half, axis.group)
        out[name] = {"in": inputs, "out": {"big": big, "small": small, "ints": ints, "max": mx, "bf16": half}}
    out["ranks"] = {n: a.ranks for n, a in mesh.axes.items()}
    return out


@pytest.mark.parametrize("use_shm", [True, "futex", False], ids=["shm", "shm-futex", "gloo"])
def test_all_reduce_matches_on_both_transports(use_shm):
    before = set(glob.glob("/dev/shm/meshtron-*"))
    res = run_ranks(_reductions, 4, use_shm)
    assert set(glob.glob("/dev/shm/meshtron-*")) == before          # segments are unlinked once mapped
    from meshtron.comm import shm
    for r in res:
        assert all(v == (bool(use_shm) and shm.enabled()) for v in r["transport"].values())
    for name in ("batch", "model"):
        for rank, r in enumerate(res):
            members = [res[m][name]["in"] for m in r["ranks"][name]]
            got = r[name]["out"]
            for key in ("big", "small", "bf16"):
                want = sum(m[key].double() for m in members)
                torch.testing.assert_close(got[key].double(), want, rtol=1e-2 if key == "bf16" else 1e-6,
                                           atol=1e-2 if key == "bf16" else 1e-6)
            assert torch.equal(got["ints"], sum(m["ints"] for m in members))
            assert torch.equal(got["max"], torch.stack([m["max"] for m in members]).amax(0))
            peer = res[r["ranks"][name][0]][name]["out"]
            assert all(torch.equal(got[k], peer[k]) for k in got)    # bitwise the same on every rank


def _gathers_and_scatters(use_shm: bool):
    os.environ["MESHTRON_SHM"] = "1" if use_shm else "0"
    from meshtron.comm import collectives as C
    from meshtron.comm import shm
    mesh = Mesh.from_spec("batch:2,model:2")
    out = {}
    g = torch.Generator().manual_seed(10 + mesh.rank)
    for name, axis in mesh.axes.items():
        res = {}
        for key, numel in (("small", 6), ("big", shm.SLOT_BYTES // 4 * 2 + 34)):     # 34: even, three chunks
            x = torch.randn(numel, generator=g)
            res[f"ag_{key}"] = (x.clone(), C.all_gather_into(x, axis.group, axis.size))
            y = torch.randn(2 * numel, generator=g)
            mine = torch.empty(numel)
            pending = C.reduce_scatter_async(mine, y, axis.group)   # in flight while an all-gather runs
            again = C.all_gather_dim(x.view(2, -1), axis.group, axis.size, 1)
            res[f"rs_{key}"] = (y, pending.wait().clone())
            res[f"agdim_{key}"] = again
        out[name] = res
    out["ranks"] = {n: a.ranks for n, a in mesh.axes.items()}
    out["transport"] = all(C.shm_transport(a.group) is not None for a in mesh.axes.values())
    return out


@pytest.mark.parametrize("use_shm", [True, False])
def test_all_gather_and_reduce_scatter_on_both_transports(use_shm):
    from meshtron.comm import shm
    res = run_ranks(_gathers_and_scatters, 4, use_shm)
    assert all(r["transport"] == (use_shm and shm.enabled()) for r in res)
    for name in ("batch", "model"):
        for rank, r in enumerate(res):
            members = r["ranks"][name]
            me = members.index(rank)
            for key in ("small", "big"):
                x_in = [res[m][name][f"ag_{key}"][0] for m in members]
                assert torch.equal(r[name][f"ag_{key}"][1], torch.cat(x_in))
                assert torch.equal(r[name][f"agdim_{key}"], torch.cat([x.view(2, -1) for x in x_in], 1))
                ys = [res[m][name][f"rs_{key}"][0] for m in members]
                part = ys[0].numel() // 2
                want = (ys[0] + ys[1])[me * part:(me + 1) * part]       # rank order: the same sum on every rank
                assert torch.equal(r[name][f"rs_{key}"][1], want)


def _stuck_peer(use_shm):
    import time
    os.environ["MESHTRON_SHM"] = "1" if use_shm else "0"
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2", timeout_s=3)
    if mesh.rank == 1:
        time.sleep(8)                      # never joins the collective
        return "slept"
    C.all_reduce(torch.ones(4), mesh.axis("model").group)


@pytest.mark.parametrize("use_shm", [True, False])
def test_a_missing_peer_times_out_with_a_named_error(use_shm):
    with pytest.raises(RankError, match=r"rank 0: all_reduce over group model\[0, 1\] failed"):
        run_ranks(_stuck_peer, 2, use_shm, timeout_s=60)


def _train_losses(use_shm):
    os.environ["MESHTRON_SHM"] = "1" if use_shm else "0"
    from meshtron.models import ModelConfig, build_model
    from meshtron.train.step import TrainStep, local_rows
    mesh = Mesh.from_spec("batch:2,model:2")
    cfg = ModelConfig("gpt", vocab_size=61, n_layer=2, n_head=4, d_model=32, max_seq_len=16)
    step = TrainStep(build_model(cfg, mesh, seed=4), mesh, lr=1e-2)
    data = torch.randint(0, 61, (4, 17), generator=torch.Generator().manual_seed(2))
    return [step.step(local_rows(data, step.batch_axis))["loss"] for _ in range(3)]


def test_training_is_the_same_over_shared_memory_and_gloo():
    shm_losses = run_ranks(_train_losses, 4, True)
    gloo_losses = run_ranks(_train_losses, 4, False)
    for a, b in zip(shm_losses, gloo_losses):
        assert a == pytest.approx(b, rel=1e-6, abs=0)


def _peer_exits():
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2", timeout_s=120)
    if mesh.rank == 1:
        os._exit(0)                        # dies without a word; gloo's socket would close, shm must notice
    C.all_reduce(torch.ones(4), mesh.axis("model").group)


def test_a_peer_that_exits_is_noticed_long_before_the_timeout():
    import time
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"all_reduce over group model\[0, 1\] failed.*rank\(s\) \[1\] has exited"):
        run_ranks(_peer_exits, 2, timeout_s=60)
    assert time.monotonic() - t0 < 30


def _other_host_on_rank_one(tmp):
    """Rank 1 maps a file of its own where rank 0 created the segment, as on another host's /dev/shm."""
    if int(os.environ["RANK"]) == 1:
        real = torch.from_file

        def private(path, *args, **kw):
            own = os.path.join(tmp, "other-host-" + os.path.basename(path))
            open(own, "wb").close()
            os.truncate(own, kw.get("size", args[1] if len(args) > 1 else 0))
            return real(own, *args, **kw)
        torch.from_file = private
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2")
    group = mesh.axis("model").group
    x = torch.full((5,), float(mesh.rank + 1))
    C.all_reduce(x, group)
    return C.shm_transport(group) is None, x.tolist()


def test_memory_that_is_not_shared_falls_back_to_gloo_on_every_rank(tmp_path):
    before = set(glob.glob("/dev/shm/meshtron-*"))
    for fell_back, values in run_ranks(_other_host_on_rank_one, 2, str(tmp_path)):
        assert fell_back and values == [3.0] * 5
    assert set(glob.glob("/dev/shm/meshtron-*")) == before


def _mismatched_calls(kind):
    os.environ["MESHTRON_SHM"] = "1"
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2", timeout_s=10)
    group = mesh.axis("model").group
    if kind == "size":
        x = torch.ones(4 if mesh.rank == 0 else 8)
        C.all_reduce(x, group)
    elif kind == "op":
        import torch.distributed as dist
        C.all_reduce(torch.ones(4), group, dist.ReduceOp.SUM if mesh.rank == 0 else dist.ReduceOp.MAX)
    else:                                  # one rank skipped a call: every later call is refused, not combined
        if mesh.rank == 0:
            C.all_reduce(torch.ones(4), group)
        C.all_reduce(torch.ones(3, dtype=torch.int64), group)
    return "no error"


@pytest.mark.skipif(not __import__("meshtron.comm.shm", fromlist=["enabled"]).enabled(), reason="no shared memory")
@pytest.mark.parametrize("kind, message", [
    ("size", r"rank 0 called all_reduce #1 \(sum, float32, 16 bytes; chunk 1\) but rank 1 called all_reduce #1 "
             r"\(sum, float32, 32 bytes; chunk 1\)"),
    ("op", r"rank 0 called all_reduce #1 \(sum, float32, 16 bytes; chunk 1\) but rank 1 called all_reduce #1 "
           r"\(max, float32, 16 bytes; chunk 1\)"),
    ("skipped", r"rank 0 called all_reduce #1 \(sum, float32, 16 bytes; chunk 1\) but rank 1 called all_reduce #1 "
                r"\(sum, int64, 24 bytes; chunk 1\)"),
])
def test_mismatched_calls_raise_naming_both_ranks_calls(kind, message):
    with pytest.raises(RankError, match=r"rank 0: all_reduce over group model\[0, 1\] failed: mismatched "
                                        r"collectives on group \(0, 1\): " + message):
        run_ranks(_mismatched_calls, 2, kind, timeout_s=60)


def _after_a_timeout():
    import time
    os.environ["MESHTRON_SHM"] = "1"
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2", timeout_s=2)
    group = mesh.axis("model").group
    if mesh.rank == 1:
        time.sleep(4)                      # late for call 1: rank 0 times out
    else:
        with pytest.raises(C.CollectiveError, match="did not arrive within 2 s"):
            C.all_reduce(torch.ones(4), group)
    x = torch.full((4,), float(mesh.rank + 1))
    try:                                   # rank 1's call 1 meets rank 0's call 2: refused, never combined
        C.all_reduce(x, group)
    except C.CollectiveError as e:
        return str(e)
    return x.tolist()


@pytest.mark.skipif(not __import__("meshtron.comm.shm", fromlist=["enabled"]).enabled(), reason="no shared memory")
def test_after_a_timeout_the_transport_refuses_instead_of_combining_stale_slots():
    res = run_ranks(_after_a_timeout, 2, timeout_s=60)
    assert "failed earlier" in res[0] and "out of step" in res[0]
    assert isinstance(res[1], str) and "but rank 0 abandoned all_reduce #1 (it failed there)" in res[1]


def _wait_for_a_late_peer():
    import time
    os.environ["MESHTRON_SHM_WAIT"] = "futex"
    from meshtron.comm import collectives as C
    mesh = Mesh.from_spec("model:2")
    group = mesh.axis("model").group
    assert C.shm_transport(group) is not None
    x = torch.ones(4)
    C.all_reduce(x, group)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(5):
        if mesh.rank == 1:
            time.sleep(0.05)                 # the late peer: rank 0 waits 50 ms for it, five times
        C.all_reduce(x, group)
    return time.perf_counter() - wall, time.process_time() - cpu, x[0].item()


def test_a_rank_waiting_for_its_peer_sleeps_instead_of_spinning():
    """MESHTRON_SHM_WAIT=futex: while a peer is late, the waiting rank sleeps in the kernel (a futex on the peer's
    sequence word) and leaves its core to the peer it waits for; the results stay exact."""
    from meshtron.comm import shm
    if not shm.enabled() or shm._SYS_FUTEX is None:
        pytest.skip("no shared-memory futex wait on this platform")
    (wall, cpu, value), _ = run_ranks(_wait_for_a_late_peer, 2)
    assert value == 2 ** 6
    assert wall >= 0.25 and cpu < 0.3 * wall, (wall, cpu)
