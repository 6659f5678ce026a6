"""Hugging Face GPT-2 and Llama folders in and out of meshtron: read them whole, load them shard by shard into a
model on any mesh, and export a meshtron state back to a folder `transformers.from_pretrained` loads.

Invariant: every meshtron parameter has one `Source` (a Hugging Face tensor, whether it is stored transposed as
GPT-2's Conv1D [in, out], and where along the output features it starts inside a fused tensor such as c_attn),
so a rank reads exactly the rows and columns its `ShardSpec` owns: from safetensors only those bytes are read;
vocabulary padding rows are zero. PyTorch `.bin` files cannot be sliced lazily and are read whole.
Config mapping (and refusing unsupported fields) is `meshtron.models.hf_config`; `config_to_hf` is its inverse.
Mistral configs without a sliding window load as Llama (same tensor names); export always writes Llama.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from meshtron.models.config import ModelConfig
from meshtron.models.hf_config import HFConfigError, config_from_hf, load_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
# Tensors a Hugging Face checkpoint may hold that are not weights (old GPT-2 attention masks, rotary caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Source:
    """Where a meshtron parameter lives in the Hugging Face checkpoint."""
    key: str                    # Hugging Face name, with its usual prefix ('transformer.', 'model.')
    hf_shape: tuple[int, ...]   # shape of that stored tensor
    shape: tuple[int, ...]      # meshtron's logical shape of the parameter
    transpose: bool = False     # stored [in, out] (GPT-2 Conv1D)
    offset: int = 0             # first output feature inside a fused tensor (c_attn: 0, d, 2d)


def _src(key: str, hf_shape: tuple[int, ...], transpose: bool = False, offset: int = 0,
         width: int | None = None) -> Source:
    """`width`: output features taken from a fused tensor (c_attn holds q, k and v side by side)."""
    shape = hf_shape[::-1] if transpose else hf_shape
    if width is not None:
        shape = (width,) + tuple(shape[1:])
    return Source(key, tuple(hf_shape), tuple(shape), transpose, offset)


def sources(cfg: ModelConfig) -> dict[str, Source]:
    """meshtron parameter name -> its Source, for the model `cfg` describes."""
    d, f, v, kv = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.kv_heads * cfg.head_dim
    out: dict[str, Source] = {}
    if cfg.family == "gpt":
        t = "transformer."
        out["wte.weight"] = _src(t + "wte.weight", (v, d))
        out["wpe"] = _src(t + "wpe.weight", (cfg.max_seq_len, d))
        for i in range(cfg.n_layer):
            h, b = f"{t}h.{i}.", f"blocks.{i}."
            for ln in ("ln_1", "ln_2"):
                for w in ("weight", "bias"):
                    out[f"{b}{ln}.{w}"] = _src(f"{h}{ln}.{w}", (d,))
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{b}attn.{name}.weight"] = _src(f"{h}attn.c_attn.weight", (d, 3 * d), True, j * d, d)
                out[f"{b}attn.{name}.bias"] = _src(f"{h}attn.c_attn.bias", (3 * d,), False, j * d, d)
            out[f"{b}attn.o_proj.weight"] = _src(f"{h}attn.c_proj.weight", (d, d), True)
            out[f"{b}attn.o_proj.bias"] = _src(f"{h}attn.c_proj.bias", (d,))
            out[f"{b}mlp.up_proj.weight"] = _src(f"{h}mlp.c_fc.weight", (d, f), True)
            out[f"{b}mlp.up_proj.bias"] = _src(f"{h}mlp.c_fc.bias", (f,))
            out[f"{b}mlp.down_proj.weight"] = _src(f"{h}mlp.c_proj.weight", (f, d), True)
            out[f"{b}mlp.down_proj.bias"] = _src(f"{h}mlp.c_proj.bias", (d,))
        out["ln_f.weight"] = _src(t + "ln_f.weight", (d,))
        out["ln_f.bias"] = _src(t + "ln_f.bias", (d,))
    else:
        m = "model."
        out["embed.weight"] = _src(m + "embed_tokens.weight", (v, d))
        for i in range(cfg.n_layer):
            h, b = f"{m}layers.{i}.", f"blocks.{i}."
            out[f"{b}attn_norm.weight"] = _src(f"{h}input_layernorm.weight", (d,))
            out[f"{b}mlp_norm.weight"] = _src(f"{h}post_attention_layernorm.weight", (d,))
            for name, shape in (("q_proj", (d, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, d))):
                out[f"{b}attn.{name}.weight"] = _src(f"{h}self_attn.{name}.weight", shape)
            for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                out[f"{b}mlp.{name}.weight"] = _src(f"{h}mlp.{name}.weight", shape)
        out["norm.weight"] = _src(m + "norm.weight", (d,))
    if not cfg.tied:
        out["head.weight"] = _src("lm_head.weight", (v, d))
    return out


class _Checkpoint:
    """The weight files of a Hugging Face folder: safetensors (one file or sharded with an index) or
    pytorch_model.bin (likewise). Names are resolved with or without the base-model prefix."""

    def __init__(self, hf_dir: str):
        self.dir, self._open = hf_dir, {}
        for index, single, safe in (("model.safetensors.index.json", "model.safetensors", True),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin", False)):
            self.safe = safe
            if os.path.exists(os.path.join(hf_dir, index)):
                with open(os.path.join(hf_dir, index)) as f:
                    self.files: dict[str, str] = dict(json.load(f)["weight_map"])   # tensor name -> file
                return
            if os.path.exists(os.path.join(hf_dir, single)):
                names = self._handle(single).keys() if safe else self._load_bin(single)
                self.files = {k: single for k in names}
                return
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or their .index.json")

    def _handle(self, file: str):
        if file not in self._open:
            from safetensors import safe_open
            self._open[file] = safe_open(os.path.join(self.dir, file), framework="pt")
        return self._open[file]

    def _load_bin(self, file: str) -> dict:
        if file not in self._open:
            from meshtron.load import load_torch_weights   # tensors only, never code
            self._open[file] = load_torch_weights(os.path.join(self.dir, file))
        return self._open[file]

    def keys(self) -> set[str]:
        return set(self.files)

    def resolve(self, key: str) -> str | None:
        if key in self.files:
            return key
        short = key.split(".", 1)[1] if key.startswith(("transformer.", "model.")) else None
        return short if short in self.files else None

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.files[key]
        if self.safe:
            return tuple(self._handle(file).get_slice(key).get_shape())
        return tuple(self._load_bin(file)[key].shape)

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        file = self.files[key]
        if self.safe:
            return self._handle(file).get_slice(key)[index]
        return self._load_bin(file)[key][index].clone()


def _check_keys(ckpt: _Checkpoint, srcs: dict[str, Source], cfg: ModelConfig) -> dict[str, str]:
    """meshtron name -> resolved checkpoint key; fail on missing tensors, wrong shapes, or unknown weights."""
    resolved, missing = {}, []
    for name, src in srcs.items():
        key = ckpt.resolve(src.key)
        if key is None:
            missing.append(src.key)
            continue
        if ckpt.shape(key) != src.hf_shape:
            raise ValueError(f"{ckpt.dir}: tensor {key} has shape {ckpt.shape(key)}, the config implies "
                             f"{src.hf_shape}: config.json and the weights disagree")
        resolved[name] = key
    if missing:
        hint = " (untied output layer: tie_word_embeddings is false)" if "lm_head.weight" in missing else ""
        raise ValueError(f"{ckpt.dir}: missing tensors {sorted(missing)[:5]}{hint}")
    used = set(resolved.values())
    extra = sorted(k for k in ckpt.keys() - used if not k.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tied and k == "lm_head.weight"))
    if extra:
        raise HFConfigError(f"{ckpt.dir}: tensors meshtron's {cfg.family} model has no place for: "
                                  f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return resolved


def _read(ckpt: _Checkpoint, key: str, src: Source, full_shape, split_dim=None, rows=None) -> torch.Tensor:
    """The meshtron tensor (or its [rows) slice along split_dim, zero-padded past the real size) of `src`."""
    ranges = [(0, n) for n in full_shape]
    pad = 0
    if split_dim is not None:
        lo, hi = rows
        valid_hi = min(hi, full_shape[split_dim])
        pad = hi - max(lo, valid_hi)
        ranges[split_dim] = (lo, valid_hi) if valid_hi > lo else (0, 0)
    ranges[0] = (ranges[0][0] + src.offset, ranges[0][1] + src.offset)
    if src.transpose:
        ranges = ranges[::-1]
    t = ckpt.read(key, tuple(slice(a, b) for a, b in ranges))   # empty if this rank holds only padding
    if src.transpose:
        t = t.t()
    if pad:
        pad_shape = list(t.shape)
        pad_shape[split_dim] = pad
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=split_dim)
    return t.contiguous()


def is_hf_dir(path: str) -> bool:
    """True for a folder holding a Hugging Face config.json (with model_type) and weights."""
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.exists(cfg)):
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
    with open(cfg) as f:
        return "model_type" in json.load(f) and any(os.path.exists(os.path.join(path, w)) for w in weights)


def read_hf_config(hf_dir: str) -> ModelConfig:
    return config_from_hf(load_hf_config(hf_dir))


def read_hf(hf_dir: str, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, meshtron name -> full logical tensor) of a Hugging Face folder; `dtype` None keeps the stored one."""
    cfg = read_hf_config(hf_dir)
    ckpt, srcs = _Checkpoint(hf_dir), sources(cfg)
    keys = _check_keys(ckpt, srcs, cfg)
    state = {}
    for name, src in srcs.items():
        t = _read(ckpt, keys[name], src, src.shape)
        state[name] = t.to(dtype) if dtype is not None else t
    return cfg, state


