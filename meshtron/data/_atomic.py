"""Atomic file writes: write a sibling temporary file, flush it to disk, rename it over the target.

Invariant: a reader sees either the previous file or the complete new one, never a partial write, even if the
writer dies or several ranks write the same file at once (each uses its own temporary name).
"""
from __future__ import annotations

import os
from pathlib import Path


def tmp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk and rename it to `path` (atomic on POSIX within one file system)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    try:
        tmp.write_bytes(data)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
