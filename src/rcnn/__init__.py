"""rcnn: R-CNN (Girshick et al., "Rich feature hierarchies ...") as a Python library.

Stages, one module each, data flowing one way through plain types:
``data`` → ``proposals`` → ``backbones``/``features`` → ``sources`` → ``svm`` → ``detect`` → ``evaluate``.
A module imports only from the stages below it (the import-linter contract in pyproject.toml).
Boxes are ``(N,4)`` float ``xyxy`` pixel-edge coordinates everywhere (see ``rcnn.boxes``).
"""

__version__ = "0.1.0"
