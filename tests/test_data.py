"""meshtron.data: every input kind (plain and gzip), the token cache and its invalidation, tokenizer round trips
(byte, trained BPE, Hugging Face folders, GPT-2's files), the sampler's determinism, resume and dp slicing, and
bad input failing fast with messages that say what to change. Offline, in tmp_path."""
import gzip
import json
import os

import numpy as np
import pytest
import torch

from meshtron.data import (BPETokenizer, ByteTokenizer, DataError, Dataset, Tokenizer, builtin_corpus,
                           load_tokenizer, open_dataset, prepare_tokenizer, resolve_sources, token_dtype,
                           tokenize_data, train_bpe)

DOCS = ["The quick brown fox jumps over the lazy dog.\n" * 3, "Ünïcödé text: naïve café, 日本語.\n",
        "def f(x):\n    return x * 2\n" * 4]
BYTE = ByteTokenizer()


def stream(docs, tok=BYTE):
    """The expected token stream: each document's ids then end-of-text."""
    return [i for d in docs for i in tok.encode(d) + [tok.eot_id]]


def write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def corpus_text(n=40):
    return "".join(f"Paragraph {i}: the {['cat', 'dog', 'bird'][i % 3]} sat on the mat and read {i * 7} pages "
                   f"of the manual before lunch.\n\n" for i in range(n))


# ---- input kinds ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_text_file_is_one_document(tmp_path, gz):
    f = write(tmp_path / ("a.txt.gz" if gz else "a.txt"), DOCS[1], gz)
    tf = tokenize_data(f, "byte")
    assert tf.tokens.tolist() == stream([DOCS[1]]) and tf.n_documents == 1
    assert tf.tokens.dtype == np.uint16


@pytest.mark.parametrize("gz", [False, True])
def test_folder_recursive_sorted_skips_others(tmp_path, gz):
    sfx = ".gz" if gz else ""
    write(tmp_path / "d" / f"b.md{sfx}", DOCS[1], gz)
    write(tmp_path / "d" / f"a.txt{sfx}", DOCS[0], gz)
    write(tmp_path / "d" / "sub" / f"c.txt{sfx}", DOCS[2], gz)
    write(tmp_path / "d" / "image.png", "not text")
    write(tmp_path / "d" / ".hidden" / "x.txt", "hidden")
    write(tmp_path / "d" / "empty.txt", "")  # empty documents are skipped, not separated
    assert [s.path.name for s in resolve_sources(tmp_path / "d")] == [f"a.txt{sfx}", f"b.md{sfx}", "empty.txt",
                                                                      f"c.txt{sfx}"]
    tf = tokenize_data(tmp_path / "d", "byte")
    assert tf.tokens.tolist() == stream(DOCS) and tf.n_documents == 3


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_records_are_documents(tmp_path, gz):
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)]
    f = write(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", gz)
    tf = tokenize_data(f, "byte")
    assert tf.tokens.tolist() == stream(DOCS) and tf.n_documents == 3


def test_builtin_and_several_specs(tmp_path):
    tf = tokenize_data("builtin", "byte")
    assert tf.tokens.tolist()[-1] == 256 and len(tf) == len(builtin_corpus().encode()) + 1
    f = write(tmp_path / "a.txt", DOCS[0])
    both = tokenize_data([f, "builtin"], "byte")
    assert both.tokens.tolist() == stream([DOCS[0]]) + tf.tokens.tolist()


def test_big_vocab_uses_uint32(tmp_path):
    class Shifted(Tokenizer):  # any Tokenizer subclass plugs in; ids above 65535 need uint32
        name, vocab_size, eot_id = "shifted", 70_000, 69_999

        def encode(self, text): return [ord(c) + 65_536 for c in text]
        def decode(self, ids): return "".join(chr(i - 65_536) for i in ids)
        def save(self, d): raise NotImplementedError
        def fingerprint(self): return "shifted-v1"

    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    tf = tokenize_data(write(tmp_path / "a.txt", "hello"), Shifted(), cache_dir=tmp_path / "cache")
    assert tf.tokens.dtype == np.uint32 and tf.tokens.tolist() == [ord(c) + 65_536 for c in "hello"] + [69_999]


# ---- the cache -----------------------------------------------------------------------------------------------

def test_cache_reused_and_invalidated(tmp_path):
    f, cache = write(tmp_path / "a.txt", corpus_text()), tmp_path / "cache"
    first = tokenize_data(f, "byte", cache)
    assert not first.from_cache and first.path.parent == cache and isinstance(first.tokens, np.memmap)
    mtime = first.path.stat().st_mtime_ns
    again = tokenize_data(f, "byte", cache)
    assert again.from_cache and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.tokens, first.tokens) and again.fingerprint == first.fingerprint

    os.utime(f, ns=(1, 1))  # touched, same content: the content hash says reuse
    assert tokenize_data(f, "byte", cache).from_cache
    assert tokenize_data(f, "byte", cache).from_cache  # and the refreshed stats take the fast path

    write(f, corpus_text() + "One more line.\n")  # changed: re-tokenised, the stale entry removed
    changed = tokenize_data(f, "byte", cache)
    assert not changed.from_cache and changed.fingerprint != first.fingerprint
    assert changed.tokens.tolist() == stream([corpus_text() + "One more line.\n"])
    assert not first.path.exists() and sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]

    other_tok = tokenize_data(f, train_bpe([corpus_text()], 300), cache)  # another tokenizer: its own entry
    assert not other_tok.from_cache and other_tok.fingerprint != changed.fingerprint
    assert tokenize_data(f, "byte", cache).from_cache
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temporary files left


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    f, cache = write(tmp_path / "a.txt", corpus_text()), tmp_path / "cache"
    first = tokenize_data(f, "byte", cache)
    with open(first.path, "r+b") as fh:  # truncated: its size no longer matches the entry
        fh.truncate(10)
    rebuilt = tokenize_data(f, "byte", cache)
    assert not rebuilt.from_cache and rebuilt.tokens.tolist() == stream([corpus_text()])


