"""Tokenised data: the token stream cached on disk, cut into windows, split into training and validation.

The stream is every document's ids followed by the end-of-text id, in source order, stored as a flat numpy
memmap (uint16 when the vocabulary fits, else uint32). Window i is tokens[i*T : i*T + T + 1] (T = seq_len):
windows do not overlap (stride T), each gives inputs [:-1] and targets [1:]. The last `val_fraction` of the
windows (rounded up, at least one) is the validation split; the rest is training.
Invariants: the stream is a pure function of (documents, tokenizer fingerprint); a cache entry is reused only
when both are unchanged and every id in it is below the tokenizer's vocabulary size (checked when the stream is
written and again, in one pass, whenever it is reused: an entry that fails is rebuilt), and is written
atomically (a crash leaves the previous entry or none).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meshtron.data import _atomic
from meshtron.data.errors import DataError
from meshtron.data.sampler import Sampler, rank_rows
from meshtron.data.sources import BUILTIN, Source, content_digest, iter_documents, resolve_sources
from meshtron.data.tokenizer import MARKER, Tokenizer, load_tokenizer, train_bpe

FORMAT = 1  # bump when the token-file layout changes: old cache entries are then ignored
_BATCH_CHARS = 4 << 20  # documents are encoded in batches of about this many characters


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class TokenFile:
    """A tokenised corpus: `tokens` (1-D memmap or array) and what produced it.

    `fingerprint` digests (input contents, tokenizer): checkpoints store it to detect a change of data on resume.
    """
    tokens: np.ndarray
    tokenizer: Tokenizer
    fingerprint: str
    n_documents: int
    sources: list[str]
    path: Path | None = None      # the .bin file when cached
    from_cache: bool = False      # True when this load tokenised nothing

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_data(data: str | Path | Sequence = BUILTIN, tokenizer: str | Path | Tokenizer = "byte",
                  cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> TokenFile:
    """Tokenise `data` once: with `cache_dir`, into a memmapped file there, reused while inputs are unchanged.

    Reuse check: the sources' (path, size, mtime, ctime, inode) equal the entry's, or else their content hash
    does (then only the recorded stats are refreshed). Without `cache_dir` the tokens stay in memory.
    Several ranks may call this at once (each writes its own temporary file), but it is cheaper to call it on
    one rank first, then on the others after a barrier.
    """
    sources, tok = resolve_sources(data), load_tokenizer(tokenizer)
    labels = [s.label for s in sources]
    if cache_dir is None:
        return _tokenize_in_memory(sources, tok, log)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    slot = hashlib.sha256(json.dumps([FORMAT, labels, tok.fingerprint()]).encode()).hexdigest()[:16]
    meta_path = cache / f"tokens-{slot}.json"
    meta, stats = _read_meta(meta_path, cache), [s.stat_signature() for s in sources]
    content = None if meta is not None and meta["stats"] == stats else content_digest(sources)
    if meta is not None and content in (None, meta["content"]):
        bad = _first_out_of_range(_memmap(cache / meta["bin"], meta), tok.vocab_size)
        if bad is None:
            if content is not None:
                _atomic.write_text(meta_path, json.dumps({**meta, "stats": stats}))
            if log:
                log(f"reusing {meta['n_tokens']:,} cached tokens from {cache / meta['bin']}")
            return _open_cached(meta, cache, tok, labels)
        if log:
            log(f"the cached tokens {cache / meta['bin']} hold id {bad}, outside the {tok.describe()}'s "
                f"{tok.vocab_size} ids (a damaged cache): tokenising again")
        content = content or content_digest(sources)

    bin_path = cache / f"tokens-{slot}-{content[:16]}.bin"
    t0 = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    tmp = _atomic.tmp_path(bin_path)
    try:
        with open(tmp, "wb") as f:
            n_tokens, n_docs = _write_stream(sources, tok, dtype, f.write)
        _check_not_empty(n_tokens, labels)
        _atomic.commit(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": FORMAT, "sources": labels, "stats": stats, "content": content, "bin": bin_path.name,
            "tokenizer": tok.fingerprint(), "tokenizer_describe": tok.describe(), "dtype": dtype.name,
            "n_tokens": n_tokens, "n_documents": n_docs}
    old = _read_meta(meta_path, cache)
    _atomic.write_text(meta_path, json.dumps(meta))
    if old is not None and old["bin"] != bin_path.name:
        (cache / old["bin"]).unlink(missing_ok=True)
    if log:
        log(f"tokenised {_plural(n_docs, 'document')} into {n_tokens:,} tokens with the {tok.describe()} in "
            f"{time.perf_counter() - t0:.1f} s; cached as {bin_path}")
    return TokenFile(_memmap(cache / meta["bin"], meta), tok, _fingerprint(content, tok), n_docs, labels, bin_path)


def prepare_tokenizer(spec: str | Path | Tokenizer, data: str | Path | Sequence = BUILTIN,
                      vocab_size: int | None = None, cache_dir: str | Path | None = None) -> Tokenizer:
    """`load_tokenizer(spec)`, except spec 'bpe': train a byte-level BPE of `vocab_size` on the documents of
    `data` (cached under `cache_dir` by data content and vocab_size, so ranks and reruns reuse it)."""
    if str(spec) != "bpe":
        return load_tokenizer(spec)
    if not vocab_size:
        raise DataError("tokenizer 'bpe' is trained on the data and needs a vocabulary size: pass --vocab-size")
    sources = resolve_sources(data)
    if cache_dir is None:
        return train_bpe(iter_documents(sources), vocab_size)
    target = Path(cache_dir) / f"bpe-{vocab_size}-{content_digest(sources)[:16]}"
    if not (target / MARKER).is_file():
        tmp = _atomic.tmp_path(target)
        train_bpe(iter_documents(sources), vocab_size).save(tmp)
        try:
            tmp.rename(target)  # atomic; fails if another rank got there first, which is as good
        except OSError:
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return load_tokenizer(target)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _fingerprint(content: str, tok: Tokenizer) -> str:
    return hashlib.sha256(f"{content}\0{tok.fingerprint()}".encode()).hexdigest()


def _write_stream(sources: Sequence[Source], tok: Tokenizer, dtype: np.dtype, write) -> tuple[int, int]:
    """Encode documents in batches and `write` each one's ids then the end-of-text id; returns (tokens, docs)."""
    eot = np.array([tok.eot_id], dtype=dtype)
    n_tokens = n_docs = 0
    for batch in _batches(iter_documents(sources)):
        for ids in tok.encode_batch(batch):
            ids = np.asarray(ids)
            if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise DataError(f"the {tok.describe()} produced token id {bad}, outside its vocabulary of "
                                f"{tok.vocab_size}: the tokenizer is inconsistent; give another --tokenizer")
            write(ids.astype(dtype).tobytes())
            write(eot.tobytes())
            n_tokens += len(ids) + 1
        n_docs += len(batch)
    return n_tokens, n_docs


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize_in_memory(sources, tok, log) -> TokenFile:
    parts: list[bytes] = []
    dtype = token_dtype(tok.vocab_size)
    n_tokens, n_docs = _write_stream(sources, tok, dtype, parts.append)
    labels = [s.label for s in sources]
    _check_not_empty(n_tokens, labels)
    tokens = np.frombuffer(b"".join(parts), dtype=dtype)
    return TokenFile(tokens, tok, _fingerprint(content_digest(sources), tok), n_docs, labels)


