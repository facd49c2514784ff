"""The shapes model's configuration: SD1 classes at toy size (32 px images, f=4 VAE, 8×8 latents)."""

from __future__ import annotations

from ldm.config import ModelConfig

NAME = "shapes"


def shapes(scale_factor: float = 1.0) -> ModelConfig:
    """A small SD1-class model for the shapes world; scale_factor is measured after the VAE is trained."""
    return ModelConfig(
        name=NAME,
        unet=dict(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=64,
            attention_resolutions=[1, 2],
            num_res_blocks=1,
            channel_mult=[1, 2],
            num_heads=4,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=64,
            use_checkpoint=False,
            legacy=False,
        ),
        vae={
            "ddconfig": dict(
                double_z=True,
                z_channels=4,
                resolution=32,
                in_channels=3,
                out_ch=3,
                ch=64,
                ch_mult=[1, 1, 1],
                num_res_blocks=0,
                attn_resolutions=[],
                dropout=0.0,
            ),
            "embed_dim": 4,
        },
        text=dict(kind="clip", vocab_size=49408, width=64, layers=2, heads=4, context_length=77),
        tokenizer="sd1",
        scale_factor=scale_factor,
        image_size=32,
        steps=25,
        guidance=3.0,
    )
