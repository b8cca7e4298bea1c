"""Shipped detectors (a small model zoo): a manifest of packaged models and ``load(name)``.

The manifest ``resources/zoo/manifest.json`` lists each shipped detector: what it detects, what
it was trained on, the recipe, its validation/test numbers (written by ``bench/train_zoo.py``) and
the licence of its training data. Model files hold only the SVM and box-regressor weights; the
network they read is a packaged ImageNet backbone named by its weights' sha256 (checked on load),
so no backbone is copied.

* ``imagenet``: the zero-training detector (:class:`rcnn.demo.ImagenetDetector`): the ImageNet
  classifier over selective-search regions, 101 readable names, plus the shipped ``person`` head
  scoring the same proposals (its SVM scores calibrated to probabilities, Platt scaling) and the
  class-agnostic tightness scorer (:mod:`rcnn.tightness`) reading the head's forward pass.
* ``person``: an R-CNN person detector (:class:`rcnn.detect.RCNNModel`) trained on Penn-Fudan.

``load(name)`` returns the detector: an ``ImagenetDetector`` (``detect(image)``) or an
``RCNNModel`` (use it with :func:`rcnn.detect.detect_image`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ZOO_DIR = Path(__file__).resolve().parent / "resources" / "zoo"
MANIFEST_PATH = ZOO_DIR / "manifest.json"
#: the manifest layout this module reads
MANIFEST_VERSION = 1
#: CNN arithmetic of the imagenet detector's heads: fp32 (bf16 autocast is slower without native
#: bf16 support, and the features agree within ~1%: bench/results/demo.json)
HEAD_PRECISION = "fp32"


class ZooError(ValueError):
    """An unknown name or an unusable shipped file (one line)."""


@dataclass(frozen=True)
class ModelInfo:
    """One manifest entry. ``kind``: ``"imagenet"`` (zero-training detector) or ``"rcnn"`` (a
    model file). ``numbers``: validation/test results with how they were measured."""

    name: str
    kind: str
    description: str
    classes: list[str]
    trained_on: str
    recipe: str
    licence: str
    file: str | None = None
    sha256: str | None = None
    heads: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    tightness: str | None = None  # imagenet: the class-agnostic tightness scorer file (rcnn.tightness)
    tightness_sha256: str | None = None

    @property
    def path(self) -> Path | None:
        return ZOO_DIR / self.file if self.file else None


def manifest(path: str | Path | None = None) -> dict[str, ModelInfo]:
    """The shipped detectors by name (default: the packaged manifest)."""
    src = Path(path) if path is not None else MANIFEST_PATH
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ZooError(f"{src}: cannot read the model manifest ({e})") from None
    if doc.get("manifest_version") != MANIFEST_VERSION:
        raise ZooError(f"{src}: manifest version {doc.get('manifest_version')}, this rcnn reads {MANIFEST_VERSION}")
    out = {}
    for name, m in doc.get("models", {}).items():
        try:
            out[name] = ModelInfo(name=name, **m)
        except TypeError as e:
            raise ZooError(f"{src}: entry {name!r}: {e}") from None
    return out


def names() -> list[str]:
    """Names of the shipped detectors."""
    return list(manifest())


def info(name: str) -> ModelInfo:
    """The manifest entry of ``name``; :class:`ZooError` naming the choices if there is none."""
    m = manifest()
    if name not in m:
        raise ZooError(f"{name!r} is not a shipped detector (shipped: {', '.join(m)})")
    return m[name]


def load_rcnn(name: str):
    """The shipped :class:`rcnn.detect.RCNNModel` ``name`` (its file checked against the manifest's sha256)."""
    from rcnn.detect import ModelError, RCNNModel

    entry = info(name)
    if entry.kind != "rcnn" or entry.file is None:
        raise ZooError(f"{name!r} is not a model file but a {entry.kind!r} detector")
    path = _checked(entry, entry.file, entry.sha256)
    try:
        return RCNNModel.load(path)
    except ModelError as e:
        raise ZooError(str(e)) from None


def _checked(entry: ModelInfo, file: str, sha256: str | None) -> Path:
    path = ZOO_DIR / file
    if not path.is_file():
        raise ZooError(f"{entry.name!r}: shipped file {path} is missing (reinstall rcnn)")
    if sha256:
        from rcnn.cache import file_sha256

        if file_sha256(path) != sha256:
            raise ZooError(f"{entry.name!r}: {path} does not match the manifest's sha256 (reinstall rcnn)")
    return path


def load(name: str, config=None, vocabulary=None, heads: bool = True):
    """The shipped detector ``name``: an :class:`rcnn.demo.ImagenetDetector` for ``"imagenet"``
    (``config``: a :class:`rcnn.demo.DemoConfig`; ``vocabulary``: a vocabulary or its JSON path;
    ``heads=False``: the ImageNet vocabulary alone, without the shipped person head and tightness
    scorer), else an :class:`rcnn.detect.RCNNModel`."""
    from rcnn.demo import ImagenetDetector, ModelHead
    from rcnn.tightness import TightnessScorer

    entry = info(name)
    if entry.kind == "rcnn":
        return load_rcnn(name)
    if entry.kind != "imagenet":
        raise ZooError(f"{name!r}: unknown kind {entry.kind!r} in the manifest")
    head_objs = []
    for h in entry.heads if heads else []:
        hinfo = info(h)
        ab = hinfo.calibration.get("platt")
        if not ab or len(ab) != 2:
            raise ZooError(f"{h!r}: the manifest holds no Platt calibration ('calibration': {{'platt': [a, b]}})")
        head_objs.append(ModelHead(load_rcnn(h), (float(ab[0]), float(ab[1])), precision=HEAD_PRECISION))
    tight = None
    if heads and entry.tightness:
        try:
            tight = TightnessScorer.load(_checked(entry, entry.tightness, entry.tightness_sha256))
        except ValueError as e:
            raise ZooError(str(e)) from None
    return ImagenetDetector(vocabulary, config, heads=head_objs, tightness=tight)


__all__ = ["MANIFEST_PATH", "ZOO_DIR", "ModelInfo", "ZooError", "info", "load", "load_rcnn", "manifest", "names"]
