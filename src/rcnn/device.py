"""Device selection for the CNN stages: ``--device auto|cpu|cuda[:i]``.

``auto`` (the default) uses the first CUDA GPU when torch can see one, else the CPU. An explicit
``cuda`` that cannot be honoured falls back to the CPU with a message that says why (no CUDA in
this torch build, no visible device, index out of range). On CUDA the network runs under
float16 autocast (features are stored as float16 anyway, and fp16 keeps 3 more mantissa bits
than bf16, so GPU and CPU cache entries agree within storage precision) and input batches are
copied from pinned host memory asynchronously.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
_WARNED: set[str] = set()


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why ``cuda:index`` cannot be used here, or ``None`` if it can."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    try:
        if not torch.cuda.is_available():
            return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
        n = torch.cuda.device_count()
    except RuntimeError as e:  # a broken driver install raises here
        return f"CUDA initialisation failed: {str(e).splitlines()[0]}"
    if index >= n:
        return f"cuda:{index} requested but only {n} CUDA device(s) are visible"
    return None


def resolve_device(device: str | torch.device | None = "auto") -> tuple[torch.device, str | None]:
    """``(device to use, why it is not the one asked for or None)``.

    ``auto``/``None`` → ``cuda`` when available, else ``cpu`` (reason given, logged at info level);
    ``cuda``/``cuda:i`` → that GPU, or ``cpu`` with the reason (logged once as a warning);
    ``cpu`` → ``cpu``. Anything else raises ``ValueError``.
    """
    name = "auto" if device is None else str(device)
    if name == "cpu":
        return torch.device("cpu"), None
    if name == "auto":
        why = cuda_unavailable_reason(0)
        if why is None:
            return torch.device("cuda", 0), None
        log.info("device auto: using the CPU (%s)", why)
        return torch.device("cpu"), why
    if name == "cuda" or name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1]) if ":" in name else 0
        except ValueError:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}") from None
        why = cuda_unavailable_reason(index)
        if why is None:
            return torch.device("cuda", index), None
        if name not in _WARNED:
            _WARNED.add(name)
            log.warning("device %s unavailable, using the CPU: %s", name, why)
        return torch.device("cpu"), why
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager[Any]:
    """The arithmetic the CNN runs in: float16 autocast on CUDA; on the CPU float32
    (``"fp32"``, the faithful default) or bfloat16 autocast (``"bf16"``: ~2x faster on CPUs
    with AVX512-BF16/AMX, features within ~0.5% relative error; measured in bench/features.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``: zero-copy on the CPU; on CUDA through pinned
    (page-locked) memory with a non-blocking copy, so the transfer overlaps queued GPU work."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def module_device(module: torch.nn.Module | None) -> torch.device:
    """The device of a module's first parameter (CPU for parameterless modules or None)."""
    if module is None:
        return torch.device("cpu")
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")




def place_backbone(bb, device: str | torch.device | None) -> torch.device:
    """Put a :class:`rcnn.backbones.Backbone`'s network on ``device`` (resolved as in
    :func:`resolve_device`) and return the device it runs on; ``None`` leaves it where it is."""
    mod = bb.modules if bb.modules is not None else bb.trunk
    if device is None:
        return module_device(mod)
    dev, _ = resolve_device(device)
    if module_device(mod) != dev:
        if bb.modules is None and dev.type != "cpu":
            log.warning("backbone %s exposes only its trunk: running on the CPU", bb.name)
            return torch.device("cpu")
        mod.to(dev)
        bb.trunk.to(dev)
    return dev


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: itself on the CPU, else via pinned memory, non-blocking."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A result tensor back on the CPU as float32 (a no-op for CPU results)."""
    return t if t.device.type == "cpu" else t.float().cpu()


__all__ = ["DEVICES", "autocast", "cuda_unavailable_reason", "host_to", "module_device", "place_backbone", "resolve_device",
           "to_device", "to_host"]
