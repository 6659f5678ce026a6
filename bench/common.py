"""Shared pieces of the benchmarks: the DTensor peer (a plain torch.nn GPT parallelized with PyTorch's own
tensor parallelism), its training step, and timing helpers.

The peer computes the same logical model as `meshtron.models.GPT` (GPT-2: learned positions, pre-LayerNorm,
q/k/v/o linears with biases, tanh-GELU MLP with biases, tied embedding/head) and its parameters carry the
same names, so meshtron's full weights load into it directly.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------------
# the peer model: plain torch.nn, same names as meshtron's GPT parameters
# ----------------------------------------------------------------------------------------------------------

class PeerAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.head_dim = d // n_head
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        # under tensor parallelism the column-parallel outputs hold this rank's heads only: -1 heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class PeerMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class PeerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = PeerAttention(cfg.d_model, cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = PeerMLP(cfg.d_model, cfg.ffn_dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PeerGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.family == "gpt" and cfg.kv_heads == cfg.n_head and cfg.dropout == 0.0
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(PeerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight                                    # tied, as GPT-2

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def load_meshtron_weights(peer: PeerGPT, full: dict[str, torch.Tensor]) -> None:
    """Copy meshtron's full logical weights (`meshtron.parallel.full_state_dict`) into the plain peer."""
    params = dict(peer.named_parameters())
    if set(params) != set(full):
        raise ValueError(f"names differ: {sorted(set(params) ^ set(full))[:6]}")
    for name, p in params.items():
        p.copy_(full[name])


def no_decay(name: str, p) -> bool:
    """meshtron's rule: no weight decay on norms and biases (matrices, embeddings and positions decay)."""
    return p.ndim < 2


