"""`meshtron train`: resolve the options (defaults < resumed run < config file < flags) against the schema in
meshtron.train.config, check them, lock the run folder, then start the mesh's ranks (or join torchrun's) and
train; restart from the newest checkpoint (or from scratch) after a rank dies; stop cleanly on SIGTERM.

Invariant: nothing is written (not even the run folder) before every option has been validated, and every
error a user can fix ends in one `meshtron train: error: ...` line, not in a rank's traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from pydantic import BaseModel, Field, ValidationError

LOCAL_WARN_PER_CORE = 4     # more local ranks than this per core: warn (slow)
LOCAL_MAX_PER_CORE = 16     # ... than this: refuse (the machine would only thrash)


class LaunchOptions(BaseModel):
    """The options of this invocation that are not part of the run's configuration."""
    model_config = {"strict": True, "extra": "forbid"}
    max_restarts: int = Field(0, ge=0, description="restart the job from its newest checkpoint (or from scratch "
                                                   "before the first one) this many times after a rank dies")
    threads_per_rank: Optional[int] = Field(None, ge=1, description="compute threads of each rank (default: the "
                                                                    "cores divided by the ranks)")
    resume_step: Optional[int] = Field(None, ge=0, description="with --resume: continue from the checkpoint of "
                                                               "this step instead of the newest")
    grace_period: float = Field(120.0, gt=0, allow_inf_nan=False, description="seconds the ranks get, after "
                                "SIGTERM, to finish their step and save it (then they are killed)")


def _flag_type(annotation):
    args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
    return args[0] if args else annotation


def _help(info) -> str:
    default = info.get_default(call_default_factory=True)
    return f"{info.description} (default: {default})" if default is not None else info.description


def add_arguments(p: argparse.ArgumentParser) -> None:
    from meshtron.train.config import ModelOverrides, TrainConfig
    p.add_argument("--config", help="a TOML or YAML file of options (keys as the flags, with '_')")
    p.add_argument("--resume", metavar="RUN_OR_CHECKPOINT", help="continue the run in RUN_DIR from its newest "
                   "checkpoint, or from RUN_DIR/checkpoints/step_N (on this or another mesh)")
    for name, info in LaunchOptions.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), type=_flag_type(info.annotation), default=None,
                       help=_help(info))
    for name, info in TrainConfig.model_fields.items():
        if name == "overrides":
            continue
        kind = _flag_type(info.annotation)
        if kind is bool:
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                           help=_help(info))
        else:
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_help(info))
    for name, info in ModelOverrides.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), type=_flag_type(info.annotation), default=None,
                       help=f"override the preset's {name}: {info.description}")


def read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
    except Exception as e:  # noqa: BLE001 - TOML and YAML syntax errors: say where
        raise ValueError(f"config file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of options")
    return data


def launch_options(args) -> LaunchOptions:
    given = {k: getattr(args, k) for k in LaunchOptions.model_fields if getattr(args, k, None) is not None}
    try:
        return LaunchOptions(**given)
    except ValidationError as e:
        from meshtron.train.config import options_error
        raise ValueError(options_error(e, {k: "flags" for k in given}, LaunchOptions)) from None


def _fit_saved_layout(values: dict, flags: dict) -> None:
    """Resuming on another mesh: the saved layout rules keep only the axes the new mesh has, and the pipeline's
    virtual stages go without a pipe axis (the model computed is the same whatever the layout); flags given with
    the new mesh win."""
    from meshtron.mesh import parse_mesh_spec
    try:
        axes = set(parse_mesh_spec(flags["mesh"]))
    except ValueError:
        return                                      # the schema reports the bad mesh
    if "layout" not in flags and values.get("layout"):
        kept = [r for r in str(values["layout"]).replace(",", ";").split(";")
                if r.strip() and r.split(":")[-1].strip() in axes]
        values["layout"] = ";".join(kept) or None
    if "virtual_stages" not in flags and values.get("virtual_stages", 1) != 1:
        from meshtron.layout import LayoutRules
        dims = LayoutRules.parse(values["layout"]).as_dict() if values.get("layout") else {"layers": "pipe"}
        if dims.get("layers") not in axes:
            values["virtual_stages"] = 1


