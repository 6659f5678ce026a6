"""Hardware profiles: what the cost model needs to know about one device and the links between devices.

Invariant: a `HardwareProfile` is complete and in human units (TFLOP/s, GiB, GB/s, microseconds); the cost
model converts. Built-in profiles restate vendor datasheets; a file (JSON or TOML) may start from one of them
(`base = "a100-80gb"`) and override fields; `cpu` is measured on this machine (see `calibrate.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

GIB = 2 ** 30


class HardwareError(ValueError):
    """An unknown device name or a malformed profile file; the message says what to change."""


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_tflops: dict[str, float]        # dense peak per dtype ('bf16', 'fp16', 'tf32', 'fp32'), per device
    memory_gib: float                    # device memory (GiB, as nvidia-smi reports it)
    memory_bandwidth_gbs: float          # device memory (HBM) bandwidth, GB/s
    intra_node_bandwidth_gbs: float      # per device, one direction, to a device of the same node (NVLink)
    inter_node_bandwidth_gbs: float      # per device, one direction, to another node (its share of the NICs)
    devices_per_node: int = 8            # default for --gpus-per-node
    intra_node_latency_us: float = 10.0  # per step of a ring collective inside a node
    inter_node_latency_us: float = 20.0  # ... across nodes
    gemm_efficiency: float = 0.70        # fraction of peak a large training GEMM reaches (the profile states it)
    collective_efficiency: float = 0.8   # fraction of link bandwidth a ring collective reaches (NCCL bus bw)
    runtime_overhead_gib: float = 1.0    # per device, before any tensor: CUDA context + NCCL buffers, or a
                                         # CPU rank's Python + torch runtime (part of the measured peak RSS)
    allocator_overhead: float = 0.0      # memory the allocator holds beyond the live tensors, as a share of them
                                         # (CPU: freed blocks glibc malloc keeps resident; GPUs: see
                                         # cost_model.MEMORY_HEADROOM)
    allocator_retained_gib: float = 0.0  # per device, heap the allocator keeps resident beyond the live tensors
                                         # whatever the model (CPU: glibc's high-water mark of transient buffers)
    allocator_grad_churn: float = 0.0    # extra resident memory, as a share of the gradients, when gradients are
                                         # freed after every step and allocated anew in the next backward (CPU:
                                         # the new ones land beside the activations' freed blocks)
    elementwise_passes: float | None = None  # None: cost_model.ELEMENTWISE_PASSES (fused GPU kernels)
    optimizer_passes: float = 2.0        # times the optimizer step reads or writes each byte of the device's
                                         # parameter, gradient and optimizer state (fused Adam: read + write)
    dp_overlap: float | None = None      # None: cost_model.DP_OVERLAP (a GPU's copy engines and NCCL overlap)
    default_dtype: str = "bf16"
    cores_per_node: int | None = None    # CPU only: ranks on a node share these cores
    threads_per_rank: int = 1            # CPU only: compute threads of one rank
    shared_memory: bool = False          # CPU only: memory_gib is the node's RAM, shared by its ranks
    dropout_attention_loop: bool = False  # CPU only: attention with dropout runs as cpu_kernels' compiled loop,
                                         # its s² work done in cache: timed as the fused kernel (memory unchanged)
    description: str = ""
    measured: dict = field(default_factory=dict, compare=False)  # raw calibration numbers (cpu)
    # the model axis's collectives inside a node, when they take another transport than the batch axis's (CPU:
    # meshtron's shared-memory all-reduce, while DDP's gradient buckets use gloo); None: the intra-node link
    tp_intra_node_bandwidth_gbs: float | None = None
    tp_intra_node_latency_us: float | None = None

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise HardwareError(f"profile {self.name!r} has no peak FLOP/s for dtype {dtype!r}; "
                                f"choose --dtype from {sorted(self.peak_tflops)} or add it to the profile")
        return self.peak_tflops[dtype] * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def runtime_overhead_bytes(self) -> float:
        return self.runtime_overhead_gib * GIB


# Dense (non-sparse) datasheet figures. Inter-node bandwidth is each device's share of the node's NICs.
BUILTIN: dict[str, HardwareProfile] = {p.name: p for p in [
    HardwareProfile(
        "a100-80gb", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 80, 2039, 300, 25,
        description="NVIDIA A100 SXM 80GB, DGX A100: NVLink3/NVSwitch 600 GB/s bidirectional, "
                    "8x HDR 200 Gb/s InfiniBand per node"),
    HardwareProfile(
        "a100-40gb", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 40, 1555, 300, 25,
        description="NVIDIA A100 SXM 40GB, DGX A100: as a100-80gb with HBM2 at 1.6 TB/s"),
    HardwareProfile(
        "h100-80gb", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}, 80, 3350, 450, 50,
        description="NVIDIA H100 SXM 80GB, DGX H100: NVLink4 900 GB/s bidirectional, "
                    "8x NDR 400 Gb/s InfiniBand per node"),
    HardwareProfile(
        "v100-32gb", {"fp16": 125, "fp32": 15.7}, 32, 900, 150, 6.25, default_dtype="fp16",
        description="NVIDIA V100 SXM2 32GB, DGX-1: NVLink2 300 GB/s bidirectional (hybrid cube mesh), "
                    "4x EDR 100 Gb/s InfiniBand per node; no bf16"),
    HardwareProfile(
        "l4", {"bf16": 121, "fp16": 121, "fp32": 30.3}, 24, 300, 32, 1.5625,
        description="NVIDIA L4 24GB: PCIe Gen4 x16 (no NVLink), 100 Gb/s Ethernet shared by 8 GPUs"),
    HardwareProfile(
        "mi250x", {"bf16": 191.5, "fp16": 191.5, "fp32": 47.9}, 64, 1638, 50, 12.5,
        description="AMD MI250X, one GCD (half a package) per device; Frontier-style node of 8 GCDs, "
                    "Infinity Fabric 50 GB/s per direction between GCDs, 4x 200 Gb/s Slingshot per node"),
]}

_FIELDS = {f.name for f in dataclasses.fields(HardwareProfile)} - {"measured"}
_REQUIRED = {f.name for f in dataclasses.fields(HardwareProfile)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def profile_from_dict(data: dict, source: str = "profile") -> HardwareProfile:
    """A profile from a dict of fields, optionally `base = "<built-in name>"` to inherit the rest."""
    data = dict(data)
    base = data.pop("base", None)
    data.setdefault("name", os.path.splitext(os.path.basename(source))[0])
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise HardwareError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(_FIELDS)}")
    if base is not None:
        if base not in BUILTIN:
            raise HardwareError(f"{source}: base {base!r} is not a built-in profile; choose one of "
                                f"{', '.join(BUILTIN)}")
        merged = dataclasses.asdict(BUILTIN[base])
        merged.pop("measured")
        if "peak_tflops" in data:
            data["peak_tflops"] = {**merged["peak_tflops"], **data["peak_tflops"]}
        merged.update(data)
        data = merged
    missing = sorted(_REQUIRED - set(data))
    if missing:
        raise HardwareError(f"{source}: missing field(s) {missing}; give them or start from a built-in "
                            f"profile with base = \"a100-80gb\" (any of {', '.join(BUILTIN)})")
    try:
        return HardwareProfile(**data)
    except TypeError as e:
        raise HardwareError(f"{source}: {e}") from None


def load_profile_file(path: str) -> HardwareProfile:
    """Read a JSON (`.json`) or TOML (anything else) profile file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HardwareError(f"cannot read hardware profile {path!r}: {e.strerror}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise HardwareError(f"hardware profile {path!r} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: "
                            f"{e}") from None
    if not isinstance(data, dict):
        raise HardwareError(f"hardware profile {path!r} must hold a table/object of fields")
    return profile_from_dict(data, source=path)


def get_profile(name_or_path: str, *, recalibrate: bool = False, measure=None) -> HardwareProfile:
    """A built-in name, `cpu` (this machine's cached calibration; `measure` supplies one if none), or a path to a
    profile file."""
    if name_or_path == "cpu":
        from meshtron.planner.calibrate import cpu_profile
        return cpu_profile(recalibrate=recalibrate, measure=measure)
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if os.path.isfile(name_or_path):
        return load_profile_file(name_or_path)
    raise HardwareError(f"unknown GPU {name_or_path!r}: choose one of {', '.join([*BUILTIN, 'cpu'])}, "
                        f"or give the path of a profile file (JSON or TOML, e.g. base = \"a100-80gb\" plus the "
                        f"fields to change)")
