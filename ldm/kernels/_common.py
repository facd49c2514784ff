"""Shared dispatch rules for the fused kernels: backend names, the interpreter switch, launch counters.

`CALLS` counts eager launches by kernel name so tests can prove a fused path ran; `count` skips itself while
torch.compile traces (a global side effect there would break the graph), so compiled graphs hold no counter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter

import torch

from ldm.errors import SettingError

log = logging.getLogger(__name__)

KERNEL_BACKENDS = ("math", "triton", "auto")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Launches of every Triton kernel by name, so tests can prove the fused path really ran.
CALLS: Counter[str] = Counter()


def count(name: str) -> None:
    """Record one eager launch of kernel `name` (nothing while torch.compile traces)."""
    if not torch.compiler.is_compiling():
        CALLS[name] += 1


def reset_calls() -> None:
    """Zero the launch counters."""
    CALLS.clear()


def triton_available() -> bool:
    """True where the triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors through numpy (slow, exact)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_backend(backend: str | None) -> str:
    """Resolve a norm/GEGLU backend: the argument, else $ONEWORD_KERNELS, else "auto"."""
    name = backend or os.environ.get("ONEWORD_KERNELS", "auto")
    if name not in KERNEL_BACKENDS:
        raise SettingError(
            f"kernel backend {name!r} (argument or ONEWORD_KERNELS); choose one of {', '.join(KERNEL_BACKENDS)}"
        )
    return name


def device_ok(t: torch.Tensor, explicit: bool) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only when asked explicitly under TRITON_INTERPRET=1."""
    if t.device.type == "cuda":
        return True
    return explicit and t.device.type == "cpu" and interpreter_enabled()


def use_triton(name: str, tensors: tuple[torch.Tensor, ...], what: str) -> bool:
    """Decide math vs triton for an elementwise/norm kernel under backend `name` ("math"/"triton"/"auto")."""
    if name == "math":
        return False
    if not triton_available():
        if name == "triton":
            raise RuntimeError(f"{what}: backend 'triton' needs the triton package (pip install triton)")
        return False
    explicit = name == "triton"
    ok = all(t.dtype in KERNEL_DTYPES and device_ok(t, explicit) for t in tensors)
    if not ok and explicit:
        log.debug("%s: triton cannot run on %s; using the reference", what, [(t.device.type, t.dtype) for t in tensors])
    return ok


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's CUDA device current for a launch (Triton launches on the current device); no-op elsewhere."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
