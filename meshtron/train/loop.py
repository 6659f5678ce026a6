"""The `meshtron train` job on one rank: data, mesh and model; train, validate, checkpoint; then sample text.

Invariants: with the same seed, data and global batch the logged losses are the same on every mesh; a run
resumed from its checkpoint (on any mesh) sees exactly the batches, learning rates and dropout masks an
uninterrupted run would; rank 0 alone prints and writes the run folder's logs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshtron import checkpoint, faults
from meshtron.layout import LayoutRules, validate
from meshtron.mesh import Mesh, parse_mesh_spec
from meshtron.models import ModelConfig, build_model, get_preset
from meshtron.train.step import TrainStep, evaluate


@dataclass
class TrainConfig:
    mesh: str = "model:1"
    layout: str | None = None
    model: str = "gpt-mini"
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields (n_layer, d_model, ...)
    data: str = "builtin"         # text file, folder, .jsonl (each maybe .gz), or 'builtin' (CPython's docs)
    tokenizer: str = "byte"       # 'byte', 'bpe' (trained on the data), 'gpt2', a tokenizer.json or a folder
    vocab_size: int | None = None  # for 'bpe'
    val_fraction: float = 0.05
    steps: int = 200
    batch_size: int = 16          # global, in sequences
    micro_batches: int = 1        # per optimizer step, on each batch-axis rank
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    bf16: bool = False            # bf16 autocast; parameters, gradients and Adam state stay float32
    seed: int = 0
    out: str = "runs/latest"
    eval_every: int = 0           # steps between validation passes (0: only at the end)
    eval_batches: int = 8
    save_every: int = 0           # optimizer steps between checkpoints (0: only at the end)
    keep: int = 3                 # newest checkpoints kept
    stop_after: int = 0           # leave after this many steps of this invocation, with a checkpoint (0: never)
    peak_tflops: float | None = None  # per GPU or per machine (CPU); measured once when not given
    sample_tokens: int = 200
    prompt: str = "The "

    def model_config(self, vocab_size: int) -> ModelConfig:
        cfg = get_preset(self.model).replace(vocab_size=vocab_size, **self.overrides)
        return cfg.replace(max_seq_len=max(cfg.max_seq_len, self.seq_len))

    def check(self, vocab_size: int) -> ModelConfig:
        """Everything that can be checked without starting a rank; raises ValueError with the fix."""
        for name in ("steps", "batch_size", "seq_len", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        shape = parse_mesh_spec(self.mesh)
        cfg = self.model_config(vocab_size)
        rules = LayoutRules.parse(self.layout) if self.layout else LayoutRules.default_for(shape)
        validate(rules, shape, {**cfg.dim_sizes(), "batch": self.batch_size})
        dp = shape.get(rules.as_dict().get("batch"), 1)
        if (self.batch_size // dp) % self.micro_batches:
            raise ValueError(f"--batch-size {self.batch_size} over {dp} batch-axis ranks gives "
                             f"{self.batch_size // dp} sequences per rank, which do not split into "
                             f"--micro-batches {self.micro_batches}")
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


def open_data(cfg: TrainConfig, tokenizer=None, log=None):
    """The run's dataset, tokenised once into `RUN_DIR/data-cache` (reused while data and tokenizer match)."""
    from meshtron.data import open_dataset
    return open_dataset(cfg.data, tokenizer or cfg.tokenizer, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                        vocab_size=cfg.vocab_size, cache_dir=os.path.join(cfg.out, "data-cache"), log=log)


