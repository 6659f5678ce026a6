"""The cost model: per-device memory and step time of one parallel layout, every term with its source.

Invariant: pure arithmetic on (model config, layout, hardware, batch, sequence, dtype), no I/O and no torch.
Each function is one term and its docstring cites where the formula comes from. The constants right below
are the only tuned numbers; one set serves every model and every profile (a device's own figures, including
the GEMM efficiency it reaches, live in its `HardwareProfile`; the measured `cpu` profile also states its own
elementwise and optimizer passes, gradient-reduction overlap and allocator overhead, see calibrate.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from meshtron.layout import pad_to_multiple
from meshtron.models.config import ModelConfig
from meshtron.planner.hardware import GIB, HardwareProfile

# --- Tuned constants: one set for every model and profile. ELEMENTWISE_PASSES was fitted, together with the
# profiles' gemm_efficiency (0.70) and collective_efficiency (0.8), to Narayanan et al. 2021, Table 1 (all ten
# rows within 3.1%); the other two are judgment calls, stated here so they can be argued with. --------------------
ELEMENTWISE_PASSES = 2.5   # non-GEMM kernels (norms, softmax, GELU, dropout, residuals) move this many times
                           # a layer's stored-activation bytes through device memory per forward pass
MEMORY_HEADROOM = 0.9      # share of device memory a layout may fill: the caching allocator's fragmentation and
                           # transient buffers (collective staging, workspaces) take the rest
DP_OVERLAP = 1.0           # share of the last micro-batch's backward that can hide the gradient reduction

RECOMPUTE = ("none", "selective", "full")

# --- Fixed facts --------------------------------------------------------------------------------------------
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}
MASK_BYTES = 1             # a dropout mask element (Korthikanti et al. 2022, section 4.1)
LOGIT_BYTES = 4            # logits are kept in fp32 for the cross-entropy (Korthikanti et al. 2022, 4.1.2)
GRAD_REDUCE_BYTES = 4      # gradients are reduced in fp32 (the fp32 grads of the bytes-per-parameter table)
ADAM_TEMP_BYTES = 0        # meshtron's TrainStep uses torch.optim.AdamW(fused=True) on CPU and CUDA: it updates
                           # in place (the foreach implementation allocated sqrt(v), 4 bytes per parameter)
ACCUMULATION_GRAD_BYTES = 4  # DDP with gradient_as_bucket_view: gradients are views of its fp32 buckets, except
                             # while micro-batches accumulate under no_sync, where they are tensors of their own
                             # (the distributed optimizer's gradients are always views of its buckets)
NORM_STORED = {"gpt": 1,   # tensors of s·b·h a norm keeps for its backward: torch's fused LayerNorm its input;
               "llama": 2} # meshtron's RMSNorm (PyTorch ops, fp32 as Llama) its input and the normalised x


@dataclass(frozen=True)
class ParallelLayout:
    """One way to run: sizes of the batch (dp), model (tp) and pipe (pp) axes, and the memory options."""
    dp: int
    tp: int = 1
    pp: int = 1
    micro_batch: int = 1
    recompute: str = "none"           # none | selective (core attention) | full (every layer's input only)
    sequence_parallel: bool = False   # Korthikanti et al.: norms/dropout split over the model axis
    sharded_optimizer: bool = False   # Megatron's distributed optimizer: fp32 state split over dp
    virtual_stages: int = 1           # interleaved 1F1B: layer chunks per pipeline rank (v)

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r} is unknown: use one of {', '.join(RECOMPUTE)}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def runnable(self) -> bool:
        """Whether meshtron's trainer runs this layout: every layout the search produces (pipelines included:
        1F1B, or interleaved 1F1B with v > 1)."""
        return True

    @property
    def mesh(self) -> str:
        """The `--mesh` string in Megatron's rank order (global rank = tp + t·dp + t·d·pp): pipe outermost,
        model fastest, so model-axis groups sit inside a node and data-parallel peers are as near as can be."""
        axes = [("pipe", self.pp), ("batch", self.dp), ("model", self.tp)]
        return ",".join(f"{n}:{s}" for n, s in axes if s > 1) or "batch:1"


@dataclass
class Prediction:
    """Per-device memory (bytes) and step time (seconds) of a layout, with the derived rates."""
    layout: ParallelLayout
    global_batch: int
    seq_len: int
    memory: dict[str, float]     # params, grads, optimizer, activations, runtime, total
    time: dict[str, float]       # compute, tp_comm, pp_comm, bubble, dp_comm, optimizer, step
    fits: bool
    tokens_per_s: float
    tflops_per_gpu: float        # executed FLOP/s (recompute counted, Narayanan's convention), in TFLOP/s
    mfu: float                   # model FLOP/s (no recompute) / peak
    hfu: float                   # executed FLOP/s / peak (Narayanan's "% of peak")

    @property
    def step_time_s(self) -> float:
        return self.time["step"]

    @property
    def memory_gb(self) -> float:
        return self.memory["total"] / GIB

    def as_dict(self) -> dict:
        lay = self.layout
        return {"mesh": lay.mesh, "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "micro_batch": lay.micro_batch,
                "recompute": lay.recompute, "sequence_parallel": lay.sequence_parallel,
                "sharded_optimizer": lay.sharded_optimizer, "virtual_stages": lay.virtual_stages,
                "runnable": lay.runnable, "memory_gb": round(self.memory_gb, 3),
                "fits": self.fits, "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "hfu": self.hfu,
                "memory_breakdown_gb": {k: v / GIB for k, v in self.memory.items()},
                "time_breakdown_s": dict(self.time)}


# --- Memory terms -----------------------------------------------------------------------------------------------

def state_bytes_per_param(dtype: str, sharded: bool, dp: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per parameter with Adam, as meshtron's trainer keeps them.

    Rajbhandari et al. 2020 (REFERENCE.md, "Data parallelism and optimizer memory"), float32 case: 4 + 4 + 8 = 16
    plain, 4 + 4 + 8/d with the optimizer state sharded over d data-parallel ranks (ZeRO-1). meshtron's bf16 and
    fp16 runs autocast the GEMMs and keep float32 parameters (the master weights) and gradients, so the same
    table holds for every dtype; Megatron-LM's 16-bit parameters with a float32 master copy would be
    2 + 4 + 12 (18) and 6 + 12/d."""
    return 4.0, 4.0, 8.0 / dp if sharded else 8.0


def layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(split over the model axis, replicated) parameters of one transformer layer.

    Shoeybi et al. 2019: QKV and fc1 are column-parallel (weight and bias split), the output projection and
    fc2 row-parallel (weight split, bias replicated); norms are replicated."""
    d, f, kv = cfg.d_model, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    if cfg.family == "gpt":
        split = (d * (d + 2 * kv) + (d + 2 * kv)) + d * d + (d * f + f) + f * d
        replicated = 2 * d + 2 * 2 * d          # two row-parallel biases, two LayerNorms (weight, bias)
    else:
        split = d * (d + 2 * kv) + d * d + 3 * d * f
        replicated = 2 * d                      # two RMSNorms
    return split, replicated


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: str) -> float:
    """Parameters held by one device of the `first` or `last` pipeline stage.

    Narayanan et al. 2021: layers split evenly over stages; the (vocab-parallel, padded to a multiple of t)
    embedding sits on the first stage, the output layer on the last (a tied head keeps a copy there when
    p > 1, as Megatron does)."""
    split, replicated = layer_params(cfg)
    total = cfg.n_layer // pp * (split / tp + replicated)
    vocab_rows = pad_to_multiple(cfg.vocab_size, tp) * cfg.d_model / tp
    final_norm = cfg.d_model * (2 if cfg.family == "gpt" else 1)
    if stage == "first" or pp == 1:
        total += vocab_rows + (cfg.max_seq_len * cfg.d_model if cfg.family == "gpt" else 0)
    if stage == "last" or pp == 1:
        total += final_norm + (vocab_rows if (pp > 1 or not cfg.tied) else 0)
    return total


def layer_activation_bytes(cfg: ModelConfig, s: int, b: int, tp: int, sp: bool, elem: int,
                           dropout: bool, fused_attention: bool) -> float:
    """Bytes one layer stores for its backward, per device, without recompute.

    Korthikanti et al. 2022, section 4: with 16-bit elements and dropout, s·b·h·(34 + 5·a·s/h); tensor parallel
    s·b·h·(10 + 24/t + 5·a·s/(h·t)); plus sequence parallel s·b·h·(34/t + 5·a·s/(h·t)). Here per element size e
    and mask size m, so fp32 and dropout-free runs scale correctly. Not split without sequence parallelism:
    two norm inputs, the QKV and fc1 inputs, two dropout masks: 4·e + 2·m per s·b·h (Llama's RMSNorm as meshtron
    writes it also keeps its normalised input: 2·e more, NORM_STORED). Split: Q, K, V and the
    output-projection input, e·(2 + 2·kv/h), and the MLP's e·f/h per stored tensor (GELU: its input and fc2's,
    2 x 4h; SwiGLU: gate, silu(gate), up and their product, 4 x f). Scores: the paper's softmax output, dropout
    mask and dropout output, (2·e + m) per a·s²·b (e=2, m=1, GPT: 34 and 5); meshtron's dropout attention
    (parallel/attention.py) recomputes the dropout output from the other two in backward, so it keeps (e + m).
    A fused attention kernel (FlashAttention, Dao et al. 2022; PyTorch SDPA) stores no a·s² scores."""
    h, a, f = cfg.d_model, cfg.n_head, cfg.ffn_dim
    m = MASK_BYTES if dropout else 0
    mlp_tensors = 2 if cfg.family == "gpt" else 4
    replicated = 2 * (NORM_STORED[cfg.family] + 1) * elem + 2 * m
    split = elem * (2 + 2 * cfg.kv_heads / cfg.n_head) + elem * mlp_tensors * f / h
    per_sbh = (replicated + split) / tp if sp else replicated + split / tp
    scores = 0.0 if fused_attention else (elem + m) * a * s / h / tp
    return s * b * h * (per_sbh + scores)


def score_bytes(cfg: ModelConfig, s: int, b: int, tp: int, elem: int, dropout: bool) -> float:
    """The s² tensors meshtron's explicit attention keeps (softmax output and dropout mask): what selective
    recompute (Korthikanti et al. 2022, section 5) drops, (e + m·[dropout])·a·s²·b/t."""
    m = MASK_BYTES if dropout else 0
    return (elem + m) * cfg.n_head * s * s * b / tp


def dropped_probs_bytes(cfg: ModelConfig, s: int, b: int, tp: int, elem: int, dropout: bool, fused: bool) -> float:
    """The dropout output of the attention probabilities, e·a·s²·b/t: written and read in every pass though
    meshtron's attention does not keep it, so the elementwise-time proxy (Korthikanti's byte count) adds it
    back to what is stored."""
    return elem * cfg.n_head * s * s * b / tp if dropout and not fused else 0.0


def checkpoint_bytes(cfg: ModelConfig, s: int, b: int, tp: int, sp: bool, elem: int) -> float:
    """Bytes one layer stores with full recompute: its input, s·b·h elements (Korthikanti et al. 2022, Table 2:
    2·s·b·h for 16-bit), split over t with sequence parallelism (Megatron checkpoints the sharded input)."""
    return s * b * cfg.d_model * elem / (tp if sp else 1)


def logits_bytes(cfg: ModelConfig, s: int, b: int, tp: int) -> float:
    """fp32 logits for the loss, vocab-parallel: 4·s·b·V/t (Korthikanti et al. 2022, section 4.1.2)."""
    return LOGIT_BYTES * s * b * pad_to_multiple(cfg.vocab_size, tp) / tp


def head_activation_bytes(cfg: ModelConfig, s: int, b: int, tp: int, sp: bool, elem: int) -> float:
    """What the last stage keeps besides its layers: the final norm's stored tensors and the output layer's
    input, (NORM_STORED + 1)·e·s·b·h (split over t with sequence parallelism), and the fp32 logits (the
    cross-entropy keeps their softmax). Korthikanti et al. 2022 count only the logits (4.1.2)."""
    return ((NORM_STORED[cfg.family] + 1) * elem * s * b * cfg.d_model / (tp if sp else 1)
            + logits_bytes(cfg, s, b, tp))


def embedding_activation_bytes(cfg: ModelConfig, s: int, b: int, tp: int, sp: bool, dropout: bool) -> float:
    """What the first stage keeps besides its layers: the embedding dropout's mask, m·s·b·h (split over t with
    sequence parallelism; Korthikanti et al. 2022, 4.1.2), nothing without dropout."""
    return MASK_BYTES * s * b * cfg.d_model / (tp if sp else 1) if dropout else 0.0


def loss_working_bytes(cfg: ModelConfig, s: int, b: int, tp: int) -> float:
    """The cross-entropy's forward holds the logits and their max-shifted copy at once (Megatron's and
    meshtron's vocab-parallel cross-entropy): one more fp32 logits tensor at the peak, on the last stage."""
    return logits_bytes(cfg, s, b, tp)


