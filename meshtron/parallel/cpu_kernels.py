"""Fused CPU loops for dropout: drawing a keep-mask from the counter-based hash, applying a mask, and causal
attention with dropout on its probabilities.

Invariant: each mask loop computes bit for bit what the PyTorch composition in `random.py` computes (the same
SplitMix64 hash of the same logical index, the same int16 lanes and threshold, the same float32 products and
bfloat16 rounding), so a run gives the same masks with or without them, on any mesh and on a GPU (which takes
the PyTorch path). They exist because that composition makes 13 passes over int64 temporaries per mask and 3
passes per application; a C loop makes one, vectorised by the compiler for the machine it runs on.
The attention loop (float32) agrees with `parallel/attention.py`'s PyTorch path to float32 rounding, not bit
for bit (its own blocking and exp): per (batch row, head) and block of 32 query rows it multiplies only the keys
up to the block's last row (causal), and does the softmax, mask and its backward while the block is in cache,
its GEMMs through the `sgemm_` PyTorch's CPU library exports (MKL in the x86 wheels; without that symbol the
loop is off). Each (batch row, head) is computed the same way whatever the mesh, so every layout still equals
one process. Measured, forward + backward at (8, 2, 128, 64), one thread: 2.3 ms, against 3.4 ms for the
PyTorch path and 2.8 ms for `scaled_dot_product_attention` without dropout.

The C source below is compiled on first use with the system's C compiler (`cc`, or `$CC`) into a per-user cache
(`$MESHTRON_CACHE_DIR`, else `~/.cache/meshtron`, as the planner's calibration; the file name is keyed by the
source, the flags, the compiler and the CPU's feature flags, so a home directory shared by different machines
never loads a library built for another CPU), written atomically, and loaded with ctypes (the calls release the
GIL). Without a compiler, or with `MESHTRON_CPU_KERNELS=0`, `available()` is False and callers use PyTorch.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
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
#include <stdlib.h>
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

/* ---- causal attention with dropout on its probabilities, float32, GEMMs through the BLAS PyTorch links ---- */

typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *,
                        const int *);
static sgemm_t sgemm_ptr;

void mt_set_sgemm(void *p) { sgemm_ptr = (sgemm_t)p; }

/* Row-major C (m x n, ldc) = alpha * op(A) op(B) + beta * C through the column-major BLAS. ta: A is given
   transposed, i.e. A is stored (k x m) row-major; else (m x k). tb likewise for B: (n x k) if tb, else (k x n). */
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                 int ldb, float beta, float *c, int ldc) {
    /* row-major C = A B  <=>  col-major C^T = B^T A^T */
    char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    sgemm_ptr(&tA, &tB, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

/* exp for x <= 0 (softmax after the max is subtracted): 2^n * p(r), r in [-ln2/2, ln2/2], degree-6 polynomial
   (relative error under 2e-7); vectorisable, no libm call. */
static inline float exp_neg(float x) {
    float in = x;
    x = x >= -87.0f ? x : -87.0f;                 /* also NaN -> -87: the integer part stays defined */
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t i; float f; } s = {(uint32_t)((int32_t)n + 127) << 23};
    return in == in ? p * s.f : in;               /* NaN in, NaN out */
}


/* Reductions in 16 lanes (vectorised; the lanes are summed at the end). */
static inline float row_max(const float *x, int n) {
    float acc[16];
    int j = 0;
    for (int l = 0; l < 16; l++) acc[l] = x[0];
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
    float m = acc[0];
    for (int l = 1; l < 16; l++) m = acc[l] > m ? acc[l] : m;
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

static inline float row_dot(const float *x, const float *y, int n) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[j + l] * y[j + l];
    float s = 0.0f;
    for (; j < n; j++) s += x[j] * y[j];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

static inline float row_sum(const float *x, int n) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[j + l];
    float s = 0.0f;
    for (; j < n; j++) s += x[j];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

#define ROWS 32   /* query rows per block: (8, 2, 128, 64) 1.95 / 1.90 / 1.95 ms at 16 / 32 / 64 */

/* Causal attention with dropout on its probabilities for B*h (batch row, query head) pairs.
   q, y: element strides (qb, qh, qt) with unit last stride; k, v: (kb, kh, kt) over kv heads, query head i
   reading kv head i / g; probs and keep (B, h, T, T) with strides (ps[0], ps[1], T, 1). Row blocks of ROWS queries
   multiply only the keys up to the block's last row (causal). probs gets the softmax, zero above the diagonal. */
int mt_attention_fwd(const float *q, const float *k, const float *v, const uint8_t *keep, float *probs, float *y,
                      int64_t B, int64_t h, int64_t g, int64_t T, int64_t d, const int64_t *qs, const int64_t *ks,
                      const int64_t *vs, const int64_t *ys, const int64_t *ps, float keep_scale,
                      float score_scale) {
    float *drop = malloc(sizeof(float) * ROWS * T);
    if (!drop) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < h; i++) {
            const float *qp = q + b * qs[0] + i * qs[1], *kp = k + b * ks[0] + (i / g) * ks[1];
            const float *vp = v + b * vs[0] + (i / g) * vs[1];
            float *yp = y + b * ys[0] + i * ys[1], *pp = probs + b * ps[0] + i * ps[1];
            const uint8_t *mp = keep + b * ps[0] + i * ps[1];
            for (int64_t r0 = 0; r0 < T; r0 += ROWS) {
                int R = (int)(T - r0 < ROWS ? T - r0 : ROWS), nk = (int)(r0 + R);
                gemm(0, 1, R, nk, (int)d, score_scale, qp + r0 * qs[2], (int)qs[2], kp, (int)ks[2], 0.0f,
                     pp + r0 * T, (int)T);
                for (int r = 0; r < R; r++) {
                    float *row = pp + (r0 + r) * T, *dr = drop + (int64_t)r * nk;
                    const uint8_t *mr = mp + (r0 + r) * T;
                    int n = (int)r0 + r + 1;
                    float mx = row_max(row, n);
                    for (int j = 0; j < n; j++) row[j] = exp_neg(row[j] - mx);
                    float inv = 1.0f / row_sum(row, n);
                    for (int j = 0; j < n; j++) { row[j] *= inv; dr[j] = mr[j] ? row[j] : 0.0f; }
                    for (int j = n; j < T; j++) row[j] = 0.0f;
                    for (int j = n; j < nk; j++) dr[j] = 0.0f;
                }
                gemm(0, 0, R, (int)d, nk, keep_scale, drop, nk, vp, (int)vs[2], 0.0f, yp + r0 * ys[2], (int)ys[2]);
            }
        }
    free(drop);
    return 0;
}

/* The backward of mt_attention_fwd: gq (strides gqs, per query head), gk and gv (strides gks over kv heads:
   written by the first query head of each group, the last row block first, which reaches every key; added
   by the rest). gy: the output's gradient (strides gys). */
int mt_attention_bwd(const float *q, const float *k, const float *v, const uint8_t *keep, const float *probs,
                      const float *gy, float *gq, float *gk, float *gv, int64_t B, int64_t h, int64_t g, int64_t T,
                      int64_t d, const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *gys,
                      const int64_t *gqs, const int64_t *gks, const int64_t *ps, float keep_scale,
                      float score_scale) {
    float *dp = malloc(sizeof(float) * ROWS * T), *drop = malloc(sizeof(float) * ROWS * T);
    if (!dp || !drop) { free(dp); free(drop); return -1; }
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < h; i++) {
            const float *qp = q + b * qs[0] + i * qs[1], *kp = k + b * ks[0] + (i / g) * ks[1];
            const float *vp = v + b * vs[0] + (i / g) * vs[1], *gyp = gy + b * gys[0] + i * gys[1];
            float *gqp = gq + b * gqs[0] + i * gqs[1];
            float *gkp = gk + b * gks[0] + (i / g) * gks[1], *gvp = gv + b * gks[0] + (i / g) * gks[1];
            const float *pp = probs + b * ps[0] + i * ps[1];
            const uint8_t *mp = keep + b * ps[0] + i * ps[1];
            int64_t last = (T - 1) / ROWS * ROWS;
            for (int64_t r0 = last; r0 >= 0; r0 -= ROWS) {
                int R = (int)(T - r0 < ROWS ? T - r0 : ROWS), nk = (int)(r0 + R);
                float beta = (i % g == 0 && r0 == last) ? 0.0f : 1.0f;
                /* dp = keep_scale * gy . v^T (the gradient of the dropped probabilities) */
                gemm(0, 1, R, nk, (int)d, keep_scale, gyp + r0 * gys[2], (int)gys[2], vp, (int)vs[2], 0.0f, dp, nk);
                for (int r = 0; r < R; r++) {
                    const float *pr = pp + (r0 + r) * T;
                    const uint8_t *mr = mp + (r0 + r) * T;
                    float *dr = dp + (int64_t)r * nk, *xr = drop + (int64_t)r * nk;
                    int n = (int)r0 + r + 1;
                    for (int j = 0; j < n; j++) dr[j] = mr[j] ? dr[j] : 0.0f;
                    float dot = row_dot(dr, pr, n);
                    for (int j = 0; j < n; j++) { xr[j] = mr[j] ? pr[j] : 0.0f; dr[j] = pr[j] * (dr[j] - dot); }
                    for (int j = n; j < nk; j++) { xr[j] = 0.0f; dr[j] = 0.0f; }
                }
                /* dp now holds the scores' gradient, drop the dropped probabilities */
                gemm(0, 0, R, (int)d, nk, score_scale, dp, nk, kp, (int)ks[2], 0.0f, gqp + r0 * gqs[2], (int)gqs[2]);
                gemm(1, 0, nk, (int)d, R, score_scale, dp, nk, qp + r0 * qs[2], (int)qs[2], beta, gkp, (int)gks[2]);
                gemm(1, 0, nk, (int)d, R, keep_scale, drop, nk, gyp + r0 * gys[2], (int)gys[2], beta, gvp,
                     (int)gks[2]);
            }
        }
    free(dp);
    free(drop);
    return 0;
}
"""

