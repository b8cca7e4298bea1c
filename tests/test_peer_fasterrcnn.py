"""bench/peer_fasterrcnn.py: refuses without data; a killed run resumes exactly where its checkpoint left it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "peer_fasterrcnn.py"
#: small images and few training images: a few CPU-seconds per iteration
TINY = ["--max-train-images", "6", "--min-size", "240", "--max-size", "320", "--log-every", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


def test_refuses_without_data(tmp_path):
    r = _run("--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.json"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "BCCD not found" in lines[0]
    assert not (tmp_path / "p.json").exists()


def _trace(path: Path) -> dict[int, tuple[float, str, str, float]]:
    """iteration -> (loss, lr, image ids, training seconds); a re-trained iteration keeps its last line."""
    out = {}
    for line in path.read_text().splitlines():
        it, loss, lr, train_s, ids = line.split(" ", 4)
        out[int(it)] = (float(loss), lr, ids, float(train_s))
    return out


@pytest.mark.slow  # ~13 training iterations and 4 process starts: a minute or two on 2 busy cores
def test_killed_run_resumes_exactly(tmp_path):
    data = str(data_path("BCCD"))
    out = tmp_path / "p.json"
    common = ["--data", data, "--out", str(out), *TINY, "--budgets", "600"]
    # reference: 6 uninterrupted iterations (then the same abrupt exit, so both stop at 6)
    a = _run(*common, "--name", "a", "--trace", str(tmp_path / "a.txt"), "--simulate-kill-after", "6")
    assert a.returncode == 3, a.stderr[-2000:]
    # killed after iteration 3 with a checkpoint after every iteration: the last one is iteration 2's
    b_args = [*common, "--name", "b", "--trace", str(tmp_path / "b.txt"), "--checkpoint-every", "0"]
    b1 = _run(*b_args, "--simulate-kill-after", "3")
    assert b1.returncode == 3, b1.stderr[-2000:]
    b2 = _run(*b_args, "--simulate-kill-after", "6")
    assert b2.returncode == 3, b2.stderr[-2000:]
    assert "resumed" in b2.stdout and "iteration 2," in b2.stdout
    ta, tb = _trace(tmp_path / "a.txt"), _trace(tmp_path / "b.txt")
    assert sorted(ta) == sorted(tb) == [1, 2, 3, 4, 5, 6]
    lines = (tmp_path / "b.txt").read_text().splitlines()
    assert [int(x.split()[0]) for x in lines] == [1, 2, 3, 3, 4, 5, 6]  # iteration 3 trained twice
    for it in ta:  # same images, flips (through the losses), learning rate and optimizer state
        assert ta[it][1:3] == tb[it][1:3]
        assert ta[it][0] == pytest.approx(tb[it][0], rel=1e-4, abs=1e-5)
    # the last checkpoint is iteration 5's (the kill after 6 came before its checkpoint): a budget just past
    # its clock trains iteration 6 again, then evaluates and writes the JSON point
    budget = f"{(tb[5][3] + 0.01) / 60:.6f}"
    b3 = _run(*[x if x != "600" else budget for x in b_args], "--max-test-images", "2")
    assert b3.returncode == 0, b3.stderr[-2000:]
    assert "under one epoch" not in b3.stdout  # 6 iterations x 2 images = two epochs of 6 images
    run = json.loads(out.read_text())["runs"]["b"]
    (point,) = run["points"]
    assert point["iterations"] == 6 and point["epochs"] == 2.0 and point["test_images"] == 2
    assert 0.0 <= point["map_voc07"] <= 1.0 and "fp_analysis" in point
    assert Path(point["detections_file"]).is_file() and out.with_suffix(".png").is_file()
    # a budget the run is already past (with no point there) cannot be re-created from the checkpoint
    b4 = _run(*[x if x != "600" else "0.0005" for x in b_args])
    assert b4.returncode == 0 and "already past it" in b4.stdout, b4.stderr[-2000:]
    assert [p["budget_min"] for p in json.loads(out.read_text())["runs"]["b"]["points"]] == [float(budget)]
