"""Hugging Face interoperability: random-weight GPT-2 and Llama (grouped-query) models built offline with
`transformers` give the same logits and greedy tokens in meshtron on model:1, model:2 and batch:2,model:2
(loaded shard by shard), and survive export back to `from_pretrained`; unsupported models fail by name. Exported
meshtron checkpoints (BPE and byte tokenizers) generate in transformers as in meshtron, end of text included; a
BOS-adding tokenizer is followed; `meshtron eval --loglikelihood` equals transformers.

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


# ---- exported folders in transformers, end-of-text and BOS included -------------------------------------------

def _tokenizer(kind):
    from meshtron.data.tokenizer import ByteTokenizer, train_bpe
    if kind == "byte":
        return ByteTokenizer()
    from pydoc_data.topics import topics
    return train_bpe(list(topics.values())[:200], 600)


def _meshtron_greedy(model, tok, eos, prompt_ids, n=20):
    from meshtron.inference import Engine, Request, SamplingParams
    [done] = Engine(model, tok, eos).generate([Request(0, prompt_ids, SamplingParams(n, temperature=0))])
    return done


@pytest.mark.parametrize("family,kind", [("gpt", "bpe"), ("gpt", "byte"), ("llama", "bpe"), ("llama", "byte")])
def test_exported_folder_generates_in_transformers_as_meshtron(tmp_path, family, kind):
    """A meshtron checkpoint (BPE or byte tokenizer) exported with `meshtron export`: transformers' AutoTokenizer
    encodes the prompt as meshtron does, and its default greedy generation (generation_config.json) gives meshtron's
    tokens and text, stopping at the same end-of-text; meshtron reads the exported folder back (eval too); files are
    not private (0600)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshtron.cli import main
    from meshtron.load import open_model, save_converted
    from meshtron.models import get_preset
    tok = _tokenizer(kind)
    cfg = get_preset(f"{family}-tiny").replace(vocab_size=tok.vocab_size)
    mesh = Mesh.from_spec("model:1")
    model = build_model(cfg, mesh, seed=1).eval()
    _randomize(model, 1)
    prompt = "The meaning of"
    ids = tok.encode_prompt(prompt)
    eot = tok.eot_id
    free = _meshtron_greedy(model, tok, [], ids)                        # without an end-of-text in sight ...
    j = next(j for j, t in enumerate(free.token_ids) if j >= 3 and t not in ids and t != eot
             and t not in free.token_ids[:j])
    t = free.token_ids[j]
    with torch.no_grad():                                                # ... relabel token t as end-of-text
        for w in [p for n, p in model.named_parameters() if n in ("wte.weight", "embed.weight", "head.weight")]:
            w[[t, eot]] = w[[eot, t]]
    want = _meshtron_greedy(model, tok, [eot], ids)
    assert want.finish_reason == "stop" and want.token_ids == free.token_ids[:j] + [eot]
    save_converted(model, mesh, str(tmp_path / "run"), tok)
    out = str(tmp_path / "hf")
    assert main(["export", str(tmp_path / "run"), out]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_tok(prompt)["input_ids"] == ids
    assert hf_tok("héllo wörld <|endoftext|>")["input_ids"] == tok.encode_prompt("héllo wörld <|endoftext|>")
    x = torch.tensor([ids])
    with torch.no_grad():
        got = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20)[0, len(ids):].tolist()
    assert got == want.token_ids                                         # stopped at the same end-of-text
    assert hf_tok.decode(got, skip_special_tokens=True) == want.text
    back, back_tok, src = open_model(out, mesh)                          # meshtron reads the export back
    from meshtron.inference import model_eos_ids
    assert type(back_tok) is type(tok) and model_eos_ids(src, back_tok) == {eot}
    assert _meshtron_greedy(back, back_tok, model_eos_ids(src, back_tok), ids).token_ids == want.token_ids
    (tmp_path / "text.txt").write_text("The meaning of life is a question. " * 40)
    assert main(["eval", out, "--data", str(tmp_path / "text.txt"), "--seq-len", "32", "--batch-size", "2",
                 "--max-batches", "1"]) == 0


@pytest.mark.parametrize("how", ["post_processor", "add_bos_token"])
def test_a_bos_adding_llama_tokenizer_is_followed(hf, tmp_path, how, capsys):
    """A Llama folder whose tokenizer adds <s> (in tokenizer.json's post-processor, or by tokenizer_config.json's
    add_bos_token): meshtron encodes prompts as transformers' tok(prompt) does, so `meshtron generate` prints
    transformers' greedy text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from meshtron.data import load_tokenizer
    path = tmp_path / "llama"
    shutil.copytree(hf["llama-untied"][0], path)
    vocab = {f"w{i}": i for i in range(VOCAB - 3)} | {"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {}
    if how == "post_processor":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB - 2)])
    else:
        kw = {"add_bos_token": True}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            **kw).save_pretrained(str(path))
    prompt = "w5 w17 w3"
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    ids = hf_tok(prompt)["input_ids"]
    assert ids[0] == VOCAB - 2
    assert load_tokenizer(str(path)).encode_prompt(prompt) == ids
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids])
    with torch.no_grad():
        new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    from meshtron.cli import main
    assert main(["generate", str(path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    mine = load_tokenizer(str(path))
    assert capsys.readouterr().out == mine.decode(ids + new)[len(mine.decode(ids)):] + "\n"    # text in context
    without_bos = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        other = without_bos.generate(x[:, 1:], attention_mask=torch.ones_like(x[:, 1:]), max_new_tokens=8,
                                     do_sample=False, pad_token_id=0)[0, len(ids) - 1:].tolist()
    assert other != new                                                 # the BOS matters to the text


def test_eval_loglikelihood_equals_transformers(hf, tmp_path, capsys):
    """`meshtron eval --loglikelihood` (lm-eval's loglikelihood request, on model:2: split vocabulary, full forward)
    gives transformers' sum of continuation log-softmax values to 1e-4, and its greedy flags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from meshtron.cli import main
    path = tmp_path / "m"
    shutil.copytree(hf["gpt2-tied"][0], path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<|endoftext|>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(path)
    g = torch.Generator().manual_seed(2)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 2, (n,), generator=g).tolist())  # noqa: E731
    items = [{"context": words(3 + i % 4), "continuation": " " + words(1 + i % 3)} for i in range(6)]
    items.append({"context": "", "continuation": words(4)})              # empty context: end-of-text first
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    assert main(["eval", str(path), "--loglikelihood", str(tmp_path / "items.jsonl"), "--mesh", "model:2",
                 "--batch-size", "3"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = lambda s: [int(w[1:]) for w in s.split()]                                            # noqa: E731
    for it, row in zip(items, got, strict=True):
        ctx, cont = ids(it["context"]) or [VOCAB - 1], ids(it["continuation"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, :-1].double(), -1)
        rows = lp[len(ctx) - 1:]
        want = sum(rows[j, t].item() for j, t in enumerate(cont))
        assert abs(row["loglikelihood"] - want) < 1e-4 and row["tokens"] == len(cont)
        assert row["is_greedy"] == all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
