"""Where the text comes from: a `--data` spec resolved to an ordered list of sources, each read as documents.

A spec is 'builtin' (CPython's own docs), a text file, a JSON Lines file (`.jsonl`/`.ndjson`, one document per
record's "text" field), or a folder (recursively: `.txt`, `.md`, `.jsonl`, `.ndjson`, sorted by relative path,
hidden entries skipped); each file may be gzip-compressed (`.gz`). A text file is one document.
Invariant: the documents of a spec, and their order, depend only on the files' contents and names.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtron.data.errors import DataError

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def builtin_corpus() -> str:
    """CPython's reference documentation on its topics (about 0.46 MB of English and code): no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class Source:
    """One input: a file (kind 'text' or 'jsonl', maybe gzip) or the built-in corpus (path None)."""
    kind: str  # 'text' | 'jsonl' | 'builtin'
    path: Path | None = None
    gzip: bool = False

    @property
    def label(self) -> str:
        return BUILTIN if self.path is None else str(self.path)

    def stat_signature(self) -> list:
        """Cheap identity: changes when the file is written, replaced or touched (ctime cannot be set back)."""
        if self.path is None:
            return [BUILTIN, sys.version]
        st = self.path.stat()
        return [self.label, self.kind, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def update_digest(self, h) -> None:
        """Feed this source's name, kind and raw bytes (compressed bytes for .gz) into hash `h`."""
        h.update(f"\0{self.kind}\0{self.label}\0".encode())
        if self.path is None:
            h.update(builtin_corpus().encode("utf-8"))
            return
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    def documents(self) -> Iterator[str]:
        """The non-empty documents of this source, in file order."""
        if self.kind == "builtin":
            yield builtin_corpus()
        elif self.kind == "text":
            text = _decode(self._read_all(), self.path)
            if text:
                yield text
        else:
            yield from self._jsonl_documents()

    def _open(self):
        return gzip.open(self.path, "rb") if self.gzip else open(self.path, "rb")

    def _read_all(self) -> bytes:
        try:
            with self._open() as f:
                return f.read()
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(f"cannot read {self.path}: {e}" + (" (is it really gzip?)" if self.gzip else "")) from None

    def _jsonl_documents(self) -> Iterator[str]:
        try:
            with self._open() as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    where = f"{self.path} line {lineno}"
                    try:
                        record = json.loads(_decode(raw, where))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): "
                                        f"each line must be one JSON object such as {{\"text\": \"...\"}}") from None
                    if not isinstance(record, dict) or "text" not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise DataError(f"{where}: no \"text\" field (found {keys}): each line must be a JSON "
                                        f"object with the document in \"text\"")
                    if not isinstance(record["text"], str):
                        raise DataError(f"{where}: \"text\" is a {type(record['text']).__name__}, not a string")
                    if record["text"]:
                        yield record["text"]
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(f"cannot read {self.path}: {e}" + (" (is it really gzip?)" if self.gzip else "")) from None


def _decode(raw: bytes, where) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}): convert it to UTF-8") from None


def _file_source(p: Path) -> Source:
    gz = p.suffix == ".gz"
    inner = Path(p.stem).suffix if gz else p.suffix
    return Source("jsonl" if inner.lower() in JSONL_SUFFIXES else "text", p, gz)


def _wanted(p: Path) -> bool:
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    return Path(name).suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES


def resolve_sources(data: str | Path | Sequence[str | Path] = BUILTIN) -> list[Source]:
    """The sources of a data spec (or of several, concatenated in the given order); fails on missing paths."""
    specs = [data] if isinstance(data, (str, Path)) else list(data)
    if not specs:
        raise DataError("no data given: pass a text file, a folder, a .jsonl file, or 'builtin'")
    out: list[Source] = []
    for spec in specs:
        if str(spec) == BUILTIN:
            out.append(Source("builtin"))
            continue
        p = Path(spec).expanduser().resolve()
        if p.is_file():
            out.append(_file_source(p))
        elif p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, f) for f in files if not f.startswith(".") and _wanted(Path(f))]
            if not found:
                raise DataError(f"no data files in folder {p}: expected .txt, .md, .jsonl or .ndjson files "
                                f"(optionally .gz), searched recursively")
            out += [_file_source(f) for f in sorted(found, key=lambda f: f.relative_to(p).as_posix())]
        else:
            raise DataError(f"data path '{spec}' does not exist: give a text file, a folder of .txt/.md files, "
                            f"a .jsonl file with a \"text\" field per line, or 'builtin'")
    return out


def iter_documents(sources: Sequence[Source]) -> Iterator[str]:
    """Every non-empty document of every source, in order."""
    for s in sources:
        yield from s.documents()


def content_digest(sources: Sequence[Source]) -> str:
    """A sha256 over every source's name, kind and bytes: equal digests mean the same documents."""
    h = hashlib.sha256(b"meshtron data v1")
    for s in sources:
        s.update_digest(h)
    return h.hexdigest()