def test_cache_with_ids_beyond_the_vocabulary_is_rebuilt(tmp_path):
    """Item 10: a damaged cache whose ids exceed the vocabulary (here same size, same stats) is not trained on."""
    f, cache = write(tmp_path / "a.txt", corpus_text()), tmp_path / "cache"
    first = tokenize_data(f, "byte", cache)
    st = first.path.stat()
    with open(first.path, "r+b") as fh:
        fh.seek(20)
        fh.write(np.array([300, 60000], dtype=np.uint16).tobytes())     # byte vocabulary: 257 ids
    os.utime(first.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    logged = []
    again = tokenize_data(f, "byte", cache, log=logged.append)
    assert not again.from_cache and again.tokens.tolist() == stream([corpus_text()])
    assert "hold id 300, outside the byte tokenizer" in logged[0]


def _embed_out_of_range(debug: bool):
    """On model:2, an id >= V looks up nothing on every rank: zeros, silently, unless MESHTRON_DEBUG=1."""
    os.environ["MESHTRON_DEBUG"] = "1" if debug else "0"
    from meshtron.mesh import Mesh
    from meshtron.parallel.embedding import VocabParallelEmbedding
    mesh = Mesh.from_spec("model:2")
    emb = VocabParallelEmbedding(10, 4, mesh.axis("model"))
    try:
        out = emb(torch.tensor([[1, 12]]))
    except IndexError as e:
        return str(e)
    return float(out[0, 1].abs().sum())


def test_the_vocab_parallel_embedding_refuses_out_of_range_ids_in_debug_mode():
    from meshtron.launch import run_ranks
    assert run_ranks(_embed_out_of_range, 2, False) == [0.0, 0.0]
    assert run_ranks(_embed_out_of_range, 2, True) == ["token id 12 is outside the vocabulary [0, 10) "
                                                        "(MESHTRON_DEBUG=1)"] * 2


# ---- tokenizers ----------------------------------------------------------------------------------------------

def test_byte_tokenizer_ids_and_round_trip(tmp_path):
    assert (BYTE.vocab_size, BYTE.eot_id, BYTE.encode("aé")) == (257, 256, [97, 195, 169])
    back = load_tokenizer(BYTE.save(tmp_path / "tok"))
    assert isinstance(back, ByteTokenizer) and back.fingerprint() == BYTE.fingerprint()
    assert load_tokenizer("byte").decode(BYTE.encode(DOCS[1]) + [256]) == DOCS[1]


def test_bpe_train_save_load_round_trip(tmp_path):
    texts = [corpus_text(), *DOCS]
    tok = train_bpe(texts, vocab_size=400)
    assert tok.eot_id == 0 and 257 < tok.vocab_size <= 400
    assert train_bpe(texts, vocab_size=400).fingerprint() == tok.fingerprint()  # training is deterministic
    for d in DOCS:
        assert tok.decode(tok.encode(d)) == d
    assert len(tok.encode(corpus_text())) < len(corpus_text()) / 2  # it learned merges
    assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [0] + tok.encode("b")

    saved = tok.save(tmp_path / "ck" / "tokenizer")
    for spec in (saved, saved / "tokenizer.json", str(saved)):
        back = load_tokenizer(spec)
        assert back.fingerprint() == tok.fingerprint() and back.eot_id == tok.eot_id
        assert all(back.encode(d) == tok.encode(d) for d in DOCS)
    assert load_tokenizer(saved).describe() == tok.describe()
    saved2 = load_tokenizer(saved).save(tmp_path / "again")  # saving a loaded tokenizer is byte-identical
    assert (saved2 / "tokenizer.json").read_bytes() == (saved / "tokenizer.json").read_bytes()


def test_prepare_bpe_trains_once_and_caches(tmp_path):
    f, cache = write(tmp_path / "a.txt", corpus_text()), tmp_path / "cache"
    a = prepare_tokenizer("bpe", f, vocab_size=350, cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("bpe-")]
    mtime = (entry / "tokenizer.json").stat().st_mtime_ns
    b = prepare_tokenizer("bpe", f, vocab_size=350, cache_dir=cache)
    assert b.fingerprint() == a.fingerprint() and (entry / "tokenizer.json").stat().st_mtime_ns == mtime
    ds = open_dataset(f, "bpe", seq_len=16, vocab_size=350, cache_dir=cache)
    assert ds.tokenizer.fingerprint() == a.fingerprint() and ds.token_file.tokens.max() < a.vocab_size


def test_hugging_face_folders(tmp_path):
    tok = train_bpe([corpus_text()], vocab_size=350)
    hf = tok.hf_tokenizer
    # a folder with tokenizer.json and a config naming the eos token
    d1 = tmp_path / "hf1"
    d1.mkdir()
    hf.save(str(d1 / "tokenizer.json"))
    (d1 / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    got = load_tokenizer(d1)
    assert got.eot_id == tok.eot_id and got.encode(DOCS[0]) == tok.encode(DOCS[0])
    # a folder with vocab.json + merges.txt (the BPE model's own files)
    d2 = tmp_path / "hf2"
    d2.mkdir()
    hf.model.save(str(d2))
    got = load_tokenizer(d2)
    assert got.eot_id == tok.eot_id and got.encode(DOCS[0]) == tok.encode(DOCS[0])
    assert got.decode(got.encode(DOCS[1])) == DOCS[1]


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters (as in its encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_gpt2_bpe_files(tmp_path):
    """A tiny encoder.json + vocab.bpe in GPT-2's own format (byte alphabet, merges, eot as the last id)."""
    enc = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t")]
    for a, b in merges:
        enc[a + b] = len(enc)
    enc["<|endoftext|>"] = len(enc)
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.eot_id) == (262, 261)
    assert tok.encode(" the cat") == [enc["Ġthe"], enc["Ġc"], enc["at"]]
    assert tok.encode("x<|endoftext|>") == [enc["x"], 261]
    assert tok.decode(tok.encode(DOCS[1])) == DOCS[1]
    back = load_tokenizer(tok.save(tmp_path / "saved"))
    assert back.fingerprint() == tok.fingerprint() and back.encode(DOCS[2]) == tok.encode(DOCS[2])


# ---- windows, split, sampler ---------------------------------------------------------------------------------

@pytest.fixture
def ds(tmp_path):
    return open_dataset(write(tmp_path / "a.txt", corpus_text(60)), "byte", seq_len=16, val_fraction=0.1,
                        cache_dir=tmp_path / "cache")


def test_windows_and_split(ds):
    toks, T = ds.token_file.tokens.astype(np.int64), 16
    total = (len(toks) - 1) // T
    assert ds.val.count == int(np.ceil(total * 0.1)) and ds.train.count + ds.val.count == total
    rows = ds.train.read(np.array([0, 3]))
    assert rows.dtype == torch.int64 and rows.shape == (2, T + 1)
    assert rows[1].tolist() == toks[3 * T:4 * T + 1].tolist()
    assert ds.val.read(np.array([0]))[0].tolist() == toks[ds.train.count * T:(ds.train.count + 1) * T + 1].tolist()
    vb = list(ds.val_batches(8))  # fixed: the val windows in order, wrapping around
    assert len(vb) == ds.n_val_batches(8) and vb[0].shape == (8, T + 1)
    assert torch.equal(torch.cat(vb)[:ds.val.count], ds.val.read(np.arange(ds.val.count)))
    assert torch.equal(torch.cat([ds.val_batch(1, 8, r, 4) for r in range(4)]), vb[1])


def test_sampler_is_deterministic_and_covers_each_epoch(ds):
    a, b, c = ds.sampler(seed=1), ds.sampler(seed=1), ds.sampler(seed=2)
    xa = [a.global_batch(8) for _ in range(5)]
    assert all(torch.equal(x, b.global_batch(8)) for x in xa)
    assert not torch.equal(xa[0], c.global_batch(8))
    n = ds.train.count
    for e in range(2):  # every training window exactly once per epoch
        assert sorted(a.window_ids(e * n, n).tolist()) == list(range(n))
    assert a.position == 40 and a.state_dict()["position"] == 40


def test_resume_gives_the_uninterrupted_batches(ds, tmp_path):
    n, B = ds.train.count, 6
    k = n // (2 * B) + 3  # so that the 2k batches cross an epoch boundary
    full = ds.sampler(seed=7)
    ref = [full.global_batch(B) for _ in range(2 * k)]
    assert 2 * k * B > n
    run = ds.sampler(seed=7)
    for _ in range(k):
        run.local_batch(B)
    state = json.loads(json.dumps(run.state_dict()))  # as stored in a checkpoint
    # a new process: reopen the (cached) data, load the position
    reopened = open_dataset(tmp_path / "a.txt", "byte", seq_len=16, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert reopened.token_file.from_cache
    resumed = reopened.sampler(seed=7)
    resumed.load_state_dict(state)
    for i in range(k, 2 * k):
        assert torch.equal(resumed.global_batch(B), ref[i]), i


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_ranks_union_is_the_global_batch(ds, dp):
    ref = ds.sampler(seed=3)
    ranks = [ds.sampler(seed=3) for _ in range(dp)]
    for _ in range(4):
        glob = ref.global_batch(8)
        parts = [s.local_batch(8, r, dp) for r, s in enumerate(ranks)]
        assert all(p.shape == (8 // dp, 17) for p in parts)
        assert torch.equal(torch.cat(parts), glob)
    assert {s.position for s in ranks} == {ref.position}


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_data_fails_fast(tmp_path):
    def err(fn, *match):
        with pytest.raises(DataError) as e:
            fn()
        for m in match:
            assert m in str(e.value), str(e.value)

    err(lambda: tokenize_data(tmp_path / "nope.txt"), "nope.txt", "does not exist")
    (tmp_path / "empty_dir").mkdir()
    write(tmp_path / "empty_dir" / "notes.csv", "a,b")
    err(lambda: tokenize_data(tmp_path / "empty_dir"), "no data files in folder", ".txt")
    write(tmp_path / "blank" / "a.txt", "")
    write(tmp_path / "blank" / "b.md.gz", "", gz=True)
    err(lambda: tokenize_data(tmp_path / "blank", cache_dir=tmp_path / "c"), "the data is empty")
    f = write(tmp_path / "notext.jsonl", '{"body": "hello"}\n')
    err(lambda: tokenize_data(f), "notext.jsonl line 1", 'no "text" field', "body")
    f = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": "oops",\n')
    err(lambda: tokenize_data(f), "bad.jsonl line 3", "malformed JSON")
    f = write(tmp_path / "num.jsonl", '{"text": 5}\n')
    err(lambda: tokenize_data(f), "num.jsonl line 1", "not a string")
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    err(lambda: tokenize_data(f), "latin1.txt", "not UTF-8")
    f = write(tmp_path / "fake.txt.gz", "plain text, not gzip")
    err(lambda: tokenize_data(f), "fake.txt.gz", "gzip")

    short = write(tmp_path / "short.txt", "x" * 40)  # 41 tokens with the end-of-text
    err(lambda: open_dataset(short, seq_len=64, val_fraction=0), "41 tokens", "seq_len=64 needs 65 tokens for one")
    err(lambda: open_dataset(short, seq_len=32), "41 tokens", "needs 65 tokens for 2 sequences", "val_fraction 0")
    assert open_dataset(short, seq_len=32, val_fraction=0).train.count == 1


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer 'sentencepiece'.*'byte'"):
        load_tokenizer("sentencepiece")
    with pytest.raises(DataError, match="--vocab-size"):
        prepare_tokenizer("bpe", "builtin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer in folder"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer file"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="at least 512"):
        train_bpe(["abc"], vocab_size=100)


def test_resume_on_other_data_is_refused(ds, tmp_path):
    state = ds.sampler(seed=1).state_dict()
    other = open_dataset(write(tmp_path / "b.txt", corpus_text(61)), "byte", seq_len=16, val_fraction=0.1)
    with pytest.raises(DataError, match="different data"):
        other.sampler(seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed: saved 1, now 2"):
        ds.sampler(seed=2).load_state_dict(state)
    loose = other.sampler(seed=1)
    loose.load_state_dict({**state, "position": 5}, strict=False)
    assert loose.position == 5
    with pytest.raises(DataError, match="batch axis size 3"):
        ds.sampler(seed=1).local_batch(8, 0, 3)
    assert isinstance(ds, Dataset) and isinstance(ds.tokenizer, ByteTokenizer)
    assert not isinstance(ds.tokenizer, BPETokenizer)
