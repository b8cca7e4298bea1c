"""Content-keyed on-disk caches: atomic writes, resumable, never stale.

Every cache entry lives under ``cache_dir()/<stage>/<key>/...`` where ``key`` is a hash
of everything the entry depends on (dataset path, settings, weights hash, ...). A
changed setting gives a new key, so stale entries are never reused; files are written
to a temporary name and renamed, so a killed run leaves either a whole entry or none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def cache_dir() -> Path:
    """Root of the user cache: ``$RCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/rcnn``, else ``~/.cache/rcnn``."""
    env = os.environ.get("RCNN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rcnn"


def settings_hash(*parts: Any, length: int = 16) -> str:
    """Stable hex digest of JSON-serialisable ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def safe_filename(name: str) -> str:
    """``name`` (an image id, a class name) as a file name: unchanged when it is already made of
    ``A-Za-z0-9._-`` and does not start with a dot; otherwise those characters with every other one
    replaced by ``_``, at most 80 of them, plus a hash of ``name`` (distinct names stay distinct)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or not safe or safe.startswith("."):
        safe = f"{safe.lstrip('.')[:80]}-{settings_hash(name, length=8)}"
    return safe


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CacheWriteError(OSError):
    """A cache entry that could not be written because the disk (or the quota) is full. Its
    message is one line naming the path; ``errno`` is kept (``ENOSPC`` / ``EDQUOT``)."""

    def __str__(self) -> str:
        return str(self.strerror)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path`` (atomic on POSIX).

    On any failure the temporary file is removed and ``path`` is left as it was (absent, or
    the previous whole entry), so the next run recomputes just this entry. A full disk raises
    :class:`CacheWriteError` ("<path>: disk full ..."), whichever step hit it.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise CacheWriteError(e.errno, f"{path}: {_FULL[e.errno]} while writing this cache entry (nothing "
                                           "partial was kept; free space and rerun: finished entries are reused)") from None
        raise
    return path


_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded (disk full for this user)"}


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Atomically write ``arrays`` as an uncompressed ``.npz``."""

    def w(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, w)


def load_npz(path: str | Path) -> dict[str, np.ndarray] | None:
    """Read an ``.npz`` written by :func:`save_npz`; ``None`` if absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None


def read_safetensors(path: str | Path, names: tuple[str, ...], what: str) -> tuple[Any, list[np.ndarray]]:
    """``(metadata, tensors)`` of a safetensors file written by :func:`atomic_write`: its ``"rcnn"``
    metadata entry parsed as JSON (None if absent) and the tensors ``names`` as numpy arrays.
    ``ValueError`` naming the file if it is missing or is not ``what`` (a readable file of those tensors)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("rcnn", "null"))
            return meta, [f.get_tensor(n) for n in names]
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} file not found") from None
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def save_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def dir_size_mb(path: str | Path) -> float:
    """Bytes on disk under ``path`` in MB (1e6)."""
    p = Path(path)
    if not p.exists():
        return 0.0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6
