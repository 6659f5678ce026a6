"""The options of `meshtron train`: one pydantic schema that is the single source of their names, types, ranges,
defaults and help texts (the command line is generated from it).

Invariants: a `TrainConfig` exists only if every value has its declared type (strictly: `"no"` is not a bool,
`3.7` is not an int) and range; `options_error` turns a validation failure into one line naming the option, the
value given, where it came from and what is expected. `model_config` derives the sizes an override leaves
implied (a new `d_model` scales a preset's `d_ff`) and refuses a `seq_len` above the model's context unless the
context is set explicitly.
"""
from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshtron.models import ModelConfig, get_preset

DEFAULT_SEQ_LEN = 128
_STRICT = ConfigDict(strict=True, extra="forbid", validate_assignment=True)
_PAIR = r"\s*[A-Za-z_][A-Za-z0-9_]*\s*:\s*[0-9]+\s*"
_MESH = re.compile(rf"^{_PAIR}([,;]{_PAIR})*[,;]?\s*$")          # sizes in ASCII digits only ('model:²' is not)


def _f(default, help_text: str, **constraints):
    return Field(default, description=help_text, **constraints)


def _x(default, help_text: str, **constraints):
    """A finite number (inf and nan refused)."""
    return Field(default, description=help_text, allow_inf_nan=False, **constraints)


class ModelOverrides(BaseModel):
    """Shape options that override the preset's (None: the preset's, or derived from the options given)."""
    model_config = _STRICT
    n_layer: Optional[int] = _f(None, "transformer blocks", ge=1)
    n_head: Optional[int] = _f(None, "attention heads (default: the preset's if it divides d_model)", ge=1)
    n_kv_head: Optional[int] = _f(None, "key/value heads (grouped-query attention; default: the preset's ratio)",
                                  ge=1)
    d_model: Optional[int] = _f(None, "hidden size", ge=1)
    d_ff: Optional[int] = _f(None, "MLP inner size (default: scaled with d_model as in the preset)", ge=1)
    dropout: Optional[float] = _x(None, "dropout probability, in [0, 1)", ge=0.0, lt=1.0)
    max_seq_len: Optional[int] = _f(None, "the model's context in tokens (needed for a --seq-len above the "
                                          "preset's)", ge=1)


