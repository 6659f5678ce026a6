"""Model FLOPs utilisation: the model's training FLOPs per token, the hardware's peak FLOP/s, and their ratio.

Invariant: MFU = tokens/s x model FLOPs per token / peak FLOP/s of *all* the hardware the run occupies (every GPU,
or every core of every CPU machine). Model FLOPs count the logical model's GEMMs only (no recompute, no vocabulary
padding), as in PaLM (Chowdhery et al. 2022, appendix B). A GPU's peak is its datasheet's dense tensor-core peak
for the run's GEMM dtype (`GPU_PEAK_TFLOPS`, keyed by `torch.cuda.get_device_name`); a CPU's (or an unknown GPU's)
is measured once by a short GEMM and cached in `~/.cache/meshtron/peak_flops.json`; a user's `--peak-tflops`
replaces either.
"""
from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time

import torch

from meshtron.models import ModelConfig


# --- model FLOPs ---------------------------------------------------------------------------------------------

def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a GEMM for every token: the layers' projections and the output head.

    Left out, because they do no multiply-add per token: embedding lookups (token and learned positions), biases
    and norm gains. With tied embeddings the table is counted once, as the head it also is.
    """
    d, f, L = config.d_model, config.ffn_dim, config.n_layer
    kv = config.kv_heads * config.head_dim
    attn = d * d + 2 * d * kv + d * d                  # q, k, v, out projections
    mlp = (2 if config.family == "gpt" else 3) * d * f  # GELU MLP: up, down; SwiGLU: gate, up, down
    return L * (attn + mlp) + config.vocab_size * d     # + output head


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, no recompute): 6·N + 12·L·d·s.

    N = `matmul_params(config)`; 12·L·d·s is QKᵀ and attention·V (2·2·s·d multiply-adds forward per token and
    layer, x3), counted over the full s x s score matrix as PaLM and nanoGPT do. Per token this equals the
    planner's `training_flops(cfg, 1, s, recompute=False) / s`. `ModelConfig.flops_per_token` is the nanoGPT
    variant (6 x all parameters but learned positions): it also counts biases and norm gains (under 1% for GPT)
    and, for untied Llama, the input embedding table, which is a lookup, not a GEMM.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    return 6.0 * matmul_params(config) + 12.0 * config.n_layer * config.d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1] (more only if the peak is understated)."""
    if peak_flops_total <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_total}")
    return tokens_per_s * flops_per_token / peak_flops_total


# --- peak FLOP/s ---------------------------------------------------------------------------------------------

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: (bf16, tf32, fp32). The first pattern that
# matches the device name wins, so the more specific names come first. None: the GPU has no such tensor cores.
GPU_PEAK_TFLOPS: list[tuple[str, tuple[float | None, float | None, float]]] = [
    (r"\bB200\b", (2250.0, 1100.0, 75.0)),
    (r"\bH200\b", (989.4, 494.7, 66.9)),
    (r"\bH100\b.*\bPCIe\b", (756.0, 378.0, 51.2)),
    (r"\bH100\b.*\bNVL\b", (835.0, 417.0, 60.0)),
    (r"\bH100\b", (989.4, 494.7, 66.9)),                # SXM
    (r"\bH800\b", (989.4, 494.7, 66.9)),
    (r"\bA100\b", (312.0, 156.0, 19.5)),
    (r"\bA800\b", (312.0, 156.0, 19.5)),
    (r"\bL40S\b", (362.1, 183.0, 91.6)),
    (r"\bL40\b", (181.0, 90.5, 90.5)),
    (r"\bL4\b", (121.0, 60.0, 30.3)),
    (r"\bA10\b", (125.0, 62.5, 31.2)),
    (r"\bV100\b", (None, None, 15.7)),
    (r"\bT4\b", (None, None, 8.1)),
]


def gpu_peak_flops(name: str, dtype: torch.dtype = torch.bfloat16, tf32: bool | None = None) -> float | None:
    """Datasheet peak FLOP/s of the GPU called `name` for GEMMs in `dtype` (float32 counts as TF32 when torch
    allows TF32 matmuls), or None when the GPU (or that dtype on it) is not in the table."""
    for pattern, (bf16, tf32_peak, fp32) in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            if dtype in (torch.bfloat16, torch.float16):
                peak = bf16
            else:
                use_tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
                peak = tf32_peak if use_tf32 and tf32_peak else fp32
            return None if peak is None else peak * 1e12
    return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                              # macOS, Windows
        return os.cpu_count() or 1


def default_cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meshtron", "peak_flops.json")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _cache_key(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    # The host name guards a home directory shared by several machines (NFS).
    return f"{platform.node()}|{device.type}:{_device_name(device)}|{str(dtype).replace('torch.', '')}|threads={threads}"


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):                       # missing or corrupt: measure again
        return {}


def _write_cache(path: str, key: str, value: float) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one; a failure is not an error."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = _read_cache(path)
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".peak_flops.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _time_gemm(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Best FLOP/s of n x n x n matmuls over about `seconds` (at least three timed after one warm-up)."""
    n = 1024 if device.type == "cpu" else 4096
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    c = a @ b                                           # warm-up: thread pool, kernel selection
    sync(device)
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n ** 3 / best


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       threads: int | None = None, seconds: float = 0.5, cache: bool = True,
                       cache_path: str | None = None) -> float:
    """FLOP/s of one process's dense GEMM on `device` with `threads` CPU threads (None: all usable cores).

    Cached per (host, device, dtype, threads), so a machine pays the ~0.5 s once. Measure while the machine is
    otherwise idle (before starting the ranks): ranks spinning in a collective would steal cores.
    """
    device = torch.device(device)
    threads = threads or usable_cores()
    path = cache_path or default_cache_path()
    key = _cache_key(device, dtype, threads)
    if cache:
        hit = _read_cache(path).get(key)
        if isinstance(hit, (int, float)) and hit > 0:
            return float(hit)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        value = _time_gemm(device, dtype, seconds)
    finally:
        torch.set_num_threads(before)
    if cache:
        _write_cache(path, key, value)
    return value


def peak_flops_total(world_size: int = 1, local_world_size: int | None = None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, peak_tflops: float | None = None, **measure_kw) -> float:
    """Peak FLOP/s of all the hardware a run of `world_size` ranks occupies: the MFU denominator.

    The unit is one GPU on CUDA and one whole machine (all its cores) on CPU; `peak_tflops`, when given (the
    `--peak-tflops` option), is the peak of one unit and replaces the table or the measurement. `dtype` is the
    dtype the GEMMs run in (bfloat16 under --bf16). On CPU the ranks of a machine
    share its cores, so the honest denominator is the machine's peak measured with all cores, times the number of
    machines (`world_size // local_world_size`): a per-rank peak x ranks would count a core twice when ranks x
    threads exceed the cores (4 ranks on 2 cores), and hide idle cores when they fall short.
    """
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be positive, got {peak_tflops}")
    kind = torch.device(device).type
    local = local_world_size or world_size
    units = world_size if kind == "cuda" else max(1, world_size // local)
    if peak_tflops is not None:
        per_unit = peak_tflops * 1e12
    else:
        listed = gpu_peak_flops(torch.cuda.get_device_name(torch.device(device)), dtype) if kind == "cuda" else None
        per_unit = listed or measure_peak_flops(device, dtype, **measure_kw)
    return per_unit * units
