"""Model configurations: one frozen dataclass, presets named after the public checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

SCALE_FACTOR = 0.18215
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TIMESTEPS = 1000


def _sd_unet(context_dim: int, **over: Any) -> dict:
    params = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=context_dim,
        use_checkpoint=True,
        legacy=False,
    )
    params.update(over)
    return params


def _sd_vae(**over: Any) -> dict:
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        dropout=0.0,
    )
    ddconfig.update(over)
    return {"ddconfig": ddconfig, "embed_dim": 4}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one latent diffusion model: sub-model params under original names."""

    name: str
    unet: dict = field(default_factory=dict)  # unet_config.params, verbatim
    vae: dict = field(default_factory=dict)  # {"ddconfig": ..., "embed_dim": ...}
    text: dict = field(default_factory=dict)  # {"kind": "clip" | "openclip" | "ldmbert", **ctor}
    tokenizer: str = "sd1"  # "sd1" | "sd2" | "bert"
    parameterization: str = "eps"  # "eps" | "v"
    scale_factor: float = SCALE_FACTOR
    linear_start: float = LINEAR_START
    linear_end: float = LINEAR_END
    timesteps: int = NUM_TIMESTEPS
    image_size: int = 512  # default sampling size in pixels
    steps: int = 50
    guidance: float = 7.5

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamplings)."""
        return 2 ** (len(self.vae["ddconfig"]["ch_mult"]) - 1)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def sd1() -> ModelConfig:
    """Stable Diffusion 1.x (v1-inference.yaml)."""
    return ModelConfig(
        name="sd1",
        unet=_sd_unet(768),
        vae=_sd_vae(),
        text=dict(kind="clip", vocab_size=49408, width=768, layers=12, heads=12, context_length=77),
        tokenizer="sd1",
        image_size=512,
        guidance=7.5,
    )


def sd2() -> ModelConfig:
    """Stable Diffusion 2.x base, 512 px, eps (v2-inference.yaml)."""
    unet = _sd_unet(1024, num_head_channels=64, use_linear_in_transformer=True, use_fp16=True)
    del unet["num_heads"]
    return ModelConfig(
        name="sd2",
        unet=unet,
        vae=_sd_vae(),
        text=dict(
            kind="openclip", vocab_size=49408, width=1024, layers=24, heads=16, context_length=77, output="penultimate"
        ),
        tokenizer="sd2",
        image_size=512,
        guidance=9.0,
    )


def sd2_v() -> ModelConfig:
    """Stable Diffusion 2.x 768-v (v2-inference-v.yaml)."""
    return sd2().with_(name="sd2-v", parameterization="v", image_size=768)


def ldm_1p4b() -> ModelConfig:
    """The paper's LDM-1.4B text-to-image model (txt2img-1p4B-eval.yaml)."""
    return ModelConfig(
        name="ldm-1.4b",
        unet=_sd_unet(1280),
        vae=_sd_vae(),
        text=dict(kind="ldmbert", vocab_size=30522, width=1280, layers=32, heads=8, dim_head=64, max_seq_len=77),
        tokenizer="bert",
        image_size=256,
        steps=50,
        guidance=5.0,
    )


def tiny() -> ModelConfig:
    """A tiny random model of the SD1 classes for tests and offline smoke runs (64 px images)."""
    return ModelConfig(
        name="tiny",
        unet=dict(
            image_size=16,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[1, 2],
            num_res_blocks=1,
            channel_mult=[1, 2],
            num_heads=4,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=32,
            use_checkpoint=False,
            legacy=False,
        ),
        vae=_sd_vae(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=64),
        text=dict(kind="clip", vocab_size=49408, width=32, layers=2, heads=4, context_length=77),
        tokenizer="sd1",
        image_size=64,
        steps=10,
        guidance=7.5,
    )


PRESETS = {
    "sd1": sd1,
    "sd15": sd1,
    "sd2": sd2,
    "sd21": sd2,
    "sd2-v": sd2_v,
    "sd21-v": sd2_v,
    "ldm-1.4b": ldm_1p4b,
    "tiny": tiny,
}