class TrainConfig(BaseModel):
    """Everything a training run is a function of (with the data); saved as RUN_DIR/config.json."""
    model_config = _STRICT
    mesh: str = _f("model:1", "mesh axes and sizes, e.g. 'batch:2,model:2' (the last axis varies fastest: put "
                              "the model axis last)")
    layout: Optional[str] = _f(None, "layout rules, e.g. 'batch:batch;heads:model;d_ff:model;vocab:model' "
                                     "(default: Mesh-TensorFlow's rules for the axes the mesh has)")
    model: str = _f("gpt-mini", "model preset (gpt-tiny, gpt-mini, llama-tiny, llama-mini, gpt2, ..., llama-7b)")
    overrides: ModelOverrides = Field(default_factory=ModelOverrides, description="shape overrides")
    data: str = _f("builtin", "training text: a file, a folder of .txt/.md, a .jsonl with a 'text' field (each "
                              "maybe .gz), or 'builtin' (CPython's documentation)")
    tokenizer: str = _f("byte", "'byte', 'bpe' (train one on the data, see --vocab-size), 'gpt2', a "
                                "tokenizer.json, or a tokenizer folder")
    vocab_size: Optional[int] = _f(None, "vocabulary of a trained BPE tokenizer", ge=2)
    val_fraction: float = _x(0.05, "share of the data held out for validation, in [0, 1)", ge=0.0, lt=1.0)
    steps: int = _f(200, "optimizer steps (in total, counting resumed ones)", ge=1)
    batch_size: int = _f(16, "global batch, in sequences", ge=1)
    micro_batches: int = _f(1, "gradient accumulation steps per update (on each batch-axis rank)", ge=1)
    seq_len: int = _f(None, f"tokens per sequence, at most the model's context (max_seq_len); default "
                            f"{DEFAULT_SEQ_LEN}, or the context if it is shorter", ge=1)
    lr: float = _x(3e-3, "peak learning rate", gt=0.0)
    min_lr_ratio: float = _x(0.1, "final learning rate as a fraction of --lr (cosine decay), in [0, 1]",
                             ge=0.0, le=1.0)
    warmup_steps: int = _f(20, "linear warmup steps", ge=0)
    weight_decay: float = _x(0.1, "AdamW weight decay (not on norms and biases)", ge=0.0)
    clip: float = _x(1.0, "global gradient-norm clip (0: off)", ge=0.0)
    bf16: bool = _f(False, "bf16 autocast (float32 master weights, gradients and optimizer state)")
    recompute: str = _f("none", "activation recompute: none, selective (core attention: scores, softmax, dropout) "
                                "or full (each block keeps only its input)")
    zero: int = _f(0, "1: shard the optimizer state over the batch axis (ZeRO-1, Megatron's distributed optimizer; "
                      "no effect without a batch axis > 1)", ge=0, le=1)
    pipeline_schedule: str = _f("1f1b", "with a 'pipe' mesh axis: gpipe, 1f1b or interleaved")
    virtual_stages: int = _f(1, "layer chunks per pipeline rank (interleaved 1F1B; needs --pipeline-schedule "
                                "interleaved)", ge=1)
    seed: int = _f(0, "seed of weights, data order and dropout", ge=0, lt=2 ** 63)
    out: str = _f("runs/latest", "run folder: config.json, metrics.jsonl, checkpoints/", min_length=1)
    eval_every: int = _f(0, "steps between validation passes (0: only at the end)", ge=0)
    eval_batches: int = _f(8, "batches per validation pass", ge=1)
    save_every: int = _f(0, "steps between checkpoints (0: only at the end)", ge=0)
    keep: int = _f(3, "newest checkpoints kept (at least 1)", ge=1)
    stop_after: int = _f(0, "leave after this many steps of this invocation, saving a checkpoint (0: never)", ge=0)
    peak_tflops: Optional[float] = _x(None, "peak TFLOP/s of one GPU (or one CPU machine) for MFU; measured when "
                                            "not given", gt=0.0)
    sample_tokens: int = _f(200, "tokens to generate at the end (0: none)", ge=0)
    prompt: str = _f("The ", "prompt of the final sample")

    @model_validator(mode="before")
    @classmethod
    def _default_seq_len(cls, data):
        """No --seq-len: 128 tokens, or the model's (maybe overridden) context if it is shorter."""
        if isinstance(data, dict) and data.get("seq_len") is None:
            ov = data.get("overrides") or {}
            context = ov.get("max_seq_len") if isinstance(ov, dict) else getattr(ov, "max_seq_len", None)
            try:
                context = context or get_preset(data.get("model", cls.model_fields["model"].default)).max_seq_len
            except (ValueError, TypeError):
                return data                          # the model's own validator reports it
            data = {**data, "seq_len": min(DEFAULT_SEQ_LEN, context) if isinstance(context, int) else DEFAULT_SEQ_LEN}
        return data

    @field_validator("mesh")
    @classmethod
    def _mesh(cls, v: str) -> str:
        from meshtron.mesh import parse_mesh_spec
        if not _MESH.match(v):
            raise ValueError("write the mesh as 'name:size' pairs with sizes in digits 0-9, e.g. 'batch:2,model:2'")
        parse_mesh_spec(v)
        return v

    @field_validator("layout")
    @classmethod
    def _layout(cls, v):
        from meshtron.layout import LayoutRules
        if v is not None:
            LayoutRules.parse(v)
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        get_preset(v)
        return v

    @field_validator("recompute")
    @classmethod
    def _recompute(cls, v: str) -> str:
        from meshtron.models.base import RECOMPUTE
        if v not in RECOMPUTE:
            raise ValueError(f"use one of {', '.join(RECOMPUTE)}")
        return v

    @field_validator("pipeline_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        from meshtron.pipeline.schedule import SCHEDULES
        if v not in SCHEDULES:
            raise ValueError(f"use one of {', '.join(SCHEDULES)}")
        return v

    # ------------------------------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        from meshtron.mesh import parse_mesh_spec
        n = 1
        for size in parse_mesh_spec(self.mesh).values():
            n *= size
        return n

    def resolved_model(self, vocab_size: int) -> ModelConfig:
        return resolve_shape(self.model, self.overrides, vocab_size, self.seq_len)[0]

    def check(self, vocab_size: int) -> ModelConfig:
        """Everything that can be checked without starting a rank; raises ValueError with the fix."""
        from meshtron.layout import LayoutRules, validate
        from meshtron.mesh import parse_mesh_spec
        shape = parse_mesh_spec(self.mesh)
        cfg = self.resolved_model(vocab_size)
        rules = LayoutRules.parse(self.layout) if self.layout else LayoutRules.default_for(shape)
        validate(rules, shape, {**cfg.dim_sizes(), "batch": self.batch_size})
        dims = rules.as_dict()
        dp = shape.get(dims.get("batch"), 1)
        if (self.batch_size // dp) % self.micro_batches:
            raise ValueError(f"--batch-size {self.batch_size} over {dp} batch-axis ranks gives "
                             f"{self.batch_size // dp} sequences per rank, which do not split into "
                             f"--micro-batches {self.micro_batches}")
        if "seq" in dims and self.seq_len % shape[dims["seq"]]:
            raise ValueError(f"sequence parallelism ('seq:{dims['seq']}') splits each sequence over {shape[dims['seq']]} "
                             f"ranks: --seq-len {self.seq_len} must be a multiple of {shape[dims['seq']]}")
        stages = shape.get(dims.get("layers"), 1)
        if stages > 1:
            from meshtron.pipeline.schedule import check
            from meshtron.pipeline.stages import StagePlan
            StagePlan(cfg.n_layer, stages, 0, self.virtual_stages)
            check(self.pipeline_schedule, stages, self.micro_batches, self.virtual_stages)
        elif self.virtual_stages > 1:
            raise ValueError(f"--virtual-stages {self.virtual_stages} needs a 'pipe' mesh axis (e.g. --mesh "
                             f"pipe:2,{self.mesh})")
        return cfg

    def notes(self) -> list[str]:
        """Harmless but surprising combinations, said once at start."""
        from meshtron.layout import LayoutRules
        from meshtron.mesh import parse_mesh_spec
        shape = parse_mesh_spec(self.mesh)
        dims = (LayoutRules.parse(self.layout) if self.layout else LayoutRules.default_for(shape)).as_dict()
        out = []
        if self.zero and shape.get(dims.get("batch"), 1) == 1:
            out.append("--zero 1 has no effect: the mesh has no batch axis with more than one rank")
        stages = shape.get(dims.get("layers"), 1)
        if stages > 1 and self.pipeline_schedule != "gpipe" and self.micro_batches < stages:
            out.append(f"--micro-batches {self.micro_batches} is fewer than the {stages} pipeline stages: the "
                       f"pipeline idles most of each step (bubble (p-1)/m); use at least {stages}, better {4 * stages}")
        return out


def resolve_shape(preset: str, overrides: ModelOverrides, vocab_size: int, seq_len: int | None = None
                  ) -> tuple[ModelConfig, list[str]]:
    """The model a preset plus overrides means, and the names of the sizes derived (not given, not the preset's).

    A new d_model keeps the preset's n_head if it divides d_model (else its head size), and scales a preset's
    explicit d_ff by the same factor; a new n_head keeps the preset's query-to-key/value head ratio. Raises
    ValueError when a size cannot be derived, or when `seq_len` exceeds a context that was not set explicitly."""
    base = get_preset(preset)
    given = overrides.model_dump(exclude_none=True)
    shape = dict(given)
    derived = []
    d_model = shape.get("d_model", base.d_model)
    if "n_head" not in shape and d_model != base.d_model:
        if d_model % base.n_head == 0:
            shape["n_head"] = base.n_head
        elif d_model % base.head_dim == 0:
            shape["n_head"] = d_model // base.head_dim
            derived.append("n_head")
        else:
            raise ValueError(f"--d-model {d_model} is divisible neither by {preset}'s n_head {base.n_head} nor by its "
                             f"head size {base.head_dim}: give --n-head too")
    n_head = shape.get("n_head", base.n_head)
    if "n_kv_head" not in shape and base.n_kv_head is not None and n_head != base.n_head:
        ratio = base.n_head // base.kv_heads
        if n_head % ratio:
            raise ValueError(f"--n-head {n_head} does not keep {preset}'s {ratio} query heads per key/value head: "
                             f"give --n-kv-head too")
        shape["n_kv_head"] = n_head // ratio
        derived.append("n_kv_head")
    if "d_ff" not in shape and base.d_ff is not None and d_model != base.d_model:
        shape["d_ff"] = max(1, round(base.d_ff * d_model / base.d_model))
        derived.append("d_ff")
    context = shape.get("max_seq_len", base.max_seq_len)
    if seq_len is not None and seq_len > context:
        if "max_seq_len" in given:
            raise ValueError(f"--seq-len {seq_len} is longer than --max-seq-len {context}: lower --seq-len or raise "
                             f"--max-seq-len")
        raise ValueError(f"--seq-len {seq_len} is longer than {preset}'s context of {context} tokens: lower --seq-len, "
                         f"or pass --max-seq-len {seq_len} to build the model with a longer context")
    return base.replace(vocab_size=vocab_size, **shape), derived


def describe_shape(cfg: ModelConfig, derived: list[str]) -> str:
    """'gpt: n_layer=2 n_head=4 d_model=96 d_ff=384 (derived: d_ff) ...', the shape a run builds."""
    parts = [f"n_layer={cfg.n_layer}", f"n_head={cfg.n_head}", f"n_kv_head={cfg.kv_heads}",
             f"d_model={cfg.d_model}", f"d_ff={cfg.ffn_dim}", f"vocab_size={cfg.vocab_size}",
             f"max_seq_len={cfg.max_seq_len}", f"dropout={cfg.dropout}"]
    return (f"{cfg.family}: " + " ".join(parts) + (f" (derived: {', '.join(derived)})" if derived else "")
            + f", {cfg.num_params() / 1e6:.2f}M parameters")


# ---------------------------------------------------------------------------------------------- messages
def expected(model: type[BaseModel], name: str) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a number in [0, 1)', 'true or false', ..."""
    info = model.model_fields[name]
    ann = info.annotation
    args = [a for a in getattr(ann, "__args__", (ann,)) if a is not type(None)]
    kind = args[0] if args else ann
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))
    bounds = {}
    for m in info.metadata:
        for k in ("gt", "ge", "lt", "le"):
            if getattr(m, k, None) is not None:
                bounds[k] = getattr(m, k)
    if "ge" in bounds and ("lt" in bounds or "le" in bounds):
        hi, close = (bounds["lt"], ")") if "lt" in bounds else (bounds["le"], "]")
        words += f" in [{bounds['ge']}, {hi}{close}"
    else:
        sym = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        words += "".join(f" {sym[k]} {v}" for k, v in bounds.items())
    if len(args) < len(getattr(ann, "__args__", (ann,))):
        words += " (or leave it out)"
    return words


def options_error(err: ValidationError, where: dict[str, str], model: type[BaseModel] = TrainConfig) -> str:
    """One line per invalid option: where it came from, the option, the value given, what is wrong and expected.
    `where` maps an option name to its source ('flags' or a file's path)."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        owner, name = (ModelOverrides, loc[1]) if loc[0] == "overrides" and len(loc) > 1 else (model, loc[0])
        source = where.get(name, "options")
        shown = f"--{name.replace('_', '-')} {e['input']}" if source == "flags" else f"{name} = {e['input']!r}"
        if e["type"] == "extra_forbidden":
            known = sorted(set(TrainConfig.model_fields) - {"overrides"} | set(ModelOverrides.model_fields))
            lines.append(f"{source}: unknown option {name!r}; known options: {', '.join(known)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        hint = " (write it as a number, not a quoted string)" if isinstance(e["input"], str) and \
            e["type"] in ("int_type", "float_type") and _numeric(e["input"]) else ""
        want = f" (expected {expected(owner, name)})" if name in owner.model_fields and \
            not e["type"].startswith("value_error") else ""
        lines.append(f"{source}: {shown}: {msg}{want}{hint}")
    return "; ".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
