"""The instances model's configuration: the shapes model's SD1 classes with a deeper autoencoder."""
from __future__ import annotations

from experiments.shapes.config import shapes
from ldm.config import ModelConfig

NAME = "instances"


def instances(scale_factor: float = 1.0) -> ModelConfig:
    """32 px, f=4 (8×8×4 latents) like shapes; one residual block per VAE level for the finer detail."""
    base = shapes(scale_factor)
    vae = {"ddconfig": {**base.vae["ddconfig"], "num_res_blocks": 1}, "embed_dim": 4}
    return base.with_(name=NAME, vae=vae)
