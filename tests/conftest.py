"""Shared fixtures: paths to the real datasets beside the repository (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear message when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p}")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches under a per-session temporary directory, never ~/.cache."""
    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rcnn-cache"))