# -fno-trapping-math lets the compiler if-convert (vectorise) the clamp in exp_neg; it changes no result
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-std=c99"]
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
            for flags in (FLAGS, [f for f in FLAGS if not f.startswith(("-march", "-mprefer"))]):
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
    lib.mt_set_sgemm.argtypes = [p]
    lib.mt_attention_fwd.argtypes = [p] * 6 + [i64] * 5 + [p] * 5 + [ctypes.c_float] * 2
    lib.mt_attention_bwd.argtypes = [p] * 9 + [i64] * 5 + [p] * 7 + [ctypes.c_float] * 2
    for name in ("mt_keep_mask", "mt_apply_f32", "mt_apply_bf16", "mt_apply_add_f32", "mt_apply_add_bf16",
                 "mt_set_sgemm"):
        getattr(lib, name).restype = None
    lib.mt_attention_fwd.restype = lib.mt_attention_bwd.restype = ctypes.c_int
    lib.has_sgemm = False
    sgemm = _torch_sgemm()
    if sgemm:
        lib.mt_set_sgemm(sgemm)
        lib.has_sgemm = True
    return lib


def _torch_cpu_library():
    """PyTorch's CPU library (already loaded by `import torch`), or None."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _torch_sgemm() -> int | None:
    """The address of the Fortran BLAS `sgemm_` that PyTorch's CPU library exports (MKL in the x86 wheels), or
    None: the attention loop then stays off. Using PyTorch's own BLAS keeps its threading settings and adds no
    dependency."""
    lib = _torch_cpu_library()
    try:
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value if lib is not None else None
    except AttributeError:
        return None


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


def _strides3(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention_forward` takes these (B, h, T, d) q and (B, kv, T, d) k, v: the loops and a BLAS are
    loaded, float32 on CPU, unit stride along d and rows at least d apart (what a BLAS matrix needs)."""
    lib = _load()
    if lib is None or not lib.has_sgemm:
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.stride(3) == 1
               and t.stride(2) >= t.shape[3] for t in (q, k, v)):
        return False
    (B, h, T, d), kv = q.shape, k.shape[1]      # the loop trusts these: anything else takes PyTorch's checks
    return k.shape == v.shape and (k.shape[0], k.shape[2], k.shape[3]) == (B, T, d) and kv > 0 and h % kv == 0


