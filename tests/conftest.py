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


def write_old_segmentation_model(path: Path, mask_config: dict) -> Path:
    """A segmentation model file as an earlier version wrote it, with ``mask_config`` as stored then."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    fc = {"backbone": "squeezenet1_1", "weights": None, "taps": ["pool5", "fc6", "fc7"], "mode": "shared",
          "context_pad": 0, "batch_size": 32}
    meta = {"format": "rcnn-segmentation-v1", "classes": ["person"], "strategy": "full", "tap": "fc7",
            "scales": {"full": 1.0}, "threshold": 0.3, "mask_config": mask_config, "feature_config": fc, "info": {}}
    save_file({"W": np.zeros((1, 512), np.float32), "b": np.zeros(1, np.float32)}, str(path),
              metadata={"rcnn": json.dumps(meta)})
    return path
