"""The command line's shared vocabulary: each option or argument declared once, as an ``Annotated``
type the commands reuse (tests/test_cli_vocabulary.py checks they mean the same everywhere),
and the parsers of option strings (``--ks 50,100``, ``--scales 1,1.5``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from rcnn.cli.app import fail
from rcnn.device import PRECISIONS
from rcnn.distributed import ENGINES
from rcnn.evaluate import METRICS
from rcnn.features import MODES as FEATURE_MODES
from rcnn.features import SHARED_GRID, SHARED_SCALES
from rcnn.proposals import MODES as PROPOSAL_MODES
from rcnn.proposals import ProposalConfig

# ------------------------------------------------------------------ data
DatasetArg = Annotated[Path, typer.Argument(help="Dataset root (VOC, PASCAL v1.00 or YOLO layout), a YOLO data.yaml, "
                                            "or a COCO .json")]
SplitOpt = Annotated[str | None, typer.Option("--split", "-s", help="Split name (VOC: ImageSets/Main/<split>.txt; YOLO: "
                                              "data.yaml train/val/test or images/<split>/)", show_default="all images")]
TrainSplitOpt = Annotated[str, typer.Option("--split", "-s", help="Training split")]
MetricOpt = Annotated[Literal[METRICS], typer.Option("--metric", help="AP metric of the VOC devkit "
                                                     "(voc07: 11-point interpolated; voc2010: area under the curve)")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", "-j", help="Worker processes", show_default="CPU cores")]
ModelArg = Annotated[Path, typer.Argument(help="Model file written by `rcnn train` (.rcnn)")]
PngOpt = Annotated[Path, typer.Option("--output", "-o", help="PNG to write")]
ModelOrDetsArg = Annotated[Path, typer.Argument(help="Model file (.rcnn) or detections (COCO .json / comp4 files)")]

# ------------------------------------------------------------------ proposals
ProposalsOpt = Annotated[Literal[PROPOSAL_MODES], typer.Option("--proposals", help="Selective-search mode: rcnn-fast = "
                                                               "the paper's fast mode (§2.1); fast, quality = OpenCV's presets")]
KsOpt = Annotated[str | None, typer.Option("--ks", help="Felzenszwalb k values for rcnn-fast, comma-separated (small "
                                           "objects: 25,50)", show_default="50,100")]
MaxBoxesOpt = Annotated[int | None, typer.Option("--max-boxes", help="Keep only the best-ranked N boxes", show_default="all")]
MinSizeOpt = Annotated[float | None, typer.Option("--min-size", help="Drop boxes narrower than this (px, segmented image)",
                                                  show_default="20 for rcnn-fast")]
WidthOpt = Annotated[int | None, typer.Option("--resize-width", help="Segment at this width (px); 0 = original size",
                                              show_default="500 for rcnn-fast")]
UpscaleOpt = Annotated[bool, typer.Option("--upscale/--no-upscale", help="Also enlarge narrower images to --resize-width "
                                          "(the original code did)")]

# ------------------------------------------------------------------ features
FeatureModeOpt = Annotated[Literal[FEATURE_MODES], typer.Option(
    "--mode", "-m", help="Region features: warp = each region warped to the CNN input (faithful, §2.1); "
    "shared = one trunk pass per image + RoI pooling (fast)")]
ScalesOpt = Annotated[str, typer.Option("--scales", help="shared mode: image scale(s), comma-separated")]
GridOpt = Annotated[int, typer.Option("--grid", help="RoI grid (cells per side) of shared mode and pool5")]
SCALES, GRID = ",".join(str(s) for s in SHARED_SCALES), SHARED_GRID  # the defaults of --scales and --grid
UnitWeightsOpt = Annotated[str | None, typer.Option("--weights", "-w", help="Backbone weights file (torchvision "
                                                    "backbones)", show_default="built-in")]
PrecisionOpt = Annotated[Literal[PRECISIONS], typer.Option(
    "--precision", help="CPU arithmetic of the CNN: fp32 (faithful) or bf16 (bfloat16 autocast, ~2x faster on "
    "AVX512-BF16/AMX CPUs)")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N for the CNN (auto: a CUDA GPU when torch sees one; float16 "
    "autocast and pinned-memory batches on CUDA)")]
EngineOpt = Annotated[Literal[ENGINES], typer.Option(
    "--engine", help="Where proposals + features are computed (ray: Ray tasks writing into the same cache; "
    "without --address a local Ray instance)")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="ray: 'auto' (the cluster `ray start` made on this node) or HOST:PORT of a head node; "
    "RCNN_CACHE_DIR must be a path every node sees", show_default="a local Ray instance")]

# ------------------------------------------------------------------ detection
FlipOpt = Annotated[bool, typer.Option("--flip", help="Test-time flip averaging: each region's pooled map averaged with its "
                                       "mirror's (2x the CNN work; not in the paper, no gain measured on BCCD)")]
RelocalizeOpt = Annotated[int, typer.Option("--relocalize", min=0, help="Rounds of iterative localisation after box "
                                           "regression: each class's best boxes are re-scored and regressed again (not in "
                                           "the paper; BCCD fine-tuned: +5 mAP with 1 round)")]
NoBboxRegOpt = Annotated[bool, typer.Option("--no-bbox-reg", help="Do not refine boxes with the model's box regressor")]

# ------------------------------------------------------------------ analysis
GroupOpt = Annotated[list[str] | None, typer.Option("--group", "-g", help="Similar-class group NAME=a,b,c (repeatable)",
                                                   show_default="VOC's animals, vehicles, furniture")]
NoVocOpt = Annotated[bool, typer.Option("--no-voc-groups", help="No built-in groups (no Sim errors)")]
FpMetricOpt = Annotated[Literal[(*METRICS, "coco101")], typer.Option(
    "--metric", help="AP metric: the VOC devkit's (voc07, voc2010) or TIDE's 101-point (coco101)")]


def floats(text: str) -> tuple[float, ...]:
    """``"1,1.5"`` → ``(1.0, 1.5)`` (``ValueError`` on a non-number)."""
    return tuple(float(x) for x in text.split(","))


def make_config(mode: str, ks: str | None, max_boxes: int | None, min_size: float | None, resize_width: int | None,
                upscale: bool) -> ProposalConfig:
    """Build a :class:`ProposalConfig` from CLI options or exit with one error line."""
    kw: dict = {"mode": mode, "max_boxes": max_boxes, "min_size": min_size, "resize_width": resize_width,
                "upscale": upscale}
    if ks:
        try:
            kw["ks"] = tuple(int(k) for k in ks.split(","))
        except ValueError:
            raise fail(f"--ks must be comma-separated integers, not {ks!r}", 2) from None
    try:
        return ProposalConfig(**kw)
    except ValueError as e:
        raise fail(str(e), 2) from None
