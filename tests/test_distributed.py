"""Local and Ray feature engines (rcnn.distributed): same cache, same features, failures reported."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from conftest import data_path
from rcnn.data import ImageRecord, load_dataset
from rcnn.distributed import _features_shard, extract_dataset
from rcnn.features import FeatureConfig, feature_path, get_features
from rcnn.proposals import ProposalConfig

PC = ProposalConfig(max_boxes=12)  # few regions: the engines, not the CNN, are under test
FC = FeatureConfig(batch_size=16)


def _voc(n: int):
    ds = load_dataset(data_path("VOC2007-test-sample"), "test")
    return replace(ds, records=ds.records[:n])


def _bad_record(tmp_path) -> ImageRecord:
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    e = np.zeros((0, 4), np.float32)
    return ImageRecord("broken", p, 10, 10, e, np.zeros(0, np.int64), np.zeros(0, bool))


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        extract_dataset(_voc(1), PC, FC, engine="spark")


def test_task_body_fills_the_shared_cache_and_reports_bad_images(tmp_path, monkeypatch):
    """What a Ray task runs, called in-process with the environment its ``runtime_env`` gives a
    worker: writes the cache get_features reads, reports an unreadable image as a failure (not an
    exception, so Ray does not retry it), and leaves the process environment as it found it."""
    ds = _voc(1)
    rec = ds.records[0]
    root = str(ds.root.resolve())
    shared = tmp_path / "shared-cache"
    monkeypatch.setenv("RCNN_CACHE_DIR", str(shared))
    monkeypatch.setenv("RCNN_THREADS", "1")
    env = dict(os.environ)
    res = _features_shard([(rec, root), (_bad_record(tmp_path), root)], PC, FC)
    assert [r["image_id"] for r in res] == [rec.image_id, "broken"]
    assert res[0]["error"] is None and not res[0]["cached"] and 0 < res[0]["regions"] <= 12
    assert "broken.jpg" in res[1]["error"]
    assert feature_path(rec, PC, FC, root).is_file() and str(feature_path(rec, PC, FC, root)).startswith(str(shared))
    again = _features_shard([(rec, root)], PC, FC)
    assert again[0]["cached"]
    assert dict(os.environ) == env


@pytest.mark.slow  # starts a Ray instance and two workers that import torch: ~1 min on 2 busy cores
def test_ray_engine_equals_local_engine(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    ds = _voc(3)
    bad = _bad_record(tmp_path)
    recs = [*ds.records, bad]
    root = ds.root.resolve()

    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "local"))
    loc = extract_dataset(ds, PC, FC, engine="local", workers=2, records=recs)
    local = {r.image_id: get_features(r, PC, FC, root) for r in ds.records}

    monkeypatch.setenv("RCNN_CACHE_DIR", str(tmp_path / "ray"))
    ray_s = extract_dataset(ds, PC, FC, engine="ray", workers=2, records=recs)
    assert (ray_s.computed, ray_s.cached, loc.computed) == (3, 0, 3)
    assert len(ray_s.failed) == 1 and "broken.jpg" in ray_s.failed[0]
    assert len(loc.failed) == 1 and "broken.jpg" in loc.failed[0]
    for r in ds.records:
        assert feature_path(r, PC, FC, root).is_file()  # written by the Ray workers into this cache
        boxes, feats = get_features(r, PC, FC, root)  # a cache read now
        lb, lf = local[r.image_id]
        np.testing.assert_array_equal(boxes, lb)  # proposals: bit for bit
        # float16 storage: one thread (Ray task) vs two (local) may round the last bit differently
        np.testing.assert_allclose(feats.astype(np.float32), lf.astype(np.float32), rtol=2e-3, atol=2e-3)
    # resumable / interchangeable: a second run computes nothing
    again = extract_dataset(ds, PC, FC, engine="ray", workers=2)
    assert (again.computed, again.cached) == (0, 3)


def test_cli_engine_options_are_checked():
    from typer.testing import CliRunner

    from rcnn.cli import app

    voc = str(data_path("VOC2007-test-sample"))
    r = CliRunner().invoke(app, ["features", voc, "--split", "test", "--engine", "spark"])
    assert r.exit_code == 2 and "--engine" in r.output and "'spark' is not one of 'local', 'ray'" in r.output
    r = CliRunner().invoke(app, ["features", voc, "--split", "test", "--address", "auto"])
    assert r.exit_code == 2 and "--address needs --engine ray" in r.output


def test_cli_detect_and_evaluate_check_engine_options(tmp_path):
    from typer.testing import CliRunner

    from rcnn.cli import app

    r = CliRunner().invoke(app, ["detect", str(tmp_path / "m.rcnn"), str(tmp_path / "a.jpg"), "-o", str(tmp_path),
                                 "--engine", "dask"])
    assert r.exit_code == 2 and "--engine" in r.output and "'dask' is not one of 'local', 'ray'" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m.rcnn"), str(tmp_path), "--address", "auto"])
    assert r.exit_code == 2 and "--address needs --engine ray" in r.output