def _check_not_empty(n_tokens: int, labels: list[str]) -> None:
    if n_tokens == 0:
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        raise DataError(f"the data is empty: no text in {shown}: give files with text (JSON Lines records need a "
                        f"non-empty \"text\")")


def _read_meta(path: Path, cache: Path) -> dict | None:
    """The cache entry at `path` if it is complete and of this FORMAT, else None (then it is rebuilt)."""
    try:
        meta = json.loads(path.read_text("utf-8"))
        ok = (meta["format"] == FORMAT and
              (cache / meta["bin"]).stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize)
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _first_out_of_range(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> int | None:
    """The first id >= vocab_size in `tokens` (read in chunks: one pass at memory speed), or None."""
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        if len(part) and int(part.max()) >= vocab_size:
            return int(part[part >= vocab_size][0])
    return None


def _memmap(path: Path, meta: dict) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))


def _open_cached(meta, cache, tok, labels) -> TokenFile:
    return TokenFile(_memmap(cache / meta["bin"], meta), tok, _fingerprint(meta["content"], tok),
                     meta["n_documents"], labels, cache / meta["bin"], from_cache=True)


@dataclass(frozen=True)
class Windows:
    """Windows `first` .. `first + count - 1` of a token stream; `read` takes ids relative to `first`."""
    tokens: np.ndarray
    seq_len: int
    first: int
    count: int

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """The windows `ids` as a LongTensor (len(ids), seq_len + 1); reads only those tokens."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"window ids out of range [0, {self.count})")
        starts = (self.first + ids) * self.seq_len
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # (n, T+1)
        return torch.from_numpy(rows.astype(np.int64))


class Dataset:
    """A token stream cut into training and validation windows of seq_len + 1 tokens (see the module docstring)."""

    def __init__(self, token_file: TokenFile, seq_len: int, val_fraction: float = 0.05):
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, not {seq_len}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), not {val_fraction}")
        n = len(token_file)
        total = (n - 1) // seq_len if n else 0
        n_val = math.ceil(total * val_fraction) if val_fraction > 0 else 0
        if total - n_val < 1:
            w = 1 if val_fraction == 0 else 2  # the fewest windows leaving one for training
            while w - math.ceil(w * val_fraction) < 1:
                w += 1
            split = f"{w} sequences (training and validation at val_fraction={val_fraction})" \
                if val_fraction else "one sequence"
            raise DataError(
                f"the data is too short: {n:,} tokens ({_plural(token_file.n_documents, 'document')}, "
                f"{token_file.tokenizer.name} tokenizer), but seq_len={seq_len} needs {w * seq_len + 1:,} tokens "
                f"for {split}: give more text or a smaller --seq-len"
                + (", or no validation split (val_fraction 0)" if val_fraction else ""))
        self.token_file, self.seq_len, self.val_fraction = token_file, seq_len, val_fraction
        self.tokenizer, self.fingerprint = token_file.tokenizer, token_file.fingerprint
        self.train = Windows(token_file.tokens, seq_len, 0, total - n_val)
        self.val = Windows(token_file.tokens, seq_len, total - n_val, n_val)

    def sampler(self, seed: int, position: int = 0) -> Sampler:
        """The training stream for `seed`, starting `position` sequences in."""
        return Sampler(self.train, seed, position, data_fingerprint=self.fingerprint)

    def n_val_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        """How many validation batches cover the split once (capped by `max_batches`); 0 without a split."""
        n = math.ceil(self.val.count / batch_size)
        return n if max_batches is None else min(n, max_batches)

    def val_batch(self, j: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """Validation batch j: windows (j*B .. j*B + B - 1) mod n_val of the split, this rank's rows
        (B/dp_size contiguous rows, as for training). Fixed: independent of seed and position."""
        if self.val.count == 0:
            raise DataError("there is no validation split: val_fraction is 0")
        lo, hi = rank_rows(batch_size, dp_rank, dp_size)
        return self.val.read((j * batch_size + np.arange(lo, hi)) % self.val.count)

    def val_batches(self, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    max_batches: int | None = None) -> Iterator[torch.Tensor]:
        for j in range(self.n_val_batches(batch_size, max_batches)):
            yield self.val_batch(j, batch_size, dp_rank, dp_size)

    def describe(self) -> str:
        return (f"{len(self.token_file):,} tokens in {_plural(self.token_file.n_documents, 'document')} "
                f"({self.tokenizer.describe()}); {self.train.count:,} training and {self.val.count:,} validation "
                f"sequences of {self.seq_len} + 1 tokens")


def open_dataset(data: str | Path | Sequence = BUILTIN, tokenizer: str | Path | Tokenizer = "byte", *,
                 seq_len: int, val_fraction: float = 0.05, vocab_size: int | None = None,
                 cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Dataset:
    """Everything in one call: prepare the tokenizer (training a BPE for 'bpe'), tokenise (cached), window, split."""
    tok = prepare_tokenizer(tokenizer, data, vocab_size, cache_dir)
    return Dataset(tokenize_data(data, tok, cache_dir, log), seq_len, val_fraction)
