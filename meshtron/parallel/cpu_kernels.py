"""Fused CPU loops for dropout: drawing a keep-mask from the counter-based hash, and applying a mask.

Invariant: each loop computes bit for bit what the PyTorch composition in `random.py` computes (the same
SplitMix64 hash of the same logical index, the same int16 lanes and threshold, the same float32 products and
bfloat16 rounding), so a run gives the same numbers with or without them, on any mesh and on a GPU (which takes
the PyTorch path). They exist because that composition makes 13 passes over int64 temporaries per mask and 3
passes per application; a C loop makes one, vectorised by the compiler for the machine it runs on.

The C source below is compiled on first use with the system's C compiler (`cc`, or `$CC`) into a per-user cache
(`$MESHTRON_CACHE_DIR`, else `~/.cache/meshtron`, as the planner's calibration; the file name is keyed by the
source, the flags, the compiler and the CPU's feature flags, so a home directory shared by different machines
never loads a library built for another CPU), written atomically, and loaded with ctypes (the calls release the
GIL). Without a compiler, or with `MESHTRON_CPU_KERNELS=0`, `available()` is False and callers use PyTorch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* One row of n mask bytes whose first group of four has logical group index `base`. */
static void fill_row(uint8_t *out, int64_t n, uint64_t base, uint64_t key, int32_t thr) {
    int64_t groups = n / 4;
    uint64_t z0 = key + base * GOLDEN;
    for (int64_t g = 0; g < groups; g++) {
        uint64_t z = mix(z0 + (uint64_t)g * GOLDEN);
        uint32_t b = (uint32_t)((int16_t)z >= thr) | ((uint32_t)((int16_t)(z >> 16) >= thr) << 8)
                   | ((uint32_t)((int16_t)(z >> 32) >= thr) << 16) | ((uint32_t)((int16_t)(z >> 48) >= thr) << 24);
        memcpy(out + 4 * g, &b, 4);
    }
    if (n % 4) {
        uint64_t z = mix(z0 + (uint64_t)groups * GOLDEN);
        for (int64_t l = 0; l < n % 4; l++) out[4 * groups + l] = (int16_t)(z >> (16 * l)) >= thr;
    }
}

/* The keep-mask of a block: `lead` leading dims of sizes shape[], at offsets[] in a tensor whose leading dims
   are full[], and a whole last dim of n elements (counted in groups of four in the logical index). */
void mt_keep_mask(uint8_t *out, int64_t lead, const int64_t *shape, const int64_t *offsets, const int64_t *full,
                  int64_t n, uint64_t key, int32_t threshold) {
    int64_t rows = 1, idx[16] = {0};
    uint64_t gfull = (uint64_t)((n + 3) / 4);
    for (int64_t d = 0; d < lead; d++) rows *= shape[d];
    for (int64_t r = 0; r < rows; r++) {
        uint64_t row = 0;
        for (int64_t d = 0; d < lead; d++) row = row * (uint64_t)full[d] + (uint64_t)(offsets[d] + idx[d]);
        fill_row(out + r * n, n, row * gfull, key, threshold);
        for (int64_t d = lead - 1; d >= 0; d--) {
            if (++idx[d] < shape[d]) break;
            idx[d] = 0;
        }
    }
}

/* y = x * (keep ? scale : 0), float32 (y may be x). */
void mt_apply_f32(const float *x, const uint8_t *m, float *y, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * (m[i] ? scale : 0.0f);
}

static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf(float f) {   /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* bfloat16: (x * keep) is exact; its product with scale is rounded once, as PyTorch's mul by a scalar. */
void mt_apply_bf16(const uint16_t *x, const uint8_t *m, uint16_t *y, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) y[i] = f2bf(bf2f(x[i]) * (m[i] ? scale : 0.0f));
}

/* y = r + x * (keep ? scale : 0): the residual add after dropout, each operation rounded as PyTorch's. */
void mt_apply_add_f32(const float *r, const float *x, const uint8_t *m, float *y, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) y[i] = r[i] + x[i] * (m[i] ? scale : 0.0f);
}

void mt_apply_add_bf16(const uint16_t *r, const uint16_t *x, const uint8_t *m, uint16_t *y, int64_t n,
                       float scale) {
    for (int64_t i = 0; i < n; i++) y[i] = f2bf(bf2f(r[i]) + bf2f(f2bf(bf2f(x[i]) * (m[i] ? scale : 0.0f))));
}
"""

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-std=c99"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")   # where AVX-512 exists: the mask's hash 1.5x faster than 256-bit

