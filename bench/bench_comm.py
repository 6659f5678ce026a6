"""All-reduce time of meshtron's shared-memory transport against gloo, between the ranks of this host.

    .venv/bin/python bench/bench_comm.py                 # 2 ranks, 1 thread each (about 30 s)
    .venv/bin/python bench/bench_comm.py --ranks 4       # 4 ranks (more ranks than cores: waiting ranks yield)

Both transports run in the same process group, on the same tensors, in alternating blocks; the table shows the
median time per all-reduce (SUM, float32, in place) and the ratio shm / gloo (lower is better). Each block
starts and ends with a barrier, so the slowest rank sets the time. Sizes: 1 KiB (a cross-entropy's per-token
values), 64 KiB, 1 MiB (a small GPT's activations, b*s*h*4 bytes) and 16 MiB (several slots: chunked).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = [2 ** 10, 2 ** 16, 2 ** 20, 2 ** 24]


def worker(repeats: int, calls: int) -> dict:
    import torch
    import torch.distributed as dist
    import meshtron
    from meshtron.comm import collectives as C
    ranks = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    mesh = meshtron.Mesh.from_spec(f"model:{ranks}")
    group = mesh.axis("model").group
    transport = C.shm_transport(group)
    out = {"shm": transport is not None}
    for nbytes in SIZES:
        x = torch.randn(nbytes // 4)
        times = {"shm": [], "gloo": []}
        for r in range(repeats):
            for name in (("shm", "gloo") if r % 2 == 0 else ("gloo", "shm")):
                C.register_shm(group, transport if name == "shm" else None)
                C.all_reduce(x, group)                    # warm
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(calls):
                    C.all_reduce(x, group)
                dist.barrier()
                times[name].append((time.perf_counter() - t0) / calls)
                x.div_(ranks ** (calls + 1))              # keep the values finite
        C.register_shm(group, transport)
        out[nbytes] = {k: statistics.median(v) for k, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "comm.md"))
    args = ap.parse_args()
    from common import wait_for_idle, write_report
    from meshtron.launch import run_ranks
    wait_for_idle(args.wait_idle)
    cores = os.cpu_count() or 1
    res = run_ranks(worker, args.ranks, args.repeats, args.calls, threads_per_rank=max(1, cores // args.ranks),
                    timeout_s=600)[0]
    if not res["shm"]:
        sys.exit("the shared-memory transport is not available here (MESHTRON_SHM=0, or not x86-64)")
    lines = [f"All-reduce between {args.ranks} ranks on this host ({cores} cores), float32 SUM in place, median of "
             f"{args.repeats} alternating blocks of {args.calls} calls:", "",
             "| size | gloo ms | shared memory ms | ratio shm / gloo |", "|---|---|---|---|"]
    for nbytes in SIZES:
        g, s = res[nbytes]["gloo"], res[nbytes]["shm"]
        label = f"{nbytes // 2 ** 20} MiB" if nbytes >= 2 ** 20 else f"{nbytes // 2 ** 10} KiB"
        lines.append(f"| {label} | {g * 1e3:.3f} | {s * 1e3:.3f} | {s / g:.2f} |")
    write_report(args.out, "Shared-memory all-reduce vs gloo",
                 f".venv/bin/python bench/bench_comm.py --ranks {args.ranks}", "\n".join(lines))

if __name__ == "__main__":
    main()