def optimizer_temp_bytes(n_params: float, sharded: bool, dp: int) -> float:
    """The optimizer step's transient buffers, ADAM_TEMP_BYTES per parameter the device updates (its shard with
    a sharded optimizer). They live while the activations are freed: the peak is the larger of the two."""
    return n_params * ADAM_TEMP_BYTES / (dp if sharded else 1)


def grads_freed_each_step(lay: ParallelLayout) -> bool:
    """Whether TrainStep frees the gradients after each step (set_to_none) and allocates them again in the next
    backward: unless DDP's buckets (dp > 1, gradient_as_bucket_view) or the distributed optimizer's hold them."""
    return lay.dp == 1 and not lay.sharded_optimizer


def grads_allocated_in_backward(lay: ParallelLayout, micro_batches: int) -> bool:
    """Whether gradients exist only from the backward on, layer by layer as it reaches each parameter: they are
    freed each step and, with one micro-batch, no earlier micro-batch's backward has allocated them."""
    return grads_freed_each_step(lay) and micro_batches == 1


def backward_peak(layers: int, stored_layer: float, head: float, working: float, forward_working: float,
                  layer_grads: float, other_grads: float) -> tuple[float, float]:
    """(activations, gradients) at the step's peak when gradients are allocated in the backward (one
    micro-batch in flight). The candidates: the forward's end (every layer's stored tensors, the head's, the
    loss's working copy); the head's backward (its gradients allocated, the non-layer ones with them); and each
    layer's backward, which holds the stored tensors of the layers below, its own `working` set (recomputed
    activations), and the gradients of itself and the layers above. The last candidate is linear in the layer,
    so its maximum is at the first layer the backward reaches or at the last."""
    stored = layers * stored_layer
    candidates = [(stored + head + forward_working, 0.0), (stored + head, other_grads)]
    if layers:
        candidates += [(stored + working, layer_grads + other_grads),
                       (stored_layer + working, layers * layer_grads + other_grads)]
    return max(candidates, key=sum)


