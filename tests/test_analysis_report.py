"""The HTML report: written from a small synthetic dataset, opened in headless Chromium,
every image must load."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnn.analysis.report import ReportInputs, write_report
from rcnn.data import Dataset, ImageRecord
from rcnn.evaluate import Detections

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=8000"]
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'IMGCHECK ' + ok + '/' + imgs.length;
});</script>"""


def _dataset(tmp: Path) -> tuple[Dataset, Detections]:
    rng = np.random.default_rng(0)
    records, rows = [], []
    for i in range(6):
        img = np.full((120, 160, 3), 40, np.uint8)
        boxes, labels = [], []
        for k in range(3):
            x, y = int(rng.integers(0, 110)), int(rng.integers(0, 70))
            w, h = int(rng.integers(15, 45)), int(rng.integers(15, 45))
            img[y : y + h, x : x + w] = (200, 60 * k, 90)
            boxes.append([x, y, min(x + w, 160), min(y + h, 120)])
            labels.append(k % 2)
        Image.fromarray(img).save(tmp / f"im{i}.png")
        b = np.array(boxes, np.float32)
        records.append(ImageRecord(f"im{i}", tmp / f"im{i}.png", 160, 120, b, np.array(labels), np.zeros(3, bool),
                                   truncated=np.array([0, 1, 0], bool)))
        for bb, lab in zip(b, labels, strict=True):
            if rng.random() < 0.7:
                rows.append((f"im{i}", lab, rng.random(), *(bb + rng.normal(0, 3, 4))))
        rows.append((f"im{i}", int(rng.integers(0, 2)), rng.random() * 0.5, 0, 0, 20, 20))
    ds = Dataset(tmp, "test", ["cat", "dog"], records)
    dets = Detections(np.array([r[0] for r in rows], dtype=object), np.array([r[3:] for r in rows], np.float32),
                      np.array([r[2] for r in rows], np.float32), np.array([r[1] for r in rows], np.int64))
    return ds, dets


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _loaded_images(browser: str, page: Path, profile: Path) -> tuple[int, int]:
    r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=180)
    m = re.search(r"IMGCHECK (\d+)/(\d+)", r.stdout)
    assert m, f"chromium did not render the page: {r.stderr[-500:]}"
    return int(m.group(1)), int(m.group(2))


def test_report_written(tmp_path):
    ds, dets = _dataset(tmp_path)
    out = tmp_path / "report"
    page = write_report(ReportInputs("toy", ds, dets, samples=2), out)
    html = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert {"pr.png", "fp_types.png", "dap.png", "sensitivity.png"} <= set(srcs)
    assert all((out / s).is_file() for s in srcs) and sum(s.startswith("det_") for s in srcs) == 4
    assert "<td>cat</td>" in html and (out / "report.json").is_file()


def test_report_renders_in_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    ds, dets = _dataset(tmp_path)
    out = tmp_path / "report"
    page = write_report(ReportInputs("toy", ds, dets, samples=2), out)
    check = out / "check.html"
    check.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    ok, total = _loaded_images(browser, check, tmp_path / "profile1")
    assert total >= 8 and ok == total
    # the check can fail: a missing picture is reported as not loaded
    (out / "dap.png").unlink()
    ok, total = _loaded_images(browser, check, tmp_path / "profile2")
    assert ok == total - 1


def test_report_skips_an_unreadable_image(tmp_path, caplog):
    import json
    import logging

    ds, dets = _dataset(tmp_path)
    bad = ds.records[2].path
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing usable
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="rcnn.analysis.report"):
        page = write_report(ReportInputs("toy", ds, dets, samples=3), out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "\n" not in warnings[0]
    html = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    dets_shown = [s for s in srcs if s.startswith("det_")]
    assert len(dets_shown) == 5 and all((out / s).is_file() for s in srcs)  # 3 best + the 2 other readable
    assert "im2" not in "".join(re.findall(r"<figcaption>([^<]*)</figcaption>", html))
    assert "1 unreadable image(s) left out of the pictures" in html
    doc = json.loads((out / "report.json").read_text())
    assert list(doc["skipped_images"]) == ["im2"] and doc["images"] == 6  # its boxes still count in the AP
