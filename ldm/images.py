"""Images in and out of the model: PIL ↔ [-1, 1] tensors, grids, and the masks of localized editing."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


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


ImageInput = Image.Image | Sequence[Image.Image] | torch.Tensor


def as_uint8(images: ImageInput) -> np.ndarray:
    """PIL image(s) or a (B, 3, H, W) tensor in [-1, 1] → uint8 (B, H, W, 3) (the tensor rounded like to_pil)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        return np.stack([np.asarray(im) for im in to_pil(images)])
    images = list(images)
    if not images:
        raise ValueError("no image to edit")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"the images to edit differ in size ({', '.join(f'{w}×{h}' for w, h in sorted(sizes))})")
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def mask_tensor(
    mask: Image.Image | Sequence[Image.Image] | torch.Tensor | np.ndarray, height: int, width: int, dilate: int = 0
) -> torch.Tensor:
    """A user's mask → binary (B, 1, H, W) float32, 1 = edit: luminance > 0.5, resized to H×W, dilated `dilate` px."""
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32) if isinstance(mask, np.ndarray) else mask).float()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] != 1 else m[None]
        if m.ndim != 4 or m.shape[1] not in (1, 3):
            raise ValueError(f"a mask tensor must be (H, W), (B, H, W) or (B, 1|3, H, W), got {tuple(mask.shape)}")
        m = m.mean(1, keepdim=True)
    else:
        m = torch.stack([torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None] for im in mask])
    if m.shape[-2:] != (height, width):
        log.warning(
            "the mask is %d×%d and the image %d×%d: the mask is resized to the image",
            m.shape[-1],
            m.shape[-2],
            width,
            height,
        )
        m = F.interpolate(m, size=(height, width), mode="nearest")
    m = (m > 0.5).float()
    if dilate < 0:
        raise ValueError(f"mask dilation must be >= 0 pixels, got {dilate}")
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Blend weights that ramp from 1/radius at the mask's edge to 1 `radius` px inside; exactly 0 outside."""
    if radius < 0:
        raise ValueError(f"mask blur must be >= 0 pixels, got {radius}")
    if radius <= 1:
        return mask
    layers, m = [mask], mask
    for _ in range(radius - 1):  # erode by one pixel (3×3) per layer: weight = min(distance to outside, r)/r
        m = 1.0 - F.max_pool2d(1.0 - m, 3, stride=1, padding=1)
        layers.append(m)
    return torch.stack(layers).mean(0)


def blend_pixels(edited: np.ndarray, original: np.ndarray, weight: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3) images: weight·edited + (1 − weight)·original; weight 0 keeps the original exactly."""
    w = weight[:, 0, :, :, None].cpu().double().numpy()
    out = np.rint(w * edited + (1.0 - w) * original)
    return np.where(w > 0, out, original).astype(np.uint8)