def in_flight_microbatches(pp: int, m: int, v: int) -> float:
    """Micro-batches whose activations the first stage holds: p with 1F1B (Narayanan et al. 2021, 2.2.1),
    times (1 + (p-1)/(p·v)) with the interleaved schedule (Korthikanti et al. 2022, section 4.2.3)."""
    return min(pp, m) * (1 + (pp - 1) / (pp * v) if v > 1 else 1)


# --- FLOPs ------------------------------------------------------------------------------------------------------

def layer_forward_flops(cfg: ModelConfig, s: int, b: int) -> float:
    """Forward FLOPs of one layer: 2·(multiply-adds) of the QKV, output, MLP GEMMs plus 4·b·s²·h for QKᵀ and
    attention·V (Narayanan et al. 2021, appendix: 24·b·s·h² + 4·b·s²·h for GPT's 4h MLP)."""
    h, f, kv = cfg.d_model, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    mlp_mats = 2 if cfg.family == "gpt" else 3
    return 2 * s * b * (h * (h + 2 * kv) + h * h + mlp_mats * h * f) + 4 * b * s * s * h


def logits_forward_flops(cfg: ModelConfig, s: int, b: int) -> float:
    """Forward FLOPs of the output layer: 2·b·s·h·V (Narayanan et al. 2021, appendix)."""
    return 2 * s * b * cfg.d_model * cfg.vocab_size


