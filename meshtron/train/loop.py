"""The `meshtron train` job on one rank: data, mesh and model; train, validate, checkpoint; then sample text.

Invariants: with the same seed, data and global batch the logged losses are the same on every mesh; a run
resumed from its checkpoint (on any mesh) sees exactly the batches, learning rates and dropout masks an
uninterrupted run would; rank 0 alone prints and writes the run folder's logs. A restarted attempt continues
from the newest checkpoint, or from scratch when there is none yet. After SIGTERM every rank finishes the
current step, saves it and returns (see meshtron.train.preempt).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch

from meshtron import checkpoint, faults
from meshtron.comm import collectives as C
from meshtron.mesh import Mesh
from meshtron.models import build_model
from meshtron.train import preempt
from meshtron.train.config import TrainConfig
from meshtron.train.step import TrainStep, evaluate

__all__ = ["TrainConfig", "checkpoint_root", "lr_at", "open_data", "resume_point", "run_training"]


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


def resume_point(cfg: TrainConfig, resume_from: str | None) -> str | None:
    """The checkpoint to continue from: on the first attempt `resume_from` (the one --resume chose, or None for
    a new run); after an automatic restart (torchrun or meshtron's launcher), the newest complete one, or None
    (from scratch) if the crash came before the first checkpoint."""
    if faults.attempt() > 0:
        return checkpoint.latest_checkpoint(checkpoint_root(cfg))
    return resume_from


def run_training(cfg: TrainConfig, resume_from: str | None = None) -> dict:
    """Run on every rank (started by `meshtron.launch` or torchrun). Returns rank 0's summary (every rank's
    carries `preempted`: the step saved after SIGTERM, or None)."""
    with preempt.handling():
        return _run(cfg, resume_from)


def _run(cfg: TrainConfig, resume_from: str | None) -> dict:
    from meshtron.data import load_tokenizer
    from meshtron.inference import sample_ids
    from meshtron.train.flops import model_flops_per_token, mfu, peak_flops_total
    from meshtron.train.metrics import MetricsLogger
    resume_path = resume_point(cfg, resume_from)
    meta = checkpoint.read_meta(resume_path) if resume_path else None
    mesh = Mesh.from_spec(cfg.mesh)
    lead = mesh.rank == 0
    tokenizer = load_tokenizer(os.path.join(resume_path, "tokenizer")) if resume_path else None
    data = _open_data_rank0_first(cfg, mesh, tokenizer)
    tok = data.tokenizer
    model_cfg = cfg.resolved_model(tok.vocab_size)
    if meta:
        checkpoint.check_model_matches(meta, dataclasses.asdict(model_cfg), resume_path)
    model = build_model(model_cfg, mesh, cfg.layout, seed=cfg.seed, virtual_stages=cfg.virtual_stages)
    trainer = TrainStep(model, mesh, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip,
                        micro_batches=cfg.micro_batches, bf16=cfg.bf16, recompute=cfg.recompute, zero=cfg.zero,
                        pipeline_schedule=cfg.pipeline_schedule)
    faults.arm(mesh.rank, model, trainer.optimizer)
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
                            mesh.device.type, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                            peak_tflops=cfg.peak_tflops) if lead else 0.0
    flops_per_token = model_flops_per_token(model_cfg, cfg.seq_len)
    log = MetricsLogger(cfg.out, cfg.steps, enabled=lead, start_step=start_step)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses = []

    def save(step: int) -> None:
        checkpoint.save_checkpoint(
            checkpoint_root(cfg), step, model, mesh, trainer.optimizer, keep=cfg.keep,
            meta={"model": dataclasses.asdict(model_cfg), "train": cfg.model_dump(),
                  "data": sampler.state_dict()},
            write_extra=lambda folder: tok.save(os.path.join(folder, "tokenizer")))

    def validate_now(step: int) -> None:
        val = evaluate(model, data.val_batches(cfg.batch_size, batch_axis.coord, batch_axis.size,
                                                max_batches=cfg.eval_batches), batch_axis, bf16=cfg.bf16)
        log.log_val(step, val)

    preempted = None
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            model.rng.reseed(step)
            faults.at_step(step + 1)
            faults.point("data")
            batch = sampler.local_batch(cfg.batch_size, batch_axis.coord, batch_axis.size)
            out = trainer.step(batch, lr=lr)
            dt = time.perf_counter() - t0
            done = step + 1
            losses.append(out["loss"])
            tps = tokens_per_step / dt
            log.log_train(done, out["loss"], lr, tps, grad_norm=out["grad_norm"], step_time_s=dt,
                          mfu=mfu(tps, flops_per_token, peak) if lead else None,
                          peak_memory_mib=per_rank_peak_memory(mesh))
            faults.point("step")
            if preempt.agreed(C.world(), mesh.device):     # every rank stops after this same step
                preempted = done
            stopping = preempted is not None or (bool(cfg.stop_after) and done - start_step >= cfg.stop_after)
            if preempted is None and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                validate_now(done)
            if done == cfg.steps or stopping or (cfg.save_every and done % cfg.save_every == 0):
                save(done)
            if stopping:
                break
    finally:
        log.close()
    if preempted is not None:
        if lead:
            print(f"meshtron: {preempt.requested() or 'a signal on another rank'}: stopped after step {preempted} "
                  f"and saved it; continue with: meshtron train --resume {cfg.out}", flush=True)
        return {"preempted": preempted, "losses": losses}
    sample = ""
    if cfg.sample_tokens > 0 and model.pipelined:
        if lead:
            print(f"meshtron: no sample from a pipelined model; generate one with: meshtron generate {cfg.out} "
                  f"--mesh model:1", flush=True)
    elif cfg.sample_tokens > 0 and not preempt.agreed(C.world(), mesh.device):
        model.eval()
        prompt = torch.tensor([tok.encode(cfg.prompt) or [tok.eot_id]])
        ids = sample_ids(model, prompt, cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
        sample = tok.decode(ids[0].tolist())
        if lead:
            print(f"--- sample ({cfg.sample_tokens} tokens, temperature 0.8, top-k 40) ---\n{sample}\n---", flush=True)
    summary = {"losses": losses, "sample": sample, "tokens_per_step": tokens_per_step} if lead else {}
    return {**summary, "preempted": None}


def per_rank_peak_memory(mesh: Mesh) -> list[float]:
    """Every rank's peak memory so far, MiB (CUDA: the allocator's peak; CPU: the process's peak RSS); collective
    over the world (one small all-gather)."""
    from meshtron.train.metrics import peak_memory_bytes
    mine = torch.tensor([peak_memory_bytes(mesh.device) / 2 ** 20], dtype=torch.float64, device=mesh.device)
    if mesh.world_size == 1:
        return [round(mine.item(), 1)]
    every = C.all_gather_into(mine, C.world(), mesh.world_size)
    return [round(v, 1) for v in every.tolist()]


def _open_data_rank0_first(cfg: TrainConfig, mesh: Mesh, tokenizer):
    """Rank 0 tokenises (or finds the cache); the others wait, then open the cached stream."""
    if mesh.rank == 0:
        data = open_data(cfg, tokenizer)
    C.barrier(C.world())
    if mesh.rank != 0:
        data = open_data(cfg, tokenizer)
    return data


def _announce(cfg, mesh, model, model_cfg, data, resume_path, start_step) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump({"train": cfg.model_dump(), "model": dataclasses.asdict(model_cfg)}, f, indent=2)
    with open(os.path.join(cfg.out, "run.log"), "a") as f:   # one line per start: what each attempt did
        f.write(json.dumps({"time": time.time(), "attempt": faults.attempt(), "mesh": mesh.spec,
                            "start_step": start_step, "resumed_from": resume_path}) + "\n")
    print(f"meshtron: mesh {mesh.spec} ({mesh.world_size} ranks), layout {model.layout.rules or '(none)'}, "
          f"model {cfg.model} {model_cfg.num_params() / 1e6:.2f}M params, global batch {cfg.batch_size} x "
          f"{cfg.seq_len} tokens, {cfg.steps} steps -> {cfg.out}"
          + (f", resumed from {resume_path}" if resume_path else ""), flush=True)
    print(f"meshtron: data {data.describe()}", flush=True)
