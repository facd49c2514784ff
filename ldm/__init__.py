"""Hand-written latent diffusion: UNet, VAE, text towers, samplers and checkpoint loading."""

from __future__ import annotations

from typing import Any

__all__ = ["LatentDiffusion", "CheckpointError", "load_model", "tiny_model"]

_LAZY = {
    "LatentDiffusion": "ldm.pipeline",
    "tiny_model": "ldm.pipeline",
    "load_model": "ldm.checkpoint",
    "CheckpointError": "ldm.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