def resume_point(cfg: TrainConfig, resume: bool) -> str | None:
    """The checkpoint to continue from: with `resume`, the newest complete one (an error if there is none);
    after an automatic restart (torchrun or meshtron's launcher), the newest one if any."""
    path = checkpoint.latest_checkpoint(checkpoint_root(cfg))
    if resume and path is None:
        raise checkpoint.CheckpointError(f"--resume {cfg.out}: no complete checkpoint under "
                                         f"{checkpoint_root(cfg)}; train without --resume to start a new run")
    return path if (resume or faults.attempt() > 0) else None


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run on every rank (started by `meshtron.launch` or torchrun). Returns rank 0's summary."""
    from meshtron.data import load_tokenizer
    from meshtron.inference import sample_ids
    from meshtron.train.flops import model_flops_per_token, mfu, peak_flops_total
    from meshtron.train.metrics import MetricsLogger
    resume_path = resume_point(cfg, resume)
    meta = checkpoint.read_meta(resume_path) if resume_path else None
    mesh = Mesh.from_spec(cfg.mesh)
    lead = mesh.rank == 0
    tokenizer = load_tokenizer(os.path.join(resume_path, "tokenizer")) if resume_path else None
    data = _open_data_rank0_first(cfg, mesh, tokenizer)
    tok = data.tokenizer
    model_cfg = cfg.model_config(tok.vocab_size)
    if meta:
        checkpoint.check_model_matches(meta, dataclasses.asdict(model_cfg), resume_path)
    model = build_model(model_cfg, mesh, cfg.layout, seed=cfg.seed)
    trainer = TrainStep(model, mesh, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                        micro_batches=cfg.micro_batches, bf16=cfg.bf16)
    sampler = data.sampler(cfg.seed)
    start_step = 0
    if resume_path:
        checkpoint.load_checkpoint(resume_path, model, mesh, trainer.optimizer)
        sampler.load_state_dict(meta["data"])
        start_step = meta["step"]
    batch_axis = trainer.batch_axis
    if lead:
        _announce(cfg, mesh, model, model_cfg, data, resume_path, start_step)
    peak = peak_flops_total(mesh.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size)),
                            mesh.device.type, peak_tflops=cfg.peak_tflops) if lead else 0.0
    flops_per_token = model_flops_per_token(model_cfg, cfg.seq_len)
    log = MetricsLogger(cfg.out, cfg.steps, enabled=lead, start_step=start_step)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses = []

    def save(step: int) -> None:
        checkpoint.save_checkpoint(
            checkpoint_root(cfg), step, model, mesh, trainer.optimizer, keep=cfg.keep,
            meta={"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
                  "data": sampler.state_dict()},
            write_extra=lambda folder: tok.save(os.path.join(folder, "tokenizer")))

    def validate_now(step: int) -> None:
        val = evaluate(model, data.val_batches(cfg.batch_size, batch_axis.coord, batch_axis.size,
                                                max_batches=cfg.eval_batches), batch_axis, bf16=cfg.bf16)
        log.log_val(step, val)

    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            model.rng.reseed(step)
            out = trainer.step(sampler.local_batch(cfg.batch_size, batch_axis.coord, batch_axis.size), lr=lr)
            dt = time.perf_counter() - t0
            done = step + 1
            losses.append(out["loss"])
            tps = tokens_per_step / dt
            log.log_train(done, out["loss"], lr, tps, grad_norm=out["grad_norm"], step_time_s=dt,
                          mfu=mfu(tps, flops_per_token, peak) if lead else None)
            faults.maybe_kill("step", mesh.rank, done)
            stopping = bool(cfg.stop_after) and done - start_step >= cfg.stop_after
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                validate_now(done)
            if done == cfg.steps or stopping or (cfg.save_every and done % cfg.save_every == 0):
                save(done)
            if stopping:
                break
    finally:
        log.close()
    sample = ""
    if cfg.sample_tokens > 0:
        model.eval()
        prompt = torch.tensor([tok.encode(cfg.prompt) or [tok.eot_id]])
        ids = sample_ids(model, prompt, cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
        sample = tok.decode(ids[0].tolist())
        if lead:
            print(f"--- sample ({cfg.sample_tokens} tokens, temperature 0.8, top-k 40) ---\n{sample}\n---", flush=True)
    return {"losses": losses, "sample": sample, "tokens_per_step": tokens_per_step} if lead else {}


def _open_data_rank0_first(cfg: TrainConfig, mesh: Mesh, tokenizer):
    """Rank 0 tokenises (or finds the cache); the others wait, then open the cached stream."""
    if mesh.rank == 0:
        data = open_data(cfg, tokenizer)
    if mesh.device_mesh is not None:
        dist.barrier()
    if mesh.rank != 0:
        data = open_data(cfg, tokenizer)
    return data


def _announce(cfg, mesh, model, model_cfg, data, resume_path, start_step) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)}, f, indent=2)
    with open(os.path.join(cfg.out, "run.log"), "a") as f:   # one line per start: what each attempt did
        f.write(json.dumps({"time": time.time(), "attempt": faults.attempt(), "mesh": mesh.spec,
                            "start_step": start_step, "resumed_from": resume_path}) + "\n")
    print(f"meshtron: mesh {mesh.spec} ({mesh.world_size} ranks), layout {model.layout.rules or '(none)'}, "
          f"model {cfg.model} {model_cfg.num_params() / 1e6:.2f}M params, global batch {cfg.batch_size} x "
          f"{cfg.seq_len} tokens, {cfg.steps} steps -> {cfg.out}"
          + (f", resumed from {resume_path}" if resume_path else ""), flush=True)
    print(f"meshtron: data {data.describe()}", flush=True)