_COMPARED = ("family", "vocab_size", "n_layer", "n_head", "kv_heads", "d_model", "ffn_dim", "max_seq_len",
             "tied", "norm_eps", "rope_theta")


@torch.no_grad()
def load_hf_into(model: torch.nn.Module, hf_dir: str) -> None:
    """Load a Hugging Face folder into a meshtron model on any mesh; each rank reads only its own shards."""
    cfg = read_hf_config(hf_dir)
    skip = ("rope_theta",) if cfg.family == "gpt" else ("max_seq_len",)     # no effect on that family
    diff = [f"{k}: model {getattr(model.config, k)!r}, checkpoint {getattr(cfg, k)!r}" for k in _COMPARED
            if k not in skip and getattr(model.config, k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"{hf_dir} does not describe this model: " + "; ".join(diff))
    ckpt, srcs = _Checkpoint(hf_dir), sources(cfg)
    keys = _check_keys(ckpt, srcs, cfg)
    params = dict(model.named_parameters())
    if set(params) != set(srcs):
        raise ValueError(f"model parameters and Hugging Face mapping differ: {sorted(set(params) ^ set(srcs))[:5]}")
    for name, p in params.items():
        spec = p.shard
        if spec.full_shape != srcs[name].shape:
            raise ValueError(f"{name}: model expects {spec.full_shape}, {keys[name]} gives {srcs[name].shape}")
        rows = spec.local_range() if spec.split_dim is not None else None
        t = _read(ckpt, keys[name], srcs[name], spec.full_shape, spec.split_dim, rows)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name}: read {tuple(t.shape)} from {keys[name]}, this rank holds {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))


