"""LatentDiffusion: the frozen model as one object — encode images and prompts, sample, edit, decode.

Rombach et al. 2022 (High-Resolution Image Synthesis with Latent Diffusion Models); classifier-free guidance
from Ho & Salimans 2022. Editing: image-to-image as SDEdit (Meng et al. 2022) the way the original Stable
Diffusion `scripts/img2img.py` runs it, and localized editing with a mask as Blended Latent Diffusion (Avrahami,
Fried and Lischinski 2023).

Masks: white (> 50 % grey) marks what to edit; any PIL mode (converted to luminance), a (H, W) or (B, 1, H, W)
tensor/array in [0, 1]. A mask of another size than the images is resized (nearest) with a warning; an empty
mask is a ValueError (nothing to edit); a full mask is plain image-to-image. The latent mask marks every latent
cell that holds at least one masked pixel; after decoding, every pixel outside the (dilated) pixel mask is the
input pixel, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm import config as configs
from ldm import samplers
from ldm.bert import LDMBertTextModel
from ldm.config import ModelConfig
from ldm.images import ImageInput, as_uint8, blend_pixels, feather, mask_tensor, to_pil
from ldm.precision import CudaGraphStep
from ldm.schedule import Schedule
from ldm.text import CLIPTextModel, OpenCLIPTextModel
from ldm.tokenizer import Tokenizer
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL
from ldm.wordpiece import WordPieceTokenizer

log = logging.getLogger(__name__)


def build_text_encoder(text: dict) -> nn.Module:
    """The text tower named by `text["kind"]`, built from the remaining keys."""
    params = {k: v for k, v in text.items() if k != "kind"}
    kind = text.get("kind")
    if kind == "clip":
        return CLIPTextModel(**params)
    if kind == "openclip":
        return OpenCLIPTextModel(**params)
    if kind == "ldmbert":
        return LDMBertTextModel(**params)
    raise ValueError(f"unknown text tower kind {kind!r}")


def build_modules(
    config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """UNet, VAE and text tower of `config` (on the meta device they allocate nothing)."""
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
        return Tokenizer(config.tokenizer, context_length=config.text.get("context_length", 77))
    if config.tokenizer == "bert":
        return WordPieceTokenizer(None, context_length=config.text.get("max_seq_len", 77))
    raise ValueError(f"unknown tokenizer {config.tokenizer!r}")


class LatentDiffusion(nn.Module):
    """A text-to-image latent diffusion model: UNet, VAE, text tower, tokenizer and noise schedule."""

    def __init__(
        self, config: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, schedule
    ) -> None:
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

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
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

    def encode_prompts(self, prompts: str | Sequence[str], extra: torch.Tensor | None = None) -> torch.Tensor:
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
            raise ValueError(f"embedding for {token!r} has shape {tuple(vectors.shape)}; this model needs (n, {width})")
        ids = self.tokenizer.add_placeholder(token, vectors.shape[0])
        have = 0 if self.extra_embeddings is None else self.extra_embeddings.shape[0]
        first = self.text_encoder.token_embedding.weight.shape[0] + have
        if ids != list(range(first, first + len(ids))):
            raise RuntimeError(f"placeholder ids {ids} are not the next free rows (expected from {first})")
        rows = vectors.detach().to(self.device, self.dtype)
        self.extra_embeddings = rows if self.extra_embeddings is None else torch.cat([self.extra_embeddings, rows])
        return ids

    # -- sampling -----------------------------------------------------------------------------------------

    def guided_model_fn(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Classifier-free guidance: out = out_u + s·(out_c − out_u), both branches in one UNet call."""

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.dtype)
            if uncond is None:
                return self.unet(x, t, cond)
            out_u, out_c = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            return out_u + scale * (out_c - out_u)

        return model_fn

    def _check_sampling(self, sampler: str, steps: int, height: int, width: int) -> None:
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        f = self.latent_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for this model, got {height}×{width}")

    def _guided(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, scale: float
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The guided model function of prompts and their negative prompts (empty by default)."""
        negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError("give one negative prompt per prompt")
        cond = self.encode_prompts(prompts)
        uncond = None if scale == 1.0 else self.encode_prompts(negative_prompts)
        return self.guided_model_fn(cond, uncond, scale)

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        scale: float | None = None,
        eta: float = 0.0,
        sampler: str = "ddim",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Sample scaled latents for a batch of prompts; row i is seeded with seed + i. Steps, guidance scale and
        size default to the model's own (`config.steps`, `config.guidance`, `config.image_size`).

        `cuda_graph` captures the guided UNet step once and replays it (CUDA only; eager elsewhere)."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        scale = cfg.guidance if scale is None else scale
        height, width = height or cfg.image_size, width or cfg.image_size
        self._check_sampling(sampler, steps, height, width)
        prompts = list(prompts)
        model_fn = self._guided(prompts, negative_prompts, scale)
        vf = self.config.vae_factor
        shape = (1, self.config.unet["out_channels"], height // vf, width // vf)
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
        x_T = torch.cat([torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in generators])
        bar = tqdm(
            total=len(samplers.timesteps(steps, self.schedule.num_timesteps)) if sampler in ("ddim", "plms") else steps,
            desc=f"{sampler} sampling",
            disable=not progress,
            leave=False,
        )

        def on_step(i: int, t: int, x: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, t, x)

        if cuda_graph:
            t0 = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
            model_fn = CudaGraphStep(model_fn, x_T, t0)
        try:
            return samplers.SAMPLERS[sampler](
                model_fn, x_T, self.schedule, steps, eta=eta, generator=generators, callback=on_step
            )
        finally:
            bar.close()

    @torch.no_grad()
    def sample(
        self,
        prompts: str | Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        scale: float | None = None,
        eta: float = 0.0,
        sampler: str = "ddim",
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
        cuda_graph: bool = False,
    ) -> list[Image.Image]:
        """Text → PIL images; image k of a batch equals image 0 of a single run seeded seed + k."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        latents = self.sample_latents(
            prompts, negative_prompts, steps, scale, eta, sampler, seed, height, width, callback, progress, cuda_graph
        )
        return to_pil(self._decode_checked(latents, seed))

    def _decode_checked(self, latents: torch.Tensor, seed: int) -> torch.Tensor:
        """Decode row by row; NaN/inf rows are clamped with a warning naming their seeds."""
        images = torch.cat([self.decode_latents(z[None]) for z in latents])
        bad = [i for i in range(len(images)) if not bool(torch.isfinite(images[i]).all())]
        if bad:  # fp16 overflow (often the SD 2.x VAE) shows as black images: say so instead of failing quietly
            log.warning(
                "NaN/inf in %d of %d sample(s) (seeds %s) with %s; their pixels are clamped, expect black "
                "pixels — use DTYPE=bf16 or fp32",
                len(bad),
                len(images),
                ", ".join(str(seed + i) for i in bad),
                str(self.dtype).removeprefix("torch."),
            )
            images = torch.nan_to_num(images.float(), nan=-1.0, posinf=1.0, neginf=-1.0)
        return images

    # -- editing ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def edit_latents(
        self,
        latents: torch.Tensor | None,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        *,
        noise: torch.Tensor,
        strength: float = 0.75,
        steps: int = 50,
        scale: float = 7.5,
        eta: float = 0.0,
        sampler: str = "ddim",
        mask: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """SDEdit (Meng et al. 2022) from scaled input latents, noised with `noise`; with a latent mask
        (1 = edit, (B|1, 1, h, w)) Blended Latent Diffusion (Avrahami et al. 2023, Alg. 1).

        `latents` may be None only for strength 1 without a mask (pure noise: text-to-image)."""
        _check_strength(strength)
        vf = self.config.vae_factor
        self._check_sampling(sampler, steps, noise.shape[-2] * vf, noise.shape[-1] * vf)
        ts = samplers.sampler_timesteps(sampler, steps, self.schedule.num_timesteps)
        n = len(ts)
        if (mask is not None or strength < 1.0) and latents is None:
            raise ValueError("image-to-image needs the input latents")
        if latents is not None:
            latents = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        if strength == 1.0:
            start, x = 0, noise
        else:
            t_enc = int(strength * steps)
            if t_enc == 0:
                log.warning(
                    "strength %g × %d steps < 1: no denoising step runs, the output is the input re-encoded",
                    strength,
                    steps,
                )
            if sampler == "ddim":
                # As img2img.py: DDIMSampler.stochastic_encode(z, t_enc) noises to the DDIM subsequence's index
                # t_enc (ascending, ᾱ of timestep ts_asc[t_enc]), then decode(z, c, t_start=t_enc) runs
                # ts_asc[:t_enc] in reverse, so its first step is ts_asc[t_enc − 1] with that index's ᾱ. The
                # off-by-one is the original's: the latents enter one DDIM step noisier than the step that
                # denoises them assumes. Index t_enc = n, which the original cannot index, only arises for
                # S = 1000 (one timestep dropped, see samplers.timesteps) and is clamped to n − 1.
                t_enc = min(t_enc, n - 1)
                level, start = ts[::-1][t_enc], n - t_enc
            else:  # the other samplers run their last t_enc steps from latents noised to the first one's level
                start = n - min(t_enc, n)
                level = ts[min(start, n - 1)]
            x = self.schedule.q_sample(latents, level, noise)
        hook = None
        if mask is not None:
            edit = mask.to(self.device, torch.float32)
            keep = 1.0 - edit

            def hook(i: int, t: int, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
                """Outside the mask: the input latents noised to the level x has reached (Blended LD)."""
                if alpha_bar >= 1.0:
                    background = latents
                else:
                    fresh = samplers.noise_like(latents, generator)
                    background = alpha_bar**0.5 * latents + (1.0 - alpha_bar) ** 0.5 * fresh
                return edit * x + keep * background.to(x.dtype)

        bar = tqdm(total=n - start, desc=f"{sampler} editing", disable=not progress, leave=False)

        def on_step(i: int, t: int, x: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, t, x)

        try:
            return samplers.SAMPLERS[sampler](
                self._guided(list(prompts), negative_prompts, scale),
                x,
                self.schedule,
                steps,
                eta=eta,
                generator=generator,
                callback=on_step,
                start=start,
                hook=hook,
            )
        finally:
            bar.close()

    @torch.no_grad()
    def edit(
        self,
        images: ImageInput,
        prompts: str | Sequence[str],
        *,
        mask=None,
        strength: float = 0.75,
        steps: int = 50,
        scale: float = 7.5,
        eta: float = 0.0,
        sampler: str = "ddim",
        negative_prompts: Sequence[str] | None = None,
        seed: int | None = None,
        mask_dilate: int = 0,
        mask_blur: int = 0,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
    ) -> list[Image.Image]:
        """Edit images with a prompt: SDEdit image-to-image, or with `mask` (white = edit) Blended Latent
        Diffusion followed by a pixel blend (feathered `mask_blur` px inside the mask) that keeps every pixel
        outside the mask. One image with many prompts (or one prompt with many images) is repeated; row i is
        seeded seed + i, and at strength 1 without a mask row i equals `sample(..., seed=seed)`'s row i."""
        _check_strength(strength)
        original = as_uint8(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(original) == 1 and len(prompts) > 1:
            original = np.repeat(original, len(prompts), axis=0)
        elif len(prompts) == 1 and len(original) > 1:
            prompts = prompts * len(original)
        if len(prompts) != len(original):
            raise ValueError(f"got {len(original)} images and {len(prompts)} prompts; give one of either, or as many")
        batch, height, width = original.shape[:3]
        self._check_sampling(sampler, steps, height, width)
        pixel_mask = None
        if mask is not None:
            pixel_mask = mask_tensor(mask, height, width, mask_dilate)
            if pixel_mask.shape[0] not in (1, batch):
                raise ValueError(f"got {pixel_mask.shape[0]} masks for {batch} images; give one, or one per image")
            pixel_mask = pixel_mask.expand(batch, -1, -1, -1)
            empty = [i for i in range(batch) if not bool(pixel_mask[i].any())]
            if empty:
                raise ValueError(
                    "the mask is empty (no white pixel): nothing to edit"
                    + (f" (image {empty[0]})" if batch > 1 else "")
                )
            if bool(pixel_mask.all()):
                log.info("the mask covers the whole image: plain image-to-image")
                pixel_mask = None
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(batch)]
        vf = self.config.vae_factor
        shape = (1, self.config.unet["out_channels"], height // vf, width // vf)
        noise = torch.cat(
            [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in generators]
        )
        latents = latent_mask = None
        if strength < 1.0 or pixel_mask is not None:
            pixels = torch.from_numpy(original).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            post = self.posterior(pixels)  # a posterior draw per row from its own generator, as img2img.py samples
            latents = (
                torch.cat(
                    [
                        post.mean[i : i + 1].float()
                        + post.std[i : i + 1].float()
                        * torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
                        for i, g in enumerate(generators)
                    ]
                )
                * self.config.scale_factor
            )
        if pixel_mask is not None:
            latent_mask = F.max_pool2d(pixel_mask, vf)  # a latent cell is edited if any of its pixels is
        out = self.edit_latents(
            latents,
            prompts,
            negative_prompts,
            noise=noise,
            strength=strength,
            steps=steps,
            scale=scale,
            eta=eta,
            sampler=sampler,
            mask=latent_mask,
            generator=generators,
            callback=callback,
            progress=progress,
        )
        edited = np.stack([np.asarray(im) for im in to_pil(self._decode_checked(out, seed))])
        if pixel_mask is not None:
            edited = blend_pixels(edited, original, feather(pixel_mask, mask_blur))
        return [Image.fromarray(a) for a in edited]


def _check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength!r}")


def _randomise_zero_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised layers (the original zero_module outputs) small random weights."""
    for p in module.parameters():
        if p.ndim > 1 and not bool(p.detach().abs().sum()):
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def tiny_model(seed: int = 0) -> LatentDiffusion:
    """A tiny random-initialised SD1-class model (64-px images) for tests and offline smoke runs."""
    config = configs.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(config)
        _randomise_zero_weights(unet, torch.Generator().manual_seed(seed))
    model = LatentDiffusion(config, unet, vae, text_encoder, build_tokenizer(config), Schedule.from_config(config))
    return model.eval().requires_grad_(False)