THREAD_SCORES = 1 << 19   # scores per thread's block, at least: (8, 8, 256, 64) on 2 threads 31 -> 21 ms


def _parts(B: int, h: int, g: int, T: int) -> list:
    """(batch rows, query heads) blocks, one per thread of torch.get_num_threads() where there is work for them
    (THREAD_SCORES a block at least; below, the hand-off costs more than it saves): along the batch, or along whole
    kv-head groups where the batch is too short (blocks then share no kv head: no kv gradient is written twice)."""
    n = min(torch.get_num_threads(), B * h * T * T // THREAD_SCORES)
    if n <= 1 or _mkl_thread_setter() is None:         # a BLAS without a per-thread setting: one thread
        return [(slice(None), slice(None))]
    if B >= n or h // g < 2:
        step = -(-B // min(n, B))
        return [(slice(b, b + step), slice(None)) for b in range(0, B, step)]
    groups = h // g
    step = -(-groups // min(n, groups)) * g
    return [(slice(None), slice(i, i + step)) for i in range(0, h, step)]


def _run(fn, parts) -> None:
    """Each part on a worker thread (the C calls release the GIL), or inline for one part; the GEMMs of each run
    on the calling thread alone (MKL's per-thread setting: its own threads only slow GEMMs this small, (8, 4,
    128, 64) forward + backward on 2 threads 4.5 ms against 3.8 on one, and workers would each start a team)."""
    global _pool
    if len(parts) == 1:
        previous = _blas_threads(1)
        try:
            fn(*parts[0])
        finally:
            _blas_threads(previous)
        return
    pool, pid = _pool
    if pool is None or pool._max_workers < len(parts) or pid != os.getpid():   # a forked child has no workers
        if pool is not None and pid == os.getpid():
            pool.shutdown(wait=False)
        pool = concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="meshtron-attention",
                                                     initializer=_blas_threads, initargs=(1,))
        _pool = (pool, os.getpid())
    for f in [pool.submit(fn, *p) for p in parts]:
        f.result()


_pool = (None, 0)


@functools.lru_cache(maxsize=None)
def _mkl_thread_setter():
    """MKL's per-thread thread count (`mkl_set_num_threads_local`, Fortran-style: the count by reference) from
    PyTorch's CPU library, or None with another BLAS."""
    try:
        fn = _torch_cpu_library().mkl_set_num_threads_local
    except AttributeError:
        return None
    fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    return fn


def _blas_threads(n: int) -> int:
    """Set this thread's MKL thread count (0: back to the global one); the previous setting, 0 without MKL."""
    fn = _mkl_thread_setter()
    return fn(ctypes.byref(ctypes.c_int(n))) if fn is not None else 0


def _kv(heads: slice, g: int) -> slice:
    return heads if heads.start is None else slice(heads.start // g, heads.stop // g)


def _check(rc: int) -> None:
    if rc:
        raise MemoryError("meshtron's CPU attention loop could not allocate its row-block buffers")


def _strides2(t: torch.Tensor):
    return (ctypes.c_int64 * 2)(*t.stride()[:2])


def attention_forward(q, k, v, keep, keep_scale: float, score_scale: float):
    """y (B, h, T, d), a view of (B, T, h, d) storage, and the probabilities (B, h, T, T): causal softmax of
    q·kᵀ·score_scale (zero above the diagonal), y = (probs ⊙ keep)·v·keep_scale; keep is contiguous uint8. Call
    only where `attention_fits`. With several threads, blocks of batch rows or kv groups run in parallel."""
    B, h, T, d = q.shape
    g = h // k.shape[1]
    if _load() is None or keep.shape != (B, h, T, T) or keep.dtype != torch.uint8 or not keep.is_contiguous():
        raise ValueError(f"attention_forward: keep must be a contiguous uint8 mask of shape {(B, h, T, T)}, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    probs = q.new_empty(B, h, T, T)
    y = q.new_empty(B, T, h, d).transpose(1, 2)

    def part(bs, hs):
        ks = _kv(hs, g)
        qp, kp, vp, yp, pp, mp = q[bs, hs], k[bs, ks], v[bs, ks], y[bs, hs], probs[bs, hs], keep[bs, hs]
        _check(_lib.mt_attention_fwd(_ptr(qp), _ptr(kp), _ptr(vp), _ptr(mp), _ptr(pp), _ptr(yp), qp.shape[0],
                                     qp.shape[1], g, T, d, _strides3(qp), _strides3(kp), _strides3(vp),
                                     _strides3(yp), _strides2(pp), keep_scale, score_scale))
    _run(part, _parts(B, h, g, T))
    return y, probs


def attention_backward(q, k, v, keep, probs, grad_y, keep_scale: float, score_scale: float):
    """The gradients of q, k, v (laid out (B, T, heads, d), as the projections' backward wants them) from the
    forward's probabilities and mask (both contiguous, as `attention_forward` gives and takes them)."""
    B, h, T, d = q.shape
    g = h // k.shape[1]
    if grad_y.stride(3) != 1 or grad_y.stride(2) < d:
        grad_y = grad_y.contiguous()
    grad_q = q.new_empty(B, T, h, d).transpose(1, 2)
    grad_k, grad_v = (q.new_empty(B, T, k.shape[1], d).transpose(1, 2) for _ in range(2))

    def part(bs, hs):
        ks = _kv(hs, g)
        qp, kp, vp, mp, pp, gyp = q[bs, hs], k[bs, ks], v[bs, ks], keep[bs, hs], probs[bs, hs], grad_y[bs, hs]
        gq, gk, gv = grad_q[bs, hs], grad_k[bs, ks], grad_v[bs, ks]
        _check(_lib.mt_attention_bwd(_ptr(qp), _ptr(kp), _ptr(vp), _ptr(mp), _ptr(pp), _ptr(gyp), _ptr(gq),
                                     _ptr(gk), _ptr(gv), qp.shape[0], qp.shape[1], g, T, d, _strides3(qp),
                                     _strides3(kp), _strides3(vp), _strides3(gyp), _strides3(gq), _strides3(gk),
                                     _strides2(pp), keep_scale, score_scale))
    _run(part, _parts(B, h, g, T))
    return grad_q, grad_k, grad_v
