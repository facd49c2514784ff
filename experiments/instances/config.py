"""The instances model's configuration: the shapes model's SD1 classes with a wider, deeper autoencoder."""

from __future__ import annotations

from experiments.shapes.config import shapes
from ldm.config import ModelConfig

NAME = "instances"
Z_CHANNELS = 8  # 8×8×8 latents: an object's identity survives them (README: autoencoder study)
UNET_WIDTH = 96  # 64 (the shapes UNet) barely used the captions here (README: text conditioning)
# SD's schedule ends at ᾱ_T = 4.7e-3: √ᾱ_T · ‖white − black background latents‖ = 0.068 · 45 ≈ 3 σ, so the UNet
# read the background (and the body's colour) from the noise itself and ignored the caption, and at sampling the
# seed chose them. 0.025 leaves ᾱ_T = 4e-5 (≈ 0.3 σ). README: "The noise chose the background".
LINEAR_END = 0.025


def instances(scale_factor: float = 1.0) -> ModelConfig:
    """32 px, f=4 like shapes, but 8 latent channels and one residual block per VAE level for the finer detail,
    and a 96-wide UNet."""
    base = shapes(scale_factor)
    vae = {"ddconfig": {**base.vae["ddconfig"], "num_res_blocks": 1, "z_channels": Z_CHANNELS}, "embed_dim": Z_CHANNELS}
    unet = {**base.unet, "in_channels": Z_CHANNELS, "out_channels": Z_CHANNELS, "model_channels": UNET_WIDTH}
    return base.with_(name=NAME, vae=vae, unet=unet, linear_end=LINEAR_END)
