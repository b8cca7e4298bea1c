"""rcnn: R-CNN (Girshick et al., "Rich feature hierarchies ...") as a Python library.

Stages, one module each, data flowing one way through plain types:
``data`` → ``proposals`` → ``backbones``/``features`` → ``sources`` → ``svm``/``bbox_regression`` →
``detect`` → ``evaluate`` → ``pipeline``; a module imports only from the stages below it (the
import-linter contract in pyproject.toml). Boxes are ``(N,4)`` float ``xyxy`` pixel-edge coordinates
everywhere (see ``rcnn.boxes``).

The workflow in three calls (:mod:`rcnn.pipeline`)::

    model = rcnn.train("data/", split="trainval")
    dets = model.detect(image)
    res = rcnn.evaluate(model, "data/", split="test")
"""

import types as _types

from rcnn._version import __version__ as __version__

#: the workflow functions, imported on first use so ``import rcnn`` stays light
_PIPELINE = ("train", "load", "recipe", "Recipe", "PRESETS", "Detector")


class _EvaluateModule(_types.ModuleType):
    """``rcnn.evaluate`` is the VOC/COCO evaluation module (``rcnn.evaluate.coco_metrics``, …) and,
    called, :func:`rcnn.pipeline.evaluate`: the name cannot be both a submodule attribute and a
    function, so the module itself is made callable."""

    def __call__(self, *args, **kwargs):
        from rcnn.pipeline import evaluate

        return evaluate(*args, **kwargs)


from rcnn import evaluate as _evaluate_module  # noqa: E402  (after the class it is given)

_evaluate_module.__class__ = _EvaluateModule


def __getattr__(name: str):
    if name in _PIPELINE:
        from rcnn import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PIPELINE])
