"""Shared test helpers: original-layout state dicts (real, meta or pattern-filled), diffusers folders made
by diffusers' own converters (an independent check of the key layout), and tiny `inversion.train` runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from ldm.checkpoint import PREFIXES
from ldm.config import ModelConfig
from ldm.pipeline import build_modules

ROOT = Path(__file__).resolve().parent.parent


def module_prefixes(config: ModelConfig) -> tuple[str, str, str]:
    return PREFIXES["unet"], PREFIXES["vae"], PREFIXES[config.text["kind"]]


def original_state_dict(unet, vae, text, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The single-file checkpoint layout of three modules (contiguous copies, safe to save)."""
    sd = {}
    for prefix, module in zip(module_prefixes(config), (unet, vae, text)):
        sd.update({prefix + k: v.detach().contiguous() for k, v in module.state_dict().items()})
    return sd


def meta_state_dict(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The complete key set and shapes of a config, allocating nothing."""
    return original_state_dict(*build_modules(config, device="meta"), config)


def pattern(index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A cheap, exactly representable, row-varying fill that tells tensors (and their rows) apart."""
    t = torch.empty(shape, dtype=dtype)
    if not shape:
        return t.fill_((index % 61) / 64)
    rows = ((torch.arange(shape[0]) + 7 * index) % 61).to(dtype) / 64 - 0.5
    t.copy_(rows.view(-1, *([1] * (len(shape) - 1))).expand(shape))
    return t


def full_size_state_dict(
    config: ModelConfig, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every key of the real single-file checkpoint, pattern-filled; also {key: pattern index}."""
    shapes = meta_state_dict(config)
    index = {k: i for i, k in enumerate(shapes)}
    return {k: pattern(index[k], tuple(v.shape), dtype) for k, v in shapes.items()}, index


def original_config(config: ModelConfig) -> dict:
    """The yaml layout (model.params.*_config.params) diffusers' converters read."""
    return {
        "model": {
            "params": {
                "unet_config": {"params": dict(config.unet)},
                "first_stage_config": {"params": dict(config.vae)},
                "scale_factor": config.scale_factor,
            }
        }
    }


def write_diffusers_folder(
    sd: dict[str, torch.Tensor], config: ModelConfig, folder: Path, drop_text_prefix: bool = False
) -> Path:
    """Convert a single-file state dict with diffusers' converters and save it as a diffusers folder."""
    from diffusers.loaders import single_file_utils as sfu

    orig = original_config(config)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(orig, sd)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(orig, sd)
    unet = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
    vae = sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)
    width = config.text["width"]
    if config.text["kind"] == "openclip":
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        text = sfu.convert_open_clip_checkpoint(stub, sd)
        act, layers = "gelu", len({k.split(".")[3] for k in text if k.startswith("text_model.encoder.layers.")})
    else:
        text = sfu.convert_ldm_clip_checkpoint(sd)
        act, layers = "quick_gelu", config.text["layers"]
    if drop_text_prefix:  # transformers 5.x CLIPTextModel.state_dict() has no `text_model.` level
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    text_cfg = {
        "hidden_act": act,
        "hidden_size": width,
        "num_attention_heads": config.text["heads"],
        "num_hidden_layers": layers,
        "vocab_size": config.text["vocab_size"],
    }
    sched = {
        "prediction_type": "v_prediction" if config.parameterization == "v" else "epsilon",
        "beta_schedule": "scaled_linear",
        "beta_start": config.linear_start,
        "beta_end": config.linear_end,
        "num_train_timesteps": config.timesteps,
    }
    for sub, weights, file, cfg, name in (
        ("unet", unet, "diffusion_pytorch_model", unet_cfg, "config.json"),
        ("vae", vae, "diffusion_pytorch_model", vae_cfg, "config.json"),
        ("text_encoder", text, "model", text_cfg, "config.json"),
        ("scheduler", None, None, sched, "scheduler_config.json"),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(json.dumps(cfg))
        if weights is not None:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / sub / f"{file}.safetensors"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def train_argv(tmp_path: Path, *extra: str, out: str = "run", steps: int = 3, save_every: int = 3) -> list[str]:
    """`inversion.train` arguments for a tiny 32-px run into tmp_path/out (latents cached in tmp_path/cache)."""
    return [
        "--concept",
        "cat",
        "--model",
        "tiny",
        "--size",
        "32",
        "--batch",
        "1",
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--val-every",
        "0",
        "--init",
        "cat",
        "--out",
        str(tmp_path / out),
        "--latent-cache",
        str(tmp_path / "cache"),
        "--no-progress",
        *extra,
    ]


def subprocess_env() -> dict:
    """Environment for a CLI subprocess: one OpenMP thread, warnings only, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "ONEWORD_LOG": "WARNING", "PYTHONPATH": str(ROOT)}
