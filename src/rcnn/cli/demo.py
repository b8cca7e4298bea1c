"""``rcnn demo``: the zero-training ImageNet-vocabulary detector on sample or user photos."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from rcnn.cli.app import app, console, err_console, fail
from rcnn.cli.features import FeatureModeOpt


@app.command()
def demo(
    images: Path | None = typer.Option(
        None,
        "--images",
        "-i",
        help="Folder (or one file) of your own photos.",
        show_default="photos shipped with scikit-image and matplotlib",
    ),
    output: Path = typer.Option(Path("rcnn-demo"), "--output", "-o", help="Output folder (created)."),
    vocabulary: Path | None = typer.Option(
        None,
        "--vocabulary",
        help="Vocabulary JSON: readable names -> ImageNet classes.",
        show_default="the built-in one",
    ),
    threshold: float = typer.Option(
        0.5, "--threshold", "-t", help="A group whose summed probability is below this is background."
    ),
    mode: FeatureModeOpt = "shared",
    backbone: str = typer.Option(
        "efficientnet_lite0", "--backbone", "-b", help="ImageNet backbone: efficientnet_lite0 or squeezenet1_1."
    ),
    top_k: int = typer.Option(10, "--top-k", help="At most this many detections per image."),
) -> None:
    """Detect objects with no training: selective search -> ImageNet classifier per region -> readable names,
    plus people from the shipped person head (rcnn models).

    Writes OUTPUT/<image>.png (annotated), OUTPUT/detections.json (COCO layout) and OUTPUT/index.html. A demonstration of the pipeline; train a real detector with rcnn train.

    """
    from rcnn import zoo
    from rcnn.demo import (
        DemoConfig,
        ImageReport,
        VocabularyError,
        check_writable,
        folder_images,
        load_vocabulary,
        run_demo,
        sample_images,
    )

    try:
        config = DemoConfig(backbone=backbone, mode=mode, threshold=threshold, max_detections=top_k)
    except ValueError as e:
        raise fail(str(e), 2) from None
    # everything that can fail fast is checked before the (slow) model and image work, and the
    # inputs before the output folder is created (a refused run leaves nothing behind)
    if images is not None:
        if not images.exists():
            raise fail(f"{images}: no such file or folder", 2)
        sources = folder_images(images)
        if not sources:
            raise fail(f"{images}: folder is empty, no images to run on", 2)
    else:
        sources = sample_images()
    try:
        vocab = load_vocabulary(vocabulary) if vocabulary is not None else None
    except VocabularyError as e:
        raise fail(str(e), 2) from None
    try:
        check_writable(output)
    except OSError as e:
        raise fail(f"output folder {e}", 2) from None
    try:
        detector = zoo.load("imagenet", config=config, vocabulary=vocab)
    except (VocabularyError, zoo.ZooError) as e:

        raise fail(str(e), 2) from None

    table = Table(title="rcnn demo (imagenet detector, zero training)")
    table.add_column("image")
    table.add_column("detections", justify="right")
    table.add_column("top labels")
    table.add_column("seconds", justify="right")

    def on_image(r: ImageReport) -> None:
        top = ", ".join(f"{n} {s:.2f}" for n, s in r.result.top(3)) or "-"
        table.add_row(r.name, str(len(r.result.scores)), top, f"{r.result.seconds.get('total', 0):.1f}")
        console.print(f"  {r.name}: {len(r.result.scores)} detections ({top})", highlight=False)

    def on_skip(msg: str) -> None:
        err_console.print(f"[yellow]warning:[/] skipped {msg}", highlight=False, soft_wrap=True)

    console.print(
        f"Detecting in {len(sources)} image(s) with {config.backbone} ({config.mode} mode, "
        f"{len(detector.class_names)} names) -> {output}/",
        highlight=False,
        soft_wrap=True,
    )
    t0 = time.perf_counter()
    report = run_demo(sources, output, detector, on_image=on_image, on_skip=on_skip)
    console.print(table)
    n_ok, n_bad = len(report.images), len(report.skipped)
    summary = f"{n_ok} image(s) processed in {time.perf_counter() - t0:.1f} s"
    if n_bad:
        summary += f", {n_bad} file(s) skipped (not readable images)"
    console.print(summary, highlight=False)
    if n_ok == 0:
        raise fail(f"{images}: no readable images", 2)
    console.print(f"Open {report.html_path.resolve()}", highlight=False, soft_wrap=True)