def resolve(args, launch: LaunchOptions | None = None):
    """(TrainConfig, checkpoint to resume from or None), from defaults < the resumed checkpoint's configuration <
    config file < flags. Unknown keys, wrong types and out-of-range values are ValueErrors naming them."""
    from meshtron.checkpoint import find_resume, read_meta
    from meshtron.train.config import ModelOverrides, TrainConfig, options_error
    launch = launch or launch_options(args)
    values: dict = {}
    overrides: dict = {}
    where: dict[str, str] = {}

    def merge(source: dict, origin: str):
        for key, value in source.items():
            key = str(key).replace("-", "_")
            if key in ModelOverrides.model_fields:
                overrides[key] = value
            elif key == "overrides" and isinstance(value, dict):
                overrides.update({k: v for k, v in value.items() if v is not None or k not in overrides})
                where.update({k: origin for k in value})
                continue
            else:
                values[key] = value
            where[key] = origin

    resume_from = None
    if args.resume:
        run, resume_from = find_resume(args.resume, launch.resume_step)
        if resume_from is None:
            raise ValueError(f"--resume {args.resume}: no complete checkpoint under "
                             f"{os.path.join(run, 'checkpoints')}; train without --resume to start a new run")
        if args.out is not None and os.path.realpath(args.out) != os.path.realpath(run):
            raise ValueError(f"--resume {args.resume} continues the run in its own folder {run}, but --out says "
                             f"{args.out}: leave --out out (a run is resumed where it lives), or copy the run "
                             f"folder to {args.out} and resume that")
        saved = read_meta(resume_from, verify=False).get("train")
        if not isinstance(saved, dict):
            path = os.path.join(run, "config.json")
            try:
                with open(path) as f:
                    saved = json.load(f)["train"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"--resume {args.resume}: neither {resume_from} nor {path} records the run's "
                                 f"options; is it a meshtron run folder?") from None
        saved = dict(saved)
        saved.pop("stop_after", None)
        merge(saved, resume_from)
        values["out"] = run
    elif launch.resume_step is not None:
        raise ValueError("--resume-step needs --resume RUN_DIR")
    if args.config:
        merge(read_config_file(args.config), args.config)
    flags = {k: getattr(args, k) for k in TrainConfig.model_fields if getattr(args, k, None) is not None}
    flags.update({k: getattr(args, k) for k in ModelOverrides.model_fields if getattr(args, k, None) is not None})
    if args.resume:
        flags.pop("out", None)
        if "mesh" in flags:
            _fit_saved_layout(values, flags)
    merge(flags, "flags")
    try:
        cfg = TrainConfig(**values, overrides=overrides)
    except ValidationError as e:
        raise ValueError(options_error(e, where)) from None
    if cfg.warmup_steps > cfg.steps:
        cfg.warmup_steps = cfg.steps
    return cfg, resume_from


def get_vocab_for_check(cfg) -> int:
    """Under torchrun each rank opens the data itself; the shape checks use the preset's vocabulary."""
    from meshtron.models import get_preset
    return get_preset(cfg.model).vocab_size