def attention_score_flops(cfg: ModelConfig, s: int, b: int) -> float:
    """Forward FLOPs of QKᵀ and attention·V in one layer, 4·b·s²·h: what selective recompute runs again."""
    return 4 * b * s * s * cfg.d_model


def training_flops(cfg: ModelConfig, global_batch: int, s: int, recompute) -> float:
    """FLOPs of one iteration: backward = 2x forward; full recompute runs each layer's forward again, not the
    output layer's; selective recompute runs only the attention scores again (4·b·s²·h per layer). For GPT
    with full recompute this is exactly Narayanan et al. 2021's 96·B·s·L·h²·(1 + s/(6h) + V/(16·L·h)).
    Without recompute the layers' factor is 72 instead of 96; the output layer keeps its 6·B·s·h·V (scaling
    the V term by 72/96 too, as the shorthand suggests, would undercount it by a quarter). `recompute` is a
    RECOMPUTE kind (True/False mean full/none)."""
    kind = {True: "full", False: "none"}.get(recompute, recompute)
    layer_passes = 4 if kind == "full" else 3
    extra = cfg.n_layer * attention_score_flops(cfg, s, global_batch) if kind == "selective" else 0.0
    return (cfg.n_layer * layer_passes * layer_forward_flops(cfg, s, global_batch) + extra
            + 3 * logits_forward_flops(cfg, s, global_batch))


# --- Communication --------------------------------------------------------------------------------------------

def crosses_nodes(stride: int, size: int, devices: int, per_node: int) -> bool:
    """Whether a group of `size` ranks spaced `stride` apart spans nodes (ranks fill nodes in order)."""
    span = stride * size
    return size > 1 and devices > per_node and (span > per_node or per_node % span != 0)


def link(hw: HardwareProfile, inter_node: bool, model_axis: bool = False) -> tuple[float, float]:
    """(bandwidth B/s a ring collective reaches, latency s per ring step) of the link a group crosses."""
    if inter_node:
        return hw.inter_node_bandwidth_gbs * 1e9 * hw.collective_efficiency, hw.inter_node_latency_us * 1e-6
    if model_axis and hw.tp_intra_node_bandwidth_gbs:
        return (hw.tp_intra_node_bandwidth_gbs * 1e9 * hw.collective_efficiency,
                (hw.tp_intra_node_latency_us or hw.intra_node_latency_us) * 1e-6)
    return hw.intra_node_bandwidth_gbs * 1e9 * hw.collective_efficiency, hw.intra_node_latency_us * 1e-6


def all_reduce_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    """Ring all-reduce: each rank sends and receives 2·(n-1)/n of the buffer in 2·(n-1) steps
    (Patarasuk & Yuan 2009; NCCL's bus bandwidth)."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency


def gather_time(nbytes: float, n: int, bw: float, latency: float) -> float:
    """Ring all-gather or reduce-scatter of an n-way sharded buffer: half an all-reduce."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes / bw + (n - 1) * latency


def tp_collectives_per_layer(recompute: str) -> int:
    """All-reduces of s·b·h per layer and micro-batch over the model axis: 2 forward + 2 backward, and 2 more
    with full recompute (Shoeybi et al. 2019; Korthikanti et al. 2022); selective recompute adds none.
    Sequence parallelism turns each into a reduce-scatter + all-gather pair with the same bytes, hence the
    same time (plus Megatron's backward re-gather of the two column GEMMs' inputs: `sp_regathers_per_layer`)."""
    return 6 if recompute == "full" else 4


def sp_regathers_per_layer(sequence_parallel: bool) -> int:
    """All-gathers of s·b·h per layer in backward with sequence parallelism: the QKV and fc1 inputs are stored
    split over the model axis and gathered again for the weight gradients (Megatron-LM's layers.py)."""
    return 2 if sequence_parallel else 0


# --- Time terms -----------------------------------------------------------------------------------------------

