"""Tests for rcnn.demo: vocabulary, group scoring, suppression, outputs, and the real demo run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rcnn.backbones import imagenet_categories
from rcnn.demo import (
    DemoConfig,
    DetectionResult,
    ImageReport,
    ImageSource,
    Vocabulary,
    VocabularyError,
    check_writable,
    coco_document,
    folder_images,
    group_detections,
    load_vocabulary,
    softmax,
    suppress_parts,
    write_html,
)

CATS = imagenet_categories()


def _probs(n: int, assign: dict[int, dict[int, float]]) -> np.ndarray:
    """(n,1000) rows; row i puts assign[i][c] on class c and spreads the rest uniformly."""
    p = np.zeros((n, 1000), np.float32)
    for i in range(n):
        a = assign.get(i, {})
        rest = 1.0 - sum(a.values())
        others = [c for c in range(1000) if c not in a]
        p[i, others] = rest / len(others)
        for c, v in a.items():
            p[i, c] = v
    return p


# ----------------------------------------------------------------------------- vocabulary


def test_builtin_vocabulary_is_built_from_imagenet_names():
    v = load_vocabulary()
    doc = json.loads((__import__("rcnn.demo").demo.VOCABULARY_PATH).read_text())
    # every group's ids and readable names agree with the 1000 ImageNet names
    for g in doc["groups"]:
        assert [CATS[i] for i in g["imagenet_ids"]] == g["imagenet_names"]
    assert v.members[v.names.index("cat")] == (281, 282, 283, 284, 285)
    assert [CATS[i] for i in v.members[v.names.index("cat")]] == [
        "tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat",
    ]  # fmt: skip
    for name in ("dog", "bird", "cup", "car", "rocket", "boat", "bottle", "chair"):
        assert name in v.names
    assert "space shuttle" in [CATS[i] for i in v.members[v.names.index("rocket")]]
    assert {"coffee mug", "cup"} <= {CATS[i] for i in v.members[v.names.index("cup")]}
    assert len(v.members[v.names.index("dog")]) == 118  # ImageNet's dog breeds 151..268
    # groups are disjoint, so summed group probabilities never exceed 1
    allids = [i for m in v.members for i in m]
    assert len(allids) == len(set(allids))
    assert v.matrix().sum(1).max() == 1.0


def test_user_vocabulary_forms(tmp_path):
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"kitty": ["Tabby", "tiger cat"], "mug": [504, "cup"]}))
    v = load_vocabulary(p)
    assert v.names == ("kitty", "mug") and v.members == ((281, 282), (504, 968))
    p.write_text(json.dumps({"groups": [{"name": "x", "classes": [1, 1, 2]}]}))
    assert load_vocabulary(p).members == ((1, 2),)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty"),
        (json.dumps({"cat": ["tabbby"]}), "did you mean 'tabby'"),
        (json.dumps({"cat": [1000]}), "outside 0..999"),
        (json.dumps({"cat": []}), "non-empty list"),
        (
            json.dumps({"groups": [{"name": "a", "classes": [1]}, {"name": "a", "classes": [2]}]}),
            "appears twice",
        ),
        (json.dumps({"groups": [{"classes": [1]}]}), "name"),
        (json.dumps({"cat": [1.5]}), "neither"),
    ],
)
def test_bad_vocabulary_one_line_error(tmp_path, content, needle):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(VocabularyError) as e:
        load_vocabulary(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(VocabularyError, match="file not found"):
        load_vocabulary(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- grouping + suppression

VOC = Vocabulary(("cat", "dog", "cup"), ((281, 282, 283, 284, 285), tuple(range(151, 269)), (504, 968)))


def test_sum_beats_max_probability():
    # each cat class only 0.2 (max-prob thresholding at 0.5 would find nothing) but the group sums to 0.8
    p = _probs(1, {0: {281: 0.2, 282: 0.2, 283: 0.2, 284: 0.1, 285: 0.1}})
    s = VOC.group_scores(p)
    assert s[0, 0] == pytest.approx(0.8, abs=1e-5)
    _b, sc, lab = group_detections(np.array([[0, 0, 50, 50]]), p, VOC, DemoConfig(threshold=0.5))
    assert lab.tolist() == [0] and sc[0] == pytest.approx(0.8, abs=1e-5)
    # one very confident class outside every group is background
    p2 = _probs(1, {0: {930: 0.96}})  # "French loaf"
    assert len(group_detections(np.array([[0, 0, 50, 50]]), p2, VOC)[0]) == 0


def test_threshold_background():
    p = _probs(2, {0: {504: 0.3, 968: 0.15}, 1: {504: 0.3, 968: 0.25}})
    b, _s, lab = group_detections(
        np.array([[0, 0, 10, 10], [50, 50, 90, 90]]), p, VOC, DemoConfig(threshold=0.5)
    )
    assert lab.tolist() == [2] and b.tolist() == [[50, 50, 90, 90]]


def test_per_class_nms_at_0_3():
    boxes = np.array([[0, 0, 100, 100], [10, 0, 110, 100], [0, 0, 100, 40]], np.float32)
    # box1 IoU with box0 = 90/110 = 0.82 (suppressed); box2 IoU = 0.4 > 0.3 (suppressed)
    p = _probs(3, {0: {281: 0.9}, 1: {281: 0.8}, 2: {281: 0.7}})
    only_nms = DemoConfig(contain=0)  # isolate the paper's NMS from part suppression
    b, _s, _lab = group_detections(boxes, p, VOC, only_nms)
    assert b.tolist() == [[0, 0, 100, 100]]
    # IoU 0.25 < 0.3: both kept by NMS ...
    boxes2 = np.array([[0, 0, 100, 100], [0, 0, 100, 25]], np.float32)
    assert len(group_detections(boxes2, p[:2], VOC, only_nms)[0]) == 2
    # ... but the second lies wholly inside the first (a part of the same cat): dropped by default
    assert group_detections(boxes2, p[:2], VOC)[0].tolist() == [[0, 0, 100, 100]]


def test_suppress_parts_same_class_only_and_score_order():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 40, 40], [10, 10, 40, 40], [90, 0, 190, 100]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.55])
    labels = np.array([0, 0, 1, 0])
    # box1 (0.9) is inside box0 but scores higher: kept, and box0 is not inside box1: kept too;
    # box2 is inside box0 but another class: kept; box3 overlaps box0 by 10%: kept
    assert suppress_parts(boxes, scores, labels, 0.7).tolist() == [1, 0, 3, 2]
    scores2 = np.array([0.9, 0.6, 0.5, 0.55])
    assert suppress_parts(boxes, scores2, labels, 0.7).tolist() == [0, 3, 2]  # the part of box0 dropped


def test_cross_class_one_label_per_object_and_order():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 100, 100], [200, 200, 260, 260]], np.float32)
    p = _probs(3, {0: {281: 0.7}, 1: {200: 0.9}, 2: {504: 0.6}})
    b, s, lab = group_detections(boxes, p, VOC)
    # the dog box (0.9) wins the object; the cat box on the same object is dropped
    assert lab.tolist() == [1, 2]
    assert np.all(np.diff(s) <= 0)
    assert b.tolist() == [[5, 5, 100, 100], [200, 200, 260, 260]]


def test_max_detections_and_empty():
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(30)], np.float32)
    p = _probs(30, {i: {281: 0.6 + i / 100} for i in range(30)})
    b, s, lab = group_detections(boxes, p, VOC, DemoConfig(max_detections=5))
    assert len(b) == 5 and s[0] == pytest.approx(0.89, abs=1e-3)
    b, s, lab = group_detections(np.zeros((0, 4)), np.zeros((0, 1000)), VOC)
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)


def test_softmax():
    z = np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]])
    p = softmax(z)
    assert np.allclose(p.sum(1), 1) and np.allclose(p[0], [0.5, 0.5, 0]) and np.isfinite(p).all()


def test_config_validation():
    with pytest.raises(ValueError):
        DemoConfig(mode="bogus")
    with pytest.raises(ValueError):
        DemoConfig(threshold=0)


# ----------------------------------------------------------------------------- outputs


def _report(name: str, boxes, scores, labels) -> ImageReport:
    res = DetectionResult(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(labels, np.int64),
        list(VOC.names), 1234, {"total": 1.5},
    )  # fmt: skip
    return ImageReport(name, f"test:{name}", f"{name}.png", 200, 100, res)


def test_coco_document_parses_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    reps = [_report("a", [[10, 20, 50, 60], [0, 0, 200, 100]], [0.9, 0.6], [0, 2]), _report("b", [], [], [])]
    doc = coco_document(reps, VOC, DemoConfig())
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc))
    coco = COCO(str(p))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 2
    a = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert a["bbox"] == [10.0, 20.0, 40.0, 40.0] and a["category_id"] == 1 and a["score"] == 0.9
    assert coco.loadCats([3])[0]["name"] == "cup"
    assert doc["info"]["config"]["nms_iou"] == 0.3


def test_html_escapes_and_lists(tmp_path):
    r = _report("<evil>", [[1, 1, 5, 5]], [0.77], [1])
    write_html(tmp_path / "index.html", [r], ["bad.jpg: not an image file PIL can read"])
    text = (tmp_path / "index.html").read_text()
    assert "<evil>" not in text and "&lt;evil&gt;" in text
    assert "dog <b>0.77</b>" in text and "Skipped files" in text and "rcnn train" in text


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError, match="not a directory"):
        check_writable(f)
    # a path below a regular file cannot be created, even as root
    with pytest.raises(OSError, match="cannot write"):
        check_writable(f / "out")


def test_folder_images_lists_all_files(tmp_path):
    (tmp_path / "b.txt").write_text("hello")
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "sub").mkdir()
    src = folder_images(tmp_path)
    assert [s.name for s in src] == ["a", "b"]
    from rcnn.data import ImageReadError

    with pytest.raises(ImageReadError):
        src[0].load()


# ----------------------------------------------------------------------------- the real detector

# Hand-measured on skimage.data.chelsea() (451x300): the image drawn at 2x with a 25-px grid,
# each point then checked on a 4x crop centred on it (pixel column x, row y, 0-based).
CHELSEA_LEFT_EYE = (171, 114)  # centre of the pupil of the eye on the viewer's left
CHELSEA_RIGHT_EYE = (314, 135)  # centre of the pupil of the eye on the viewer's right
CHELSEA_NOSE = (260, 238)  # centre of the pink nose leather


@pytest.fixture(scope="module")
def chelsea_run(tmp_path_factory):
    from skimage import data

    from rcnn.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    src = ImageSource("chelsea", "skimage.data.chelsea()", data.chelsea)
    return run_demo([src], out)


def test_demo_outputs_exist_and_parse(chelsea_run):
    from PIL import Image
    from pycocotools.coco import COCO

    out = chelsea_run.out_dir
    png = out / "chelsea.png"
    assert png.is_file() and Image.open(png).size == (451, 300)
    assert Image.open(out / "summary.png").size[1] == 240
    coco = COCO(str(out / "detections.json"))
    assert [i["file_name"] for i in coco.dataset["images"]] == ["chelsea.png"]
    assert len(coco.getAnnIds()) == len(chelsea_run.images[0].result.scores) >= 1
    html_text = (out / "index.html").read_text()
    assert 'src="chelsea.png"' in html_text and "detections.json" in html_text
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_chelsea_top_detection_is_the_cat_face(chelsea_run):
    res = chelsea_run.images[0].result
    assert res.class_names[int(res.labels[0])] == "cat"
    x1, y1, x2, y2 = res.boxes[0]
    for x, y in (CHELSEA_LEFT_EYE, CHELSEA_RIGHT_EYE, CHELSEA_NOSE):
        assert x1 <= x < x2 and y1 <= y < y2, (res.boxes[0], (x, y))
    # the JSON says the same
    doc = json.loads((chelsea_run.out_dir / "detections.json").read_text())
    top = max(doc["annotations"], key=lambda a: a["score"])
    assert doc["categories"][top["category_id"] - 1]["name"] == "cat"


# ----------------------------------------------------------------------------- CLI, bad input


def _cli(*args):
    from typer.testing import CliRunner

    from rcnn.cli import app

    return CliRunner().invoke(app, ["demo", *args])


def test_cli_empty_folder_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("--images", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "empty" in r.output
    assert not (tmp_path / "out").exists()  # a refused run leaves no output folder behind


def test_cli_unwritable_output_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("-o", str(blocker / "out"))
    assert r.exit_code == 2 and "cannot write" in r.output
    assert "Detecting" not in r.output  # refused before loading the model or any image


def test_cli_bad_files_skipped_with_warnings(tmp_path):
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(d / "noise.png")
    out = tmp_path / "out"
    r = _cli("--images", str(d), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "notes.txt" in r.output and "broken.jpg" in r.output
    assert "1 image(s) processed" in r.output and "2 file(s) skipped" in r.output
    doc = json.loads((out / "detections.json").read_text())
    assert [i["file_name"] for i in doc["images"]] == ["noise.png"]
    assert "index.html" in r.output


def test_cli_only_broken_files_exit_2(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_text("nope")
    r = _cli("--images", str(d), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "a.jpg" in r.output and "no readable images" in r.output


@pytest.mark.slow
def test_cli_default_demo_all_sample_photos(tmp_path):
    r = _cli("-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {i["file_name"] for i in doc["images"]} >= {
        "chelsea.png",
        "coffee.png",
        "rocket.png",
        "astronaut.png",
    }
    names = {doc["categories"][a["category_id"] - 1]["name"] for a in doc["annotations"]}
    assert {"cat", "cup", "rocket"} <= names


def test_cli_bad_vocabulary_exit_2(tmp_path):
    v = tmp_path / "v.json"
    v.write_text(json.dumps({"kitty": ["tabbby"]}))
    r = _cli("--vocabulary", str(v), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "tabbby" in r.output and "Detecting" not in r.output


def test_cli_missing_images_path_exit_2(tmp_path):
    r = _cli("--images", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "no such file or folder" in r.output


# ----------------------------------------------------------------------------- VOC mapping, calibration, heads


def test_builtin_voc_mapping_is_versioned_and_names_real_classes():
    from rcnn.demo import load_class_mapping

    m = load_class_mapping()
    assert isinstance(m.version, int) and m.version >= 1 and m.target == "voc2007"
    voc = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
           "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # fmt: skip
    assert set(m.pairs.values()) == set(voc)  # every VOC class once, nothing else
    assert len(set(m.pairs.values())) == len(m.pairs)
    names = [*load_vocabulary().names, "person"]
    assert set(m.pairs) <= set(names)  # every mapped name is a detector name
    lab = m.label_map(["tv monitor", "truck", "table", "person"], voc)
    assert lab.tolist() == [voc.index("tvmonitor"), -1, voc.index("diningtable"), voc.index("person")]


@pytest.mark.parametrize(("content", "needle"), [
    ("{", "not valid JSON"), (json.dumps({"pairs": {"a": "b"}}), "version"),
    (json.dumps({"version": 1, "pairs": {}}), "pairs"), (json.dumps({"version": True, "pairs": {"a": "b"}}), "version"),
    (json.dumps({"version": 1, "pairs": {"a": 3}}), "pairs"),
])  # fmt: skip
def test_bad_class_mapping_one_line(tmp_path, content, needle):
    from rcnn.demo import load_class_mapping

    p = tmp_path / "m.json"
    p.write_text(content)
    with pytest.raises(VocabularyError) as e:
        load_class_mapping(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_fit_platt_recovers_a_logistic_and_stays_finite_when_separable():
    from rcnn.demo import fit_platt, platt

    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(1.5 * s - 1.0)))
    a, b = fit_platt(s, y)
    assert a == pytest.approx(1.5, rel=0.1) and b == pytest.approx(-1.0, abs=0.1)
    p = platt(np.array([-100.0, 0.0, 100.0]), a, b)
    assert p.dtype == np.float32 and p[0] < 1e-6 and p[2] > 1 - 1e-6 and 0 < p[1] < 0.5
    # perfectly separated scores: Platt's smoothed targets keep the slope finite
    a2, b2 = fit_platt(np.r_[np.full(10, -1.0), np.full(10, 1.0)], np.r_[np.zeros(10), np.ones(10)])
    assert np.isfinite([a2, b2]).all() and a2 > 0
    with pytest.raises(ValueError, match="both"):
        fit_platt(np.ones(5), np.ones(5))


def test_select_detections_uses_each_names_own_boxes():
    from rcnn.demo import select_detections

    boxes = np.array([[0, 0, 10, 10], [100, 100, 150, 150]], np.float32)
    scores = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    class_boxes = np.repeat(boxes[:, None], 2, axis=1).copy()
    class_boxes[1, 1] = [98, 101, 152, 149]  # name 1's regressed box of region 1
    b, _s, lab = select_detections(boxes, scores, DemoConfig(threshold=0.5), class_boxes)
    assert lab.tolist() == [0, 1] and b.tolist() == [[0, 0, 10, 10], [98, 101, 152, 149]]
    assert len(select_detections(np.zeros((0, 4)), np.zeros((0, 2)), DemoConfig())[0]) == 0
    with pytest.raises(ValueError, match="rows"):
        select_detections(boxes, scores[:1])


def test_contact_sheet_columns():
    from rcnn.demo import contact_sheet

    ims = [np.zeros((10, 20, 3), np.uint8)] * 5
    assert contact_sheet(ims, height=10, gap=2).shape == (10, 5 * 20 + 4 * 2, 3)
    assert contact_sheet(ims, height=10, gap=2, columns=2).shape == (3 * 10 + 2 * 2, 2 * 20 + 2, 3)


def test_vote_boxes_weighted_mean_of_same_class_overlaps():
    from rcnn.demo import vote_boxes

    boxes = np.array([[0, 0, 100, 100], [10, 0, 110, 100], [0, 0, 100, 100], [300, 300, 310, 310]], np.float32)
    scores = np.array([0.6, 0.2, 0.9, 0.9])
    labels = np.array([0, 0, 1, 0])
    # kept box 0 (class 0): votes with box 1 (IoU 0.82, class 0), not with box 2 (class 1) or box 3 (far)
    out = vote_boxes(boxes[:1], labels[:1], boxes, scores, labels, 0.5)
    assert np.allclose(out, [[2.5, 0, 102.5, 100]])
    # a threshold above their IoU: the box stays itself
    assert vote_boxes(boxes[:1], labels[:1], boxes, scores, labels, 0.9).tolist() == [[0, 0, 100, 100]]
    assert vote_boxes(np.zeros((0, 4)), np.zeros(0), boxes, scores, labels).shape == (0, 4)


def _tiny_person_model():
    """An RCNNModel on squeezenet1_1 pool5+fire5 at a 2x2 grid (3072-d) with a pool5 box regressor."""
    from rcnn.bbox_regression import BoxRegressor
    from rcnn.detect import RCNNModel
    from rcnn.features import FeatureConfig

    fc = FeatureConfig(backbone="squeezenet1_1", layer="pool5+fire5", mode="shared", grid=2, with_gt=True)
    opts = {k: v for k, v in fc.__dict__.items() if k not in ("batch_size", "device")}
    rng = np.random.default_rng(0)
    reg = BoxRegressor(["person"], np.zeros((1, 2048, 4), np.float32), np.array([[0.0, 0.0, 0.1, 0.1]], np.float32),
                       np.ones(1, bool), 1.0, "pool5", {**opts, "layer": "pool5"})
    return RCNNModel(["person"], rng.normal(0, 0.01, (3072, 1)).astype(np.float32), np.zeros(1, np.float32),
                     np.ones(1, bool), 1.0, "squeezenet1_1", fc.weights_hash(), "pool5+fire5", "shared", opts,
                     {"mode": "rcnn-fast"}, bbox_reg=reg)


def test_model_head_scores_shared_proposals_with_calibration_and_regression():
    from skimage import data

    from rcnn.demo import ImagenetDetector, ModelHead, platt
    from rcnn.tightness import TightnessScorer

    model = _tiny_person_model()
    head = ModelHead(model, (2.0, -1.0))
    image = np.ascontiguousarray(data.chelsea()[::2, ::2])
    boxes = np.array([[0, 0, 100, 80], [50, 20, 200, 140]], np.float32)
    probs, cboxes, extras = head.score(image, boxes, ["pool5"])
    assert probs.shape == (2, 1) and cboxes.shape == (2, 1, 4) and extras["pool5"].shape == (2, 2048)
    feats = head.source.extract(image, boxes)
    assert np.allclose(probs[:, 0], platt(model.score(feats)[:, 0], 2.0, -1.0), atol=1e-5)
    # the regressor's constant log-size offsets 0.1 grow every box by e^0.1 about its centre
    half = 0.5 * (boxes[:, 2:] - boxes[:, :2]) * np.exp(0.1)
    centre = 0.5 * (boxes[:, 2:] + boxes[:, :2])
    assert np.allclose(cboxes[1, 0], np.r_[centre[1] - half[1], centre[1] + half[1]], atol=0.01)
    assert np.allclose(cboxes[0, 0], [0, 0, centre[0, 0] + half[0, 0], centre[0, 1] + half[0, 1]], atol=0.01)  # clipped
    # the tightness scorer's pool5 tap comes from the head's pass (same network and settings)
    tight = TightnessScorer(np.zeros(2048, np.float32), 0.75, 1.0, "pool5", {**model.feature_options, "layer": "pool5"})
    det = ImagenetDetector(config=DemoConfig(threshold=0.05), heads=[head], tightness=tight)
    assert det.class_names[-1] == "person" and det._tight_host is head
    rs = det.score_regions(image)
    assert rs.scores.shape == (rs.boxes.shape[0], len(det.class_names)) and rs.class_boxes.shape[1:] == (102, 4)
    assert np.allclose(rs.tightness, 0.75) and "heads" in rs.seconds
    plain = det.decide(rs)
    tighter = det.decide(rs, DemoConfig(threshold=0.05, tightness=1.0))
    g = len(det.vocabulary)
    vocab_max = [r.scores[r.labels < g].max() for r in (plain, tighter)]
    assert vocab_max[1] == pytest.approx(0.75 * vocab_max[0], rel=1e-5)  # vocabulary names × 0.75
    head_max = [r.scores[r.labels == g].max() for r in (plain, tighter)]
    assert head_max[0] == head_max[1]  # the head's calibrated SVM scores are not re-scored


def test_cross_name_nms_only_within_a_family():
    from rcnn.demo import select_detections

    boxes = np.array([[0, 0, 100, 200], [2, 0, 100, 200]], np.float32)
    scores = np.array([[0.9, 0.0, 0.0], [0.0, 0.8, 0.7]], np.float32)  # uniform, hat (vocabulary) | person (head)
    _b, _s, lab = select_detections(boxes, scores, DemoConfig(threshold=0.5))
    assert lab.tolist() == [0]  # one family: one label per object
    _b, s, lab = select_detections(boxes, scores, DemoConfig(threshold=0.5), families=np.array([0, 0, 1]))
    assert lab.tolist() == [0, 2] and s.tolist() == pytest.approx([0.9, 0.7])  # the person keeps its box


# Hand-measured on examples/000084.jpg (500x375, the R-CNN release's demo photo; the same file as the
# VOC sample's JPEGImages/000084.jpg, whose 000084.xml describes another picture — chairs, a sofa and a
# table — so it cannot serve as the ground truth here): pixel-edge xyxy, read off a 4x crop with a 10-px grid.
RIDER_084 = (305, 103, 366, 201)  # helmet top to shoe soles, outstretched hand to back
BICYCLE_084 = (262, 143, 380, 227)  # rear wheel's left edge to front wheel's right edge, handlebar to tyres
HOUSES_084 = ((127, 145, 262, 258), (380, 183, 500, 252))  # the house fronts left and right of the rider


@pytest.mark.xfail(strict=True, reason=(
    "target not met: the shipped person head (Penn-Fudan pedestrians) scores the seated rider at "
    "0.04 (threshold 0.5) and six bicycle boxes on wheels and parts survive NMS"))
def test_000084_one_person_one_bicycle_nothing_on_the_houses():
    from conftest import data_path
    from rcnn import zoo
    from rcnn.boxes import box_iou
    from rcnn.data import load_image

    image = load_image(data_path("examples", "000084.jpg"))
    res = zoo.load("imagenet").detect(image)
    names = [res.class_names[int(k)] for k in res.labels]
    for name, truth in (("person", RIDER_084), ("bicycle", BICYCLE_084)):
        found = res.boxes[[n == name for n in names]]
        assert len(found) == 1, (name, res.top(10))
        assert float(box_iou(found, np.array([truth], np.float32))[0, 0]) >= 0.5, (name, found)
    for b, n in zip(res.boxes, names, strict=True):
        if n in ("person", "bicycle"):
            continue
        x1, y1, x2, y2 = (float(v) for v in b)
        area = max((x2 - x1) * (y2 - y1), 1e-6)
        inside = sum(max(0.0, min(x2, hx2) - max(x1, hx1)) * max(0.0, min(y2, hy2) - max(y1, hy1))
                     for hx1, hy1, hx2, hy2 in HOUSES_084)
        assert inside < 0.5 * area, f"{n} box {b.tolist()} lies on a house front"
