"""Cache writes: atomic, and a full disk leaves nothing half-written and says so in one line."""

from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import numpy as np
import pytest

from rcnn.cache import CacheWriteError, atomic_write, load_npz, safe_filename, save_json, save_npz


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_roundtrip(tmp_path):
    save_npz(tmp_path / "a" / "x.npz", boxes=np.arange(8, dtype=np.float32).reshape(2, 4))
    assert load_npz(tmp_path / "a" / "x.npz")["boxes"].shape == (2, 4)
    save_json(tmp_path / "a" / "m.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"k": 1}
    assert leftovers(tmp_path / "a") == ["m.json", "x.npz"]


def _disk_fills_after(monkeypatch, nbytes: int):
    """Make writes to temporary cache files raise ENOSPC once ``nbytes`` went to the file:
    files opened with ``open`` (np.savez) and ``Path.write_text`` (JSON)."""
    real_open, real_write_text = builtins.open, Path.write_text

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > nbytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return Full(f) if ("w" in mode and str(file).endswith(".tmp")) else f

    def fake_write_text(self, data, *a, **kw):
        real_write_text(self, data[:nbytes], *a, **kw)
        if len(data) > nbytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(Path, "write_text", fake_write_text)


@pytest.mark.parametrize("kind", ["npz", "json"])
def test_disk_full_leaves_no_partial_entry(tmp_path, monkeypatch, kind):
    folder = tmp_path / "stage"
    target = folder / f"entry.{kind}"
    big = np.zeros((1000, 4), np.float32)

    def save():
        return save_npz(target, boxes=big) if kind == "npz" else save_json(target, {"boxes": big.tolist()})

    _disk_fills_after(monkeypatch, 100)
    with pytest.raises(CacheWriteError) as e:
        save()
    msg = str(e.value)
    assert str(target) in msg and "disk full" in msg and "\n" not in msg
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert leftovers(folder) == []  # no entry, no .tmp file
    # the next run (space freed) writes the entry
    monkeypatch.undo()
    save()
    assert leftovers(folder) == [target.name]


def test_disk_full_keeps_the_previous_entry(tmp_path):
    target = tmp_path / "e.json"
    save_json(target, {"v": 1})

    def full(tmp):
        tmp.write_text('{"v": ')  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CacheWriteError, match="disk full"):
        atomic_write(target, full)
    assert json.loads(target.read_text()) == {"v": 1} and leftovers(tmp_path) == ["e.json"]


def test_other_errors_pass_through_and_clean_up(tmp_path):
    def boom(tmp):
        tmp.write_text("partial")
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        atomic_write(tmp_path / "x.json", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "y.json", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert leftovers(tmp_path) == []


def test_safe_filename_keeps_plain_ids_and_separates_others():
    assert safe_filename("BloodImage_00001") == "BloodImage_00001"
    assert safe_filename("a.b-c_d") == "a.b-c_d"
    odd = [safe_filename(x) for x in ("a/b", "a b", "a?b", ".hidden", "", "x/" * 100)]
    assert len(set(odd)) == len(odd)  # the hash keeps ids that map to the same characters apart
    for name in odd:
        assert name and not name.startswith(".") and "/" not in name and " " not in name and len(name) <= 89
    assert odd[0].startswith("a_b-") and odd[3].startswith("hidden-")