def check_local_world(world: int) -> str | None:
    """A warning for a mesh that oversubscribes this machine's cores; ValueError for an absurd one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if world > LOCAL_MAX_PER_CORE * cores:
        raise ValueError(f"the mesh has {world} ranks, but this machine has {cores} cores: at most "
                         f"{LOCAL_MAX_PER_CORE * cores} ranks are started here; use a smaller mesh, or start the "
                         f"ranks on several machines with torchrun")
    if world > LOCAL_WARN_PER_CORE * cores:
        return f"warning: {world} ranks on {cores} cores: each rank gets a small share of a core; expect a slow run"
    return None


def run(args) -> int:
    from meshtron.launch import under_launcher
    from meshtron.train.runlock import RunLock
    try:
        launch = launch_options(args)
        cfg, resume_from = resolve(args, launch)
        launched = under_launcher()
        warning = None if launched else check_local_world(cfg.world_size)
        cfg.check(get_vocab_for_check(cfg))   # the layout and shape (the data's vocabulary is checked later, too);
                                              # under torchrun every rank checks alike, so all fail alike
    except ValueError as e:
        return _error(e, 2)
    if launched and os.environ.get("RANK", "0") != "0":     # rank 0 locks, reports and prepares the folder
        return _train_here(cfg, resume_from)
    if warning:
        print(f"meshtron train: {warning}", file=sys.stderr, flush=True)
    try:
        with RunLock(cfg.out) as lock:
            if lock.previous and lock.previous.get("pid") != os.getpid():
                print(f"meshtron train: took over the lock of PID {lock.previous.get('pid')} on "
                      f"{lock.previous.get('host')}, which is no longer running", flush=True)
            return _prepare_and_train(launch, cfg, resume_from, launched)
    except ValueError as e:
        return _error(e, 2)


def _prepare_and_train(launch, cfg, resume_from, launched) -> int:
    import dataclasses

    from meshtron.checkpoint import (check_model_matches, checkpoint_step, read_dcp_metadata, read_meta,
                                     supersede_after)
    from meshtron.train.config import describe_shape, resolve_shape
    from meshtron.train.loop import checkpoint_root, open_data
    try:
        meta = read_meta(resume_from, verify=True) if resume_from else None   # a bad checkpoint fails here, once
        if meta is not None:
            read_dcp_metadata(resume_from, set(meta["files"]))                  # ... and a crafted one
        if not launched:   # tokenise once here (cached for the ranks); bad data fails before any rank starts
            from meshtron.data import load_tokenizer
            tokenizer = load_tokenizer(os.path.join(resume_from, "tokenizer")) if resume_from else None
            vocab = open_data(cfg, tokenizer, log=lambda m: print(f"meshtron train: {m}", flush=True)
                              ).tokenizer.vocab_size
            cfg.check(vocab)
        else:
            vocab = get_vocab_for_check(cfg)
        shape, derived = resolve_shape(cfg.model, cfg.overrides, vocab, cfg.seq_len)
        if meta is not None:
            check_model_matches(meta, dataclasses.asdict(shape), resume_from)
    except ValueError as e:
        return _error(e, 2)
    shown = {**cfg.model_dump(), "overrides": cfg.overrides.model_dump(exclude_none=True)}
    print("meshtron train: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    print(f"meshtron train: model {cfg.model}, {describe_shape(shape, derived)}", flush=True)
    for note in cfg.notes():
        print(f"meshtron train: note: {note}", flush=True)
    if resume_from is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        for moved in supersede_after(checkpoint_root(cfg), checkpoint_step(resume_from)):
            print(f"meshtron train: resuming from step {checkpoint_step(resume_from)}: the later checkpoint is "
                  f"moved to {moved}", flush=True)
    if launched or (cfg.world_size == 1 and launch.max_restarts == 0):
        return _train_here(cfg, resume_from)
    return _launch(cfg, resume_from, launch)


def _train_here(cfg, resume_from) -> int:
    """This process is the (only, or torchrun's) rank."""
    from meshtron.train.loop import run_training
    try:
        run_training(cfg, resume_from)
    except (ValueError, FloatingPointError) as e:
        return _error(e, 1)
    return 0


def _launch(cfg, resume_from, launch) -> int:
    """Start the mesh's ranks here; restart them after a failure that a restart can fix."""
    from meshtron.launch import RankError, run_ranks
    from meshtron.train.loop import run_training
    for attempt in range(launch.max_restarts + 1):
        try:
            results = run_ranks(run_training, cfg.world_size, cfg, resume_from,
                                threads_per_rank=launch.threads_per_rank, timeout_s=7 * 24 * 3600,
                                env={"MESHTRON_ATTEMPT": str(attempt)}, sigterm_grace_s=launch.grace_period)
        except RankError as e:
            if e.kind == "preempt-timeout":
                from meshtron.checkpoint import latest_checkpoint
                from meshtron.train.loop import checkpoint_root
                print(f"meshtron train: error: {e.summary}; the newest complete checkpoint is "
                      f"{latest_checkpoint(checkpoint_root(cfg))}", file=sys.stderr, flush=True)
                return 1
            if e.fatal or attempt == launch.max_restarts:
                clear = e.fatal or e.kind in ("killed", "stopped", "CollectiveError")
                print(f"meshtron train: error: {e.summary}" + ("" if clear else f"\n{e.traceback}"), file=sys.stderr,
                      flush=True)
                return 1
            print(f"meshtron train: {e.summary}; restarting from the newest checkpoint, or from scratch if there is "
                  f"none (restart {attempt + 1} of {launch.max_restarts})", file=sys.stderr, flush=True)
            continue
        if results[0].get("preempted") is not None:
            print(f"meshtron train: stopped after step {results[0]['preempted']} (checkpoint saved); continue with "
                  f"--resume {cfg.out}", flush=True)
        return 0
    return 1


def _error(e: BaseException, code: int) -> int:
    print(f"meshtron train: error: {e}", file=sys.stderr, flush=True)
    return code
