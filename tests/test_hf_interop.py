"""Hugging Face interoperability: random-weight GPT-2 and Llama (grouped-query) models built offline with
`transformers` give the same logits and greedy tokens in meshtron on model:1, model:2 and batch:2,model:2
(loaded shard by shard), and survive export back to `from_pretrained`; unsupported models fail by name.

Weights are redrawn with std 0.2 (norm weights 1 ± 0.2, biases too) so that every tensor, bias and norm
matters and logits are O(1): a wrong mapping moves them by 1e-1 or more, float32 reordering by ~1e-6.
The vocabulary (101) is prime, so the vocab split over 2 ranks is padded.
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from meshtron.interop import (HFConfigError, build_from_hf, config_from_hf, export_hf, load_hf_into,
                              read_hf, tokenizer_files)
from meshtron.inference import sample_ids
from meshtron.launch import run_ranks
from meshtron.mesh import Mesh
from meshtron.models import build_model
from meshtron.parallel.sharding import full_state_dict, load_full_state_dict

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)
# transformers is imported inside the tests only: the ranks import this module and need not pay for it.

VOCAB, TOL = 101, 1e-4
GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, layer_norm_epsilon=1e-4,
            bos_token_id=None, eos_token_id=None)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)
# name -> (transformers class, config class, config, how it is saved)
VARIANTS = {
    "gpt2-tied": ("GPT2LMHeadModel", "GPT2Config", GPT2, "safetensors"),
    "gpt2-untied": ("GPT2LMHeadModel", "GPT2Config", GPT2 | {"tie_word_embeddings": False}, "sharded"),
    "llama-untied": ("LlamaForCausalLM", "LlamaConfig", LLAMA, "sharded"),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", LLAMA | {"tie_word_embeddings": True}, "bin"),
}
IDX = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.2
        p.copy_(1.0 + noise if p.ndim == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight",
                                                                                 "ln_f.weight")) else noise)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (folder, transformers model in eval mode, its logits on IDX)."""
    import transformers
    out = {}
    for i, (name, (cls, config_cls, kw, fmt)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = getattr(transformers, cls)(getattr(transformers, config_cls)(**kw)).eval()
        _randomize(model, i)
        path = str(tmp_path_factory.mktemp(name))
        if fmt == "bin":          # transformers 5 only writes safetensors: write a .bin as older versions did
            model.config.save_pretrained(path)
            torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        else:
            model.save_pretrained(path, max_shard_size="20KB" if fmt == "sharded" else "5GB")
        with torch.no_grad():
            logits = model(IDX).logits
        assert logits.abs().max() > 1.0
        out[name] = (path, model, logits)
    return out


def _close(got, want):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max |meshtron - transformers| = {err:.2e}"


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_one_rank(hf, name):
    path, _, want = hf[name]
    config, state = read_hf(path)
    model = build_model(config, Mesh.from_spec("model:1")).eval()
    load_full_state_dict(model, state)
    with torch.no_grad():
        _close(model.logits(IDX), want)
        _close(build_from_hf(path, Mesh.from_spec("model:1")).eval().logits(IDX), want)


def _sharded_logits(spec, paths, idx):
    mesh = Mesh.from_spec(spec)
    results = []
    for path in paths:
        model = build_from_hf(path, mesh).eval()
        emb = getattr(model, "wte", None) or model.embed
        padding = emb.weight[emb.n_valid:]                     # rows past the real vocabulary on this rank
        with torch.no_grad():
            logits = model.logits(idx)
        state = full_state_dict(model, mesh)
        results.append((logits, bool((padding == 0).all()), padding.shape[0], state if mesh.rank == 0 else None))
    return results


@pytest.mark.parametrize("spec,world", [("model:2", 2), ("batch:2,model:2", 4)])
def test_logits_sharded_load(hf, tmp_path, spec, world):
    from transformers import AutoModelForCausalLM
    names = list(VARIANTS)
    per_rank = run_ranks(_sharded_logits, world, spec, [hf[n][0] for n in names], IDX)
    padded_rows = 0
    for rank, results in enumerate(per_rank):
        for name, (logits, padding_zero, n_pad, _) in zip(names, results):
            _close(logits, hf[name][2])
            assert padding_zero, f"{name}: rank {rank} has non-zero vocabulary padding"
            padded_rows += n_pad
    assert padded_rows > 0                                      # 101 over 2 ranks: one padded row exercised
    for name, (_, _, _, state) in zip(names, per_rank[0]):    # gathered from the shards, exported, reloaded
        config, _ = read_hf(hf[name][0])
        export_hf(config, state, str(tmp_path / name))
        with torch.no_grad():
            _close(AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()(IDX).logits, hf[name][2])


@pytest.mark.parametrize("name", VARIANTS)
def test_export_roundtrip(hf, tmp_path, name):
    from transformers import AutoModelForCausalLM
    path, original, want = hf[name]
    config, state = read_hf(path)
    export_hf(config, state, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is type(original)
    assert reloaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    with torch.no_grad():
        _close(reloaded(IDX).logits, want)
    config2, state2 = read_hf(str(tmp_path))
    assert config2 == config
    assert all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation(hf, name):
    path, original, _ = hf[name]
    prompt = IDX[:, :6]
    original.generation_config.eos_token_id = None                # generate all 10 tokens, as meshtron does
    with torch.no_grad():
        want = original.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
    got = sample_ids(build_from_hf(path, Mesh.from_spec("model:1")).eval(), prompt, 10, temperature=0)
    assert torch.equal(got, want), f"meshtron {got.tolist()} != transformers {want.tolist()}"


def test_tokenizer_files_are_found_and_exported(hf, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok_dir = tmp_path / "hf"
    shutil.copytree(hf["gpt2-tied"][0], tok_dir)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(tok_dir))
    found = {os.path.basename(p) for p in tokenizer_files(str(tok_dir))}
    assert {"tokenizer.json", "tokenizer_config.json"} <= found
    config, state = read_hf(str(tok_dir))
    export_hf(config, state, str(tmp_path / "out"), tokenizer_dir=str(tok_dir))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))("w3 w7")["input_ids"] == [3, 7]


