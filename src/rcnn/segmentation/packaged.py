"""Model files shipped inside the package (mask rankers, mask heads): found by name or path, loaded once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def packaged_file(folder: Path, name: str, suffix: str, what: str) -> Path:
    """``folder/<name><suffix>`` when ``name`` is a packaged file, else ``name`` as a path.

    Raises ``FileNotFoundError`` naming ``what`` and the packaged choices when neither exists.
    """
    p = folder / f"{name}{suffix}"
    if p.is_file():
        return p
    p = Path(name)
    if not p.is_file():
        choices = ", ".join(sorted(f.stem for f in folder.glob(f"*{suffix}"))) or "none"
        raise FileNotFoundError(f"{name}: no such {what} (packaged: {choices})")
    return p


_LOADED: dict[tuple[str, str, float], object] = {}


def load_once(path: Path, loader: Callable[[Path], T]) -> T:
    """``loader(path)``, kept per (loader, path, modification time): a rewritten file is read again."""
    key = (getattr(loader, "__qualname__", repr(loader)), str(path), path.stat().st_mtime)
    if key not in _LOADED:
        _LOADED[key] = loader(path)
    return _LOADED[key]  # type: ignore[return-value]