MAX_LEAD = 16

_lib = None
_tried = False
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dir() -> str:
    base = os.environ.get("MESHTRON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "meshtron")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def _build() -> ctypes.CDLL | None:
    cc = shlex.split(os.environ["CC"]) if os.environ.get("CC") else [shutil.which("cc") or shutil.which("gcc")]
    if not cc[0]:
        return None
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    tag = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"dropout_{tag}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            src, out = os.path.join(tmp, "dropout.c"), os.path.join(tmp, "dropout.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            for flags in (FLAGS, ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c99"]):  # no -march=native
                done = subprocess.run([*cc, *flags, "-o", out, src], capture_output=True, text=True, timeout=120)
                if done.returncode == 0:
                    break
            else:
                return None
            os.replace(out, path)                        # atomic: a concurrent rank loads a whole file or builds
    lib = ctypes.CDLL(path)
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.mt_keep_mask.argtypes = [p, i64, p, p, p, i64, ctypes.c_uint64, ctypes.c_int32]
    for name in ("mt_apply_f32", "mt_apply_bf16"):
        getattr(lib, name).argtypes = [p, p, p, i64, ctypes.c_float]
    for name in ("mt_apply_add_f32", "mt_apply_add_bf16"):
        getattr(lib, name).argtypes = [p, p, p, p, i64, ctypes.c_float]
    for name in ("mt_keep_mask", "mt_apply_f32", "mt_apply_bf16", "mt_apply_add_f32", "mt_apply_add_bf16"):
        getattr(lib, name).restype = None
    return lib


def _load():
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                if os.environ.get("MESHTRON_CPU_KERNELS", "1") != "0":
                    try:
                        _lib = _build()
                    except (OSError, subprocess.SubprocessError):
                        _lib = None
                _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled loops are loaded (they are built on the first call)."""
    return _load() is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def fill_keep_mask(out: torch.Tensor, key: int, offsets, full, threshold: int) -> bool:
    """Fill the bool tensor `out` (contiguous, on CPU, whole last dim) as `random._fill_keep_mask` does; False
    (nothing written) when the loops are unavailable or the block does not fit them."""
    lib = _load()
    lead = out.dim() - 1
    if lib is None or out.device.type != "cpu" or not out.is_contiguous() or not 0 <= lead <= MAX_LEAD:
        return False
    n = out.shape[-1] if out.dim() else 1
    arr = ctypes.c_int64 * max(1, lead)
    lib.mt_keep_mask(_ptr(out), lead, arr(*out.shape[:lead]), arr(*offsets[:lead]), arr(*full[:lead]), n,
                     key & ((1 << 64) - 1), threshold)
    return True


def _fits(x: torch.Tensor, mask: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and mask.shape == x.shape
            and x.is_contiguous() and mask.is_contiguous() and mask.element_size() == 1
            and not (x.requires_grad and torch.is_grad_enabled()))


def apply_mask(x: torch.Tensor, mask: torch.Tensor, scale: float, out: torch.Tensor | None = None):
    """x * mask * scale into `out` (a new tensor by default; `out` may be x), or None where the loops do not
    apply (not CPU, not contiguous float32 / bfloat16, shapes differ)."""
    lib = _load()
    if lib is None or not _fits(x, mask):
        return None
    y = torch.empty_like(x) if out is None else out
    fn = lib.mt_apply_f32 if x.dtype == torch.float32 else lib.mt_apply_bf16
    fn(_ptr(x), _ptr(mask), _ptr(y), x.numel(), scale)
    return y


def apply_mask_add(residual: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, scale: float):
    """residual + x * mask * scale as a new tensor, or None where the loops do not apply (as `apply_mask`, and
    residual of x's shape, dtype and layout)."""
    lib = _load()
    if (lib is None or not _fits(x, mask) or residual.dtype != x.dtype or residual.shape != x.shape
            or not residual.is_contiguous() or residual.requires_grad and torch.is_grad_enabled()):
        return None
    y = torch.empty_like(x)
    fn = lib.mt_apply_add_f32 if x.dtype == torch.float32 else lib.mt_apply_add_bf16
    fn(_ptr(residual), _ptr(x), _ptr(mask), _ptr(y), x.numel(), scale)
    return y