def build_from_hf(hf_dir: str, mesh, rules=None):
    """A meshtron model on `mesh` holding the weights of a Hugging Face folder (sharded on load)."""
    from meshtron.models import build_model
    model = build_model(read_hf_config(hf_dir), mesh, rules)
    load_hf_into(model, hf_dir)
    return model


def tokenizer_files(hf_dir: str) -> list[str]:
    """Paths of the tokenizer files in a Hugging Face folder (to copy next to a converted checkpoint)."""
    return [os.path.join(hf_dir, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]


def to_hf_state(cfg: ModelConfig, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """meshtron full state -> Hugging Face state dict (GPT-2's Conv1D transposes and fused c_attn rebuilt)."""
    srcs = sources(cfg)
    missing, extra = sorted(set(srcs) - set(full_state)), sorted(set(full_state) - set(srcs))
    if missing or extra:
        raise ValueError(f"the state does not match this {cfg.family} config (tied={cfg.tied}): missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, src in srcs.items():
        t = full_state[name].detach().cpu()
        parts.setdefault(src.key, []).append((src.offset, t.t() if src.transpose else t))
    out = {}
    for key, pieces in parts.items():
        pieces.sort(key=lambda x: x[0])
        dim = 1 if key.endswith("c_attn.weight") else 0
        t = pieces[0][1] if len(pieces) == 1 else torch.cat([p for _, p in pieces], dim=dim)
        want = next(s.hf_shape for s in srcs.values() if s.key == key)
        if tuple(t.shape) != want:
            raise ValueError(f"{key}: built shape {tuple(t.shape)} from the state, Hugging Face expects {want}")
        out[key] = t.contiguous().clone()
    return out


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json that makes `transformers` build the same model (GPT2LMHeadModel / LlamaForCausalLM)."""
    if cfg.family == "gpt":
        if cfg.kv_heads != cfg.n_head:
            raise HFConfigError(f"a GPT with n_kv_head={cfg.kv_heads} != n_head={cfg.n_head} has no Hugging "
                                "Face GPT-2 equivalent (GPT-2 has no grouped-query attention)")
        out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
               "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
               "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
               "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
               "initializer_range": cfg.init_std, "scale_attn_weights": True, "tie_word_embeddings": cfg.tied}
        if cfg.vocab_size <= 50256:               # GPT-2's default <|endoftext|> id would be out of range
            out.update(bos_token_id=None, eos_token_id=None)
    else:
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
               "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
               "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
               "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
               "rope_theta": cfg.rope_theta, "rope_scaling": None,       # read by transformers 4.x
               "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},   # and by 5.x
               "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout,
               "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tied}
    out.update(dtype=dtype, torch_dtype=dtype)
    return out


def export_hf(cfg: ModelConfig, full_state: dict[str, torch.Tensor], out_dir: str, tokenizer_dir: str | None = None,
              extra_config: dict | None = None, tokenizer=None) -> None:
    """Write config.json + model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads
    as GPT2LMHeadModel / LlamaForCausalLM, and the tokenizer: `tokenizer` (a meshtron Tokenizer; default: loaded
    from `tokenizer_dir`) as files AutoTokenizer loads and that encode as meshtron does (a byte tokenizer as an
    equivalent byte-level tokenizer.json); Hugging Face files in `tokenizer_dir` (tokenizer_config.json, a chat
    template) are copied. Its end-of-text id goes into config.json and generation_config.json (eos, bos, pad), so
    transformers' generation stops where meshtron's does. `extra_config` is merged into config.json last. Files get
    the usual mode (0666 less the umask), not safetensors' 0600."""
    from safetensors.torch import save_file
    state = to_hf_state(cfg, full_state)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        state = {k: t.float() for k, t in state.items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_cfg = config_to_hf(cfg, dtype)
    if tokenizer is None and tokenizer_dir:
        from meshtron.data import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_dir)
    special = _special_ids(tokenizer, cfg.vocab_size)
    hf_cfg.update(special)
    hf_cfg.update(extra_config or {})
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)
    _write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    if special:
        _write_json(os.path.join(out_dir, "generation_config.json"),
                    {**special, "pad_token_id": special["eos_token_id"], "_from_model_config": False})
    if tokenizer is not None:
        _write_tokenizer(tokenizer, out_dir, tokenizer_dir, cfg.max_seq_len)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _special_ids(tokenizer, vocab_size: int) -> dict:
    """eos (the end-of-text token) and bos (the token its prompts start with, else end-of-text, as GPT-2's)."""
    if tokenizer is None or not 0 <= tokenizer.eot_id < vocab_size:
        return {}
    lead = tokenizer.encode_prompt("")                  # what the post-processor adds around a prompt
    bos = lead[0] if lead and 0 <= lead[0] < vocab_size else tokenizer.eot_id
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eot_id}


def _write_tokenizer(tokenizer, out_dir: str, tokenizer_dir: str | None, max_seq_len: int) -> None:
    from meshtron.data.tokenizer import ByteTokenizer
    copied = set()
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for path in tokenizer_files(tokenizer_dir):
            shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
            copied.add(os.path.basename(path))
    byte = isinstance(tokenizer, ByteTokenizer)
    hf_tok = byte_level_tokenizer() if byte else tokenizer.hf_tokenizer
    if "tokenizer.json" not in copied or byte:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(hf_tok.to_str())
    if "tokenizer_config.json" not in copied:
        eot = hf_tok.id_to_token(tokenizer.eot_id)
        lead = tokenizer.encode_prompt("")
        bos = hf_tok.id_to_token(lead[0]) if lead else eot
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eot,
               "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
        if byte:                  # text spelling <|endoftext|> is bytes, as in meshtron's byte tokenizer
            cfg["split_special_tokens"] = True
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), cfg)
    if byte:                      # meshtron reads the folder back as its own byte tokenizer, exactly
        tokenizer.save(out_dir)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` equal to meshtron's byte tokenizer: byte b is token b, <|endoftext|> is 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from meshtron.data.tokenizer import EOT
    chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok
