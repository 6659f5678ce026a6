"""The cpu profile's measurement (`meshtron calibrate`), run as a script in a fresh interpreter; prints one JSON
object. It lives beside the CLI, not in the planner: the planner only reads what this measured.

Invariant: imports only torch (meshtron only after the resident sizes are read, to time its shared-memory
all-reduce), so the resident size it reports is that of a rank's runtime;
starts its two gloo ranks by fork right after `import torch`, before any multithreaded math (as meshtron's
launcher forks its ranks from a server that imported torch); about 2-3 s.
"""
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from queue import Empty

import torch
import torch.distributed as dist


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn, min_s: float, min_reps: int = 3) -> float:
    """Best time of one call over at least `min_reps` calls and `min_s` seconds."""
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < min_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def timed_collective(fn, reps: int) -> float:
    """Best time of a collective over a fixed count of calls: every rank must make the same calls."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tiny_training_steps(steps: int = 2) -> None:
    """A few steps of a tiny transformer block (embedding, LayerNorm, fused attention, GELU MLP, tied head,
    cross-entropy, gradient all-reduce, foreach AdamW): they load the code and allocate the runtime buffers a
    training rank keeps, so the resident size afterwards is a rank's runtime, not its model."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    emb, qkv, out = torch.nn.Embedding(97, 64), torch.nn.Linear(64, 192), torch.nn.Linear(64, 64)
    norm, up, down = torch.nn.LayerNorm(64), torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
    params = [p for m in (emb, qkv, out, norm, up, down) for p in m.parameters()]
    opt = torch.optim.AdamW(params, foreach=True)
    for _ in range(steps):
        idx = torch.randint(0, 97, (4, 33))
        h = emb(idx[:, :-1])
        q, k, v = qkv(norm(h)).view(4, 32, 3, 4, 16).permute(2, 0, 3, 1, 4)
        h = h + out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(4, 32, 64))
        h = h + down(F.gelu(up(norm(h)), approximate="tanh"))
        F.cross_entropy(F.linear(h, emb.weight).flatten(0, 1), idx[:, 1:].flatten()).backward()
        for p in params:
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)


def shm_allreduce(small, big) -> dict:
    """The same two all-reduces through meshtron's shared-memory transport (what its model axis uses on one
    host), or nothing when that transport is off here."""
    from meshtron.comm import shm
    if not shm.enabled():
        return {}
    transport = shm.setup(dist.group.WORLD, (0, 1), timeout_s=60)
    if transport is None:
        return {}
    latency = timed_collective(lambda: transport.all_reduce(small), 50) / 2
    return {"shm_allreduce_latency_s": latency, "shm_allreduce_s": timed_collective(lambda: transport.all_reduce(big), 8)}


def gloo_rank(rank: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    small, big = torch.zeros(1), torch.zeros(2 ** 22)             # 4 bytes, 16 MiB
    latency = timed_collective(lambda: dist.all_reduce(small), 50) / 2   # a 2-rank ring all-reduce: 2 steps
    big_s = timed_collective(lambda: dist.all_reduce(big), 8)
    rank_rss = rss_bytes()
    del big
    tiny_training_steps()
    out = {"allreduce_latency_s": latency, "allreduce_bytes": 2 ** 24, "allreduce_s": big_s,
           "rank_rss_bytes": rank_rss, "rank_runtime_rss_bytes": rss_bytes()}
    out.update(shm_allreduce(small, torch.zeros(2 ** 22)))   # after the RSS readings: this imports meshtron
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out = {"import_rss_bytes": rss_bytes(), "torch": torch.__version__, "load_average": os.getloadavg()[0]}
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ranks = [ctx.Process(target=gloo_rank, args=(r, init_file, queue)) for r in range(2)]
        for p in ranks:
            p.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                out.update(queue.get(timeout=0.2))
                break
            except Empty:
                if any(p.exitcode not in (None, 0) for p in ranks) or time.monotonic() > deadline:
                    for p in ranks:
                        p.kill()
                    sys.exit("the gloo all-reduce measurement failed (see the ranks' errors above)")
        for p in ranks:
            p.join(timeout=30)
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out["gemm_flops_per_thread"] = 2 * 1024 ** 3 / timed(lambda: a @ b, 0.3)
    src, dst = torch.ones(2 ** 24), torch.empty(2 ** 24)           # 64 MiB each: beyond the caches
    out["memory_bandwidth_bytes_s"] = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), 0.2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
