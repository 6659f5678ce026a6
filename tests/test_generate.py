"""Generation with the KV cache: greedy tokens equal `transformers.generate` on random-weight GPT-2 and Llama
(grouped-query) folders on one rank, model:2 and batch:2,model:2; a batch of prompts of different lengths (and
continuous batching) gives each prompt what it gets alone; seeded sampling is reproducible and the same on every
mesh; stop sequences, EOS, max_seq_len; `meshtron generate` end to end. Logprobs (generated tokens and prompts,
with their top-k) equal transformers' log-softmax on every mesh, from split scores or gathered logits; n samples
share one prefill; penalties equal transformers' logits processors; rank-0-only text failures change nothing.

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


# ---- logprobs, n, penalties -------------------------------------------------------------------------------------

LP_K = 5


def _lp_requests():
    """Greedy with logprobs and prompt logprobs, a sampled one with logprobs, a prompt only scored (no new token),
    and n = 3 seeded samples sharing one prefill."""
    scored = SamplingParams(NEW, temperature=0, logprobs=LP_K, prompt_logprobs=LP_K)
    sampled = SamplingParams(NEW, temperature=0.9, top_k=40, seed=5, logprobs=2)
    only = SamplingParams(0, prompt_logprobs=3)
    reqs = [Request("greedy", PROMPTS[0], scored), Request("sampled", PROMPTS[2], sampled),
            Request("prompt", PROMPTS[4], only)]
    reqs += [Request(f"n{j}", PROMPTS[1], SamplingParams(NEW, temperature=1.0, seed=20 + j, logprobs=1,
                                                         prompt_logprobs=1), share="n") for j in range(3)]
    return reqs


def _lp_run(model):
    """The requests together (a sampled row: logits gathered), then the greedy ones alone (split scores only)."""
    engine = Engine(model)
    done = {c.id: c for c in engine.generate(_lp_requests())}
    prefilled = engine.prefilled_tokens
    alone = [r for r in _lp_requests() if r.id in ("greedy", "prompt")]
    done |= {f"{c.id}-split": c for c in engine.generate(alone)}
    return done, prefilled


def _lp_on_mesh(spec, paths):
    mesh = Mesh.from_spec(spec)
    return [_lp_run(build_from_hf(p, mesh).eval()) for p in paths]


def _reference_logprobs(path, ids):
    """transformers' log-softmax of the HF model's logits over `ids`: row t is the distribution of token t + 1."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def _check_logprobs(path, got, where):
    for split in ("", "-split"):
        _check_greedy(path, got["greedy" + split], where + split)
    sampled = got["sampled"]
    ref = _reference_logprobs(path, sampled.prompt_ids + sampled.token_ids)
    P = len(sampled.prompt_ids)
    for j, tok in enumerate(sampled.token_ids):                          # raw model logprobs, not the tempered ones
        assert abs(sampled.logprobs[j] - ref[P - 1 + j, tok].item()) < 1e-4, where
        assert [t for t, _ in sampled.top_logprobs[j]] == ref[P - 1 + j].topk(2).indices.tolist(), where
    for only in (got["prompt"], got["prompt-split"]):
        assert only.token_ids == [] and only.finish_reason == "length"
        ref = _reference_logprobs(path, only.prompt_ids)
        assert max(abs(a - ref[i, t].item()) for i, (a, t) in enumerate(zip(only.prompt_logprobs.logprobs[1:],
                                                                             only.prompt_ids[1:]))) < 1e-4, where


