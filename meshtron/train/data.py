"""Text to train on and its tokenizer: the built-in corpus (CPython's own docs) and a byte-level tokenizer.

Invariant: the global batch of step k is a pure function of (tokens, seed, k, batch size, sequence length),
whatever the mesh; each batch-axis rank then takes its contiguous rows of it.
"""
from __future__ import annotations

import numpy as np
import torch


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; token 256 is the end-of-text separator."""
    vocab_size = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def builtin_corpus() -> str:
    """CPython's reference documentation on its topics (about 0.46 MB of English and code): no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def tokenize_corpus(text: str, tok: ByteTokenizer) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


class RandomWindows:
    """Each step samples `batch` windows of seq_len+1 tokens at offsets drawn from (seed, step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"the data has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}: "
                             f"give more text or a smaller --seq-len")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.seq_len, self.seed = seq_len, seed

    def global_batch(self, step: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch,), generator=g)
        return torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
