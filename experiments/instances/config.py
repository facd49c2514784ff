"""The instances model's configuration: the shapes model's SD1 classes with a wider, deeper autoencoder."""

from __future__ import annotations

from experiments.shapes.config import shapes
from ldm.config import ModelConfig

NAME = "instances"
Z_CHANNELS = 8  # 8×8×8 latents: an object's identity survives them (README: autoencoder study)


def instances(scale_factor: float = 1.0) -> ModelConfig:
    """32 px, f=4 like shapes, but 8 latent channels and one residual block per VAE level for the finer detail."""
    base = shapes(scale_factor)
    vae = {"ddconfig": {**base.vae["ddconfig"], "num_res_blocks": 1, "z_channels": Z_CHANNELS}, "embed_dim": Z_CHANNELS}
    unet = {**base.unet, "in_channels": Z_CHANNELS, "out_channels": Z_CHANNELS}
    return base.with_(name=NAME, vae=vae, unet=unet)
