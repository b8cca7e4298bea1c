"""rcnn: R-CNN (Girshick et al., "Rich feature hierarchies ...") as a Python library.

Stages, one module each, data flowing one way through plain types:
``data`` → ``proposals`` → ``backbones``/``features`` → ``sources`` → ``svm``/``bbox_regression`` →
``detect`` → ``evaluate`` → ``pipeline``. Boxes are ``(N,4)`` float ``xyxy`` pixel-edge coordinates
everywhere (see ``rcnn.boxes``).

The workflow in three calls (:mod:`rcnn.pipeline`)::

    model = rcnn.train("data/", split="trainval")
    dets = model.detect(image)
    res = rcnn.evaluate(model, "data/", split="test")
"""

__version__ = "0.2.0"

#: the workflow functions, imported on first use so ``import rcnn`` stays light
_PIPELINE = ("train", "load", "evaluate", "recipe", "Recipe", "PRESETS", "Detector")


def __getattr__(name: str):
    if name in _PIPELINE:
        from rcnn import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PIPELINE])
