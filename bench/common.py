"""Shared benchmark fixtures: one set of random SD1 weights loaded into oneword AND diffusers/transformers.

Route (as the parity tests do): our modules at random init → the original single-file key dict →
diffusers' own converters (`diffusers.loaders.single_file_utils`) → UNet2DConditionModel, AutoencoderKL and a
transformers CLIPTextModel. The diffusers modules are built on the meta device and loaded with `assign=True`,
so on the CPU both libraries read the very same weight storage (one copy of a full-size model, ≈ 4.3 GB fp32).
diffusers and transformers are benchmark oracles only; library code never imports them.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm import config as configs
from ldm.config import ModelConfig

log = logging.getLogger(__name__)

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model.transformer."}


# --- process memory (CPU) ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim) so that RSS deltas see re-used memory too."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RSSPeak:
    """Peak resident set of this process over a `with` block, minus the RSS at its start (MiB).

    The heap is trimmed first, otherwise memory freed by an earlier repetition and re-used here would not
    show. Linux only: resets the high-water mark through /proc/self/clear_refs ("5") and reads VmHWM; elsewhere
    `delta_mib` stays None (getrusage's ru_maxrss is a process-lifetime peak and cannot be reset).
    """

    def __init__(self) -> None:
        self.delta_mib: float | None = None
        self.start_mib: float | None = None
        self._ok = False

    def __enter__(self) -> RSSPeak:
        trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._ok = True
        except OSError:
            self._ok = False
        rss = _status_kib("VmRSS")
        self.start_mib = rss / 1024 if rss is not None else None
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM")
        if self._ok and hwm is not None and self.start_mib is not None:
            self.delta_mib = hwm / 1024 - self.start_mib


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


# --- our modules and the single-file key dict --------------------------------------------------------------


def get_config(name: str) -> ModelConfig:
    """A preset by name; only the SD1 classes (CLIP text tower) are benchmarked against diffusers."""
    cfg = configs.PRESETS[name]()
    if cfg.text.get("kind") != "clip":
        raise NotImplementedError(
            f"bench compares SD1-class models only (CLIP text tower); {name!r} is {cfg.text.get('kind')}"
        )
    return cfg


def random_modules(config: ModelConfig, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Our UNet, VAE and text tower at random init; zero-initialised layers get small random weights."""
    from ldm.pipeline import build_modules

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text = build_modules(config)
    g = torch.Generator().manual_seed(seed + 1)
    for p in unet.parameters():  # the original zero_module() outputs: a zero layer would make the UNet trivial
        if p.ndim > 1 and not bool(p.detach().abs().sum()):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return unet, vae, text


def original_state_dict(unet: nn.Module, vae: nn.Module, text: nn.Module) -> dict[str, torch.Tensor]:
    """The single-file checkpoint layout (`model.diffusion_model.*`, …), sharing storage with the modules."""
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in zip((PREFIXES["unet"], PREFIXES["vae"], PREFIXES["clip"]), (unet, vae, text)):
        sd.update({prefix + k: v.detach() for k, v in module.state_dict().items()})
    return sd


def original_config(config: ModelConfig) -> dict:
    """The v1-inference.yaml layout (model.params.*_config.params) diffusers' converters read."""
    return {
        "model": {
            "params": {
                "unet_config": {"params": dict(config.unet)},
                "first_stage_config": {"params": dict(config.vae)},
                "scale_factor": config.scale_factor,
            }
        }
    }


def oneword_model(config: ModelConfig, unet: nn.Module, vae: nn.Module, text: nn.Module):
    """LatentDiffusion over the given modules with the config's tokenizer and schedule."""
    from ldm.pipeline import LatentDiffusion, build_tokenizer
    from ldm.schedule import Schedule

    model = LatentDiffusion(config, unet, vae, text, build_tokenizer(config), Schedule.from_config(config))
    return model.eval().requires_grad_(False)


# --- the two models over one set of weights ----------------------------------------------------------------


@dataclass
class Setup:
    config: object
    ours: object  # ldm LatentDiffusion
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    pipe: object  # diffusers StableDiffusionPipeline
    build_s: float


def build(config_name: str, seed: int, tmp: Path) -> Setup:
    t0 = time.perf_counter()
    config = get_config(config_name)
    unet, vae, text = random_modules(config, seed)
    sd = original_state_dict(unet, vae, text)
    d_unet, d_vae, d_text = diffusers_modules(sd, config)
    del sd
    ours = oneword_model(config, unet, vae, text)
    tok = hf_tokenizer(tmp / "tokenizer")
    pipe = diffusers_pipeline(d_unet, d_vae, d_text, tok, config)
    return Setup(config, ours, d_unet, d_vae, d_text, tok, pipe, time.perf_counter() - t0)


def place(modules, device: torch.device, dtype: torch.dtype) -> None:
    for m in modules:
        p = next(m.parameters())
        if p.device != device or p.dtype != dtype:
            m.to(device=device, dtype=dtype)


# --- diffusers / transformers side -------------------------------------------------------------------------


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Strict load by assignment into a meta-built module; fails on any tensor left on meta."""
    module.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if name.endswith("position_ids"):
                owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:
                raise RuntimeError(f"{what}: buffer {name} was not in the converted state dict")
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{what}: parameters left on meta: {left[:5]}")
    return module.eval().requires_grad_(False)


def diffusers_modules(sd: dict[str, torch.Tensor], config: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """UNet2DConditionModel, AutoencoderKL and transformers CLIPTextModel from an original-layout state dict,
    converted by diffusers' single-file converters (no network)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    orig = original_config(config)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(orig, sd)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(orig, sd)
    unet_sd = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
    vae_sd = sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)
    text_sd = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(sd).items()}
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    t = config.text
    text_cfg = CLIPTextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["width"],
        intermediate_size=4 * t["width"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=t["context_length"],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text = CLIPTextModel(text_cfg)
    return (
        _assign(unet, unet_sd, "diffusers UNet"),
        _assign(vae, vae_sd, "diffusers VAE"),
        _assign(text, text_sd, "transformers CLIPTextModel"),
    )


def hf_tokenizer(folder: str | Path):
    """transformers' CLIPTokenizer built offline from open_clip's BPE merges; pads with EOS."""
    from transformers import CLIPTokenizer

    from ldm.tokenizer import NUM_MERGES, bytes_to_unicode, default_bpe_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def ddim_scheduler(config: ModelConfig):
    """diffusers DDIMScheduler equal to CompVis DDIM ("leading" spacing, offset 1, ᾱ_prev(last) = ᾱ₀)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=config.timesteps,
        beta_start=config.linear_start,
        beta_end=config.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def diffusers_pipeline(unet: nn.Module, vae: nn.Module, text: nn.Module, tokenizer, config: ModelConfig):
    """StableDiffusionPipeline without safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- a full-size checkpoint on disk (the load-time report) ---------------------------------------------------


def write_checkpoint(
    path: str | Path, config_name: str = "sd1", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Write random weights of `config_name` as a single-file .safetensors (original keys + alphas_cumprod)."""
    from safetensors.torch import save_file

    from ldm.schedule import Schedule

    config = get_config(config_name)
    unet, vae, text = random_modules(config, seed)
    sd = {k: v.to(dtype).contiguous() for k, v in original_state_dict(unet, vae, text).items()}
    sd["alphas_cumprod"] = Schedule.from_config(config).alphas_cumprod.float()
    del unet, vae, text
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path


def load_seconds(path: str | Path, dtype: torch.dtype) -> float:
    """Wall time of `ldm.load_model(path, dtype=dtype)` on the CPU (strict load of every tensor)."""
    import time

    import ldm

    t0 = time.perf_counter()
    model = ldm.load_model(path, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - t0
    if next(model.unet.parameters()).dtype != dtype:
        raise RuntimeError(f"load_model gave {next(model.unet.parameters()).dtype}, asked for {dtype}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """`write PATH`: a random full-size checkpoint; `load PATH`: time ldm.load_model on it (run under
    /usr/bin/time -v for the peak RSS)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.common", description=main.__doc__)
    p.add_argument("action", choices=("write", "load"))
    p.add_argument("path")
    p.add_argument("--config", default="sd1")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    a = p.parse_args(argv)
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    if a.action == "write":
        write_checkpoint(a.path, a.config, dtype)
    else:
        print(f"ldm.load_model({a.path}, dtype={a.dtype}): {load_seconds(a.path, dtype):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