def compute_rate(hw: HardwareProfile, dtype: str, devices_on_node: int) -> tuple[float, float]:
    """(FLOP/s a training GEMM reaches, memory bytes/s) on one device: peak x the profile's GEMM efficiency.
    CPU ranks share the node's cores: beyond one thread per core every rank slows down in proportion."""
    share = 1.0
    if hw.cores_per_node:
        share = min(1.0, hw.cores_per_node / (devices_on_node * hw.threads_per_rank))
    return hw.peak_flops(dtype) * hw.gemm_efficiency * share, hw.memory_bandwidth_gbs * 1e9 * share


def elementwise_time(activation_bytes: float, mem_bw: float, passes: float | None = None) -> float:
    """Memory-bound kernels (roofline, Williams et al. 2009): ELEMENTWISE_PASSES (or the profile's own count)
    x the layer's stored activations (Korthikanti's byte count, a proxy for what those kernels read and write)
    over memory bandwidth."""
    return (ELEMENTWISE_PASSES if passes is None else passes) * activation_bytes / mem_bw


def pipeline_time(t_microbatch: float, m: int, pp: int, v: int) -> tuple[float, float]:
    """(busy time, bubble) of 1F1B: m micro-batches plus (p-1) fill/drain slots, a bubble fraction of (p-1)/m;
    interleaved over v chunks per rank: (p-1)/(v·m) (Narayanan et al. 2021, sections 2.2.1 and 2.2.2)."""
    return m * t_microbatch, (pp - 1) / v * t_microbatch


def dp_exposed_time(reduce_s: float, gather_s: float, last_backward_s: float,
                    overlap: float | None = None) -> float:
    """Gradient reduction over the batch axis hides under the last micro-batch's backward, whose buckets are
    ready layer by layer (Li et al. 2020, PyTorch DDP); only the part beyond DP_OVERLAP (or the profile's own
    share) of that backward shows. The sharded optimizer's parameter all-gather (Megatron's distributed
    optimizer) follows the step."""
    share = DP_OVERLAP if overlap is None else overlap
    return max(0.0, reduce_s - share * last_backward_s) + gather_s


def optimizer_time(state_bytes: float, mem_bw: float, passes: float = 2.0) -> float:
    """Adam is memory-bound: a fused Adam reads and writes every byte of the device's parameter, gradient and
    optimizer state once (2 passes); an unfused one (the profile's optimizer_passes) moves them more often."""
    return passes * state_bytes / mem_bw


# --- The prediction -------------------------------------------------------------------------------------------

def predict(cfg: ModelConfig, layout: ParallelLayout, hw: HardwareProfile, *, global_batch: int, seq_len: int,
            dtype: str | None = None, fused_attention: bool | None = None) -> Prediction:
    """Memory and step time of `layout` for one global batch of `seq_len`-token sequences.

    `dtype` defaults to the profile's; `fused_attention` None follows meshtron's attention (fused SDPA when
    the config has no dropout). Raises ValueError if the layout does not divide the batch or the layers."""
    dtype = dtype or hw.default_dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPE_BYTES)}")
    lay = layout
    if global_batch % (lay.dp * lay.micro_batch) or cfg.n_layer % (lay.pp * lay.virtual_stages):
        raise ValueError(f"{lay} does not divide the global batch {global_batch} into dp x micro-batch or the "
                         f"{cfg.n_layer} layers into pp x virtual stages")
    fused = cfg.dropout == 0 if fused_attention is None else fused_attention
    memory = predict_memory(cfg, lay, hw, global_batch, seq_len, dtype, fused)
    time = predict_time(cfg, lay, hw, global_batch, seq_len, dtype, fused)
    on_node = min(lay.devices, hw.devices_per_node)
    fits = memory["total"] * (on_node if hw.shared_memory else 1) <= MEMORY_HEADROOM * hw.memory_bytes
    step, peak = time["step"], hw.peak_flops(dtype)
    executed = training_flops(cfg, global_batch, seq_len, lay.recompute if not (fused and lay.recompute ==
                                                                              "selective") else "none")
    executed = executed / step / lay.devices
    model = training_flops(cfg, global_batch, seq_len, "none") / step / lay.devices
    return Prediction(lay, global_batch, seq_len, memory, time, fits, tokens_per_s=global_batch * seq_len / step,
                      tflops_per_gpu=executed / 1e12, mfu=model / peak, hfu=executed / peak)