@pytest.mark.parametrize("change,named", [
    ({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}, "model_type 'gpt_neox'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),  # 4.x form
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_llama_config_fails_by_name(hf, tmp_path, change, named):
    shutil.copytree(hf["llama-untied"][0], tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text()) | change
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(HFConfigError, match=named.replace("(", r"\(")):
        read_hf(str(tmp_path / "m"))


@pytest.mark.parametrize("change,named", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "bert"}, "model_type 'bert'"),
])
def test_unsupported_gpt2_config_fails_by_name(hf, change, named):
    with open(os.path.join(hf["gpt2-tied"][0], "config.json")) as f:
        cfg = json.load(f) | change
    with pytest.raises(HFConfigError, match=named):
        config_from_hf(cfg)


def test_unknown_tensors_and_wrong_model_fail(hf, tmp_path):
    from safetensors.torch import load_file, save_file
    shutil.copytree(hf["gpt2-tied"][0], tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights)) | {"transformer.h.0.attn.extra.weight": torch.zeros(2)}
    save_file(state, str(weights))
    with pytest.raises(HFConfigError, match="extra"):
        read_hf(str(tmp_path / "m"))
    config, _ = read_hf(hf["gpt2-tied"][0])
    other = build_model(config.replace(n_layer=3), Mesh.from_spec("model:1"))
    with pytest.raises(ValueError, match="n_layer"):
        load_hf_into(other, hf["gpt2-tied"][0])


def test_gpt2_without_prefix_and_with_mask_buffers(hf, tmp_path):
    """The layout of the original GPT-2 files: no 'transformer.' prefix, causal-mask buffers stored."""
    from safetensors.torch import load_file, save_file
    path, _, want = hf["gpt2-tied"]
    shutil.copytree(path, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(weights)).items()}
    state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)}
    save_file(state, str(weights))
    with torch.no_grad():
        _close(build_from_hf(str(tmp_path / "m"), Mesh.from_spec("model:1")).eval().logits(IDX), want)


def test_mistral_without_window_loads_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(5)
    model = MistralForCausalLM(MistralConfig(**LLAMA, sliding_window=None)).eval()
    _randomize(model, 5)
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        _close(build_from_hf(str(tmp_path), Mesh.from_spec("model:1")).eval().logits(IDX), model(IDX).logits)
