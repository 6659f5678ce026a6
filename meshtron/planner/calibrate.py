"""The `cpu` hardware profile: this machine, from its cached measurement (GEMM, memory copy, gloo and
shared-memory all-reduce, runtime RSS).

Invariant: no measuring happens here (the planner stays pure arithmetic plus this cache): the numbers come from
`meshtron calibrate` (meshtron/cli/calibrate.py, a fresh interpreter, about 3 s), passed in as `measure` when the
cache has none, and are cached per machine (host, CPU count, torch and Python versions) under
$MESHTRON_CACHE_DIR or ~/.cache/meshtron; a profile is always built from the cached numbers, so it is
identical until the cache is removed or recalibrated.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform

from meshtron.planner.hardware import GIB, HardwareError, HardwareProfile

CPU_DEVICES_PER_NODE = 256   # a CPU run's ranks all live on this machine unless --gpus-per-node says otherwise
CALIBRATION_VERSION = 3      # bump when the measurement's numbers change meaning: older caches are measured again

# --- The cpu profile's own constants: what the calibration does not measure, fitted once to meshtron's runs on
# this kind of machine (bench/bench_planner.py: GPT and Llama shapes, meshes model:1 to batch:2,model:2, with
# per-step profiles of single ranks). The GPU profiles keep the cost model's defaults. -------------------------
CPU_GEMM_EFFICIENCY = 0.80     # of the calibrated single-thread 1024^3 GEMM rate, per thread: alone, a training
                               # step's GEMMs reach 0.9 of it and PyTorch's fused CPU attention 0.55; with every
                               # core busy, ranks share the caches and the memory bus
CPU_ELEMENTWISE_PASSES = 6.0   # eager-mode PyTorch on CPU runs each norm, activation, residual, rotary and loss op
                               # as its own pass over memory (GPU default 2.5, with fused kernels); profiled: 0.2-0.4
                               # s of a 2-2.4 s single-thread step outside GEMMs, attention and the optimizer
CPU_OPTIMIZER_PASSES = 1.5     # torch.optim.AdamW(fused=True) plus global-norm clipping move ~23 bytes per fp32
                               # parameter, 1.44x its 16 bytes of state (measured: 0.059 s for 53M parameters, 1
                               # thread; the foreach AdamW meshtron used before took 0.249 s, 6 passes)
CPU_DP_OVERLAP = 0.0           # gloo reduces on the CPU: with every core computing, DDP's all-reduce does not hide
                               # under the backward (the DP_OVERLAP of GPUs, whose NCCL kernels run alongside)
CPU_ALLOCATOR_OVERHEAD = 0.0   # glibc malloc keeps freed blocks below the top of its heaps resident (tensors under
                               # its dynamic mmap threshold, up to 32 MiB), so a rank's peak RSS sits above its live
                               # tensors. Not in proportion to them: fitted to bench/bench_planner.py's 17 cases
                               # (live peaks checked with mallinfo2, RSS with MALLOC_TRIM_THRESHOLD_=0 falling to
                               # the live peak plus the runtime) the excess is a fixed heap per rank ...
CPU_ALLOCATOR_RETAINED_GIB = 125 / 1024   # (fitted before TrainStep's heap policy, train/host_memory.py; with
                                          # it, bench_planner cases 0, 1, 10-13 stay within 3.9%)
CPU_ALLOCATOR_GRAD_CHURN = 0.9  # ... plus most of one more copy of the gradients when TrainStep frees them after
                                # every step (no DDP or distributed-optimizer buckets holding them): the next
                                # backward allocates them while activations hold the old blocks. Fitted: every
                                # case's peak RSS within 5.1%; a share of everything (0.15, before) left the
                                # recompute cases 15-20% under and the DDP cases over


def cache_dir() -> str:
    return os.environ.get("MESHTRON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "meshtron")


def machine_key() -> str:
    import torch
    parts = [platform.node(), platform.machine(), platform.processor(), str(os.cpu_count()), torch.__version__,
             platform.python_version(), f"v{CALIBRATION_VERSION}"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def cache_path() -> str:
    return os.path.join(cache_dir(), f"cpu-profile-{machine_key()}.json")


def save_calibration(numbers: dict) -> str:
    """Cache a measurement of this machine (atomically); returns the file."""
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(numbers, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def calibration(recalibrate: bool = False, measure=None) -> dict:
    """The cached measurement for this machine; with none (or `recalibrate`), `measure()`'s numbers, cached."""
    path = cache_path()
    if not recalibrate and os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass                                            # unreadable cache: measure again
    if measure is None:
        raise HardwareError("this machine has no cpu profile yet: run `meshtron calibrate` (about 3 s) first")
    numbers = measure()
    save_calibration(numbers)
    return numbers


