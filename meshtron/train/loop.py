"""The `meshtron train` job on one rank: build mesh and model, train, log metrics, then sample text.

Invariant: with the same seed, data and global batch, the logged losses are the same on every mesh; rank 0
alone prints and writes `RUN_DIR/metrics.jsonl` (one JSON object per optimizer step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from meshtron import checkpoint, faults
from meshtron.layout import LayoutRules, validate
from meshtron.mesh import Mesh, parse_mesh_spec
from meshtron.models import ModelConfig, build_model, get_preset
from meshtron.train.data import ByteTokenizer, RandomWindows, builtin_corpus, tokenize_corpus
from meshtron.train.step import TrainStep, local_rows


@dataclass
class TrainConfig:
    mesh: str = "model:1"
    layout: str | None = None
    model: str = "gpt-mini"
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields (n_layer, d_model, ...)
    steps: int = 200
    batch_size: int = 16          # global, in sequences
    micro_batches: int = 1        # per optimizer step, on each batch-axis rank
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    out: str = "runs/latest"
    sample_tokens: int = 200
    prompt: str = "The "
    save_every: int = 0           # optimizer steps between checkpoints (0: only at the end)
    keep: int = 3                 # newest checkpoints kept
    stop_after: int = 0           # leave after this many steps of this invocation, with a checkpoint (0: never)

    def model_config(self, vocab_size: int) -> ModelConfig:
        cfg = get_preset(self.model).replace(vocab_size=vocab_size, **self.overrides)
        return cfg.replace(max_seq_len=max(cfg.max_seq_len, self.seq_len))

    def check(self, vocab_size: int) -> ModelConfig:
        """Everything that can be checked without starting a rank; raises ValueError with the fix."""
        shape = parse_mesh_spec(self.mesh)
        cfg = self.model_config(vocab_size)
        rules = LayoutRules.parse(self.layout) if self.layout else LayoutRules.default_for(shape)
        validate(rules, shape, {**cfg.dim_sizes(), "batch": self.batch_size})
        dp = shape.get(rules.as_dict().get("batch"), 1)
        if (self.batch_size // dp) % self.micro_batches:
            raise ValueError(f"--batch-size {self.batch_size} over {dp} batch-axis ranks gives "
                             f"{self.batch_size // dp} sequences per rank, which do not split into "
                             f"--micro-batches {self.micro_batches}")
        for name in ("steps", "batch_size", "seq_len", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_root(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, "checkpoints")


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run on every rank (started by `meshtron.launch` or torchrun). With `resume`, continue from the newest
    complete checkpoint in the run folder (on whatever mesh this run has). Returns rank 0's summary."""
    tok = ByteTokenizer()
    model_cfg = cfg.model_config(tok.vocab_size)
    resume_path = _resume_path(cfg, resume)
    mesh = Mesh.from_spec(cfg.mesh)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, mesh, cfg.layout, seed=cfg.seed)
    trainer = TrainStep(model, mesh, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                        micro_batches=cfg.micro_batches)
    data = RandomWindows(tokenize_corpus(builtin_corpus(), tok), cfg.seq_len, cfg.seed)
    start_step = 0
    if resume_path:
        meta = checkpoint.read_meta(resume_path)
        checkpoint.check_model_matches(meta, dataclasses.asdict(model_cfg), resume_path)
        checkpoint.load_checkpoint(resume_path, model, mesh, trainer.optimizer)
        start_step = meta["step"]
    lead = mesh.rank == 0
    if lead:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)}, f, indent=2)
        print(f"meshtron: mesh {mesh.spec} ({mesh.world_size} ranks), layout {model.layout.rules or '(none)'}, "
              f"model {cfg.model} {model_cfg.num_params() / 1e6:.2f}M params, global batch {cfg.batch_size} x "
              f"{cfg.seq_len} tokens, {cfg.steps} steps -> {cfg.out}"
              + (f", resumed from {resume_path}" if resume_path else ""), flush=True)
        with open(os.path.join(cfg.out, "run.log"), "a") as f:   # one line per start: what each attempt did
            f.write(json.dumps({"time": time.time(), "attempt": faults.attempt(), "mesh": mesh.spec,
                                "start_step": start_step, "resumed_from": resume_path}) + "\n")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    metrics = _open_metrics(metrics_path, start_step) if lead else None
    bar = _progress(cfg.steps) if lead else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses = []
    t_start = time.perf_counter()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        model.rng.reseed(step)
        out = trainer.step(local_rows(data.global_batch(step, cfg.batch_size), trainer.batch_axis), lr=lr)
        dt = time.perf_counter() - t0
        losses.append(out["loss"])
        done = step + 1
        faults.maybe_kill("step", mesh.rank, done)
        if lead:
            rec = {"step": done, "loss": out["loss"], "lr": lr, "tokens_per_s": tokens_per_step / dt,
                   "grad_norm": out["grad_norm"], "step_time_s": dt, "elapsed_s": time.perf_counter() - t_start}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.update(done, out["loss"], rec["tokens_per_s"])
        stopping = bool(cfg.stop_after) and done - start_step >= cfg.stop_after
        if done == cfg.steps or stopping or (cfg.save_every and done % cfg.save_every == 0):
            checkpoint.save_checkpoint(checkpoint_root(cfg), done, model, mesh, trainer.optimizer, keep=cfg.keep,
                                       meta={"model": dataclasses.asdict(model_cfg),
                                             "train": dataclasses.asdict(cfg), "data": {"position": done}})
        if stopping:
            break
    if lead:
        bar.close()
        metrics.close()
    sample = ""
    if cfg.sample_tokens > 0:
        model.eval()
        prompt = torch.tensor([tok.encode(cfg.prompt) or [tok.eot]])
        ids = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
        sample = tok.decode(ids[0].tolist())
        if lead:
            print(f"--- sample ({cfg.sample_tokens} tokens, temperature 0.8, top-k 40) ---\n{sample}\n---", flush=True)
    return {"losses": losses, "sample": sample, "tokens_per_step": tokens_per_step} if lead else {}


def _resume_path(cfg: TrainConfig, resume: bool) -> str | None:
    """The checkpoint to continue from: with `resume`, the newest complete one (an error if there is none);
    after an automatic restart (torchrun or meshtron's launcher), the newest one if any."""
    path = checkpoint.latest_checkpoint(checkpoint_root(cfg))
    if resume and path is None:
        raise checkpoint.CheckpointError(f"--resume {cfg.out}: no complete checkpoint under "
                                         f"{checkpoint_root(cfg)}; train without --resume to start a new run")
    return path if (resume or faults.attempt() > 0) else None


def _open_metrics(path: str, start_step: int):
    """Append to metrics.jsonl, first dropping lines past `start_step` (left by an attempt that crashed)."""
    kept = []
    if start_step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break
    f = open(path, "w")
    f.writelines(kept)
    return f


class _progress:
    """A tqdm bar on a terminal; on a pipe or file, a plain line about every 5% of the run."""

    def __init__(self, total: int):
        self.total, self.tty = total, sys.stderr.isatty()
        self.every = max(1, total // 20)
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.tty:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            self.bar.close()
