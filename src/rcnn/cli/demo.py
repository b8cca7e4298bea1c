"""``rcnn demo``: the zero-training ImageNet-vocabulary detector on sample or user photos."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from rcnn.cli import options as opt
from rcnn.cli.app import app, console, exits, fail, print_warning


@app.command()
def demo(
    images: Path | None = typer.Option(None, "--images", "-i", help="Folder (or one file) of your own photos.",
                                       show_default="photos shipped with scikit-image and matplotlib"),
    output: Path = typer.Option(Path("rcnn-demo"), "--output", "-o", help="Output folder (created)."),
    vocabulary: Path | None = typer.Option(None, "--vocabulary", help="Vocabulary JSON: readable names -> ImageNet "
                                           "classes.", show_default="the built-in one"),
    threshold: float = typer.Option(0.5, "--threshold", "-t", help="A group whose summed probability is below this "
                                    "is background."),
    mode: opt.FeatureModeOpt = "shared",
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="ImageNet backbone: efficientnet_lite0 "
                                 "or squeezenet1_1."),
    top_k: int = typer.Option(10, "--top-k", help="At most this many detections per image."),
) -> None:
    """Detect objects with no training: selective search -> ImageNet classifier per region -> readable names,
    plus people from the shipped person head (rcnn models).

    Writes OUTPUT/<image>.png (annotated), OUTPUT/detections.json (COCO layout) and OUTPUT/index.html. A demonstration of the pipeline; train a real detector with rcnn train.

    """
    from rcnn import zoo
    from rcnn.demo import DemoConfig, ImageReport, demo_inputs, run_demo

    with exits(ValueError, zoo.ZooError):
        config = DemoConfig(backbone=backbone, mode=mode, threshold=threshold, max_detections=top_k)
        sources, vocab = demo_inputs(images, vocabulary, output)
        detector = zoo.load("imagenet", config=config, vocabulary=vocab)
    table = Table(title="rcnn demo (imagenet detector, zero training)")
    for col, justify in (("image", "left"), ("detections", "right"), ("top labels", "left"), ("seconds", "right")):
        table.add_column(col, justify=justify)

    def on_image(r: ImageReport) -> None:
        top = ", ".join(f"{n} {s:.2f}" for n, s in r.result.top(3)) or "-"
        table.add_row(r.name, str(len(r.result.scores)), top, f"{r.result.seconds.get('total', 0):.1f}")
        console.print(f"  {r.name}: {len(r.result.scores)} detections ({top})", highlight=False)

    def on_skip(msg: str) -> None:
        print_warning(f"skipped {msg}")

    console.print(f"Detecting in {len(sources)} image(s) with {config.backbone} ({config.mode} mode, "
                  f"{len(detector.class_names)} names) -> {output}/", highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    report = run_demo(sources, output, detector, on_image=on_image, on_skip=on_skip)
    console.print(table)
    skipped = f", {len(report.skipped)} file(s) skipped (not readable images)" if report.skipped else ""
    console.print(f"{len(report.images)} image(s) processed in {time.perf_counter() - t0:.1f} s{skipped}", highlight=False)
    if not report.images:
        raise fail(f"{images}: no readable images", 2)
    console.print(f"Open {report.html_path.resolve()}", highlight=False, soft_wrap=True)