def predict_memory(cfg: ModelConfig, lay: ParallelLayout, hw: HardwareProfile, global_batch: int, s: int,
                   dtype: str, fused: bool) -> dict[str, float]:
    """Bytes on the fullest device: the first pipeline stage (embedding, p in-flight micro-batches) or the last
    (output layer, fp32 logits, one micro-batch in flight); the same stage when pp == 1."""
    e, t, p, b = DTYPE_BYTES[dtype], lay.tp, lay.pp, lay.micro_batch
    m = global_batch // (lay.dp * b)
    dropout = cfg.dropout > 0
    full_layer = layer_activation_bytes(cfg, s, b, t, lay.sequence_parallel, e, dropout, fused)
    if lay.recompute == "full":   # every layer's input, plus one layer's activations while it recomputes
        stored_layer, working = checkpoint_bytes(cfg, s, b, t, lay.sequence_parallel, e), full_layer
    elif lay.recompute == "selective" and not fused:   # no s² scores; one layer's while it recomputes them
        scores = score_bytes(cfg, s, b, t, e, dropout)
        stored_layer, working = full_layer - scores, scores
    else:
        stored_layer, working = full_layer, 0.0
    per_param = state_bytes_per_param(dtype, lay.sharded_optimizer, lay.dp)
    layers = cfg.n_layer // p
    split, replicated = layer_params(cfg)
    layer_n = split / t + replicated
    # gradients that exist all step (DDP's buckets, the distributed optimizer's, accumulation over micro-batches)
    # or only from the backward on: meshtron's TrainStep sets them to None after each step
    transient_grads = grads_allocated_in_backward(lay, m)
    stages = []
    for stage, in_flight in (("first", in_flight_microbatches(p, m, lay.virtual_stages)), ("last", 1)):
        n = stage_params(cfg, t, p, stage)
        head = 0.0                  # besides the layers: the embedding's mask(s) on the first, the head on the last
        if stage == "first" or p == 1:
            head = in_flight * embedding_activation_bytes(cfg, s, b, t, lay.sequence_parallel, dropout)
        stage_working = working
        if stage == "last" or p == 1:
            head += head_activation_bytes(cfg, s, b, t, lay.sequence_parallel, e)
            stage_working = max(working, loss_working_bytes(cfg, s, b, t))
        acts = in_flight * layers * stored_layer + head + stage_working
        grads = n * per_param[1]
        if transient_grads:
            acts, grads = backward_peak(layers, stored_layer, head, working, stage_working,
                                        layer_n * per_param[1], (n - layers * layer_n) * per_param[1])
        mem = {"params": n * per_param[0], "grads": grads, "optimizer": n * per_param[2], "activations": acts}
        # the optimizer step runs after the backward has freed the activations: only its excess shows
        mem["optimizer_step"] = max(0.0, optimizer_temp_bytes(n, lay.sharded_optimizer, lay.dp) - acts)
        if lay.dp > 1 and m > 1 and p == 1 and not lay.sharded_optimizer:   # DDP accumulating: a 2nd gradient copy
            mem["accumulation"] = n * ACCUMULATION_GRAD_BYTES
        mem["allocator"] = (hw.allocator_overhead * sum(mem.values()) + hw.allocator_retained_gib * GIB
                            + (hw.allocator_grad_churn * n * per_param[1] if grads_freed_each_step(lay) else 0.0))
        mem["runtime"] = hw.runtime_overhead_bytes
        stages.append(mem)
    memory = max(stages, key=lambda x: sum(x.values()))
    memory["total"] = sum(memory.values())
    return memory


