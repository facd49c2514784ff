"""LatentDiffusion: the frozen model as one object — encode images and prompts, sample, decode.

Rombach et al. 2022 (High-Resolution Image Synthesis with Latent Diffusion Models); classifier-free guidance
from Ho & Salimans 2022.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm import config as configs
from ldm.config import ModelConfig

log = logging.getLogger(__name__)


def build_text_encoder(text: dict) -> nn.Module:
    """The text tower named by `text["kind"]`, built from the remaining keys."""
    params = {k: v for k, v in text.items() if k != "kind"}
    kind = text.get("kind")
    if kind == "clip":
        from ldm.text import CLIPTextModel

        return CLIPTextModel(**params)
    if kind == "openclip":
        from ldm.text import OpenCLIPTextModel

        return OpenCLIPTextModel(**params)
    if kind == "ldmbert":
        from ldm.bert import LDMBertTextModel

        return LDMBertTextModel(**params)
    raise ValueError(f"unknown text tower kind {kind!r}")


def build_modules(config: ModelConfig, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """UNet, VAE and text tower of `config` (on the meta device they allocate nothing)."""
    from ldm.unet import UNetModel
    from ldm.vae import AutoencoderKL

    with torch.device(device or "cpu"):
        unet = UNetModel(**config.unet)
        vae = AutoencoderKL(**config.vae)
        text_encoder = build_text_encoder(config.text)
    if dtype is not None:
        for m in (unet, vae, text_encoder):
            m.to(dtype)
    return unet, vae, text_encoder


def build_tokenizer(config: ModelConfig):
    """The tokenizer that belongs to `config`: CLIP BPE for SD1/SD2, WordPiece for LDM-1.4B."""
    if config.tokenizer in ("sd1", "sd2"):
        from ldm.tokenizer import Tokenizer

        return Tokenizer(config.tokenizer, context_length=config.text.get("context_length", 77))
    if config.tokenizer == "bert":
        from ldm.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer(None, context_length=config.text.get("max_seq_len", 77))
    raise ValueError(f"unknown tokenizer {config.tokenizer!r}")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def image_grid(images: Sequence[Image.Image], cols: int | None = None, background: str = "white") -> Image.Image:
    """Images of one size in rows of `cols` (default: the most square layout), on a plain background."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), background)
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size → (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


class LatentDiffusion(nn.Module):
    """A text-to-image latent diffusion model: UNet, VAE, text tower, tokenizer and noise schedule."""

    def __init__(self, config: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer, schedule) -> None:
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.extra_embeddings: torch.Tensor | None = None  # rows for placeholder ids ≥ vocab size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        """Pixels per side that the whole model needs a multiple of (VAE factor × UNet downsampling)."""
        return self.config.vae_factor * 2 ** (len(self.config.unet["channel_mult"]) - 1)

    # -- images <-> latents -------------------------------------------------------------------------------

    def posterior(self, images: torch.Tensor):
        """The VAE posterior q(z|x) of images in [-1, 1] (unscaled z)."""
        return self.vae.encode(images.to(self.device, self.vae_dtype))

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (scale_factor · z)."""
        post = self.posterior(images)
        z = post.sample(generator=generator) if sample else post.mean
        return z * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1]."""
        return self.vae.decode(latents.to(self.vae_dtype) / self.config.scale_factor)

    # -- prompts -> context -------------------------------------------------------------------------------

    def token_embeddings(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Token vectors for ids: frozen table rows below the vocabulary size, rows of `extra` above it."""
        table = self.text_encoder.token_embedding.weight
        vocab = table.shape[0]
        ids = ids.to(table.device)
        embeds = F.embedding(ids.clamp(max=vocab - 1), table)
        is_new = ids >= vocab
        if not bool(is_new.any()):
            return embeds
        highest = int(ids.max()) - vocab
        if extra is None or highest >= extra.shape[0]:
            raise ValueError(f"token id {highest + vocab} is a placeholder with no learned vector")
        new = extra.to(device=table.device, dtype=embeds.dtype)[(ids - vocab).clamp(min=0)]
        return torch.where(is_new.unsqueeze(-1), new, embeds)

    def encode_prompts(self, prompts: str | Sequence[str], extra: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Prompts → the (B, 77, width) context the UNet cross-attends to."""
        ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts)).to(self.device)
        extra = self.extra_embeddings if extra is None else extra
        if extra is None:
            return self.text_encoder(ids)
        return self.text_encoder(self.token_embeddings(ids, extra))

    def add_embedding(self, token: str, vectors: torch.Tensor) -> list[int]:
        """Register a learned word (n, width) so prompts containing `token` use it."""
        width = self.text_encoder.token_embedding.weight.shape[1]
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise ValueError(f"embedding for {token!r} has shape {tuple(vectors.shape)}; "
                             f"this model needs (n, {width})")
        ids = self.tokenizer.add_placeholder(token, vectors.shape[0])
        have = 0 if self.extra_embeddings is None else self.extra_embeddings.shape[0]
        first = self.text_encoder.token_embedding.weight.shape[0] + have
        if ids != list(range(first, first + len(ids))):
            raise RuntimeError(f"placeholder ids {ids} are not the next free rows (expected from {first})")
        rows = vectors.detach().to(self.device, self.dtype)
        self.extra_embeddings = rows if self.extra_embeddings is None else torch.cat(
            [self.extra_embeddings, rows])
        return ids

    # -- sampling -----------------------------------------------------------------------------------------

    def guided_model_fn(self, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float
                        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Classifier-free guidance: out = out_u + s·(out_c − out_u), both branches in one UNet call."""

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.dtype)
            if uncond is None:
                return self.unet(x, t, cond)
            out_u, out_c = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            return out_u + scale * (out_c - out_u)

        return model_fn

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                       steps: int = 50, scale: float = 7.5, eta: float = 0.0, sampler: str = "ddim",
                       seed: int = 0, height: int = 512, width: int = 512,
                       callback: Callable[[int, int, torch.Tensor], None] | None = None,
                       progress: bool = True, cuda_graph: bool = False) -> torch.Tensor:
        """Sample scaled latents for a batch of prompts; row i is seeded with seed + i.

        `cuda_graph` captures the guided UNet step once and replays it (CUDA only; eager elsewhere)."""
        from ldm import samplers

        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        f = self.latent_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for this model, "
                             f"got {height}×{width}")
        prompts = list(prompts)
        negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError("give one negative prompt per prompt")
        cond = self.encode_prompts(prompts)
        uncond = None if scale == 1.0 else self.encode_prompts(negative_prompts)
        vf = self.config.vae_factor
        shape = (1, self.config.unet["out_channels"], height // vf, width // vf)
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
        x_T = torch.cat([torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
                         for g in generators])
        bar = tqdm(total=len(samplers.timesteps(steps, self.schedule.num_timesteps))
                   if sampler in ("ddim", "plms") else steps,
                   desc=f"{sampler} sampling", disable=not progress, leave=False)

        def on_step(i: int, t: int, x: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, t, x)

        model_fn = self.guided_model_fn(cond, uncond, scale)
        if cuda_graph:
            from ldm.precision import CudaGraphStep

            t0 = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
            model_fn = CudaGraphStep(model_fn, x_T, t0)
        try:
            return samplers.SAMPLERS[sampler](model_fn, x_T, self.schedule, steps, eta=eta, generator=generators,
                                              callback=on_step)
        finally:
            bar.close()

    @torch.no_grad()
    def sample(self, prompts: str | Sequence[str], negative_prompts: Sequence[str] | None = None,
               steps: int = 50, scale: float = 7.5, eta: float = 0.0, sampler: str = "ddim",
               seed: int | None = None, height: int = 512, width: int = 512,
               callback: Callable[[int, int, torch.Tensor], None] | None = None,
               progress: bool = True, cuda_graph: bool = False) -> list[Image.Image]:
        """Text → PIL images; image k of a batch equals image 0 of a single run seeded seed + k."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        latents = self.sample_latents(prompts, negative_prompts, steps, scale, eta, sampler, seed, height,
                                      width, callback, progress, cuda_graph)
        images = torch.cat([self.decode_latents(z[None]) for z in latents])
        bad = [i for i in range(len(images)) if not bool(torch.isfinite(images[i]).all())]
        if bad:  # fp16 overflow (often the SD 2.x VAE) shows as black images: say so instead of failing quietly
            log.warning("NaN/inf in %d of %d sample(s) (seeds %s) with %s; their pixels are clamped, expect black "
                        "pixels — use DTYPE=bf16 or fp32", len(bad), len(images),
                        ", ".join(str(seed + i) for i in bad), str(self.dtype).removeprefix("torch."))
            images = torch.nan_to_num(images.float(), nan=-1.0, posinf=1.0, neginf=-1.0)
        return to_pil(images)


def _randomise_zero_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised layers (the original zero_module outputs) small random weights."""
    for p in module.parameters():
        if p.ndim > 1 and not bool(p.detach().abs().sum()):
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def tiny_model(seed: int = 0) -> LatentDiffusion:
    """A tiny random-initialised SD1-class model (64-px images) for tests and offline smoke runs."""
    from ldm.schedule import Schedule

    config = configs.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(config)
        _randomise_zero_weights(unet, torch.Generator().manual_seed(seed))
    model = LatentDiffusion(config, unet, vae, text_encoder, build_tokenizer(config),
                            Schedule.from_config(config))
    return model.eval().requires_grad_(False)