def _check_greedy(path, greedy, where):
    ref = _reference_logprobs(path, greedy.prompt_ids + greedy.token_ids)
    P = len(greedy.prompt_ids)
    for j, tok in enumerate(greedy.token_ids):                           # generated tokens and their top-k
        row = ref[P - 1 + j]
        assert abs(greedy.logprobs[j] - row[tok].item()) < 1e-4, where
        want = row.topk(LP_K)
        assert [t for t, _ in greedy.top_logprobs[j]] == want.indices.tolist(), where
        assert max(abs(v - w) for (_, v), w in zip(greedy.top_logprobs[j], want.values.tolist())) < 1e-4, where
        assert greedy.top_logprobs[j][0][0] == tok                       # greedy: the token is the top-1
    pl = greedy.prompt_logprobs                                          # the echoed prompt, from the prefill
    assert pl.logprobs[0] is None and pl.top[0] is None and len(pl.logprobs) == P
    for i in range(1, P):
        row = ref[i - 1]
        assert abs(pl.logprobs[i] - row[greedy.prompt_ids[i]].item()) < 1e-4, where
        assert [t for t, _ in pl.top[i]] == row.topk(LP_K).indices.tolist(), where


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_equal_transformers_one_rank(hf, family):
    path, want = hf[family]
    got, prefilled = _lp_run(build_from_hf(path, Mesh.from_spec("model:1")).eval())
    _check_logprobs(path, got, family)
    assert got["greedy"].token_ids == got["greedy-split"].token_ids == want[0]   # scoring changes nothing decoded
    samples = [got[f"n{j}"].token_ids for j in range(3)]
    assert len({tuple(s) for s in samples}) == 3                         # n different samples ...
    model = build_from_hf(path, Mesh.from_spec("model:1")).eval()
    for j in range(3):                                                   # ... each reproducible alone
        alone = SamplingParams(NEW, temperature=1.0, seed=20 + j)
        assert generate(model, [PROMPTS[1]], alone)[0].token_ids == samples[j]
    assert prefilled == sum(len(PROMPTS[i]) for i in (0, 2, 4, 1))        # the n = 3 prompt went through once


@pytest.mark.parametrize("spec,world", [("model:2", 2), ("batch:2,model:2", 4)])
def test_logprobs_tensor_parallel(hf, spec, world):
    """Logprobs from the split vocabulary equal transformers' on every rank; the n samples equal one rank's."""
    families = ["gpt2", "llama"]
    one_rank = [_lp_run(build_from_hf(hf[f][0], Mesh.from_spec("model:1")).eval())[0] for f in families]
    per_rank = run_ranks(_lp_on_mesh, world, spec, [hf[f][0] for f in families])
    for rank, results in enumerate(per_rank):
        for family, alone, (got, _) in zip(families, one_rank, results):
            _check_logprobs(hf[family][0], got, f"{family} rank {rank}")
            for j in range(3):
                assert got[f"n{j}"].token_ids == alone[f"n{j}"].token_ids, f"{family} rank {rank}"


def test_split_scores_equal_full_log_softmax():
    """The pieces of logprobs.score on slices (as the ranks of a vocab axis hold them, one holding only padding),
    combined, equal log_softmax, argmax (ties: the lower id) and top-k of the full logits."""
    from meshtron.inference.logprobs import combine, pieces
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=g) * 3
    x[0, 3] = x[0, 7] = x[0].max() + 1
    targets = torch.randint(0, 11, (6,), generator=g)
    every = torch.stack([pieces(x[:, lo:hi], lo, logz=True, targets=targets, choose=x[:, lo:hi], k=4)
                         for lo, hi in ((0, 6), (6, 11), (11, 11))])
    full = combine(every, True, True, True, 4)
    ref = torch.log_softmax(x.double(), -1)
    assert torch.allclose(full.logz, torch.logsumexp(x.double(), -1), atol=1e-6)
    assert torch.allclose(full.target - full.logz, ref.gather(1, targets[:, None])[:, 0], atol=1e-6)
    assert full.pick.tolist() == x.argmax(-1).tolist() and full.pick[0] == 3
    assert full.top_ids.tolist() == [sorted(range(11), key=lambda t: (-x[r, t].item(), t))[:4] for r in range(6)]