def predict_time(cfg: ModelConfig, lay: ParallelLayout, hw: HardwareProfile, global_batch: int, s: int,
                 dtype: str, fused: bool) -> dict[str, float]:
    """Seconds of one step: the slowest stage's micro-batches (compute, model-axis collectives, pipe sends),
    the pipeline bubble, the exposed gradient reduction over the batch axis, the optimizer."""
    e, d, t, p, b, v = DTYPE_BYTES[dtype], lay.dp, lay.tp, lay.pp, lay.micro_batch, lay.virtual_stages
    m, layers, per_node = global_batch // (d * b), cfg.n_layer // p, hw.devices_per_node
    flops_s, mem_bw = compute_rate(hw, dtype, min(lay.devices, per_node))
    tp_link = link(hw, crosses_nodes(1, t, lay.devices, per_node), model_axis=True)  # rank = tp + t·dp + t·d·pp
    dp_link = link(hw, crosses_nodes(t, d, lay.devices, per_node))
    pp_link = link(hw, crosses_nodes(t * d, p, lay.devices, per_node))

    passes = 4 if lay.recompute == "full" else 3          # forward, backward (2x forward), recomputed forward
    dropout = cfg.dropout > 0
    in_cache = fused or (dropout and hw.dropout_attention_loop)   # the s² work moves no memory (CPU loop: in cache)
    dropped = dropped_probs_bytes(cfg, s, b, t, e, dropout, in_cache)
    full_layer = layer_activation_bytes(cfg, s, b, t, lay.sequence_parallel, e, dropout, in_cache) + dropped
    layer_compute = passes * (layer_forward_flops(cfg, s, b) / t / flops_s
                              + elementwise_time(full_layer, mem_bw, hw.elementwise_passes))
    if lay.recompute == "selective" and not fused:         # the scores once more: QKᵀ, softmax, dropout, ·V
        scores = 0.0 if in_cache else score_bytes(cfg, s, b, t, e, dropout) + dropped
        layer_compute += (attention_score_flops(cfg, s, b) / t / flops_s
                          + elementwise_time(scores, mem_bw, hw.elementwise_passes))
    act = s * b * cfg.d_model * e                          # one s·b·h activation
    layer_tp = (tp_collectives_per_layer(lay.recompute) * all_reduce_time(act, t, *tp_link)
                + sp_regathers_per_layer(lay.sequence_parallel) * gather_time(act, t, *tp_link))
    embed_tp = all_reduce_time(act, t, *tp_link)           # vocab-parallel embedding: one all-reduce forward
    head_tp = all_reduce_time(act, t, *tp_link) + 3 * all_reduce_time(4 * s * b, t, *tp_link)  # f, and the
    head_compute = 3 * logits_forward_flops(cfg, s, b) / t / flops_s                        # loss's 3 of s·b
    p2p = 0.0 if p == 1 else 2 * v * (act / t / pp_link[0] + pp_link[1])   # scatter-gather sends, Narayanan 4.1
    first = {"compute": layers * layer_compute, "tp_comm": layers * layer_tp + embed_tp, "pp_comm": p2p}
    last = {"compute": layers * layer_compute + head_compute,
            "tp_comm": layers * layer_tp + head_tp + (embed_tp if p == 1 else 0.0), "pp_comm": p2p}
    slowest = max(first, last, key=lambda x: sum(x.values()))
    busy, bubble = pipeline_time(sum(slowest.values()), m, p, v)
    time = {k: m * x for k, x in slowest.items()}
    time["bubble"] = bubble

    n_params = max(stage_params(cfg, t, p, "first"), stage_params(cfg, t, p, "last"))
    per_param = state_bytes_per_param(dtype, lay.sharded_optimizer, d)
    if lay.sharded_optimizer:        # reduce-scatter fp32 grads, all-gather the updated params
        reduce_s = gather_time(n_params * GRAD_REDUCE_BYTES, d, *dp_link)
        gather_s = gather_time(n_params * per_param[0], d, *dp_link)
    else:
        reduce_s, gather_s = all_reduce_time(n_params * GRAD_REDUCE_BYTES, d, *dp_link), 0.0
    last_backward = (passes - 1) / passes * layers * layer_compute
    time["dp_comm"] = dp_exposed_time(reduce_s, gather_s, last_backward, hw.dp_overlap)
    time["optimizer"] = optimizer_time(n_params * sum(per_param), mem_bw, hw.optimizer_passes)
    time["step"] = busy + bubble + time["dp_comm"] + time["optimizer"]
    return time
