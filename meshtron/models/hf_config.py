"""Hugging Face `config.json` -> ModelConfig, for GPT-2 and Llama-style (llama, mistral) checkpoints.

Invariant: a ModelConfig comes back only if meshtron builds exactly the architecture the config describes;
any field that would change it (another activation, rope scaling, sliding windows, biases Llama lacks, ...)
is refused, and every refusal names the field and its value. Dropout rates are training choices, not
architecture: they are not carried over (set them with `config.replace(dropout=...)`).
"""
from __future__ import annotations

import json
import os

from meshtron.models.config import ModelConfig

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both the tanh approximation meshtron's GPT uses


class HFConfigError(ValueError):
    """A Hugging Face config meshtron cannot represent; the message names the fields."""


def load_hf_config(path: str) -> dict:
    """The dict of a model folder's `config.json`, or of a JSON file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise HFConfigError(f"no Hugging Face config at {file!r}: give a model folder holding config.json, "
                            f"or the path of a config JSON file") from None
    except (OSError, ValueError) as e:
        raise HFConfigError(f"cannot read Hugging Face config {file!r}: {e}") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"Hugging Face config {file!r} must be a JSON object")
    return data


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a Hugging Face config dict to a ModelConfig, or raise HFConfigError naming what is unsupported."""
    model_type = hf.get("model_type")
    if model_type in GPT2_TYPES:
        return _gpt2(hf)
    if model_type in LLAMA_TYPES:
        return _llama(hf)
    raise HFConfigError(f"model_type {model_type!r} is not supported; meshtron reads "
                        f"{', '.join(GPT2_TYPES + LLAMA_TYPES)} configs")


def _require(hf: dict, names: list[str]) -> None:
    missing = [n for n in names if hf.get(n) is None]
    if missing:
        raise HFConfigError(f"{hf.get('model_type')} config lacks required field(s): {', '.join(missing)}")


def _refuse(hf: dict, problems: list[str]) -> None:
    if problems:
        raise HFConfigError(f"{hf.get('model_type')} config has unsupported field(s): " + "; ".join(problems))


def _tie(hf: dict, default: bool) -> bool | None:
    """tie_word_embeddings, as None when it is the family's default (so a config equals its preset)."""
    tied = bool(hf.get("tie_word_embeddings", default))
    return None if tied == default else tied


def _gpt2(hf: dict) -> ModelConfig:
    if hf.get("n_positions") is None and hf.get("n_ctx") is not None:
        hf = {**hf, "n_positions": hf["n_ctx"]}               # older configs name it n_ctx
    _require(hf, ["n_embd", "n_layer", "n_head", "n_positions", "vocab_size"])
    problems = []
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        problems.append(f"activation_function={act!r} (meshtron's GPT uses the tanh GELU: "
                        f"{' or '.join(GPT2_ACTIVATIONS)})")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if hf.get(name, want) != want:
            problems.append(f"{name}={hf[name]!r} (meshtron needs {want})")
    _refuse(hf, problems)
    return ModelConfig(
        family="gpt", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        d_model=hf["n_embd"], d_ff=hf.get("n_inner") or None, max_seq_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=_tie(hf, default=True),
        init_std=hf.get("initializer_range", 0.02))


def _rope_theta(hf: dict, problems: list[str]) -> float:
    """rope_theta from the old fields (rope_theta, rope_scaling) or transformers 5's rope_parameters."""
    params = hf.get("rope_parameters")
    if params is not None:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            problems.append(f"rope_parameters.rope_type={kind!r} (meshtron implements plain rotary embeddings)")
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if hf.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={hf['rope_scaling']!r} (meshtron implements plain rotary embeddings; "
                        f"only rope_scaling=null is supported)")
    return float(hf.get("rope_theta", 10000.0))


def _llama(hf: dict) -> ModelConfig:
    _require(hf, ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                  "max_position_embeddings"])
    problems = []
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    kv = hf.get("num_key_value_heads") or heads
    theta = _rope_theta(hf, problems)
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (meshtron's SwiGLU uses silu)")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            problems.append(f"{name}={hf[name]!r} (meshtron's Llama has no biases)")
    if hf.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim={hf['head_dim']} (meshtron needs hidden_size / num_attention_heads = "
                        f"{d // heads})")
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        problems.append(f"sliding_window={window} < max_position_embeddings={hf['max_position_embeddings']} "
                        f"(meshtron has no sliding-window attention)")
    _refuse(hf, problems)
    return ModelConfig(
        family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
        d_model=d, n_kv_head=None if kv == heads else kv, d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=_tie(hf, default=False), init_std=hf.get("initializer_range", 0.02))


def hf_dropout(hf: dict) -> float:
    """The dropout rate a Hugging Face config trains with (GPT-2: resid/embd/attn_pdrop; Llama: attention_dropout),
    the largest if they differ: meshtron has one rate. 0 when none is set."""
    names = ("resid_pdrop", "embd_pdrop", "attn_pdrop") if hf.get("model_type") in GPT2_TYPES else \
        ("attention_dropout", "hidden_dropout")
    rates = [float(hf[n]) for n in names if isinstance(hf.get(n), (int, float))]
    if hf.get("model_type") in GPT2_TYPES and not rates:
        rates = [0.1]                                         # transformers' GPT2Config defaults
    return max(rates, default=0.0)