def param_groups(model: nn.Module, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    rest = [p for n, p in model.named_parameters() if no_decay(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# PyTorch's tensor parallelism applied to the peer
# ----------------------------------------------------------------------------------------------------------

def parallelize_peer(model: PeerGPT, tp_mesh) -> PeerGPT:
    """Megatron's plan in DTensor terms, like-for-like with meshtron's default layout:
    vocab-parallel embedding (RowwiseParallel on nn.Embedding), attention q/k/v colwise and o rowwise,
    MLP up colwise and down rowwise, head colwise with logits left vocab-sharded for `loss_parallel`.
    PrepareModuleInput on attn/mlp turns the (replicated) input into one DTensor shared by q, k and v,
    so the backward sums their input gradients before one all-reduce (Megatron's single `f`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   parallelize_module)
    plan = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    }
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        plan.update({
            p + "attn": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            p + "attn.q_proj": ColwiseParallel(),
            p + "attn.k_proj": ColwiseParallel(),
            p + "attn.v_proj": ColwiseParallel(),
            p + "attn.o_proj": RowwiseParallel(),
            p + "mlp": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            p + "mlp.up_proj": ColwiseParallel(),
            p + "mlp.down_proj": RowwiseParallel(),
        })
    parallelize_module(model, tp_mesh, plan)
    model.head.weight = model.wte.weight          # re-tie: both are the same Shard(0) DTensor over the vocab
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


def _is_shard(p) -> bool:
    from torch.distributed.tensor import DTensor, Shard
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


@torch.no_grad()
def clip_peer_grads(params, max_norm: float, tp_group, tp_coord: int) -> float:
    """Global-norm clipping over the local shards, as meshtron does it (one all-reduce on the model axis):
    a vocab/head-sharded tensor counted on each of its shards, a replicated one on model rank 0 only."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [_local(g) for g in grads]
    counted = [_local(p.grad) for p in params if p.grad is not None and (_is_shard(p) or tp_coord == 0)]
    sq = torch.stack(torch._foreach_norm(counted)).pow(2).sum() if counted else torch.zeros(())
    if tp_group is not None:
        dist.all_reduce(sq, group=tp_group)
    norm = sq.sqrt().item()
    if max_norm > 0 and math.isfinite(norm) and max_norm / (norm + 1e-6) < 1.0:
        torch._foreach_mul_(local, max_norm / (norm + 1e-6))
    return norm


class OverlappedGradAllReduce:
    """DDP's idea by hand for DTensor modules (DDP around them gave None gradients): one bucket per transformer block,
    in backward order; a post-accumulate-grad hook launches the bucket's async all-reduce (of the local
    shards, flattened) over the batch group as soon as all its gradients exist, so it overlaps the rest of
    the backward. The remaining parameters (embeddings, final norm; the tied embedding gets its last
    gradient at the very end) form a last bucket, reduced when backward ends."""

    def __init__(self, model, group, size: int):
        self.group, self.size = group, size
        seen, self.buckets = set(), []
        for block in reversed(model.blocks):
            bucket = [p for p in block.parameters() if id(p) not in seen]
            seen.update(id(p) for p in bucket)
            self.buckets.append(bucket)
        self.last = [p for p in model.parameters() if id(p) not in seen]
        self.where = {}
        for b, bucket in enumerate(self.buckets):
            for p in bucket:
                self.where[id(p)] = b
                p.register_post_accumulate_grad_hook(self._hook)
        self.ready = [0] * len(self.buckets)
        self.works = []

    def _hook(self, p):
        b = self.where[id(p)]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            self._launch(self.buckets[b])

    def _launch(self, bucket):
        local = [_local(p.grad) for p in bucket]
        flat = torch._utils._flatten_dense_tensors(local)
        self.works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, local))

    def finish(self):
        self._launch(self.last)
        for work, flat, local in self.works:
            work.wait()
            flat.div_(self.size)
            torch._foreach_copy_(local, torch._utils._unflatten_dense_tensors(flat, local))
        self.works, self.ready = [], [0] * len(self.buckets)


class PeerStep:
    """One training step of the DTensor peer: forward + loss_parallel cross-entropy + backward, data-parallel
    gradient averaging over the batch axis, global-norm clipping, AdamW (foreach), zero_grad.

    dp_mode: 'replicate' - PyTorch's composable replicate (the FSDP2-based DDP, `replicate_with_fsdp`) on the
    batch sub-mesh, applied per block and at the root, so each block's gradients are all-reduced while the
    backward continues (overlapped, like DDP buckets); it takes the TP DTensors as they are.
    'manual' - after backward, one all-reduce of all local gradient shards flattened together (not overlapped)."""

    def __init__(self, model, tp_mesh, dp_mesh, *, lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                 clip=1.0, dp_mode="replicate", fused: bool | None = None):
        self.model, self.clip, self.dp_mode = model, clip, dp_mode
        self.tp_group = tp_mesh.get_group() if tp_mesh is not None and tp_mesh.size() > 1 else None
        self.tp_coord = tp_mesh.get_local_rank() if self.tp_group is not None else 0
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None and dp_mesh.size() > 1 else None
        self.dp_size = dp_mesh.size() if self.dp_group is not None else 1
        if self.dp_group is not None and dp_mode == "replicate":
            from torch.distributed._composable.replicate_with_fsdp import replicate
            for block in model.blocks:
                replicate(block, mesh=dp_mesh)
            replicate(model, mesh=dp_mesh)
        self.overlap = None
        if self.dp_group is not None and dp_mode == "overlap":
            self.overlap = OverlappedGradAllReduce(model, self.dp_group, self.dp_size)
        self.params = [p for p in model.parameters()]
        # foreach AdamW refuses a list mixing DTensors and plain tensors (the replicated LayerNorm and
        # position parameters stay plain tensors under TP alone): one AdamW per kind, same hyperparameters.
        from torch.distributed.tensor import DTensor
        self.optimizers = []
        for kind in (True, False):
            groups = [{**g, "params": [p for p in g["params"] if isinstance(p, DTensor) == kind]}
                      for g in param_groups(model, weight_decay)]
            groups = [g for g in groups if g["params"]]
            if groups:
                impl = {"fused": True} if fused else {"foreach": True}
                self.optimizers.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **impl))

    def forward_backward(self, local_batch):
        from torch.distributed.tensor.parallel import loss_parallel
        idx, tgt = local_batch[:, :-1], local_batch[:, 1:]
        with loss_parallel():
            logits = self.model(idx)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
            loss.backward()
        if self.dp_group is not None and self.dp_mode == "manual":
            local = [_local(p.grad) for p in self.params]
            flat = torch._utils._flatten_dense_tensors(local)
            dist.all_reduce(flat, group=self.dp_group)
            flat.div_(self.dp_size)
            torch._foreach_copy_(local, torch._utils._unflatten_dense_tensors(flat, local))
        if self.overlap is not None:
            self.overlap.finish()
        return _local(loss.detach())

    def step(self, local_batch) -> dict:
        loss = self.forward_backward(local_batch).clone()
        if self.dp_group is not None:
            dist.all_reduce(loss, group=self.dp_group)
        norm = clip_peer_grads(self.params, self.clip, self.tp_group, self.tp_coord)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"loss": loss.item() / self.dp_size, "grad_norm": norm}


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------

def timed_block(fn, steps: int, sync: bool = True) -> float:
    """Seconds per step of `steps` calls of fn(i), from a barrier to a barrier (the slowest rank sets it);
    sync=False: no barriers (a block this rank runs alone)."""
    sync = sync and dist.is_initialized()
    if sync:
        dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    if sync:
        dist.barrier()
    return (time.perf_counter() - t0) / steps


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class TextWindows:
    """Random windows of seq+1 byte tokens (0..255; vocabulary 257 as meshtron's byte tokenizer) of CPython's
    own documentation (`pydoc_data.topics`): real text, so the losses fall, and no meshtron data API."""

    def __init__(self, seq: int, seed: int = 0):
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
        self.tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        self.seq, self.seed = seq, seed

    def global_batch(self, step: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (batch,), generator=g).tolist()
        return torch.stack([self.tokens[s:s + self.seq + 1] for s in starts])      # (B, T+1)


def busy_cores(interval: float = 1.0) -> float:
    """How many cores the machine kept busy over `interval` seconds (from /proc/stat), measured while this
    benchmark runs nothing: other processes' load, which inflates and scatters the timings."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle
    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except OSError:
        return float("nan")
    import os
    total = t1 - t0
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / total) if total > 0 else float("nan")


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (from /proc/stat; nan elsewhere)."""
    import os
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class Usage:
    """Around a measured section on every rank: wall time, this process's CPU time, and the machine's busy
    CPU time; `others_cores(usages)` = cores the *other* processes on the machine kept busy meanwhile."""

    def __enter__(self):
        self.w, self.c, self.m = time.perf_counter(), time.process_time(), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c
        self.machine = machine_busy_seconds() - self.m

    def result(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu, "machine": self.machine}


def others_cores(usages: list[dict]) -> float:
    """usages: each rank's Usage.result() over the same section."""
    wall = max(u["wall"] for u in usages)
    machine = max(u["machine"] for u in usages)
    return max(0.0, (machine - sum(u["cpu"] for u in usages)) / wall) if wall > 0 else float("nan")


def wait_for_idle(max_wait_s: float, threshold: float = 0.3, log=print) -> float:
    """Wait (at most max_wait_s) until other processes keep fewer than `threshold` cores busy; returns the
    last measurement (cores busy)."""
    t0 = time.time()
    busy = busy_cores()
    while busy > threshold and time.time() - t0 < max_wait_s:
        log(f"  waiting for the machine to be idle: {busy:.1f} cores busy with other processes")
        time.sleep(10)
        busy = busy_cores()
    return busy


def write_report(path: str, title: str, command: str, text: str) -> None:
    """Print the table and write it, with its title and command, to `path` (bench/results/ is gitignored)."""
    print()
    print(text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\nCommand: `{command}`\n\n{text}\n")
    print(f"\nwritten to {path}")


def stop_process_group(proc) -> None:
    """Stop a server started in its own process group (`start_new_session=True`) and every rank it started:
    SIGTERM, then SIGKILL if it has not exited within 30 s."""
    import signal
    import subprocess
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