def test_penalties_match_transformers_logits_processors():
    """On a fixed sequence of logits: repetition penalty, logit_bias and min_tokens equal transformers' processors
    (and frequency/presence OpenAI's formula), applied to the full vocabulary or slice by slice."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

    from meshtron.inference.penalties import process
    g = torch.Generator().manual_seed(4)
    V, eos = 13, 12
    prompt = [1, 5, 5, 9]
    logits = torch.randn(8, V, generator=g) * 2
    out: list[int] = []
    cases = [
        (SamplingParams(repetition_penalty=1.7), lambda ids, x, n: RepetitionPenaltyLogitsProcessor(1.7)(ids, x)),
        (SamplingParams(logit_bias={3: 2.5, 7: -100}),
         lambda ids, x, n: SequenceBiasLogitsProcessor([[[3], 2.5], [[7], -100.0]])(ids, x)),
        (SamplingParams(min_tokens=3), lambda ids, x, n: MinNewTokensLengthLogitsProcessor(len(prompt), 3, eos)(ids, x)),
        (SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4),
         lambda ids, x, n: x - 0.6 * torch.bincount(torch.tensor(n, dtype=torch.long), minlength=V)[None]
         + 0.4 * (torch.bincount(torch.tensor(n, dtype=torch.long), minlength=V) > 0).float()[None]),
    ]
    for step in range(8):
        ids = torch.tensor([prompt + out])
        x = logits[step:step + 1]
        for params, reference in cases:
            want = reference(ids, x.clone(), out)
            full = process(x, 0, [params], [prompt], [out], [eos])
            split = torch.cat([process(x[:, lo:hi], lo, [params], [prompt], [out], [eos])
                               for lo, hi in ((0, 7), (7, V))], 1)
            assert torch.allclose(full, want) and torch.allclose(split, want), (step, params)
        out.append(int(x.argmax()))


def test_penalties_in_generation_equal_transformers(hf):
    """Greedy decoding with repetition_penalty / logit_bias / min_tokens equals transformers.generate with the same
    processors; on model:2 too (the split argmax sees the penalised slices)."""
    import transformers
    path, _ = hf["gpt2"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = PROMPTS[2]
    x = torch.tensor([prompt])
    base = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = ref.generate(x, **base)[0, len(prompt):].tolist()
        eos = plain[2]                                                   # an EOS greedy would pick third
        cases = {
            "repetition": (dict(repetition_penalty=1.8), SamplingParams(NEW, temperature=0, repetition_penalty=1.8)),
            "bias": (dict(sequence_bias=[[[plain[0]], -5.0], [[17], 3.0]]),
                     SamplingParams(NEW, temperature=0, logit_bias={plain[0]: -5.0, 17: 3.0})),
            "min_tokens": (dict(min_new_tokens=5, eos_token_id=eos),
                           SamplingParams(NEW, temperature=0, min_tokens=5)),
        }
        want = {name: ref.generate(x, **base, **kw)[0, len(prompt):].tolist() for name, (kw, _) in cases.items()}
    want["min_tokens"] = want["min_tokens"][:want["min_tokens"].index(eos) + 1] if eos in want["min_tokens"] \
        else want["min_tokens"]
    assert len(want["min_tokens"]) > 3 and want["repetition"] != plain and want["bias"] != plain
    model = build_from_hf(path, Mesh.from_spec("model:1")).eval()
    eos_of = {name: [eos] if name == "min_tokens" else [] for name in cases}
    got = {name: generate(model, [prompt], p, eos_ids=eos_of[name])[0].token_ids for name, (_, p) in cases.items()}
    assert got == want
    per_rank = run_ranks(_penalised, 2, path, prompt, [p for _, p in cases.values()], list(eos_of.values()))
    for rank, tokens in enumerate(per_rank):
        assert dict(zip(cases, tokens)) == want, f"rank {rank}"


def _penalised(path, prompt, params, eos):
    model = build_from_hf(path, Mesh.from_spec("model:2")).eval()
    return [generate(model, [prompt], p, eos_ids=e)[0].token_ids for p, e in zip(params, eos)]


class _DecodeFails:
    """A tokenizer whose decode fails on one token: rank-0-only work (the text of sequences without stop strings)
    failing where the other ranks do nothing."""
    eot_id = 0

    def __init__(self, bad):
        self.bad = bad

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        if self.bad in ids:
            raise RuntimeError(f"cannot decode {self.bad}")
        return " ".join(map(str, ids))


def _text_fails_on_rank0(path, bad):
    mesh = Mesh.from_spec("model:2")
    model = build_from_hf(path, mesh).eval()
    engine = Engine(model, _DecodeFails(bad), text=mesh.rank == 0)
    first = engine.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)])
    again = engine.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)])    # still in step
    return [c.token_ids for c in first], [c.error for c in first], [c.token_ids for c in again]


def test_rank0_text_failure_changes_nothing_decoded(hf):
    """Item 16: rank 0 alone builds the text; its decode failing is reported on that sequence's events and
    leaves every rank's tokens (and the engine's state) as they would have been."""
    path, want = hf["gpt2"]
    bad = next(t for t in want[0] if all(t not in p for p in PROMPTS))
    per_rank = run_ranks(_text_fails_on_rank0, 2, path, bad)
    for rank, (first, errors, again) in enumerate(per_rank):
        assert first == again == want, f"rank {rank}"
        failed = [i for i, e in enumerate(errors) if e]
        if rank == 0:
            assert failed == [i for i, w in enumerate(want) if bad in w] and "cannot decode" in errors[0]
        else:
            assert failed == []