def calibration_warning(profile: HardwareProfile) -> str | None:
    """A warning when the cpu profile was measured on a busy machine (its rates are then pessimistic)."""
    load, cores = profile.measured.get("load_average", 0.0), profile.cores_per_node or 1
    if load > cores:
        return (f"the cpu profile was measured while the load average was {load:.1f} on {cores} cores, so its "
                f"rates are pessimistic: rerun with --recalibrate when the machine is idle")
    return None


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _attention_loop() -> bool:
    """Whether this machine runs float32 dropout attention as the compiled loop (a C compiler and PyTorch's BLAS)."""
    import torch
    from meshtron.parallel import cpu_kernels
    return cpu_kernels.attention_fits(*(torch.zeros(1, 1, 1, 1),) * 3)


def cpu_profile(threads_per_rank: int = 1, *, recalibrate: bool = False, measure=None) -> HardwareProfile:
    """This machine as a 'device' per rank: each rank computes with `threads_per_rank` threads (ranks that share
    the cores slow down, see `cost_model.compute_rate`), all ranks share the RAM, links are gloo over loopback.
    `measure` (meshtron.cli.calibrate.measure) supplies the numbers when none are cached."""
    m = calibration(recalibrate, measure)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    latency_us = m["allreduce_latency_s"] * 1e6
    # a 2-rank ring all-reduce of N bytes takes N/bw + 2 steps of latency (cost_model.all_reduce_time)
    bw_gbs = m["allreduce_bytes"] / max(m["allreduce_s"] - 2 * m["allreduce_latency_s"], 1e-9) / 1e9
    tp_bw_gbs = tp_latency_us = None
    if "shm_allreduce_s" in m:      # the model axis's all-reduces go through shared memory, DDP's through gloo
        tp_latency_us = m["shm_allreduce_latency_s"] * 1e6
        tp_bw_gbs = m["allreduce_bytes"] / max(m["shm_allreduce_s"] - 2 * m["shm_allreduce_latency_s"], 1e-9) / 1e9
    return HardwareProfile(
        "cpu", {"fp32": m["gemm_flops_per_thread"] * threads_per_rank / 1e12},
        memory_gib=total_ram_bytes() / GIB,
        memory_bandwidth_gbs=m["memory_bandwidth_bytes_s"] * threads_per_rank / 1e9,
        intra_node_bandwidth_gbs=bw_gbs, inter_node_bandwidth_gbs=bw_gbs,
        devices_per_node=CPU_DEVICES_PER_NODE, intra_node_latency_us=latency_us, inter_node_latency_us=latency_us,
        collective_efficiency=1.0,                        # measured, not a datasheet figure
        gemm_efficiency=CPU_GEMM_EFFICIENCY, elementwise_passes=CPU_ELEMENTWISE_PASSES,
        optimizer_passes=CPU_OPTIMIZER_PASSES, dp_overlap=CPU_DP_OVERLAP,
        runtime_overhead_gib=m["rank_runtime_rss_bytes"] / GIB, allocator_overhead=CPU_ALLOCATOR_OVERHEAD,
        allocator_retained_gib=CPU_ALLOCATOR_RETAINED_GIB, allocator_grad_churn=CPU_ALLOCATOR_GRAD_CHURN,
        default_dtype="fp32", cores_per_node=cores,
        threads_per_rank=threads_per_rank, shared_memory=True, dropout_attention_loop=_attention_loop(),
        description=f"this machine ({cores} cores), measured: fp32 GEMM {m['gemm_flops_per_thread'] / 1e9:.0f} "
                    f"GFLOP/s per thread, copy {m['memory_bandwidth_bytes_s'] / 1e9:.1f} GB/s, gloo "
                    f"{bw_gbs:.2f} GB/s and {latency_us:.0f} us"
                    + (f" (model axis through shared memory: {tp_bw_gbs:.2f} GB/s and {tp_latency_us:.0f} us)"
                       if tp_bw_gbs else "") + ", rank runtime RSS "
                    f"{m['rank_runtime_rss_bytes'] / 2 ** 20:.0f} MiB",
        tp_intra_node_bandwidth_gbs=tp_bw_gbs, tp_intra_node_latency_us=tp_latency_us, measured=m)
