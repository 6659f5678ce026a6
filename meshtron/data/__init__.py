"""Training data: sources (`--data`), tokenizers (`--tokenizer`), the cached token stream, windows, the sampler.

Invariant: the global batch at sequence position p is a pure function of (documents, tokenizer, seq_len,
val_fraction, seed, p, batch size), whatever the mesh and however often the run was stopped and resumed; each
batch-axis rank reads only its contiguous rows of it from the memory-mapped token file.

Typical use in a training loop (every rank; cheaper if rank 0 goes first and the others follow a barrier)::

    from meshtron.data import open_dataset
    ds = open_dataset(cfg.data or "builtin", cfg.tokenizer or "byte", seq_len=cfg.seq_len,
                      val_fraction=0.05, vocab_size=cfg.vocab_size, cache_dir=run_dir / "data-cache", log=print)
    tok = ds.tokenizer                      # .vocab_size, .eot_id, .encode, .decode; tok.save(ckpt_dir / "tokenizer")
    sampler = ds.sampler(seed=cfg.seed)     # or sampler.load_state_dict(ckpt["data"]) on resume
    for step in range(start, steps):
        x = sampler.local_batch(cfg.batch_size, dp_rank, dp_size)   # (B/dp, seq_len + 1) int64; inputs x[:, :-1]
        ...
        ckpt["data"] = sampler.state_dict() # {"position", "seed", "n_windows", "seq_len", "data"}
    for xb in ds.val_batches(cfg.batch_size, dp_rank, dp_size, max_batches=8): ...   # fixed validation set

Pieces, usable alone:
- `load_tokenizer(spec)`: 'byte' | 'gpt2' | tokenizer.json path | folder (meshtron save, Hugging Face folder with
  tokenizer.json or vocab.json + merges.txt, GPT-2's encoder.json + vocab.bpe). `train_bpe(texts, vocab_size)`.
  `prepare_tokenizer(spec, data, vocab_size, cache_dir)` also accepts 'bpe' (trains on `data`).
- `resolve_sources(data)` / `iter_documents(sources)`: data spec 'builtin' | text file | .jsonl | folder, .gz ok.
- `tokenize_data(data, tokenizer, cache_dir)` -> `TokenFile` (the stream; `.from_cache` says if it was reused).
- `Dataset(token_file, seq_len, val_fraction)`: `.train`/`.val` `Windows`, `.sampler(seed)`, `.val_batch(j, ...)`.
- `Sampler`: `.local_batch(B, dp_rank, dp_size)`, `.batch_at(position, B, ...)`, `.state_dict()`.
Errors a user can fix raise `DataError` (a ValueError) with what to change.
"""
from meshtron.data.dataset import (Dataset, TokenFile, Windows, open_dataset, prepare_tokenizer, token_dtype,
                                   tokenize_data)
from meshtron.data.errors import DataError
from meshtron.data.sampler import Sampler, rank_rows
from meshtron.data.sources import BUILTIN, Source, builtin_corpus, iter_documents, resolve_sources
from meshtron.data.tokenizer import (EOT, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe)

__all__ = ["BUILTIN", "BPETokenizer", "ByteTokenizer", "DataError", "Dataset", "EOT", "Sampler", "Source",
           "TokenFile", "Tokenizer", "Windows", "builtin_corpus", "iter_documents", "load_tokenizer",
           "open_dataset", "prepare_tokenizer", "rank_rows", "resolve_sources", "token_dtype", "tokenize_data",
           "train_bpe"]
