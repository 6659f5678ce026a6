"""Generation with the KV cache: greedy tokens equal `transformers.generate` on random-weight GPT-2 and Llama
(grouped-query) folders on one rank, model:2 and batch:2,model:2; a batch of prompts of different lengths (and
continuous batching) gives each prompt what it gets alone; seeded sampling is reproducible and the same on every
mesh; stop sequences, EOS, max_seq_len; `meshtron generate` end to end.

Weights are redrawn with std 0.2 as in test_hf_interop, so logits are O(1) and greedy choices are not near-ties.
"""
import argparse
import importlib.util

import pytest
import torch

from meshtron.inference import Engine, Request, SamplingParams, TextStream, generate, sample_ids
from meshtron.inference.sampling import sample
from meshtron.interop import build_from_hf
from meshtron.launch import run_ranks
from meshtron.mesh import Mesh

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)

VOCAB, NEW = 101, 12
GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=48, bos_token_id=None, eos_token_id=None)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=VOCAB, max_position_embeddings=48, rope_theta=500.0, rms_norm_eps=1e-5)
_g = torch.Generator().manual_seed(11)
PROMPTS = [torch.randint(0, VOCAB, (n,), generator=_g).tolist() for n in (7, 3, 11, 1, 5)]
GREEDY = SamplingParams(NEW, temperature=0)
SAMPLED = SamplingParams(NEW, temperature=0.8, top_k=30, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """family -> (folder, transformers' greedy continuation of each prompt)."""
    import transformers
    out = {}
    for i, (name, cls, cfg) in enumerate((("gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config(**GPT2)),
                                          ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA)))):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(1.0 + noise if p.ndim == 1 and ("norm" in pname or "ln_" in pname) and
                        pname.endswith("weight") else noise)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        model.generation_config.eos_token_id = None
        want = []
        with torch.no_grad():
            for p in PROMPTS:
                x = torch.tensor([p])
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                   pad_token_id=0)
                want.append(y[0, len(p):].tolist())
        out[name] = (path, want)
    return out


def _tokens(model, prompts, params, **kw):
    return [c.token_ids for c in generate(model, prompts, params, **kw)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_one_rank(hf, family):
    path, want = hf[family]
    model = build_from_hf(path, Mesh.from_spec("model:1")).eval()
    alone = [_tokens(model, [p], GREEDY)[0] for p in PROMPTS]
    assert alone == want
    assert _tokens(model, PROMPTS, GREEDY) == want                       # left-padded batch
    assert _tokens(model, PROMPTS, GREEDY, max_batch=2) == want          # continuous batching: rows join and leave
    assert [ev.token for ev in Engine(model).stream([Request("a", PROMPTS[0], GREEDY)])] == want[0]
    assert sample_ids(model, torch.tensor([PROMPTS[0]]), NEW, temperature=0)[0, len(PROMPTS[0]):].tolist() == want[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_logits_equal_full_forward(hf, family):
    """Prefill then one token per step through the cache gives the logits of the whole sequence at once."""
    from meshtron.inference.kv_cache import KVCache
    path, _ = hf[family]
    model = build_from_hf(path, Mesh.from_spec("model:1")).eval()
    seq = torch.tensor([PROMPTS[2] + PROMPTS[0]])
    with torch.no_grad():
        full = model.logits(seq)[0]
        cache = KVCache.like(model, 1, seq.shape[1])
        steps = []
        for lo, hi in [(0, 5)] + [(t, t + 1) for t in range(5, seq.shape[1])]:
            cache.begin(torch.arange(lo, hi)[None])
            steps.append(model.head.full_logits(model.hidden(seq[:, lo:hi], cache))[0])
            cache.advance()
    assert (torch.cat(steps) - full).abs().max() < 1e-4


def _on_mesh(spec, paths):
    mesh = Mesh.from_spec(spec)
    out = []
    for path in paths:
        model = build_from_hf(path, mesh).eval()
        out.append((_tokens(model, PROMPTS, GREEDY), _tokens(model, PROMPTS, GREEDY, max_batch=1),
                    _tokens(model, PROMPTS, SAMPLED)))
    return out


@pytest.mark.parametrize("spec,world", [("model:2", 2), ("batch:2,model:2", 4)])
def test_tensor_parallel_generation(hf, spec, world):
    """Greedy equals transformers and seeded samples equal one rank's, on every rank of the mesh."""
    families = ["gpt2", "llama"]
    one_rank = [_tokens(build_from_hf(hf[f][0], Mesh.from_spec("model:1")).eval(), PROMPTS, SAMPLED) for f in families]
    per_rank = run_ranks(_on_mesh, world, spec, [hf[f][0] for f in families])
    for rank, results in enumerate(per_rank):
        for family, sampled_1, (greedy, greedy_b1, sampled) in zip(families, one_rank, results):
            assert greedy == hf[family][1], f"{family} rank {rank}"
            assert greedy_b1 == hf[family][1], f"{family} rank {rank}, one sequence per replica at a time"
            assert sampled == sampled_1, f"{family} rank {rank}: seeded samples differ from one rank's"


def test_sampling_is_seeded_per_sequence(hf):
    model = build_from_hf(hf["llama"][0], Mesh.from_spec("model:1")).eval()
    batch = _tokens(model, PROMPTS, SAMPLED)
    assert batch == _tokens(model, PROMPTS, SAMPLED)                                 # reproducible
    assert batch == [_tokens(model, [p], SAMPLED)[0] for p in PROMPTS]               # batch partners do not matter
    other = SamplingParams(NEW, temperature=0.8, top_k=30, top_p=0.9, seed=8)
    assert _tokens(model, PROMPTS, other) != batch
    assert _tokens(model, PROMPTS, SamplingParams(NEW, temperature=1.5, top_k=1, seed=3)) == hf["llama"][1]


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0, -2.0]]).repeat(2, 1)
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    seen_k, seen_p = set(), set()
    for _ in range(300):
        a, b = sample(logits, [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5)], g)
        seen_k.add(a)
        seen_p.add(b)
    assert seen_k == {0, 1}
    # softmax: p0 = 0.48, p0 + p1 = 0.77: the nucleus of mass 0.5 is the two most likely tokens
    assert seen_p == {0, 1}
    counts = torch.bincount(torch.tensor([sample(logits[:1], [SamplingParams(temperature=1.0)], g[:1])[0]
                                          for _ in range(2000)]), minlength=6).float() / 2000
    assert (counts - logits[0].softmax(-1)).abs().max() < 0.04


class CharTokenizer:
    """One character per token (ids are code points), enough to test text handling."""
    eot_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_and_cuts_it():
    stream, pieces = TextStream(CharTokenizer(), [ord("x")], stop=("END", "zz")), []
    for ch in "abEN":
        assert not stream.push(ord(ch))
        pieces.append(stream.take())
    assert "".join(pieces) == "ab"                        # "EN" could still become "END": held
    assert not stream.push(ord("x"))
    pieces.append(stream.take())
    assert "".join(pieces) == "abENx"                     # it did not
    assert stream.push(ord("z")) is False and stream.push(ord("z")) is True
    pieces.append(stream.take())
    assert "".join(pieces) == stream.text == "abENx"


def test_stop_sequences_eos_and_streaming(hf):
    model = build_from_hf(hf["gpt2"][0], Mesh.from_spec("model:1")).eval()
    tok = _Letters()
    prompt = PROMPTS[0]
    full = generate(model, [prompt], GREEDY, tokenizer=tok)[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.token_ids)
    stop = full.text[5:8]                                           # spans token boundaries
    cut = full.text[:full.text.index(stop)]
    streamed = []
    done = generate(model, [prompt], SamplingParams(NEW, temperature=0, stop=(stop,)), tokenizer=tok,
                    on_event=lambda ev: streamed.append(ev.text))[0]
    assert (done.text, done.finish_reason, "".join(streamed)) == (cut, "stop", cut)
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    stopped = generate(model, [prompt], GREEDY, tokenizer=tok, eos_ids=[eos])[0]
    assert stopped.token_ids == full.token_ids[:first + 1] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(full.token_ids[:first])       # the EOS token adds no text
    ignored = generate(model, [prompt], SamplingParams(NEW, temperature=0, ignore_eos=True), eos_ids=[eos])[0]
    assert ignored.token_ids == full.token_ids


class _Letters:
    """Token i is a two-letter string (so stop sequences can span tokens)."""
    eot_id = 0

    def encode(self, text):
        return [(ord(text[i]) - 97) * 4 + (ord(text[i + 1]) - 97) for i in range(0, len(text) - 1, 2)]

    def decode(self, ids):
        return "".join(chr(97 + i // 4) + chr(97 + i % 4) for i in ids)


def test_max_seq_len_is_respected(hf):
    model = build_from_hf(hf["gpt2"][0], Mesh.from_spec("model:1")).eval()
    ctx = model.config.max_seq_len
    long = (PROMPTS[2] * 10)[:ctx - 3]
    done = generate(model, [long, PROMPTS[1]], SamplingParams(10, temperature=0))
    assert [len(c.token_ids) for c in done] == [3, 10]
    assert [c.finish_reason for c in done] == ["length", "length"]
    assert done[1].token_ids == _tokens(model, [PROMPTS[1]], SamplingParams(10, temperature=0))[0]
    with pytest.raises(ValueError, match="context"):
        generate(model, [(PROMPTS[2] * 10)[:ctx]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        Engine(model).check(Request(0, [], GREEDY))
    with pytest.raises(ValueError, match="top_p"):
        Engine(model).check(Request(0, [1], SamplingParams(top_p=0)))


def _cli(argv):
    from meshtron.cli import generate as cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(argv))


CLI = ("import sys, argparse; from meshtron.cli import generate as g; p = argparse.ArgumentParser(); "
       "g.add_arguments(p); sys.exit(g.run(p.parse_args(sys.argv[1:])))")


def test_cli_generate(hf, capsys, tmp_path):
    """In a fresh process (its ranks print to its stdout), then bad input refused before any rank starts."""
    import subprocess
    import sys
    from meshtron.data.tokenizer import ByteTokenizer
    path, _ = hf["gpt2"]
    tok_dir = str(tmp_path / "tok")
    ByteTokenizer().save(tok_dir)
    want = generate(build_from_hf(path, Mesh.from_spec("model:1")).eval(), [[5, 32, 7]],
                    SamplingParams(NEW, temperature=0), tokenizer=ByteTokenizer())[0].text
    run = subprocess.run([sys.executable, "-c", CLI, path, "--mesh", "model:2", "--tokenizer", tok_dir, "--prompt",
                          "\x05 \x07", "--max-new-tokens", str(NEW), "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == want + "\n" and "tokens/s" in run.stderr
    assert _cli([path, "--mesh", "model:2", "--tokenizer", tok_dir, "--prompt", "hi"]) == 2
    assert "vocabulary" in capsys.readouterr().err     # byte ids 104, 105 are past the model's 101 tokens
    assert _cli([path, "--mesh", "model:3", "--tokenizer", "byte", "--prompt", "x"]) == 2
    assert "heads=4 is not divisible by mesh axis 'model' of size 3" in capsys.readouterr().err
    assert _cli([path, "--mesh", "model:2", "--prompt", "x"]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
